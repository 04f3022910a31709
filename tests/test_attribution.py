"""Token attribution on the real tiny model: the gradient, word units, leave-one-out, the stage."""

import os
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from cxrmem.attribution import TOKEN_COLUMNS, attribute_prompt, attribute_prompts, attribution_summary, token_gradient_norms, word_units
from cxrmem.config import load_config
from cxrmem.corpus.text import MARKER_REGEX, delete_span, prompt_id
from cxrmem.models.loading import fingerprint_model, load_components
from cxrmem.runfiles import RunLayout
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.stages import attribute
from cxrmem.stages.worker import attribution_settings
from cxrmem.storage import Store

PATTERN = re.compile(MARKER_REGEX)
PROMPT = "Compared to ___, the heart is enlarged."
TINY = ["score.steps=2", "score.generations=1", "attribution.steps=1", "attribution.generations=2", "model.device=cpu"]


def tiny_config(model_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", *TINY, *overrides])


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    cfg = tiny_config(tiny_model_dir)
    return Scorer(load_components(cfg.model), ScoreSettings.of(cfg.score), device="cpu")


def step_inputs(scorer, k):
    latents = torch.randn((k, *scorer.latent_shape), generator=torch.Generator().manual_seed(0))
    return latents, scorer.timesteps()[:k]


def test_gradient_flows_only_into_the_conditional_embedding(scorer):
    latents, timesteps = step_inputs(scorer, 2)
    e_p = scorer.encode([PROMPT]).embeddings.clone().requires_grad_(True)
    norms = token_gradient_norms(scorer.conditional_noise_norms, latents, timesteps, e_p)
    assert e_p.grad is not None and e_p.grad.abs().sum() > 0
    assert norms.shape == (scorer.max_length,)
    assert torch.isfinite(norms).all() and (norms > 0).all()


def test_gradient_norms_are_per_sample_then_averaged(scorer):
    """The mean over samples of per-sample token norms, not the norm of a summed gradient."""
    latents, timesteps = step_inputs(scorer, 2)
    e_p, noise_norms = scorer.encode([PROMPT]).embeddings, scorer.conditional_noise_norms
    both = token_gradient_norms(noise_norms, latents, timesteps, e_p)
    each = [token_gradient_norms(noise_norms, latents[i : i + 1], timesteps[i : i + 1], e_p) for i in range(2)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2, rtol=1e-4, atol=1e-7)


def test_word_units_join_pieces_and_marker_runs(scorer):
    tokenizer = scorer.tokenizer
    units = word_units(tokenizer, PROMPT, PATTERN, scorer.max_length)
    assert [u.text for u in units] == ["Compared", "to", "___", ",", "the", "heart", "is", "enlarged", "."]
    assert [u.is_marker for u in units] == [False, False, True, False, False, False, False, False, False]
    marker = units[2]
    assert len(marker.positions) == 3  # `___` is three `_` pieces, one unit
    enlarged = units[7]
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(PROMPT)["input_ids"])
    assert len(enlarged.positions) > 1 and all(pieces[p].startswith("##") for p in enlarged.positions[1:])
    # Every token but [CLS], [SEP] and padding belongs to exactly one unit.
    positions = sorted(p for u in units for p in u.positions)
    assert positions == list(range(1, len(pieces) - 1))


def test_word_units_one_unit_per_marker_run(scorer):
    units = word_units(scorer.tokenizer, "XXXX XXXX ___ seen", PATTERN, scorer.max_length)
    assert [(u.text, u.is_marker) for u in units] == [("XXXX", True), ("XXXX", True), ("___", True), ("seen", False)]


@pytest.mark.parametrize(
    "text, span, expected",
    [
        (PROMPT, "___", "Compared to, the heart is enlarged."),
        ("On ___ at ___.", "___", "On at ___."),
        ("Stable (___) effusion.", "___", "Stable effusion."),
        ("___, stable.", "___", "stable."),
        ("A ___-year-old man.", "___", "A year-old man."),
        ("the heart is enlarged", "heart", "the is enlarged"),
        ("heart, lungs, ___, bones", "___", "heart, lungs, bones"),
        ("the heart.", ".", "the heart"),
    ],
)
def test_delete_span_tidies_only_the_cut(text, span, expected):
    start = text.index(span)
    assert delete_span(text, start, start + len(span)) == expected


