"""Prompt text primitives and the synthetic MIMIC-style corpus."""

import hashlib
from collections import Counter

import pytest

from cxrmem.corpus import synthetic
from cxrmem.corpus.mimic import extract_prompt
from cxrmem.corpus.text import MARKER_REGEX, count_markers, normalise_whitespace, prompt_id

ORDER = ["IMPRESSION", "FINDINGS", "LAST_PARAGRAPH"]


def test_normalise_whitespace_collapses_runs_and_keeps_case_and_punctuation():
    assert normalise_whitespace("  No acute\n cardiopulmonary\t\tprocess.  \n") == "No acute cardiopulmonary process."
    assert normalise_whitespace("1. Small effusion.\n 2. AP chest, ___ ") == "1. Small effusion. 2. AP chest, ___"
    assert normalise_whitespace(" \n\t ") == ""


def test_prompt_id_is_sha256_prefix_of_utf8_text():
    text = "Compared to ___: small left pleural effusion, unchanged. Größe"
    assert prompt_id(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    assert len(prompt_id("x")) == 16
    assert prompt_id(normalise_whitespace("a \n b")) == prompt_id("a b") != prompt_id("a  b")


@pytest.mark.parametrize(
    "text, n",
    [
        ("No acute process.", 0),
        ("Compared to ___, Dr. ___ was notified at ___ a.m.", 3),
        ("a single _ underscore and __ two", 1),
        ("XXXX yr old with XXXXX and XXX", 2),
        ("snake_case is not a marker", 0),
    ],
)
def test_count_markers_default_regex(text, n):
    assert count_markers(text) == n
    assert count_markers(text, MARKER_REGEX) == n


def test_count_markers_custom_regex():
    assert count_markers("[** Name **] seen on [** Date **]", r"\[\*\*.*?\*\*\]") == 2


def test_synthetic_reports_are_reproducible_and_prefix_stable():
    n = synthetic.BLOCK + 50  # spans two blocks
    first = synthetic.generate_reports(n, seed=3)
    assert first == synthetic.generate_reports(n, seed=3)
    assert synthetic.generate_reports(200, seed=3) == first[:200]
    assert [r["text"] for r in synthetic.generate_reports(200, seed=4)] != [r["text"] for r in first[:200]]
    assert len({r["report_id"] for r in first}) == n
    assert set(first[0]) == {"report_id", "subject_id", "study", "text", "impression"}


def test_synthetic_reports_look_like_mimic_and_their_impression_is_extracted():
    reports = synthetic.generate_reports(500, seed=0)
    for report in reports:
        text = report["text"]
        for header in ("FINAL REPORT", "EXAMINATION:", "INDICATION:", "COMPARISON:", "FINDINGS:", "IMPRESSION:"):
            assert header in text
        assert "___-year-old" in text
        section, prompt = extract_prompt(text, ORDER)
        assert section == "IMPRESSION"
        assert normalise_whitespace(prompt) == normalise_whitespace(report["impression"])
        assert report["report_id"] == f"p{report['subject_id'][1:3]}/{report['subject_id']}/{report['study']}"
    impressions = " ".join(r["impression"] for r in reports)
    for keyword in ("cardiomegaly", "pleural effusion", "pneumothorax", "consolidation", "nodule", "Endotracheal tube"):
        assert keyword in impressions
    assert any(marker in impressions for marker in ("Compared to ___", "Dr. ___", "at ___ a.m."))


def test_synthetic_duplicates_are_heavy_tailed():
    reports = synthetic.generate_reports(20000, seed=1, marker_rate=0.3, normal_share=0.35)
    counts = Counter(normalise_whitespace(r["impression"]) for r in reports)
    (top, top_n), *_ = counts.most_common(1)
    assert top == "No acute cardiopulmonary process."
    assert top_n > 1000  # thousands of reports share a few normal impressions
    assert sum(1 for n in counts.values() if n == 1) > 0.7 * len(counts)  # most prompts are unique
    marked = sum(count_markers(r["impression"]) > 0 for r in reports) / len(reports)
    assert marked == pytest.approx(0.65 * 0.3, abs=0.02)  # marker_rate of the abnormal share


def _shapes(sizes: list[int]) -> dict[int, tuple[int, dict]]:
    """For each prefix size n of one seed-0 corpus: its unique prompts and the shares that describe their duplication."""
    counts, out = Counter(), {}
    for i, report in enumerate(synthetic.iter_reports(max(sizes), seed=0), 1):
        counts[normalise_whitespace(report["impression"])] += 1
        if i in sizes:
            values = sorted(counts.values(), reverse=True)
            out[i] = (len(counts), {
                "reports_per_unique": i / len(counts),
                "top_share": values[0] / i,  # the Zipf head: the commonest normal impression
                "seen_once": sum(v == 1 for v in values) / len(values),
                "in_prompts_of_10_or_more": sum(v for v in values if v >= 10) / i,
            })
    return out


def _assert_same_shape(large: dict, small: dict) -> None:
    assert large["reports_per_unique"] == pytest.approx(small["reports_per_unique"], rel=0.05)
    for key in ("top_share", "seen_once", "in_prompts_of_10_or_more"):
        assert large[key] == pytest.approx(small[key], abs=0.02), key


def test_synthetic_unique_prompts_grow_linearly_past_the_unstyled_blocks():
    """Before house styles, 246,000 reports gave 79,542 unique prompts: the single-finding phrasings ran out.
    Now each block past the unstyled ones brings a fresh style (n_styles grows by one a block up to 64
    styles, block 66, past 1M reports), so new prompts keep coming at the rate of the first styled
    blocks: that rate, from 98,304 reports on, reaches the 100K unique prompts that 100K x
    REPORTS_PER_UNIQUE reports must give (measured: 101,121; the full check is the slow test below)."""
    unstyled = synthetic.STYLED_FROM_BLOCK * synthetic.BLOCK
    n = unstyled + 2 * synthetic.BLOCK
    shapes = _shapes([unstyled, n])
    rate = (shapes[n][0] - shapes[unstyled][0]) / (n - unstyled)  # new unique prompts per report, blocks 4-5
    assert rate >= 1 / synthetic.REPORTS_PER_UNIQUE
    assert shapes[n][0] + rate * (100_000 * synthetic.REPORTS_PER_UNIQUE - n) >= 100_000
    assert all(synthetic.n_styles(b + 1) - synthetic.n_styles(b) == synthetic.STYLES_PER_BLOCK for b in range(3, 60))


@pytest.mark.slow
def test_synthetic_corpus_reaches_100k_unique_prompts_with_the_small_corpus_shape():
    """100K x REPORTS_PER_UNIQUE reports give 100K unique prompts, duplicated as 32K reports' are
    (5 s on an idle core, 14 s under load: marked slow)."""
    n = int(100_000 * synthetic.REPORTS_PER_UNIQUE)
    shapes = _shapes([32_768, n])
    assert shapes[n][0] >= 100_000
    _assert_same_shape(shapes[n][1], shapes[32_768][1])


def test_synthetic_styles_start_after_the_unstyled_blocks_and_grow_by_block():
    assert [synthetic.n_styles(b) for b in range(synthetic.STYLED_FROM_BLOCK)] == [1] * synthetic.STYLED_FROM_BLOCK
    assert synthetic.n_styles(synthetic.STYLED_FROM_BLOCK) == 1 + synthetic.STYLES_PER_BLOCK
    start = synthetic.STYLED_FROM_BLOCK * synthetic.BLOCK
    closes = tuple(c.strip() for c in synthetic._LEADS + synthetic._CLOSES if c)  # what a style adds
    reports = synthetic.generate_reports(start + 2000, seed=0)
    assert not any(c in r["impression"] for r in reports[:start] for c in closes)
    styled = [r["impression"] for r in reports[start:]]
    assert any(c in p for p in styled for c in closes)
    assert not any(p in synthetic.NORMAL_IMPRESSIONS and any(c in p for c in closes) for p in styled)


def test_synthetic_rates_are_honoured_and_checked():
    plain = synthetic.generate_reports(2000, seed=2, marker_rate=0.0, normal_share=0.0)
    assert not any(count_markers(r["impression"]) for r in plain)
    assert not any(r["impression"] in synthetic.NORMAL_IMPRESSIONS for r in plain)
    with pytest.raises(ValueError, match="marker_rate"):
        synthetic.generate_reports(10, marker_rate=1.5)


@pytest.mark.parametrize("text", ["\x00\x00\x00", "\u200b\u200c\u200d", "\ufeff \x01\x7f\t", "\u2060\u00ad\x00 \u200e"])
def test_text_of_only_nul_control_or_zero_width_characters_is_empty(text):
    assert normalise_whitespace(text) == ""


def test_visible_text_keeps_its_invisible_characters_and_its_id():
    text = "No acute\u200b process.\x00"
    assert normalise_whitespace(text) == text  # ids of existing prompts do not move


def test_invisible_only_rows_are_counted_as_empty_by_prepare(tiny_model_dir):
    from cxrmem.config import load_config
    from cxrmem.corpus.prompts import build_prompts_table
    from cxrmem.corpus.text import SourceText
    from cxrmem.models.loading import load_tokenizer

    tokenizer = load_tokenizer(load_config(None, [f"model.path={tiny_model_dir}"]).model)
    records = [SourceText("a", "\x00\x00"), SourceText("b", "\u200b\u200b"), SourceText("c", "Small effusion.")]
    table, counts = build_prompts_table(records, MARKER_REGEX, tokenizer, 128)
    assert table["prompt"].to_pylist() == ["Small effusion."]
    assert counts["skipped"] == {"empty": 2}
