"""Count, do not declare (issue 33): the Scorer counts every UNet sample, backward sample and VAE decode where it
happens, the stages record what they counted, and every declared cost equals the count on the real tiny model."""

import hashlib
import json

import pandas as pd
import pyarrow as pa
import pytest
import torch
from omegaconf import OmegaConf

from cxrmem import strategies
from cxrmem.attribution import AttributionSettings, attribute_prompts, declared_evaluations
from cxrmem.cli import main
from cxrmem.config import ModelConfig, ScoreConfig, load_config
from cxrmem.detectors import REGISTRY
from cxrmem.mitigation import mitigate_prompt, vocabulary_words
from cxrmem.models.loading import fingerprint_model, load_components
from cxrmem.runfiles import Run, RunLayout
from cxrmem.scoring.scorer import Scorer, UNetWork
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.stages import cascade
from cxrmem.stages.worker import attribution_settings, mitigation_settings
from cxrmem.storage import Store

PROMPTS = [
    "No acute cardiopulmonary process.",
    "Compared to ___, moderate right pleural effusion has increased.",
    "Endotracheal tube terminates 4 cm above the carina. Dr. ___ was notified at ___ a.m.",
]
IDS = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in PROMPTS]


def settings(**overrides) -> ScoreSettings:
    return ScoreSettings.of(OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"generations": 2, "steps": 3, **overrides}))


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": tiny_model_dir}), need_vae=True)


@pytest.mark.parametrize("seed_mode", ["shared", "per_prompt"])
def test_a_full_score_counts_n_x_g_x_2_x_t_samples(components, seed_mode):
    scorer = Scorer(components, settings(seed_mode=seed_mode), device="cpu")
    assert scorer.work == UNetWork()  # encoding the empty prompt runs no UNet
    scorer.score(PROMPTS, IDS)
    n, g, t = len(PROMPTS), 2, 3
    shared = seed_mode == "shared"
    once = (n - 1) * g if shared else 0  # shared noises: one unconditional first step serves the whole batch
    assert scorer.work == UNetWork(unet_samples=n * g * 2 * t - once)
    assert scorer.work.evaluations == REGISTRY["dmem"].cost(g, t, shared).evaluations(n)  # what the cascade declares


def test_views_of_one_worker_count_into_one_tally(components):
    """with_steps and on (another model: the attribution null) are views of the same device: one count."""
    scorer = Scorer(components, settings(), device="cpu")
    longer, single = scorer.with_steps(5), scorer.on(components, settings(generations=1))
    longer.score(PROMPTS[:1], IDS[:1])
    single.score(PROMPTS[:1], IDS[:1])
    assert longer.work is scorer.work is single.work
    assert scorer.work.unet_samples == 2 * 2 * 5 + 1 * 2 * 3


def test_backward_passes_and_decodes_are_counted_where_they_happen(components):
    scorer = Scorer(components, settings(), device="cpu")
    latents = scorer.initial_latents(IDS[:1])[0]  # [G, C, H, W]
    x_in, t = scorer.first_step_inputs(latents)
    embedding = scorer.encode(PROMPTS[:1]).embeddings.detach().requires_grad_(True)
    with torch.enable_grad():
        norms = scorer.conditional_noise_norms(x_in, t.expand(len(x_in)), embedding)
    assert scorer.work == UNetWork(unet_samples=2 * 2)  # both halves forward; no backward has run yet
    norms.sum().backward()
    assert scorer.work == UNetWork(unet_samples=4, backward_samples=2)  # the conditional half only: e_0 takes no gradient
    assert scorer.work.evaluations == 4 + strategies.BACKWARD * 2
    scorer.decode(latents)
    assert scorer.work.vae_decodes == 2


