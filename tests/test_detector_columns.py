"""score.detectors as scores.parquet columns, the cascade screening with any detector, and the analyze stage's
detector agreement: on the tiny real model and on tables written here."""

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxrmem.analysis import detector_agreement
from cxrmem.cli import main
from cxrmem.config import ConfigError, load_config
from cxrmem.detectors import REGISTRY, Cost, screen_top
from cxrmem.runfiles import Run, RunLayout
from cxrmem.score_key import config_hash
from cxrmem.stages import analyze, cascade, score, score_parts
from cxrmem.storage import Store
from tests.test_analysis import N, _write_run

EXTRA = ["anisotropy", "attention_entropy"]


def tiny_cfg(tiny_model_dir, out, *overrides):
    return load_config(None, [
        f"run.output={out}", f"model.path={tiny_model_dir}", "model.device=cpu", "corpus.synthetic.n_reports=40",
        "score.steps=3", "score.generations=1", "score.batch_size=4", "ray.checkpoint_every=8", *overrides,
    ])


# -- config -------------------------------------------------------------------------------------
def test_detector_keys_are_validated_and_keyed_only_when_set():
    with pytest.raises(ConfigError, match="'score.detectors': 'entropy' is not one of"):
        load_config(None, ["score.detectors=[entropy]"])
    with pytest.raises(ConfigError, match="names a detector twice"):
        load_config(None, ["score.detectors=[sharpness,sharpness]"])
    with pytest.raises(ConfigError, match=r"'cascade.stages\[0\].screen': 'fast' is not one of"):
        load_config(None, ["cascade.stages=[{screen: fast, keep_percent: 5}]"])
    with pytest.raises(ConfigError, match="'detect.generations'"):
        load_config(None, ["detect.generations=0"])
    with pytest.raises(ConfigError, match="'detect.steps' must not exceed score.steps"):
        load_config(None, ["score.steps=4", "detect.steps=5"])
    base = config_hash(load_config(None))
    assert config_hash(load_config(None, ["detect.generations=3"])) == base  # no detectors: the d_mem key as before
    with_columns = config_hash(load_config(None, ["score.detectors=[anisotropy]"]))
    assert with_columns != base
    assert config_hash(load_config(None, ["score.detectors=[anisotropy]", "detect.generations=3"])) != with_columns


# -- scores.parquet -----------------------------------------------------------------------------
def test_score_writes_detector_columns_beside_d_mem_and_resumes(tiny_model_dir, tmp_path):
    overrides = [f"run.output={tmp_path}", f"model.path={tiny_model_dir}", "model.device=cpu", "corpus.synthetic.n_reports=40",
                 "score.steps=3", "score.generations=1", "score.batch_size=4", f"score.detectors=[{','.join(EXTRA)}]"]
    assert main(["prepare", *overrides]) == 0
    assert main(["score", *overrides]) == 0
    layout = RunLayout(str(tmp_path))
    table = pq.read_table(layout.scores)
    columns = [c for name in EXTRA for c in REGISTRY[name].columns]
    assert table.column_names[: 3 + len(columns)] == ["prompt_id", "prompt", "d_mem", *columns]
    assert table.num_rows == pq.read_table(layout.prompts).num_rows
    for column in columns:
        assert np.isfinite(table[column].to_numpy()).all()

    cfg = load_config(None, overrides)
    again = score.run(cfg)
    assert again.resumed == table.num_rows and again.computed == 0
    # A part of the same key without the columns (another cxrmem version) is refused, naming the file.
    part = score_parts.write_part(Store(), table.slice(0, 2).drop_columns(columns[:1]), layout.score_parts, 0)
    with pytest.raises(ValueError, match=f"{part}.*score again"):
        score_parts.consolidate(Store(), layout, table["model_fingerprint"][0].as_py(), table["config_hash"][0].as_py())


# -- cascade ------------------------------------------------------------------------------------
def test_cascade_screens_with_a_named_detector_on_the_tiny_model(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, "cascade.enabled=true", "cascade.stages=[{screen: anisotropy, keep_percent: 25, steps: 1}]",
                   "cascade.audit_sample=0", "score.detectors=[attention_entropy]")
    assert main(["prepare", f"run.output={tmp_path}", "corpus.synthetic.n_reports=40"]) == 0
    result = cascade.run_cascade(cfg, Run.of(cfg).with_fingerprint("fp-tiny"))

    screening = pq.read_table(RunLayout(f"{tmp_path}/{cascade.CASCADE_DIR}/screening").scores).to_pandas()
    assert {"anisotropy", "anisotropy_norm", "anisotropy_alignment"} <= set(screening.columns)
    chosen = screen_top(screening.prompt_id.to_numpy(), screening.anisotropy.to_numpy(), 25, "anisotropy")
    full = pq.read_table(RunLayout(str(tmp_path)).scores).to_pandas()
    assert sorted(full.prompt_id) == sorted(chosen) and result.selected == math.ceil(0.25 * len(screening))
    assert "attention_entropy" in full and "anisotropy" not in full  # stage 2 writes the run's own score.detectors
    screen_cost = REGISTRY["dmem"].cost(1, 1, True) + REGISTRY["anisotropy"].cost(1, 1, True)
    assert result.unet_evaluations_cascade == (
        len(screening) * screen_cost.per_prompt + math.ceil(len(screening) / 4) * screen_cost.per_batch
        + len(full) * 4  # the full d_mem continues the screen's first-step d_mem (same G, T, seeds): 2 G (T - 1) per prompt
        # and the full score's own detector columns, which the cascade's declared cost left out before it was counted
        + REGISTRY["attention_entropy"].cost(1, 1, True).evaluations(len(full))
    )


