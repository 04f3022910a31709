"""A later cascade stage continues an earlier stage's trajectories (cxrmem/stages/continuation.py): the same
d_mem as from scratch, fewer UNet evaluations by exactly the shared steps, and a restart under other noises."""

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf

from cxrmem.cli import main
from cxrmem.config import ConfigError, load_config
from cxrmem.detectors import REGISTRY
from cxrmem.models.loading import load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.runfiles import Run, RunLayout
from cxrmem.scoring.scorer import Continuation, Scorer
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings
from cxrmem.stages import cascade
from cxrmem.stages.continuation import TrajectoryCarry
from cxrmem.storage import Store

PROMPTS = [
    "No acute cardiopulmonary process.",
    "Compared to ___, moderate right pleural effusion has increased.",
    "Endotracheal tube terminates 4 cm above the carina. Dr. ___ was notified at ___ a.m.",
]
IDS = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in PROMPTS]
RTOL, ATOL = 1e-5, 1e-7  # same batch composition: only the order of float operations may differ


def settings(**overrides) -> ScoreSettings:
    return ScoreSettings.of(OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"generations": 2, "steps": 6, **overrides}))


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": tiny_model_dir}))


def unet_samples(scorer: Scorer, run) -> tuple[object, int]:
    """What `run()` returns and the UNet samples it evaluated."""
    samples = []
    hook = scorer._unet.register_forward_hook(lambda module, args, kwargs, out: samples.append(args[0].shape[0]), with_kwargs=True)
    try:
        return run(), sum(samples)
    finally:
        hook.remove()