def test_attribute_prompts_ranks_and_leave_one_out(tiny_model_dir, scorer):
    cfg = tiny_config(tiny_model_dir)
    prompts, ids = [PROMPT, "Normal."], ["0" * 16, "1" * 16]
    tokens = attribute_prompts(scorer, prompts, ids, attribution_settings(cfg))
    assert list(tokens.columns) == list(TOKEN_COLUMNS) == [
        "prompt_id", "prompt", "unit", "unit_index", "is_marker", "n_pieces",
        "grad_score", "grad_rank", "loo_delta", "loo_rank",
    ]  # fmt: skip
    first = tokens[tokens["prompt_id"] == ids[0]]
    assert first["unit"].tolist()[2] == "___" and first["is_marker"].sum() == 1
    assert sorted(first["grad_rank"]) == list(range(1, len(first) + 1))
    assert first.loc[first["grad_score"].idxmax(), "grad_rank"] == 1
    assert first.loc[first["loo_delta"].idxmax(), "loo_rank"] == 1
    # Leave-one-out is d_mem(prompt) - d_mem(prompt without the unit), rescored with the same seeds over the first
    # attribution.steps = 1 of the score's 2 steps.
    scores = scorer.score([PROMPT, "Compared to, the heart is enlarged."], [ids[0]] * 2, steps=1).d_mem
    full = scorer.score([PROMPT, "Compared to, the heart is enlarged."], [ids[0]] * 2).d_mem
    assert abs(float(full[0] - full[1]) - float(scores[0] - scores[1])) > 1e-5  # the steps change the delta: k is what ran
    assert first["loo_delta"].iloc[2] == pytest.approx(float(scores[0] - scores[1]), rel=1e-4, abs=1e-6)
    summary = attribution_summary(tokens)
    assert summary["prompts"] == 2 and summary["prompts_with_marker"] == 1
    marker_rank = first["grad_rank"].iloc[2]
    assert summary["gradient"]["marker_top1"] == float(marker_rank == 1)
    assert summary["gradient"]["marker_mean_rank"] == marker_rank
    assert summary["gradient"]["chance_top1"] == pytest.approx(1 / len(first))


def write_scores_key(layout, prompt_ids, fingerprint: str) -> None:
    """A scores.parquet of the memorized set as `fingerprint`'s model scored it (the stages check the model):
    the key columns, and d_mem (1.0) and nonfinite for the report."""
    import pyarrow as pa

    n = len(prompt_ids)
    Store().write_table(pa.table({"prompt_id": list(prompt_ids), "d_mem": pa.array([1.0] * n, pa.float32()), "nonfinite": [False] * n,
                                  "model_fingerprint": [fingerprint] * n, "config_hash": ["h"] * n}), layout.scores)  # fmt: skip


def test_attribute_run_writes_tokens_and_merges_summary(tiny_model_dir, tmp_path):
    cfg = tiny_config(
        tiny_model_dir, f"run.output={tmp_path}", "attribution.leave_one_out=false", "attribution.max_prompts=2"
    )
    layout = RunLayout(str(tmp_path))
    memorized = pd.DataFrame(
        {"prompt": [PROMPT, "Dr. ___ notified.", "Not attributed."], "prompt_id": ["a" * 16, "b" * 16, "c" * 16]}
    )
    Store().write_text(layout.memorized, memorized.to_csv(index=False))
    Store().write_json(layout.summary, {"analysis": {"memorized_count": 3}})
    write_scores_key(layout, memorized["prompt_id"], fingerprint_model(cfg.model))  # scored by this very model
    summary = attribute.run(cfg)
    tokens = Store().read_table(layout.tokens).to_pandas()
    assert set(tokens["prompt_id"]) == {"a" * 16, "b" * 16}
    assert tokens["loo_delta"].isna().all() and tokens["loo_rank"].isna().all()
    merged = Store().read_json(layout.summary)
    assert merged["analysis"] == {"memorized_count": 3}
    assert merged["attribution"]["prompts"] == summary.prompts == 2
    assert merged["attribution"]["leave_one_out"]["marker_top1"] is None


def test_attribute_run_without_memorized_set_says_what_to_run(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="cxrmem analyze"):
        attribute.run(tiny_config(tiny_model_dir, f"run.output={tmp_path}"))


NULL_PROMPTS = [
    "Compared to ___, the heart is enlarged.",
    "Dr. ___ was notified of the findings.",
    "Small left effusion, new since ___.",
    "No pneumothorax. Discussed with ___ at the bedside.",
    "Lines and tubes as on ___, unchanged.",
    "Mild edema, improved from ___ study.",
    "Right lower lobe opacity; ___ recommended follow up.",
    "Stable cardiomegaly compared with ___.",
]


