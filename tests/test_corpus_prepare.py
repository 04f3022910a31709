"""`prepare`: global deduplication, prompt ids, markers, token counts, skips counted, outputs written."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmem.config import ConfigError, load_config
from cxrmem.corpus.prompts import build_prompts_table
from cxrmem.corpus.text import SourceText, prompt_id, skipped
from cxrmem.models.loading import load_tokenizer
from cxrmem.runfiles import Run
from cxrmem.stages import prepare
from cxrmem.stages.prepare import check_same_corpus
from cxrmem.storage import Store

SUMMARY_FILE = "prepare_summary.json"

COLUMNS = ["prompt_id", "prompt", "n_reports", "source_ids", "has_marker", "n_markers", "n_tokens", "truncated"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(load_config(None, [f"model.path={tiny_model_dir}"]).model)


def config(tiny_model_dir, output, *overrides):
    return load_config(None, [f"model.path={tiny_model_dir}", f"run.output={output}", *overrides])


def test_dedup_ids_markers_and_skips(tokenizer):
    long_prompt = " ".join(["Small left pleural effusion, unchanged."] * 40)
    records = [
        SourceText("r1", "No acute\n cardiopulmonary process.", section="IMPRESSION", ids={"study": "s1"}),
        SourceText("r2", " No acute cardiopulmonary  process. ", section="IMPRESSION", ids={"study": "s2"}),
        SourceText("r3", "Compared to ___, Dr. ___ was notified.", section="FINDINGS", ids={"study": "s3"}),
        SourceText("r4", "  \n ", section="IMPRESSION", ids={"study": "s4"}),
        skipped("r5", "invalid_utf8", "r5.txt: invalid UTF-8 at byte offset 7"),
        SourceText("r6", long_prompt, ids={"study": "s6"}),
        SourceText("r7", "No acute cardiopulmonary process.", ids={"study": "s7"}),
    ]
    table, counts = build_prompts_table(records, "_{2,}|X{4,}", tokenizer, max_length=128, progress_every=2)
    assert table.column_names == [*COLUMNS, "study"]
    rows = {row["prompt"]: row for row in table.to_pylist()}
    assert set(rows) == {"No acute cardiopulmonary process.", "Compared to ___, Dr. ___ was notified.", long_prompt}
    normal = rows["No acute cardiopulmonary process."]
    assert normal["prompt_id"] == prompt_id("No acute cardiopulmonary process.")
    assert (normal["n_reports"], normal["source_ids"], normal["study"]) == (3, ["r1", "r2", "r7"], ["s1", "s2", "s7"])
    assert (normal["has_marker"], normal["n_markers"]) == (False, 0)
    marked = rows["Compared to ___, Dr. ___ was notified."]
    assert (marked["has_marker"], marked["n_markers"]) == (True, 2)
    assert normal["n_tokens"] == len(tokenizer("No acute cardiopulmonary process.")["input_ids"]) and not normal["truncated"]
    assert rows[long_prompt]["n_tokens"] > 128 and rows[long_prompt]["truncated"]  # flagged, kept
    assert table.column("prompt_id").to_pylist() == sorted(table.column("prompt_id").to_pylist())

    assert counts["reports_read"] == 7 and counts["reports_with_prompt"] == 5 and counts["prompts_unique"] == 3
    assert counts["skipped"] == {"empty": 1, "invalid_utf8": 1}
    assert "r4" in counts["skipped_examples"]["empty"][0] and "byte offset 7" in counts["skipped_examples"]["invalid_utf8"][0]
    assert counts["sections"] == {"IMPRESSION": 2, "FINDINGS": 1, "TEXT": 2}
    assert counts["marker_share_unique"] == pytest.approx(1 / 3, abs=1e-5)
    assert counts["marker_share_reports"] == pytest.approx(1 / 5)
    assert counts["truncated_unique"] == 1
    assert counts["top_duplicated"][0] == {"prompt_id": normal["prompt_id"], "prompt": normal["prompt"], "n_reports": 3}


def test_id_columns_seen_late_are_filled_with_nulls(tokenizer):
    records = [SourceText("a", "Same."), SourceText("b", "Same.", ids={"subject_id": "p1"}), SourceText("c", "Other.")]
    table, _ = build_prompts_table(records, "_{2,}", tokenizer, 128)
    rows = {row["prompt"]: row for row in table.to_pylist()}
    assert rows["Same."]["subject_id"] == [None, "p1"] and rows["Other."]["subject_id"] == [None]


def test_prepare_synthetic_writes_prompts_and_summary(tiny_model_dir, tmp_path):
    cfg = config(tiny_model_dir, tmp_path, "corpus.synthetic.n_reports=3000", "corpus.progress_every=1000")
    summary = prepare.run(cfg)
    table = pq.read_table(tmp_path / "prompts.parquet")
    assert table.column_names == [*COLUMNS, "subject_id", "study"]
    assert table.schema.field("source_ids").type == pa.list_(pa.string())
    assert table.num_rows == summary.prompts_unique == len(set(table.column("prompt").to_pylist()))
    assert sum(table.column("n_reports").to_pylist()) == summary.reports_read == 3000
    assert summary.sections == {"IMPRESSION": 3000}
    assert summary.top_duplicated[0]["prompt"] == "No acute cardiopulmonary process."
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["prompts_unique"] == table.num_rows

    again = tmp_path / "again"
    prepare.run(config(tiny_model_dir, again, "corpus.synthetic.n_reports=3000"))
    assert pq.read_table(again / "prompts.parquet").equals(table)  # same seed, same file


def test_prepare_deduplicates_across_shards_and_counts_bad_rows(tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.csv").write_bytes(b'text,path\nNo acute process.,x/1.jpg\n"Caf\xe9",x/2.jpg\n  ,x/3.jpg\n')
    (corpus / "b.jsonl").write_text('{"text": "No  acute process.", "path": "y/1.jpg"}\n{"text": "Tiny XXXX nodule."}\n')
    out = tmp_path / "run"
    summary = prepare.run(config(tiny_model_dir, out, "corpus.source=table", f"corpus.path={corpus}"))
    rows = {row["prompt"]: row for row in pq.read_table(out / "prompts.parquet").to_pylist()}
    assert rows["No acute process."]["source_ids"] == ["x/1.jpg", "y/1.jpg"]
    assert rows["Tiny XXXX nodule."]["source_ids"] == ["b.jsonl:2"] and rows["Tiny XXXX nodule."]["has_marker"]
    assert summary.skipped == {"empty": 1, "invalid_utf8": 1}
    assert summary.reports_read == 5 and summary.reports_with_prompt == 3


def test_prepare_errors_are_actionable(tiny_model_dir, tmp_path):
    (tmp_path / "blank.csv").write_text("text\n \n\n")
    with pytest.raises(ValueError, match="no prompts in the table corpus .* skipped {'empty': 1}"):
        prepare.run(config(tiny_model_dir, tmp_path / "run", "corpus.source=table", f"corpus.path={tmp_path / 'blank.csv'}"))
    with pytest.raises(ConfigError, match="corpus.marker_regex"):
        prepare.run(config(tiny_model_dir, tmp_path / "run", "corpus.marker_regex=(unclosed"))


@pytest.mark.s3
def test_prepare_mimic_reports_from_s3(tiny_model_dir, s3_bucket, s3_server):
    from cxrmem.corpus.synthetic import generate_reports

    root, out = f"s3://{s3_bucket}/mimic", f"s3://{s3_bucket}/run"
    reports = generate_reports(40, seed=5)
    for report in reports:
        Store().write_text(f"{root}/files/{report['report_id']}.txt", report["text"])
    Store().write_bytes(f"{root}/files/p19/p19000000/s59000000.txt", b"IMPRESSION: \xff")
    cfg = config(
        tiny_model_dir, out, "corpus.source=mimic_reports", f"corpus.path={root}", "corpus.read_workers=4",
        f"storage.endpoint_url={s3_server.endpoint_url}", f"storage.region={s3_server.region}",
    )  # fmt: skip
    summary = prepare.run(cfg)
    table = Store.from_config(cfg.storage).read_table(f"{out}/prompts.parquet")
    assert summary.reports_read == 41 and summary.skipped == {"invalid_utf8": 1}
    assert "s3://" in summary.skipped_examples["invalid_utf8"][0]
    assert sum(table.column("n_reports").to_pylist()) == 40
    assert {i for ids in table.column("source_ids").to_pylist() for i in ids} == {r["report_id"] for r in reports}
    assert Store.from_config(cfg.storage).read_json(f"{out}/{SUMMARY_FILE}")["reports_read"] == 41


def test_a_resumed_run_must_keep_its_corpus(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    prepare.run(config(tiny_model_dir, out, "corpus.synthetic.n_reports=50", "corpus.max_reports=40"))
    same = config(tiny_model_dir, out, "corpus.synthetic.n_reports=50", "corpus.max_reports=40", "corpus.read_workers=2")
    check_same_corpus(same, Run.of(same))
    other = config(tiny_model_dir, out, "corpus.synthetic.n_reports=50", "corpus.max_reports=30")
    with pytest.raises(ValueError, match=r"corpus.max_reports: 40 then, 30 now.*delete that folder"):
        check_same_corpus(other, Run.of(other))


def test_a_corpus_source_is_one_registry_entry(tiny_model_dir, tmp_path, monkeypatch):
    """Adding a corpus source is one CORPUS_SOURCES entry (here registered by the test alone): the config accepts
    its name, prepare reads through it, and an unregistered name is refused naming the key and the choices."""
    from cxrmem.corpus.mimic import report_to_source

    def radiology_notes(cfg, store):
        notes = ["IMPRESSION: Dr. ___ was notified.", "IMPRESSION: No acute process.", "IMPRESSION: No acute process."]
        return (report_to_source(f"note{i}", text, list(cfg.corpus.sections), None, f"note {i}") for i, text in enumerate(notes))

    with pytest.raises(ConfigError, match=r"corpus.source.*'notes' is not one of"):
        config(tiny_model_dir, tmp_path, "corpus.source=notes")
    monkeypatch.setitem(prepare.CORPUS_SOURCES, "notes", radiology_notes)
    summary = prepare.run(config(tiny_model_dir, tmp_path, "corpus.source=notes"))
    table = pq.read_table(tmp_path / "prompts.parquet")
    assert summary.reports_read == 3 and summary.source == "notes"
    assert sorted(zip(table["prompt"].to_pylist(), table["n_reports"].to_pylist())) == [("Dr. ___ was notified.", 1), ("No acute process.", 2)]