@pytest.mark.parametrize("seed_mode", ["shared", "per_prompt"])
def test_continued_score_is_the_from_scratch_score_for_the_remaining_steps_only(components, seed_mode):
    scorer = Scorer(components, settings(seed_mode=seed_mode), device="cpu")
    full, full_work = unet_samples(scorer, lambda: scorer.score(PROMPTS, IDS))
    head = scorer.score(PROMPTS, IDS, steps=2)
    start = Continuation(head.latents, torch.as_tensor(head.step_norms))
    tail, tail_work = unet_samples(scorer, lambda: scorer.score(PROMPTS, IDS, start=start))
    np.testing.assert_allclose(tail.step_norms, full.step_norms, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(tail.d_mem, full.d_mem, rtol=RTOL)
    np.testing.assert_allclose(tail.latents, full.latents, rtol=1e-4, atol=1e-5)
    shared = seed_mode == "shared"
    assert full_work == REGISTRY["dmem"].cost(2, 6, shared).evaluations(3)
    assert full_work - tail_work == REGISTRY["dmem"].cost(2, 2, shared).evaluations(3)  # exactly the 2 shared steps
    done = Continuation(full.latents, torch.as_tensor(full.step_norms))
    again, work = unet_samples(scorer, lambda: scorer.score(PROMPTS, IDS, start=done))
    assert work == 0 and np.array_equal(again.d_mem, full.d_mem)
    with pytest.raises(ValueError, match="continued from step 6 cannot be scored over 2 steps"):
        scorer.score(PROMPTS, IDS, steps=2, start=done)


def test_carry_matches_only_the_same_trajectories_and_keeps_the_best_states():
    carry = TrajectoryCarry(settings())
    assert carry.matches(settings(screening_steps=2))
    for other in (settings(seed=1), settings(generations=1), settings(steps=8), settings(seed_mode="per_prompt"), settings(guidance_scale=3.0)):
        assert not carry.matches(other)
    from cxrmem.scoring.scorer import ScoreBatch

    carry.begin_stage(capacity=2)
    d = np.array([0.3, np.nan, 0.9, 0.1, 0.5], np.float32)
    batch = ScoreBatch(d, np.zeros((5, 2, 1), np.float32), np.isnan(d), np.ones(5, int), np.zeros(5, bool), torch.zeros(5, 2, 1, 2, 2))
    carry.keep(list("abcde"), batch, d)
    carry.end_stage(["c", "e", "a"])  # ties or resumed prompts may survive without a state: they restart
    assert sorted(carry.states) == ["c", "e"] and carry.states["c"].steps == 1
    assert [s is not None for s in carry.starts(list("ace"), steps=3)] == [False, True, True]
    assert carry.continued == 2 and carry.saved == 2 * REGISTRY["dmem"].cost(2, 1, True).per_prompt  # a part-fresh batch


def cascade_run(tiny_model_dir, out, *overrides):
    base = [f"run.output={out}", f"model.path={tiny_model_dir}", "model.device=cpu", "corpus.synthetic.n_reports=40",
            "score.steps=4", "score.generations=2", "score.batch_size=8", "ray.checkpoint_every=16", "cascade.enabled=true",
            "cascade.audit_sample=0"]
    assert main(["prepare", *base[:1], base[3]]) == 0
    cfg = load_config(None, [*base, *overrides])
    samples = []
    forward = UNet2DConditionModel.forward

    def counted(self, sample, *args, **kwargs):
        samples.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    UNet2DConditionModel.forward = counted
    try:
        cascade.run_cascade(cfg, Run.of(cfg).with_fingerprint("fp-tiny"))
    finally:
        UNet2DConditionModel.forward = forward
    section = json.loads(open(RunLayout(str(out)).summary).read())["cascade"]
    return cfg, section, pq.read_table(RunLayout(str(out)).scores).to_pandas().set_index("prompt_id").sort_index(), sum(samples)


def test_full_score_continues_the_screen_and_counts_what_it_saved(tiny_model_dir, tmp_path):
    stage = "cascade.stages=[{screen: dmem, keep_percent: 50, steps: 2}]"
    cfg, on, on_scores, on_work = cascade_run(tiny_model_dir, tmp_path / "on", stage)
    _, off, off_scores, off_work = cascade_run(tiny_model_dir, tmp_path / "off", stage, "cascade.continue_trajectories=false")
    kept = on["rounds"][-1]["stages"][0]["kept"]
    assert list(on_scores.index) == list(off_scores.index) and len(on_scores) == kept  # the same survivors, the same batches
    np.testing.assert_allclose(on_scores["d_mem"], off_scores["d_mem"], rtol=RTOL)
    # The first 2 steps of a continued prompt ran in the screen's batches, not the full score's: the late,
    # tiny norms (1e-3 here) differ by float rounding as in any batch-invariance check (test_scoring: atol 1e-6).
    norms = [np.stack(scores["step_norms"].map(np.stack)) for scores in (on_scores, off_scores)]
    np.testing.assert_allclose(norms[0], norms[1], rtol=RTOL, atol=1e-6)
    shared_steps = cascade.evaluations(REGISTRY["dmem"].cost(2, 2, True), kept, cfg.score.batch_size)  # the survivors' first 2 steps
    assert off["evaluations"]["full"] - on["evaluations"]["full"] == shared_steps == on["continuation"]["evaluations_saved"]
    assert on["evaluations"]["full"] == kept * 2 * 2 * (4 - 2)  # 2 G per remaining step, nothing shared
    assert on["continuation"]["continued"] == kept and off["continuation"] == {
        "enabled": False, "off_because": "cascade.continue_trajectories = false", "continued": 0, "evaluations_saved": 0}
    assert on["evaluations"]["screens"] == off["evaluations"]["screens"]
    assert (on_work, off_work) == (on["evaluations"]["total"], off["evaluations"]["total"])  # counted = what the UNet ran


def test_a_screen_under_other_noises_restarts(tiny_model_dir, tmp_path):
    """A G = 1 screen does not run the G = 2 full score's trajectories: nothing is continued or saved."""
    cfg, section, _, work = cascade_run(tiny_model_dir, tmp_path, "cascade.stages=[{screen: dmem, keep_percent: 50, steps: 2, generations: 1}]")
    kept = section["rounds"][-1]["stages"][0]["kept"]
    assert section["continuation"]["continued"] == 0 and section["continuation"]["evaluations_saved"] == 0
    assert section["evaluations"]["full"] == cascade.evaluations(REGISTRY["dmem"].cost(2, 4, True), kept, cfg.score.batch_size)
    assert work == section["evaluations"]["total"]


def test_continue_trajectories_is_a_boolean_key():
    with pytest.raises(ConfigError, match="continue_trajectories"):
        load_config(None, ["cascade.continue_trajectories=maybe"])
    assert load_config(None, []).cascade.continue_trajectories is True


def test_states_ride_in_the_blocks_as_the_ray_cascade_sends_them(tiny_model_dir, tmp_path):
    """The Ray path without Ray: the driver's carry puts the states in the block, one pooled worker (loaded once,
    serving both stages' configs) continues from them and sends back the states it made; the screen and the full score agree with the in-process
    worker that holds the carry itself, and count the same continued prompts and saved evaluations."""
    import pyarrow as pa

    from cxrmem.stages.continuation import STATE_COLUMN, TrajectoryState
    from cxrmem.stages.worker import ModelWorker

    cfg = load_config(None, [f"run.output={tmp_path}", f"model.path={tiny_model_dir}", "model.device=cpu",
                             "score.steps=4", "score.generations=2", "score.batch_size=2"])
    screen_cfg = cascade.stage_config(cfg, str(tmp_path / "screen"), cascade.Stage("dmem", 50, 2, 2))
    block = pa.table({"prompt_id": IDS, "prompt": PROMPTS})
    full = ScoreSettings.of(cfg.score)
    local, riding = TrajectoryCarry(full), TrajectoryCarry(full)
    tables, pooled = {}, ModelWorker(cfg, Store())
    for name, stage_cfg in (("screen", screen_cfg), ("full", cfg)):
        capacity = len(IDS) if name == "screen" else 0
        local.begin_stage(capacity)
        riding.begin_stage(capacity)
        here = ModelWorker(stage_cfg, Store(), carry=local)(block)
        sent = riding.with_states(block, ScoreSettings.of(stage_cfg.score).scored_steps, cfg.score.batch_size)
        assert sent[STATE_COLUMN].null_count == (len(IDS) if name == "screen" else 0)
        back, _ = pooled.score_block(stage_cfg, "", sent, riding.worker_kwargs())
        assert back[STATE_COLUMN].null_count == (0 if name == "screen" else len(IDS))  # states made by a screen only
        tables[name] = (here.sort_by("prompt_id"), riding.receive(back).sort_by("prompt_id"))
        assert (riding.continued, riding.saved) == (local.continued, local.saved)
        local.end_stage(IDS)
        riding.end_stage(IDS)
        if name == "screen":
            assert sorted(riding.states) == sorted(local.states) == sorted(IDS)
            a, b = riding.states[IDS[1]], TrajectoryState.from_bytes(local.states[IDS[1]].to_bytes())
            assert torch.equal(a.latents, b.latents) and a.steps == b.steps == 2
    assert riding.continued == len(IDS) and riding.saved > 0
    for here, there in tables.values():
        assert STATE_COLUMN not in there.column_names and here.column_names == there.column_names
        np.testing.assert_allclose(there["d_mem"].to_numpy(), here["d_mem"].to_numpy(), rtol=RTOL, atol=ATOL)
