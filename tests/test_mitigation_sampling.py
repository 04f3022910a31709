"""The sampling-level strategies (attention re-scaling, delayed / opposite guidance, initial-noise adjustment):
each changes what it claims and nothing else, on the real tiny model."""

import copy

import numpy as np
import pytest
import torch

from cxrmem import strategies
from cxrmem.config import load_config
from cxrmem.mitigation import (
    MitigationSettings,
    adjust_initial_noise,
    guidance_schedule,
    marker_token_scales,
    mitigate_prompt,
    strategy_sampling,
    vocabulary_words,
)
from cxrmem.models.loading import load_components
from cxrmem.scoring.attention import rescale_attention
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.stages.worker import mitigation_settings

MARKED = "Compared to ___, the heart is enlarged."
PLAIN = "Small left pleural effusion."


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu", "score.steps=4", "score.generations=2",
                              "mitigation.n_generations=2", "mitigation.noise_iters=2"])  # fmt: skip


@pytest.fixture(scope="module")
def scorer(cfg):
    return Scorer(load_components(cfg.model, need_vae=True), ScoreSettings.of(cfg.score), device="cpu")


def settings(**changes) -> MitigationSettings:
    return MitigationSettings(strategies=("original",), **changes)


# -- attention re-scaling ------------------------------------------------------------------------
def test_rescaling_moves_only_the_target_tokens_mass_to_the_first_token():
    probs = torch.softmax(torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    scales = torch.ones(2, 1, 1, 6)
    scales[0, ..., 2:4] = 0.25  # prompt 0: tokens 2 and 3 are targets; prompt 1: none
    out = rescale_attention(probs, scales)
    torch.testing.assert_close(out[0, ..., 2:4], 0.25 * probs[0, ..., 2:4])
    torch.testing.assert_close(out[0, ..., [1, 4, 5]], probs[0, ..., [1, 4, 5]])  # non-targets exactly as they were
    torch.testing.assert_close(out[0, ..., 0], probs[0, ..., 0] + 0.75 * probs[0, ..., 2:4].sum(-1))
    torch.testing.assert_close(out[1], probs[1])  # scale 1 everywhere: unchanged
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 4))


def test_marker_token_scales_mark_exactly_the_marker_tokens(scorer):
    scales, has_marker = marker_token_scales(scorer.tokenizer, [MARKED, PLAIN], scorer.max_length, settings(attention_scale=0.1))
    assert list(has_marker) == [True, False] and (scales[1] == 1).all()
    ids = scorer.tokenizer(MARKED, padding="max_length", max_length=scorer.max_length)["input_ids"]
    targets = [scorer.tokenizer.convert_ids_to_tokens(ids[j]) for j in torch.nonzero(scales[0] != 1).flatten().tolist()]
    assert targets and set(targets) == {"_"} and torch.allclose(scales[0][scales[0] != 1], torch.tensor(0.1))


def test_rescaled_sampling_changes_the_marked_prompt_only(scorer):
    embeddings = scorer.encode([MARKED, PLAIN]).embeddings
    latents = scorer.initial_latents(["a" * 16, "b" * 16])
    plain = scorer.sample(embeddings, latents, guidance=1.0)
    scales, _ = marker_token_scales(scorer.tokenizer, [MARKED, PLAIN], scorer.max_length, settings())
    # The re-scaled path computes attention explicitly, not with the fused kernel: equal to rounding.
    ones = scorer.sample(embeddings, latents, guidance=1.0, token_scales=torch.ones_like(scales))
    torch.testing.assert_close(ones.final_latents, plain.final_latents, rtol=1e-4, atol=1e-4)  # scale 1: identity
    masked = scorer.sample(embeddings, latents, guidance=1.0, token_scales=scales)
    assert (masked.final_latents[0] - plain.final_latents[0]).abs().max() > 1e-2
    torch.testing.assert_close(masked.final_latents[1], plain.final_latents[1], rtol=1e-4, atol=1e-4)  # no marker


