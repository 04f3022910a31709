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
    assert json.loads(open(layout.summary).read())["cost"]["stages"]["reference"] == done.work  # the corpus run's cost
    assert done.work["unet_samples"] > 0
    result = analyze.run(cfg)
    calibration = pq.read_table(layout.calibration).to_pandas()
    prompts = pq.read_metadata(layout.prompts).num_rows
    assert len(calibration) == prompts and calibration["p_value"].between(0, 1).all()
    assert (calibration["q_value"] >= calibration["p_value"] - 1e-12).all()
    summary = json.loads(open(layout.summary).read())["calibration"]
    assert summary["reference"]["prompts"] == done.prompts and summary["discoveries"] == result.calibrated_count
    assert summary["simes_p"] == pytest.approx(calibration["q_value"].min())
    assert summary["global_p"] == summary["beyond_reference"]["p_value"]  # F0 reads the exceedance count, not the tail
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


def test_the_memorized_set_can_be_the_calibrated_calls(tmp_path):
    """analyze.memorized_by=q_value: the set that later stages and F1-F3 read is q <= analyze.fdr against the
    reference, not the top share. On the testbed (planted prompts first in its manifest) against prompts it never saw."""
    from cxrmem.config import ConfigError

    with pytest.raises(ConfigError, match="analyze.memorized_by"):
        load_config(None, ["analyze.memorized_by=q_value"])
    ref = tmp_path / "reference.csv"  # 150 of the 300 impressions the testbed never saw: enough for two length bins
    pd.read_csv("testbed/model/reference.csv").head(150).to_csv(ref, index=False)
    base = [f"run.output={tmp_path / 'run'}", "model.path=testbed/model", "model.device=cpu", "corpus.source=table",
            "corpus.path=testbed/model/manifest.csv", "corpus.text_column=prompt", "corpus.max_reports=60",
            "score.steps=20", "score.screening_steps=1", "score.generations=1", f"analyze.reference={ref}",
            "analyze.reference_length_bins=2", "analyze.reference_min_per_bin=50",
            "analyze.known_memorized=testbed/model/manifest.csv", "report.figures=false"]  # fmt: skip
    cfg = load_config(None, [*base, "analyze.memorized_by=q_value"])
    prepare.run(cfg)
    score.run(cfg)
    reference.run(cfg)
    result = analyze.run(cfg)
    layout = RunLayout(cfg.run.output)
    calibration = pq.read_table(layout.calibration).to_pandas()
    called = set(calibration["prompt_id"][calibration["q_value"] <= cfg.analyze.fdr])
    memorized = pd.read_csv(layout.memorized)
    assert called and set(memorized["prompt_id"]) == called and result.memorized_count == len(called)
    analysis = json.loads(open(layout.summary).read())["analysis"]
    assert analysis["memorized_by"] == "q_value" and analysis["threshold"] == pytest.approx(memorized["d_mem"].min())
    report.run(cfg)
    assert "q-value ≤ 0.05 against prompts the model never saw" in open(layout.report, encoding="utf-8").read()
    top = analyze.run(load_config(None, base))  # the paper's top 1% of the same scores: another set
    assert top.memorized_count == 1 and len(called) > 1  # ceil(1% of 60)