def test_null_copy_is_seeded_and_leaves_the_callers_rng(tiny_model_dir):
    from cxrmem.models.components import null_copy

    components = load_components(tiny_config(tiny_model_dir).model)
    state = torch.random.get_rng_state()
    a, b, c = null_copy(components, 0), null_copy(components, 0), null_copy(components, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = lambda m: torch.cat([p.flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(weights(a.denoiser), weights(b.denoiser)) and torch.equal(weights(a.text_encoder), weights(b.text_encoder))
    assert not torch.equal(weights(a.denoiser), weights(c.denoiser))
    assert not torch.equal(weights(a.denoiser), weights(components.denoiser))  # re-initialised, not copied
    assert a.tokenizer is components.tokenizer and a.vae is None
    assert type(a.denoiser) is type(components.denoiser) and a.denoiser.config == components.denoiser.config


def test_null_attribution_shows_the_piece_bias_and_the_test_does_not_call_it(tiny_model_dir, tmp_path):
    """On a random model nothing is memorized, so the audited model is a null itself: the three-piece
    marker ranks first under the summed gradient on both, far above chance, and the paired test does
    not call the audited model's rate significant."""
    cfg = tiny_config(tiny_model_dir, f"run.output={tmp_path}", "attribution.null_model=true", "attribution.null_seed=3")
    layout = RunLayout(str(tmp_path))
    ids = [f"{i:016x}" for i in range(len(NULL_PROMPTS))]
    Store().write_text(layout.memorized, pd.DataFrame({"prompt": NULL_PROMPTS, "prompt_id": ids}).to_csv(index=False))
    write_scores_key(layout, ids, fingerprint_model(cfg.model))
    summary = attribute.run(cfg)
    tokens = Store().read_table(layout.tokens).to_pandas()
    assert {"null_grad_score", "null_grad_rank", "null_loo_delta", "null_loo_rank"} <= set(tokens.columns)
    assert tokens["null_grad_score"].notna().all() and not tokens["null_grad_score"].equals(tokens["grad_score"])
    null = summary.null
    gradient = null["gradient"]
    assert gradient["pairs"] == len(NULL_PROMPTS)
    chance = summary.gradient["chance_top1"]
    assert gradient["null_top1"] >= 0.5 > chance  # the multi-piece bias, with nothing learned
    assert gradient["top1_p"] is None or gradient["top1_p"] >= 0.05
    assert gradient["rank_p"] is None or gradient["rank_p"] >= 0.05
    # the per-piece mean removes most of the bias on the null
    assert null["gradient_per_piece_mean"]["null_top1"] < gradient["null_top1"]
    assert summary.null_seed == 3 and summary.null_seconds > 0



# -- early steps on the committed testbed (planted memorization) ------------------------------
TESTBED = "testbed/model"
# Two planted prompts of the committed testbed (32 and 128 copies in training, one with a marker), short enough for
# a full T = 50 leave-one-out in seconds. The second is memorized so strongly that deleting any word but the final
# period breaks it: its other 16 deltas are near-ties (1.57-1.75 at T = 20, G = 2) that only the late steps order.
PLANTED = ["Moderate left apical pneumothorax.",
           "In comparison with the study of ___: Borderline cardiomegaly, increased since the prior study."]  # fmt: skip


def early_and_full_deltas(scorer, prompt: str, settings) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """(attribute_prompt's leave-one-out deltas at settings.steps = k, the same over the first k steps of one full-T
    scoring of the variants, and that scoring's deltas over all T steps)."""
    pid, k = prompt_id(prompt), settings.steps
    early = attribute_prompt(scorer, prompt, pid, settings)["loo_delta"]
    variants = [prompt] + [delete_span(prompt, u.start, u.end) for u in word_units(scorer.tokenizer, prompt, PATTERN, scorer.max_length)]
    norms = scorer.score(variants, [pid] * len(variants)).step_norms.mean(axis=1)  # [variants, T]
    return early, norms[0, :k].mean() - norms[1:, :k].mean(axis=1), norms[0].mean() - norms[1:].mean(axis=1)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(TESTBED, "manifest.csv")), reason="no committed testbed")
def test_early_leave_one_out_ranks_words_as_the_full_schedule_does():
    """At the default attribution.steps k of T = 50 (G = 1 here), leave-one-out is the full run's first k steps, and
    agrees with the full T in rank within the tolerance bench/RESULTS.md measured at that k ("Attribution at early
    steps": mean Spearman 0.93 and 0.89, the full first unit in the early top 3 on 90% and 88% of the prompts):
    Spearman >= 0.75 on each prompt and the full setting's first unit in the early top 3 (~45 s alone)."""
    torch.set_num_threads(1)
    cfg = load_config(os.path.join("conf", "testbed.yaml"), ["score.generations=1", "score.batch_size=32"])
    scorer = Scorer(load_components(cfg.model), ScoreSettings.of(cfg.score), device="cpu")
    settings = attribution_settings(cfg)
    assert settings.steps < scorer.settings.steps == 50
    for prompt in PLANTED:
        early, prefix, full = early_and_full_deltas(scorer, prompt, settings)
        np.testing.assert_allclose(early, prefix, rtol=1e-3, atol=1e-5)  # k steps ran, from the full run's noises
        assert np.argmax(full) in early.nlargest(3).index, prompt
        assert spearmanr(early, full).statistic >= 0.75, prompt