# -- delayed and opposite guidance ---------------------------------------------------------------
def test_guidance_strategies_schedule_their_early_weight_then_plain_guidance(scorer):
    embeddings, latents = scorer.encode([MARKED]).embeddings, scorer.initial_latents(["a" * 16])

    def schedule(name: str, w: float, **changes):
        inputs = strategy_sampling(scorer, name, [MARKED], embeddings, latents, w, settings(**changes))["guidance"]
        return inputs.tolist() if torch.is_tensor(inputs) else inputs

    assert scorer.settings.steps == 4
    assert schedule("delayed_guidance", 7.5, guidance_delay=0.5) == [[0.0, 0.0, 7.5, 7.5]]
    assert schedule("opposite_guidance", 1.0, guidance_delay=0.5, opposite_scale=3.0) == [[-3.0, -3.0, 1.0, 1.0]]
    assert schedule("original", 7.5) == 7.5
    assert guidance_schedule(0.0, 7.5, 8, 0.0).tolist() == [7.5] * 8


def test_delayed_trajectory_follows_the_early_weight_then_leaves_it(scorer):
    embeddings = scorer.encode([MARKED]).embeddings
    latents = scorer.initial_latents(["a" * 16])
    steps = scorer.settings.steps
    flat = scorer.sample(embeddings, latents, guidance=torch.full((1, steps), 7.5))
    torch.testing.assert_close(flat.final_latents, scorer.sample(embeddings, latents, guidance=7.5).final_latents)
    schedule = guidance_schedule(0.0, 7.5, steps, 0.5).expand(1, -1)
    delayed = scorer.sample(embeddings, latents, guidance=schedule, keep_inputs=True)
    unguided = scorer.sample(embeddings, latents, guidance=0.0, keep_inputs=True)
    guided = scorer.sample(embeddings, latents, guidance=7.5, keep_inputs=True)
    # Steps 0 and 1 are unguided: the inputs of steps 0..2 are the unguided run's, then the runs part.
    for i in range(3):
        torch.testing.assert_close(delayed.model_inputs[i], unguided.model_inputs[i])
    assert not torch.allclose(delayed.model_inputs[1], guided.model_inputs[1])
    assert not torch.allclose(delayed.final_latents, unguided.final_latents, atol=1e-4)
    # d_mem's norms need both halves at every step, whatever the weight: all steps recorded.
    assert delayed.step_norms.shape == (1, 2, steps) and torch.isfinite(delayed.step_norms).all()


# -- initial-noise adjustment --------------------------------------------------------------------
def test_noise_adjustment_lowers_the_first_step_norm_and_keeps_the_latent_norm(scorer):
    embedding = scorer.encode([MARKED]).embeddings
    latents = scorer.initial_latents(["a" * 16], 3)[0]
    adjusted = adjust_initial_noise(scorer, latents, embedding, settings(noise_iters=3, noise_lr=0.05))
    torch.testing.assert_close(adjusted.flatten(1).norm(dim=1), latents.flatten(1).norm(dim=1))
    with torch.no_grad():
        before, after = scorer.first_step_noise_norms(latents, embedding), scorer.first_step_noise_norms(adjusted, embedding)
    assert (after < before).all()
    assert not torch.allclose(adjusted, latents)
    torch.testing.assert_close(adjust_initial_noise(scorer, latents, embedding, settings(noise_iters=0)), latents)


def test_noise_adjustment_changes_only_the_latents(scorer):
    embeddings = scorer.encode([MARKED]).embeddings
    latents = scorer.initial_latents(["a" * 16])
    inputs = strategy_sampling(scorer, "noise_adjustment", [MARKED], embeddings, latents, 1.0, settings(noise_iters=1))
    assert inputs["guidance"] == 1.0 and inputs["cond_embeddings"] is embeddings and "token_scales" not in inputs
    assert inputs["latents"].shape == latents.shape and not torch.allclose(inputs["latents"], latents)