def test_screening_config_and_cost_accounting(tmp_path):
    cfg = load_config(None, ["score.detectors=[sharpness]", "cascade.stages=[{screen: dmem, keep_percent: 10, steps: 5}]", "detect.generations=2"])
    first = cascade.plan(cfg)[0]
    by_dmem = cascade.stage_config(cfg, str(tmp_path), first)
    assert by_dmem.score.screening_steps == 5 and list(by_dmem.score.detectors) == [] and cascade.stage_column(first.screen) == "d_mem"
    assert cascade.screening_cost(by_dmem) == Cost(4 + 2 * 4 * 4, 4)  # G = 4 shared first step, then 4 full pairs
    sharpness_cfg = load_config(None, ["cascade.stages=[{screen: sharpness, keep_percent: 10, steps: 1, generations: 2}]"])
    by_sharpness = cascade.stage_config(sharpness_cfg, str(tmp_path), cascade.plan(sharpness_cfg)[0])
    assert by_sharpness.score.screening_steps == 1 and by_sharpness.score.generations == 2
    assert list(by_sharpness.score.detectors) == ["sharpness"]
    assert cascade.screening_cost(by_sharpness) == Cost(2 + 2, 2 + 2, jvps_per_prompt=4)
    cost = cascade.cascade_cost(1000, 100, Cost(4, 4), Cost(10, 2), batch_size=10)
    assert cost["unet_evaluations_full"] == 1000 * 10 + 100 * 2
    assert cost["unet_evaluations_cascade"] == (1000 * 4 + 100 * 4) + (100 * 10 + 10 * 2)
    assert cost["compute_saved"] == pytest.approx(1 - 5420 / 10200)


# -- analyze: detector agreement ----------------------------------------------------------------
def test_detector_agreement_on_a_synthetic_table():
    rng = np.random.default_rng(0)
    d_mem = rng.normal(1.0, 0.1, 200)
    d_mem[:2] = [3.0, 2.5]
    frame = pd.DataFrame({"prompt_id": [f"{i:016x}" for i in range(200)], "d_mem": d_mem, "nonfinite": False,
                          "anisotropy": 2 * d_mem + 1, "attention_entropy": -d_mem})
    frame.loc[5, "attention_entropy"] = np.nan
    out = detector_agreement(frame, EXTRA, top_percent=1.0, known_ids={frame.prompt_id[0], frame.prompt_id[1]})
    same, reverse = out.detectors["anisotropy"], out.detectors["attention_entropy"]
    assert same["spearman"] == pytest.approx(1.0) and same["top_overlap"] == 1.0 and same["auc"] == 1.0
    assert same["tpr_at_fpr"] == 1.0 and same["finite"] == 200
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["top_overlap"] == 0.0 and reverse["auc"] == 0.0
    assert reverse["finite"] == 199 and out.fpr == 0.01
    assert "auc" not in detector_agreement(frame, EXTRA, 1.0).detectors["anisotropy"]


def test_analyze_records_detector_agreement_only_with_detector_columns(tmp_path):
    d_mem = np.random.default_rng(1).normal(1.0, 0.05, N)
    d_mem[[0, 1, 2]] = [3.0, 2.5, 2.0]
    layout, _, _ = _write_run(tmp_path, d_mem, np.zeros(N, dtype=bool))
    cfg = load_config(None, [f"run.output={tmp_path}"])
    analyze.run(cfg)
    assert "detectors" not in json.loads(open(layout.summary).read())  # no detector columns: no section

    table = pq.read_table(layout.scores)
    pq.write_table(table.append_column("sharpness", table["d_mem"]), layout.scores)
    analyze.run(cfg)
    section = json.loads(open(layout.summary).read())["detectors"]
    assert list(section["detectors"]) == ["sharpness"] and section["top_percent"] == 1.0
    assert section["detectors"]["sharpness"]["spearman"] == pytest.approx(1.0)
    assert section["detectors"]["sharpness"]["top_overlap"] == 1.0
