"""The multi-stage cascade with its self-check (cxrmem/stages/cascade.py), in process on the tiny real model."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxrmem import stats
from cxrmem.cli import main
from cxrmem.config import ConfigError, load_config
from cxrmem.runfiles import Run, RunLayout
from cxrmem.stages import cascade, score

STAGES = "cascade.stages=[{screen: dmem, keep_percent: %s, steps: 1}]"


def cfg_for(tiny_model_dir, out, *overrides):
    return load_config(None, [
        f"run.output={out}", f"model.path={tiny_model_dir}", "model.device=cpu", "corpus.synthetic.n_reports=40",
        "score.steps=3", "score.generations=1", "score.batch_size=8", "ray.checkpoint_every=16", "cascade.enabled=true",
        *overrides,
    ])


def test_miss_rate_is_clopper_pearson():
    none = stats.miss_rate(0, 59)
    assert none["estimate"] == 0 and none["upper"] == pytest.approx(1 - 0.05 ** (1 / 59))  # the exact bound at x = 0
    some = stats.miss_rate(3, 100)
    assert some["estimate"] == 0.03 and 0.03 < some["upper"] < 0.08
    assert stats.miss_rate(5, 5)["upper"] == 1.0 and stats.miss_rate(0, 0)["upper"] is None


def test_audit_sample_is_seeded_and_drawn_from_the_rejected():
    ids = np.array([f"{i:04d}" for i in range(100)])
    rejected = ids[20:]
    a = cascade.audit_sample_ids(ids, rejected, 10, seed=3)
    assert len(a) == 10 and set(a) <= set(rejected) and a.tolist() == cascade.audit_sample_ids(ids[::-1], rejected, 10, 3).tolist()
    assert a.tolist() != cascade.audit_sample_ids(ids, rejected, 10, seed=4).tolist()
    # Fewer rejected later: the sample keeps the prompts it had that are still rejected.
    later = cascade.audit_sample_ids(ids, ids[40:], 10, seed=3)
    assert set(a) & set(ids[40:]) <= set(later)


def test_stage_keys_fail_fast():
    with pytest.raises(ConfigError, match=r"'cascade.stages\[0\].keep_percent'"):
        load_config(None, [STAGES % 0])
    with pytest.raises(ConfigError, match=r"'cascade.stages\[0\].steps'"):
        load_config(None, ["score.steps=3", "cascade.enabled=true", "cascade.stages=[{screen: dmem, keep_percent: 5, steps: 3}]"])
    # The default stages are for T=50: a shorter schedule loads, but cannot run them
    assert load_config(None, ["score.steps=2"]).cascade.stages[-1].steps >= 2
    with pytest.raises(ConfigError, match=r"'cascade.stages\[\d\].steps'.*below score.steps \(2\); set cascade.stages"):
        load_config(None, ["score.steps=2", "cascade.enabled=true"])
    with pytest.raises(ConfigError, match="'cascade.stages' is empty"):
        load_config(None, ["cascade.enabled=true", "cascade.stages=[]"])
    with pytest.raises(ConfigError, match="'cascade.widen_factor'"):
        load_config(None, ["cascade.widen_factor=1"])


@pytest.mark.parametrize("margins", ["null", "0.5"], ids=["fixed-shares", "screen-model-margins"])
def test_starved_screen_is_caught_widened_and_recovers(tiny_model_dir, tmp_path, margins):
    """A one-stage screen keeping 3% of the prompts cannot hold the top 10%: the audit sample (every
    rejected prompt here, so that the catch does not hang on a draw) finds the loss, the stage widens
    and the last round's fully scored prompts hold the full d_mem's whole top 10%; with the screen model's
    margins (cascade.expected_missed_target) as with fixed shares."""
    truth_dir = tmp_path / "truth"
    truth_cfg = cfg_for(tiny_model_dir, truth_dir, "cascade.enabled=false")
    assert main(["prepare", f"run.output={truth_dir}", "corpus.synthetic.n_reports=40"]) == 0
    score.run(truth_cfg, Run.of(truth_cfg).with_fingerprint("fp-tiny"))
    truth = pq.read_table(RunLayout(str(truth_dir)).scores).to_pandas()
    top = set(truth.prompt_id[stats.top_percent_mask(truth.d_mem.to_numpy(), 10.0)[0]])

    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, out, STAGES % 3, "analyze.top_percent=10", "cascade.audit_sample=1000", "cascade.widen_factor=3",
                  f"cascade.expected_missed_target={margins}")
    assert main(["prepare", f"run.output={out}", "corpus.synthetic.n_reports=40"]) == 0
    result = cascade.run_cascade(cfg, Run.of(cfg).with_fingerprint("fp-tiny"))
    section = json.loads(open(RunLayout(str(out)).summary).read())["cascade"]
    first, last = section["rounds"][0], section["rounds"][-1]
    assert first["misses"] >= len(top) - first["stages"][0]["kept"] > 0 and first["missed_by_stage"] == [first["misses"]]
    assert section["widened"] and last["misses"] == 0 and section["stages"][0]["keep_percent"] > 3
    scored = set(pq.read_table(RunLayout(str(out)).scores).column("prompt_id").to_pylist())
    assert top <= scored
    assert section["audit"]["upper"] == pytest.approx(1 - 0.05 ** (1 / last["sample"])) and "no audited" in section["verdict"]
    assert section["analysis_top_percent"] == pytest.approx(10 * len(truth) / len(scored))
    assert result.analysis_top_percent == section["analysis_top_percent"]
    spent = section["evaluations"]
    assert spent["total"] == spent["screens"] + spent["full"] + spent["audit"] and spent["per_prompt"] == spent["total"] / len(truth)


def test_two_stages_chain_in_process_through_the_cli(tiny_model_dir, tmp_path):
    """`cxrmem score` with cascade.enabled runs the cascade here; stage 2 screens exactly stage 1's survivors,
    the compute is what the registry declares, and `cxrmem analyze` takes the corpus's top share."""
    overrides = [f"run.output={tmp_path}", f"model.path={tiny_model_dir}", "model.device=cpu", "corpus.synthetic.n_reports=40",
                 "score.steps=3", "score.generations=1", "score.batch_size=8", "cascade.enabled=true", "cascade.audit_sample=4",
                 "cascade.stages=[{screen: latent_update, keep_percent: 50, steps: 1}, {screen: dmem, keep_percent: 50, steps: 2}]",
                 "cascade.max_rounds=1"]  # a miss in the audit sample must not widen and rescore: the costs below are one round's
    assert main(["prepare", *overrides]) == 0
    assert main(["score", *overrides]) == 0
    layout = RunLayout(str(tmp_path))
    section = json.loads(open(layout.summary).read())["cascade"]
    one, two = section["rounds"][-1]["stages"]
    n = section["corpus"]
    assert one["screened"] == n and one["kept"] == math.ceil(n / 2) and two["screened"] == one["kept"] and two["kept"] == math.ceil(one["kept"] / 2)
    assert pq.read_table(layout.scores).num_rows == two["kept"]
    assert len(section["rounds"]) == 1 and not section["widened"]  # cascade.max_rounds=1: the sums below are one round
    # Stage 1's first-step d_mem runs the full score's trajectories (G = 1, T = 3, same seeds): stage 2
    # continues them from step 1 and the full score from step 2, each survivor paying its remaining
    # steps only (2 G per step, no shared first step) instead of G + 2 G (k - 1) per prompt and G per batch.
    first = n * (1 + 1) + math.ceil(n / 8) * 2  # first-step d_mem and latent_update (k = 1, shared: G per batch each)
    second = one["kept"] * 2  # d_mem's step 2 only
    assert section["evaluations"]["screens"] == first + second
    assert section["evaluations"]["full"] == two["kept"] * 2  # step 3 only
    saved = one["kept"] * 1 + math.ceil(one["kept"] / 8) + two["kept"] * 3 + math.ceil(two["kept"] / 8)
    assert section["continuation"] == {"enabled": True, "off_because": None, "continued": one["kept"] + two["kept"], "evaluations_saved": saved}
    assert (two["continued"], section["rounds"][0]["stages"][0]["continued"]) == (one["kept"], 0)
    assert section["audit"]["sample"] == 4
    # The screen models' premise (cascade.stage_scores): a dmem stage's screen is the mean of the full score's first
    # k steps, so a fully scored prompt's screen can be recomputed from its step norms.
    screen2 = pq.read_table(f"{tmp_path}/_cascade/screening1/scores.parquet").to_pandas().set_index("prompt_id").d_mem
    full = pq.read_table(layout.scores).to_pandas()
    recomputed = [np.mean(np.asarray(norms.tolist())[:1, :2]) for norms in full.step_norms]
    assert np.allclose(recomputed, screen2.loc[full.prompt_id].to_numpy(), rtol=1e-5)
    assert main(["analyze", *overrides]) == 0
    analysis = json.loads(open(layout.summary).read())["analysis"]
    assert analysis["memorized_count"] >= math.ceil(0.01 * n)