# -- the strategies in the paired experiment -----------------------------------------------------
def test_new_strategies_in_the_experiment_rows_costs_and_changed(cfg, scorer):
    names = ["original", "attention_rescaling", "delayed_guidance", "opposite_guidance", "noise_adjustment"]
    s = mitigation_settings(cfg).replace(strategies=tuple(names))
    vocab = vocabulary_words(scorer.tokenizer)
    rows = {p: mitigate_prompt(scorer, scorer, p, "c" * 16, s, vocab)[0] for p in (MARKED, PLAIN)}
    marked, plain = ({r["strategy"]: r for r in rows[p]} for p in (MARKED, PLAIN))
    assert [marked[n]["changed"] for n in names] == [False, True, True, True, True]
    assert not plain["attention_rescaling"]["changed"]  # no marker to re-scale
    # An unchanged strategy takes original's results; re-scaling a marker must move d_mem by more than the
    # float32 noise of batch positions (1.8e-5 relative, tests/test_mitigation.py): it moves it by percents.
    assert plain["attention_rescaling"]["d_mem"] == plain["original"]["d_mem"]
    assert abs(marked["attention_rescaling"]["d_mem"] / marked["original"]["d_mem"] - 1) > 1e-3
    assert all(np.isfinite(r["d_mem"]) and r["pairwise_distance"] > 0 for r in rows[MARKED])


def test_declared_evaluations_are_the_unet_work_counted(cfg, scorer):
    """Each strategy alone through mitigate_prompt, its UNet work counted by the Scorer (`Scorer.work`): the row
    declares it, the scoring of the G noises over the scorer's T_s steps, the N generations over the sampler's T
    (mitigation.steps, here not the scorer's) and the strategy's preparation of its initial noises."""
    settings = mitigation_settings(cfg).replace(steps=2, optimisation_iters=2)
    sampler, vocab = scorer.with_steps(settings.steps), vocabulary_words(scorer.tokenizer)
    g, n, t_s = scorer.settings.generations, settings.n_generations, scorer.settings.scored_steps

    def run(name: str) -> tuple[int, int]:
        before = copy.copy(scorer.work)
        rows, _ = mitigate_prompt(scorer, sampler, MARKED, "c" * 16, settings.replace(strategies=(name,)), vocab)
        return (scorer.work - before).evaluations, rows[0]["evaluations"]

    original, declared_original = run("original")
    assert original == declared_original == g * 2 * t_s + n * 2 * sampler.settings.steps  # both halves at every step
    for name in strategies.REGISTRY:
        counted, declared = run(name)
        assert counted == declared, (name, counted, declared)
        assert (counted > original) == (name in ("embedding_optimisation", "noise_adjustment")), name


def test_a_strategy_that_changes_nothing_takes_originals_results_at_no_cost(cfg, scorer):
    """On a prompt without a marker the marker rewrites and attention re-scaling change nothing: their rows are
    original's (d_mem, spread, fidelity), declare 0 evaluations, and the Scorer counts only the strategies sampled."""
    settings = mitigation_settings(cfg).replace(steps=2, optimisation_iters=2)
    vocab = vocabulary_words(scorer.tokenizer)
    before = copy.copy(scorer.work)
    rows, _ = mitigate_prompt(scorer, scorer.with_steps(2), PLAIN, "d" * 16, settings, vocab)
    counted = (scorer.work - before).evaluations
    by = {r["strategy"]: r for r in rows}
    unchanged = {name for name, r in by.items() if not r["changed"] and name != "original"}
    assert {"remove_marker", "random_word", "attention_rescaling"} <= unchanged and "random_insertion" not in unchanged
    for name in unchanged:
        assert by[name]["evaluations"] == 0
        assert (by[name]["d_mem"], by[name]["pairwise_distance"]) == (by["original"]["d_mem"], by["original"]["pairwise_distance"])
    assert counted == sum(r["evaluations"] for r in rows) > 0
    before = copy.copy(scorer.work)  # without original to take results from, an unchanged strategy is sampled
    alone = mitigate_prompt(scorer, scorer.with_steps(2), PLAIN, "d" * 16, settings.replace(strategies=("remove_marker",)), vocab)[0][0]
    assert (scorer.work - before).evaluations == alone["evaluations"] > 0
