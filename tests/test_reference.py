"""The reference of non-members end to end on the tiny model: prepared and scored as the corpus is, deduplicated
against the corpus, p- and q-values per prompt in calibration.parquet, F0 first on the report's card."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxrmem.config import load_config
from cxrmem.corpus.synthetic import generate_reports
from cxrmem.runfiles import RunLayout
from cxrmem.stages import analyze, prepare, reference, report, score
from cxrmem.storage import Store


def write_reference(path, seed: int, n: int, extra=()) -> str:
    texts = [r["impression"] for r in generate_reports(n, seed=seed)] + list(extra)
    pd.DataFrame({"prompt": texts}).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def scored_run(tiny_model_dir, tmp_path_factory):
    """A scored corpus of synthetic reports; the tiny random model was trained on none of them."""
    out = tmp_path_factory.mktemp("run")
    base = [f"run.output={out}", f"model.path={tiny_model_dir}", "corpus.synthetic.n_reports=150", "score.steps=2",
            "score.generations=1", "model.device=cpu"]  # fmt: skip
    cfg = load_config(None, base)
    prepare.run(cfg)
    score.run(cfg)
    return base, RunLayout(str(out))


def test_a_corpus_against_prompts_of_the_same_kind_gives_calibrated_p_values_and_f0_not_supported(scored_run, tmp_path):
    base, layout = scored_run
    ref = write_reference(tmp_path / "reference.csv", seed=7, n=400)
    cfg = load_config(None, [*base, f"analyze.reference={ref}", "analyze.reference_min=50", "report.figures=false",
                             "analyze.reference_min_per_bin=30"])  # fmt: skip
    done = reference.run(cfg)
    assert done.prompts > 50 and done.computed == done.prompts
    result = analyze.run(cfg)
    calibration = pq.read_table(layout.calibration).to_pandas()
    prompts = pq.read_metadata(layout.prompts).num_rows
    assert len(calibration) == prompts and calibration["p_value"].between(0, 1).all()
    assert (calibration["q_value"] >= calibration["p_value"] - 1e-12).all()
    summary = json.loads(open(layout.summary).read())["calibration"]
    assert summary["reference"]["prompts"] == done.prompts and summary["discoveries"] == result.calibrated_count
    assert summary["global_p"] == pytest.approx(calibration["q_value"].min())
    memorized = pd.read_csv(layout.memorized)
    assert {"p_value", "q_value"} <= set(memorized.columns)
    # Nothing was trained on either set: no prompt scores beyond the reference, and F0 says so first on the card.
    assert summary["discoveries"] == 0 and summary["global_p"] > 0.05
    report.run(cfg)
    metrics = json.loads(open(layout.metrics).read())
    html = open(layout.report, encoding="utf-8").read()
    assert "F0 · not supported" in html and "Calibrated calls" in html
    assert html.index("F0 ·") < html.index("F1 ·")
    assert any(v.get("finding") == "F0" for v in metrics.get("findings", [])) or "F0" in json.dumps(metrics)


def test_reference_prompts_that_are_also_in_the_corpus_are_dropped_and_counted(scored_run, tmp_path):
    base, layout = scored_run
    corpus = pq.read_table(layout.prompts, columns=["prompt"])["prompt"].to_pylist()[:5]
    ref = write_reference(tmp_path / "reference.csv", seed=8, n=60, extra=corpus)
    cfg = load_config(None, [*base, f"run.output={tmp_path / 'run2'}", f"analyze.reference={ref}"])
    Store().makedirs(str(tmp_path / "run2"))
    Store().copy_within(layout.prompts, RunLayout(str(tmp_path / "run2")).prompts)
    done = reference.run(cfg)
    ref_layout = RunLayout(str(tmp_path / "run2")).reference
    prepared = Store().read_json(ref_layout.prepare_summary)
    ids = set(pq.read_table(ref_layout.prompts, columns=["prompt_id"])["prompt_id"].to_pylist())
    corpus_ids = set(pq.read_table(layout.prompts, columns=["prompt_id"])["prompt_id"].to_pylist())
    # The 5 copied prompts at least (the generator's few normal impressions recur across seeds too).
    assert done.dropped_in_corpus >= 5 and done.prompts + done.dropped_in_corpus == prepared["prompts_unique"] == len(ids) + done.dropped_in_corpus
    assert not ids & corpus_ids


def test_f0_is_inconclusive_without_a_reference():
    from cxrmem.findings import FindingInputs, f0_memorizes

    verdict = f0_memorizes(FindingInputs(analysis=None))
    assert verdict.verdict == "inconclusive" and "analyze.reference" in verdict.reason