@pytest.mark.parametrize("strategy", ["original", "remove_marker", "delayed_guidance"])
def test_copies_generations_at_w_1_take_one_pass_a_step_and_each_strategy_declares_what_it_takes(components, strategy):
    """At w = 1 the guided prediction is the conditional one: the copies check's generations there skip the
    unconditional pass (images within float rounding of the two-pass ones); a strategy whose sampling is a guidance
    schedule keeps both; at w = 7.5 both run. Each count equals what the strategy's row declares."""
    from cxrmem.copies.generation import generate
    from cxrmem.mitigation import strategy_sampling

    cfg = load_config(None, ["score.steps=3", "score.generations=2"])
    plan_settings = mitigation_settings(cfg)
    n, t = 2, 3
    for w in (1.0, 7.5):
        scorer = Scorer(components, settings(), device="cpu")
        plan = lambda texts, ids, emb, lat, g: strategy_sampling(scorer, strategy, texts, emb, lat, g, plan_settings)  # noqa: E731
        images = generate(scorer, PROMPTS[:2], IDS[:2], n, w, batch_size=2, plan=plan)
        declared = strategies.row(strategy).evaluations(plan_settings, (0, 0), (n, t), w)
        assert scorer.work.unet_samples == 2 * declared and scorer.work.vae_decodes == 2 * n
        both = Scorer(components, settings(), device="cpu")
        two_pass = both.sample(**plan(PROMPTS[:2], IDS[:2], both.encode(PROMPTS[:2]).embeddings, both.initial_latents(IDS[:2], n), w))
        torch.testing.assert_close(images, both.decode(two_pass.final_latents.flatten(0, 1)).reshape(images.shape), rtol=0, atol=1e-5)
    assert declared == 2 * n * t  # w = 7.5
    one_pass = strategies.row(strategy).evaluations(plan_settings, (0, 0), (n, t), 1.0)
    assert one_pass == (2 if strategies.row(strategy).guidance_schedule else 1) * n * t


def test_mitigation_rows_declare_the_work_counted(tiny_model_dir, components):
    """Every strategy at once (sampling shares its calls): the rows' declared evaluations sum to the count, and
    every generation is decoded once."""
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu", "score.steps=3", "score.generations=2",
                             "mitigation.n_generations=3", "mitigation.steps=2", "mitigation.optimisation_iters=2",
                             "mitigation.noise_iters=1"])  # fmt: skip
    scorer = Scorer(components, ScoreSettings.of(cfg.score), device="cpu")
    plan = mitigation_settings(cfg).replace(strategies=tuple(strategies.REGISTRY))
    rows, _ = mitigate_prompt(scorer, scorer.with_steps(plan.steps), PROMPTS[1], IDS[1], plan, vocabulary_words(scorer.tokenizer))
    assert scorer.work.evaluations == sum(r["evaluations"] for r in rows)
    assert scorer.work.backward_samples > 0  # the embedding optimisation's and the noise adjustment's gradients
    assert scorer.work.vae_decodes == len(strategies.REGISTRY) * 3


def test_the_cascade_records_what_its_stages_declare(tiny_model_dir, tmp_path):
    """Two screens, the full score continuing them, the audit sample: each counted as cxrmem/detectors.py declares
    it (less what the carried trajectories saved), and summary.json's cost section holds their sum as the score stage."""
    overrides = [f"run.output={tmp_path}", f"model.path={tiny_model_dir}", "model.device=cpu", "corpus.synthetic.n_reports=40",
                 "score.steps=3", "score.generations=2", "score.batch_size=8", "cascade.enabled=true", "cascade.audit_sample=4",
                 "cascade.stages=[{screen: dmem, keep_percent: 50, steps: 1, generations: 1}, {screen: dmem, keep_percent: 50, steps: 2}]",
                 "cascade.max_rounds=1"]  # fmt: skip
    assert main(["prepare", *overrides]) == 0
    cfg = load_config(None, overrides)
    cascade.run_cascade(cfg, Run.of(cfg).with_fingerprint("fp-tiny"))
    summary = json.loads(open(RunLayout(str(tmp_path)).summary).read())
    section, cost = summary["cascade"], summary["cost"]
    (run,) = section["rounds"]
    for i, (stage, done) in enumerate(zip(cascade.plan(cfg), run["stages"])):
        stage_cfg = cascade.stage_config(cfg, str(tmp_path / f"s{i}"), stage)
        declared = cascade.evaluations(cascade.screening_cost(stage_cfg), done["screened"], stage_cfg.score.batch_size)
        assert done["evaluations"] == declared - done["saved"], (i, done)
    assert run["stages"][1]["saved"] == 0  # G = 1 screens other trajectories than the G = 2 second stage: it restarts
    full_cost = cascade.dmem_cost(cfg.score, cfg.score.steps)
    full_saved = section["continuation"]["evaluations_saved"] - sum(s["saved"] for s in run["stages"])
    assert full_saved > 0  # the full score continued the second screen's two steps
    assert section["evaluations"]["full"] == cascade.evaluations(full_cost, run["stages"][-1]["kept"], 8) - full_saved
    assert section["evaluations"]["audit"] == cascade.evaluations(full_cost, run["sample"], 8) > 0
    assert cost["stages"] == {"score": {"unet_samples": section["evaluations"]["total"], "backward_samples": 0, "vae_decodes": 0,
                                        "evaluations": section["evaluations"]["total"]}}  # fmt: skip
    assert cost["corpus_prompts"] == section["corpus"] and cost["total"] == cost["stages"]["score"]
    assert cost["evaluations_per_prompt"] == pytest.approx(section["evaluations"]["per_prompt"])