def test_a_screen_with_fewer_generations_carries_as_many_samples_per_call_as_the_full_score():
    from cxrmem.stages.cascade import Stage, stage_config

    cfg = load_config(None, ["score.generations=4", "score.batch_size=8"])
    one = stage_config(cfg, "out", Stage("dmem", 10.0, 1, 1))
    assert one.score.batch_size * one.score.generations == cfg.score.batch_size * cfg.score.generations == 32
    assert stage_config(cfg, "out", Stage("dmem", 25.0, 2, 4)).score.batch_size == 8
    assert stage_config(cfg, "out", Stage("latent_update", 10.0, 1, 1)).score.batch_size == 32


def test_a_stage_widens_to_what_its_screen_model_asks_or_on_a_miss_and_no_further():
    """`cascade.wider_shares`: a stage whose margin asks for more than it kept widens to that share, one that lost
    an audited memorized prompt widens by cascade.widen_factor, one whose model asks for less stays, and without
    a model (needed_keep None, the fixed-share mode) only a miss widens."""
    from cxrmem.stages.cascade import Round, Screened, Stage, wider_shares

    cfg = load_config(None, ["cascade.widen_factor=2"])
    stages = [Stage("dmem", 10.0, 1, 1), Stage("dmem", 20.0, 2, 4), Stage("dmem", 50.0, 10, 4), Stage("dmem", 50.0, 20, 4)]
    n = [200, 20, 4, 2]
    screened = [Screened(np.arange(k), np.arange(k, 0, -1.0), np.arange(k) < math.ceil(k * s.keep_percent / 100))
                for k, s in zip(n, stages)]  # fmt: skip
    checked = Round([], 0, 0, 0, 1, [0, 1, 0, 0])
    margins = [{"needed_keep": 35}, {"needed_keep": 2}, {"needed_keep": 1}, {"needed_keep": None}]
    assert wider_shares(cfg, stages, checked, margins, screened) == [17.5, 40.0, 50.0, 50.0]
    fixed = [{"needed_keep": None, "expected_missed": 0.2}] * 4
    assert wider_shares(cfg, stages, checked, fixed, screened) == [10.0, 40.0, 50.0, 50.0]
    # the fixed shares act on their own screen model: a stage expecting more lost members than the knob widens
    # without an audit miss, one expecting fewer (or with no model) does not, and null turns it off
    losing = [{"needed_keep": None, "expected_missed": e} for e in (3.5, 0.2, None, 1.5)]
    acting = load_config(None, ["cascade.widen_factor=2", "cascade.widen_above_expected_missed=1"])
    assert wider_shares(acting, stages, checked, losing, screened) == [20.0, 40.0, 50.0, 100.0]
    assert cfg.cascade.widen_above_expected_missed == 1  # on by default
    assert wider_shares(cfg, stages, checked, losing, screened) == [20.0, 40.0, 50.0, 100.0]
    off = load_config(None, ["cascade.widen_factor=2", "cascade.widen_above_expected_missed=null"])
    assert wider_shares(off, stages, checked, losing, screened) == [10.0, 40.0, 50.0, 50.0]  # null: only the audit's misses widen
    assert load_config(None, ["cascade.expected_missed_target=null"]).cascade.expected_missed_target is None
    with pytest.raises(ConfigError, match="'cascade.expected_missed_target'"):
        load_config(None, ["cascade.expected_missed_target=0"])
