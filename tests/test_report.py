"""report.html from real run files: figures embedded, text escaped, absent inputs reported, never a crash."""

import base64
import io
import json
import os
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmem.config import load_config
from cxrmem.runfiles import RunLayout
from cxrmem.stages import analyze, report
from tests.test_analysis import N, _ids_from_text, _pid, _write_run

VOID = {"meta", "img", "br", "hr", "link", "input"}


class TagBalance(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _check_html(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    parser = TagBalance()
    parser.feed(text)
    assert parser.errors == [] and parser.stack == []
    # Prompt text is escaped: the only script is the table's own, inline, and nothing is fetched.
    assert text.count("<script") == text.count("<script>\n// Sort the memorized table") <= 1
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert '<meta name="viewport"' in text


def _analyzed_run(tmp_path, overrides=()):
    rng = np.random.default_rng(1)
    d_mem = rng.normal(1.0, 0.05, N)
    d_mem[[0, 1, 2]] = [3.0, 2.5, 2.0]
    _write_run(tmp_path, d_mem, np.zeros(N, dtype=bool))
    cfg = load_config(None, [f"run.output={tmp_path}", "report.top_prompts=2", *overrides])
    analyze.run(cfg)
    return cfg, RunLayout(str(tmp_path))


def _write_attribution_and_mitigation(layout: RunLayout):
    """tokens.parquet, mitigation.parquet and one generations grid for the run's top three prompts.

    The `original` generations are white noise (over-guided) and the rewrites smooth images;
    remove_marker leaves the third prompt unchanged, as it does a prompt without a marker.
    """
    ids = pd.read_csv(layout.memorized, dtype={"prompt_id": str})["prompt_id"].head(3).tolist()
    units = ["Finding", "compared", "to", "___", "finding"]
    rows = [
        {"prompt_id": pid, "prompt": f"Finding {i}, compared to ___.", "unit": u, "unit_index": j,
         "is_marker": u == "___", "n_pieces": 3 if u == "___" else 1, "grad_score": float(5 - j),
         "grad_rank": float(j + 1), "loo_delta": float(j), "loo_rank": float(5 - j)}
        for i, pid in enumerate(ids) for j, u in enumerate(units)
    ]
    pq.write_table(pa.Table.from_pylist(rows), layout.tokens)
    strategies = ["original", "random_word", "remove_marker"]
    mitigation = []
    for i, pid in enumerate(ids):
        prompt = f"Finding {i} <script>x</script> & ___ original."
        for k, s in enumerate(strategies):
            text = prompt if s == "original" or (s == "remove_marker" and i == 2) else prompt.replace("original", s)
            mitigation.append({"prompt_id": pid, "prompt": prompt, "strategy": s, "mitigated_prompt": text,
                               "d_mem": 3.0 - i - 0.5 * k + 0.01 * i * k, "pairwise_distance": 0.3 + 0.05 * k + 0.01 * i})
    pq.write_table(pa.Table.from_pylist(mitigation), layout.mitigation)
    rng = np.random.default_rng(0)
    os.makedirs(layout.figures, exist_ok=True)
    smooth = np.outer(np.hanning(16), np.hanning(16))[None] * rng.uniform(0.5, 1.0, (4, 1, 1))
    grids = {"original": rng.random((4, 16, 16)), "random_word": smooth, "remove_marker": smooth[::-1]}
    np.savez(f"{layout.figures}/generations_{ids[0]}.npz", **grids)
    summary = json.loads(open(layout.summary).read())
    summary["attribution"] = {"prompts": 3, "prompts_with_marker": 3,
                              "gradient": {"marker_top1": 0.0, "marker_mean_rank": 4.0, "chance_top1": 0.2},
                              "leave_one_out": {"marker_top1": 0.0, "marker_mean_rank": 2.0, "chance_top1": 0.2},
                              "seconds": 1.25}
    open(layout.summary, "w").write(json.dumps(summary))


def test_full_report_embeds_every_figure(tmp_path):
    cfg, layout = _analyzed_run(tmp_path)
    _write_attribution_and_mitigation(layout)
    result = report.run(cfg)
    rendered = {k: "rendered" for k in ("run", "distribution", "memorized", "enrichment", "length", "attribution", "mitigation", "howto")}
    assert result.sections == {**rendered, "copies": "absent: copies.parquet"}  # no images.source
    text = open(layout.report, encoding="utf-8").read()
    _check_html(text)
    # The card's best mitigation says what it was judged by, and that its cost to the image is unknown here
    assert "judged by d_mem alone" in text and "fidelity not measured" in text
    # The page is report.SECTIONS in order: the nav links each heading, optional sections absent here are left out
    from cxrmem.report import SECTIONS

    keys = [s.key for s in SECTIONS if s.key in result.sections]
    nav = text[text.index("<nav>"):text.index("</nav>")]
    assert re.findall(r'href="#(\w+)"', nav) == keys == re.findall(r'<h2 id="(\w+)"', text) == list(result.sections)
    assert "detectors" not in keys and "cascade" not in keys
    names = sorted(p.rsplit("/", 1)[-1] for p in result.figures)
    # Fig. 2 + histogram, enrichment, length, 2 prompts x 2 attribution methods, mitigation chart, one image grid
    assert names == sorted(["dmem_sorted.png", "dmem_histogram.png", "marker_enrichment.png", "length.png", "mitigation.png",
                            f"grid_{_pid(0)}.png"] + [f"tokens_{_pid(i)}_{m}.png" for i in (0, 1) for m in ("grad_score", "loo_delta")])
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == len(result.figures)
    for path in result.figures:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert base64.b64encode(data).decode() in embedded
    assert "&lt;script&gt;x&lt;/script&gt; &amp; <mark>___</mark>" in text  # escaped, marker still highlighted
    assert "<mark>___</mark>" in text  # markers highlighted in the memorized list
    assert "fp-test" in text and "attribute: seconds</td><td>1.25</td>" in text  # the attribution section's own duration
    assert "random_word" in text and "remove_marker" in text
    assert text.index('id="summary"') < text.index('id="distribution"') < text.index('id="run"')
    # The third prompt's remove_marker rewrite changed nothing: marked, and out of the statistics.
    assert "(unchanged: left out)" not in text  # the grid shows the first prompt only
    assert "over-guided" in text and "The unmitigated generations are over-guided" in text
    metrics = json.loads(open(layout.path("metrics.json")).read())
    assert metrics["memorized_count"] == 3 and all(isinstance(v, float) for v in metrics.values())
    assert metrics["mitigation.random_word.d_mem_change_mean"] < 0
    assert "Memorization audit" in open(layout.path("summary.md")).read()


def test_mitigation_leaves_unchanged_rewrites_out_and_pairs_with_original(tmp_path):
    from cxrmem.report import strategy_rows

    cfg, layout = _analyzed_run(tmp_path)
    _write_attribution_and_mitigation(layout)
    table = pq.read_table(layout.mitigation).to_pandas()
    rows = {r["strategy"]: r for r in strategy_rows(table, ["original", "random_word", "remove_marker"])}
    assert rows["random_word"]["fidelity_mean"] is None  # no fidelity column: nothing measured
    table["fidelity"] = np.where(table["strategy"] == "random_word", 0.25, 1.0)
    assert strategy_rows(table, ["random_word"])[0]["fidelity_mean"] == pytest.approx(0.25)
    assert rows["remove_marker"]["unchanged"] == 1 and rows["remove_marker"]["prompts"] == 2
    assert rows["random_word"]["unchanged"] == 0 and rows["random_word"]["prompts"] == 3
    change = rows["remove_marker"]["d_mem_change"]  # -1.0 and -0.98 over the two changed prompts
    assert change["n"] == 2 and change["mean"] == pytest.approx(-0.99)
    assert change["ci_low"] < change["mean"] < change["ci_high"]


def test_detection_check_says_when_recall_is_capped_by_the_set_size(tmp_path):
    cfg, layout = _known_run(tmp_path, known=(0, 1, 2, 3, 4, 5))
    report.run(cfg)
    text = open(layout.report, encoding="utf-8").read()
    assert "recall 50.0% of 6 known memorized prompts, best possible 50.0% at this set size" in text
    assert "holds 3 prompts, so at most 3 of the 6 known prompts fit: recall cannot exceed 50.0%" in text


def test_report_says_which_inputs_are_absent(tmp_path):
    cfg, layout = _analyzed_run(tmp_path, ["report.figures=false"])
    result = report.run(cfg)
    assert result.sections["attribution"] == "absent: tokens.parquet"
    assert result.sections["mitigation"] == "absent: mitigation.parquet"
    assert result.figures == []
    text = open(layout.report, encoding="utf-8").read()
    _check_html(text)
    assert "tokens.parquet is absent" in text and "mitigation.parquet is absent" in text
    assert "data:image/png" not in text and "report.figures=false" in text


def test_report_of_an_empty_run_still_renders(tmp_path):
    cfg = load_config(None, [f"run.output={tmp_path}"])
    result = report.run(cfg)
    text = open(RunLayout(str(tmp_path)).report, encoding="utf-8").read()
    _check_html(text)
    assert result.sections["distribution"] == "absent: analysis"
    assert "run `cxrmem analyze` first" in text


@pytest.mark.parametrize("shape", [(4, 16, 16), (4, 3, 16, 16), (4, 16, 16, 3)])
def test_generation_grid_accepts_grey_and_rgb(tmp_path, shape):
    from cxrmem.figures import generation_grid

    out = io.BytesIO()
    generation_grid({"original": np.random.default_rng(0).random(shape)}, out, 3)
    assert out.getvalue()[:4] == b"\x89PNG"


def _known_run(tmp_path, known=(0, 7), overrides=()):
    """An analyzed run whose prompts `known` are listed as known memorized (analyze.known_memorized)."""
    rng = np.random.default_rng(1)
    d_mem = rng.normal(1.0, 0.05, N)
    d_mem[[0, 1, 2]] = [3.0, 2.5, 2.0]
    layout, has_marker, _ = _write_run(tmp_path, d_mem, np.zeros(N, dtype=bool))
    known_csv = tmp_path / "known.csv"
    texts = [f"Finding {i}, compared to ___." if has_marker[i] else f"Finding {i}, no change." for i in known]
    pd.DataFrame({"prompt": texts, "planted": True}).to_csv(known_csv, index=False)
    _ids_from_text(layout)
    cfg = load_config(None, [f"run.output={tmp_path}", f"analyze.known_memorized={known_csv}", "report.top_prompts=2", *overrides])
    analyze.run(cfg)
    return cfg, layout


def test_report_checks_the_memorized_set_against_known_prompts(tmp_path):
    cfg, layout = _known_run(tmp_path)
    result = report.run(cfg)
    assert "known_memorized.png" in [p.rsplit("/", 1)[-1] for p in result.figures]
    text = open(layout.report, encoding="utf-8").read()
    _check_html(text)
    assert "Check against known memorized prompts" in text
    assert "1 of the 3 prompts in the memorized set are known" in text and "1 of the 2 known prompts" in text
    assert '<th class="sortable">known</th>' in text


def test_card_shows_copy_evidence_and_detectors_only_when_recorded(tmp_path):
    cfg, layout = _analyzed_run(tmp_path)
    report.run(cfg)
    text = open(layout.report, encoding="utf-8").read()
    assert "copy evidence" not in text and "detector agreement" not in text
    summary = json.loads(open(layout.summary).read())
    summary["copies"] = {"headline": {"w=1": "2/3 memorized prompts copy a training image"}}
    summary["detectors"] = {"top_percent": 1.0, "fpr": None, "detectors": {"anisotropy": {
        "column": "anisotropy", "paper": "Asthana et al., ICLR 2026", "finite": 300, "spearman": 0.8, "top_overlap": 2 / 3}}}
    # A stage's duration that the audit and the stage's own section both record is one row of the Run table.
    summary["audit"] = {"timings_s": {"score": 12.5, "attribute": 3.0}}
    summary["attribution"] = {"prompts": 2, "seconds": 2.5}
    open(layout.summary, "w").write(json.dumps(summary))
    report.run(cfg)
    text = open(layout.report, encoding="utf-8").read()
    card = text[text.index('id="summary"'):text.index("</section>")]
    assert "copy evidence" in card and "w=1 2/3 memorized prompts copy a training image" in card
    assert "detector agreement" in card and "anisotropy Spearman 0.8, top 1% overlap 66.7%" in card
    assert '<h2 id="detectors">' in text and "<th>AUC (known)</th>" not in text
    assert text.count("attribute: seconds</td>") == 1 and "attribute: seconds</td><td>3</td>" in text
    assert "score: seconds</td><td>12.5</td>" in text


def test_overguidance_and_paired_interval_statistics():
    from scipy import stats as sps

    from cxrmem.stats import high_frequency_share, paired_difference_ci

    rng = np.random.default_rng(0)
    noise = high_frequency_share(rng.random((8, 32, 32)))
    smooth = high_frequency_share(np.outer(np.hanning(32), np.hanning(32))[None] * rng.uniform(0.5, 1, (8, 1, 1)))
    assert np.all((noise > 0.6) & (noise < 0.85)) and np.all(smooth < 0.01)  # white noise: about 0.72 at 32 px
    a, b = rng.normal(1.0, 0.3, 12), rng.normal(1.2, 0.3, 12)
    result = paired_difference_ci(a, b)
    low, high = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert result["n"] == 12 and result["ci_low"] == pytest.approx(low) and result["ci_high"] == pytest.approx(high)
    assert paired_difference_ci([1.0], [0.5]) == {"n": 1, "mean": 0.5, "ci_low": None, "ci_high": None}


def test_run_section_shows_the_counted_work_with_gpu_hours_labelled_an_estimate(tmp_path):
    from cxrmem.runfiles import Run
    from cxrmem.scoring.scorer import UNetWork
    from cxrmem.storage import Store

    cfg, layout = _analyzed_run(tmp_path)
    Run(Store(), layout).record_cost("score", UNetWork(3_600_000).to_json())  # 4 h at 250 samples/s, 2.5 h at 400
    Run(Store(), layout).record_cost("mitigate", UNetWork(0, 0, 7).to_json())
    report.run(cfg)
    text = open(layout.report, encoding="utf-8").read()
    _check_html(text)
    run = text[text.index('<h2 id="run"'):]
    assert "<strong>GPU-hours are an estimate</strong>, at 250–400 UNet samples/s per GPU" in run
    assert f"<td>score</td><td>3,600,000</td><td>0</td><td>0</td><td>3,600,000</td><td>{3_600_000 / N:.4g}</td><td>2.5 – 4</td>" in run
    assert "<td>total</td><td>3,600,000</td><td>0</td><td>7</td>" in run