def test_a_stage_records_its_own_work_beside_the_others(tmp_path):

    layout, store = RunLayout(str(tmp_path)), Store()
    store.write_table(pa.table({"prompt_id": ["a" * 16, "b" * 16]}), layout.prompts)
    run = Run(store, layout)
    run.record_cost("score", UNetWork(10).to_json())
    run.record_cost("mitigate", UNetWork(4, 3, 2).to_json())
    run.record_cost("score", UNetWork(6).to_json())  # a rerun replaces its stage's record
    cost = run.read_summary().cost
    assert cost.stages["score"]["evaluations"] == 6 and cost.stages["mitigate"]["evaluations"] == 4 + 2 * 3
    assert cost.total == {"unet_samples": 10, "backward_samples": 3, "vae_decodes": 2, "evaluations": 16}
    assert cost.evaluations_per_prompt == 8  # 16 evaluations over the corpus's 2 prompts


@pytest.mark.parametrize("steps, seed_mode", [(1, "shared"), (2, "per_prompt"), (5, "shared")])
def test_attribution_declares_the_work_counted_at_its_steps(components, steps, seed_mode):
    """The gradient and leave-one-out over the first k steps (5 > T = 3: all T), in calls of 2 variants: the count
    is what attribution.declared_evaluations declares for each prompt's units, and it follows k."""
    scorer = Scorer(components, settings(seed_mode=seed_mode), device="cpu")
    plan = AttributionSettings(steps=steps, generations=2, batch_size=2)
    tokens = attribute_prompts(scorer, PROMPTS, IDS, plan)
    units = tokens.groupby("prompt_id", sort=False).size()
    declared = [declared_evaluations(int(units[pid]), plan, scorer.settings) for pid in IDS]
    assert scorer.work.evaluations == sum(declared)
    full = [declared_evaluations(int(units[pid]), plan.replace(steps=3), scorer.settings) for pid in IDS]
    assert (sum(declared) < sum(full)) == (steps < 3)


def test_the_attribute_stage_records_its_work_and_the_null_models_at_the_same_steps(tiny_model_dir, tmp_path):
    """summary.json's cost of `cxrmem attribute` with the null model, at attribution.steps: the gradient of every
    prompt twice, and leave-one-out once, of the most memorized prompt only (attribution.leave_one_out_prompts=1)."""
    from cxrmem.stages import attribute

    cfg = load_config(None, [f"run.output={tmp_path}", f"model.path={tiny_model_dir}", "model.device=cpu", "score.steps=3",
                             "score.generations=2", "attribution.steps=2", "attribution.generations=1", "attribution.null_model=true",
                             "attribution.leave_one_out_prompts=1"])  # fmt: skip
    layout, store = RunLayout(str(tmp_path)), Store()
    store.write_text(layout.memorized, pd.DataFrame({"prompt": PROMPTS[1:], "prompt_id": IDS[1:]}).to_csv(index=False))
    n = len(PROMPTS) - 1
    store.write_table(pa.table({"prompt_id": IDS[1:], "d_mem": pa.array([1.0] * n, pa.float32()), "nonfinite": [False] * n,
                                "model_fingerprint": [fingerprint_model(cfg.model)] * n, "config_hash": ["h"] * n}), layout.scores)  # fmt: skip
    attribute.run(cfg)
    tokens = store.read_table(layout.tokens).to_pandas()
    with_loo = set(tokens.loc[tokens["loo_delta"].notna(), "prompt_id"])
    assert with_loo == {IDS[1]} and tokens["null_loo_delta"].isna().all() and tokens["null_grad_score"].notna().all()
    plan, score = attribution_settings(cfg), ScoreSettings.of(cfg.score)
    gradient = declared_evaluations(0, plan, score)
    loo = declared_evaluations(int((tokens["prompt_id"] == IDS[1]).sum()), plan, score) - gradient
    summary = json.loads(open(layout.summary).read())
    assert summary["cost"]["stages"]["attribute"]["evaluations"] == 2 * n * gradient + loo and summary["attribution"]["steps"] == 2
