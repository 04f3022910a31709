"""The scorer against an independent reference, and its invariances (docs/design.md, The score)."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention
from omegaconf import OmegaConf

from cxrmem.models.loading import load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.scoring.attention import SharedText
from cxrmem.scoring.dmem import d_mem
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.seeds import initial_latents, noise_seed
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings

PROMPTS = [
    "No acute cardiopulmonary process.",
    "Compared to ___, moderate right pleural effusion has increased.",
    "Endotracheal tube terminates 4 cm above the carina. Dr. ___ was notified at ___ a.m.",
    "Mild cardiomegaly without pulmonary edema.",
]
IDS = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in PROMPTS]


def score_cfg(**overrides):
    return ScoreSettings.of(OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"generations": 2, "steps": 4, **overrides}))


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": tiny_model_dir}))


def test_noise_seed_follows_design_formula():
    digest = hashlib.sha256(b"7:3").digest()[:8]
    assert noise_seed(7, 3) == int.from_bytes(digest, "little") & (2**63 - 1)
    assert noise_seed(7, 3, "abc") == int.from_bytes(hashlib.sha256(b"7:abc:3").digest()[:8], "little") & (2**63 - 1)


def test_initial_latents_shared_and_per_prompt():
    shared = initial_latents((4, 8, 8), seed=1, generations=3)
    assert shared.shape == (1, 3, 4, 8, 8)
    expected = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(noise_seed(1, 2)))
    assert torch.equal(shared[0, 2], expected)
    per_prompt = initial_latents((4, 8, 8), seed=1, generations=3, prompt_ids=["a", "b"])
    assert per_prompt.shape == (2, 3, 4, 8, 8)
    assert not torch.equal(per_prompt[0], per_prompt[1])
    assert torch.equal(per_prompt[1, 0], initial_latents((4, 8, 8), 1, 1, ["b"])[0, 0])


def test_d_mem_flags_nonfinite_instead_of_averaging():
    norms = torch.tensor([[[1.0, 3.0], [2.0, 2.0]], [[1.0, float("inf")], [1.0, 1.0]]])
    score, nonfinite = d_mem(norms)
    assert score[0].item() == pytest.approx(2.0)
    assert torch.isnan(score[1]) and nonfinite.tolist() == [False, True]


def reference_norms(components, prompt: str, latents: torch.Tensor, steps: int, guidance: float) -> np.ndarray:
    """One prompt at a time through diffusers' own pipeline; UNet outputs captured by a forward hook."""
    def own_scheduler():  # a fresh copy each time: the pipeline must not alter the model's components
        return type(components.scheduler).from_config(components.scheduler.config)

    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.denoiser,
        scheduler=own_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # The pipeline's constructor turns clip_sample off (a legacy fix for old SD checkpoints); the
    # testbed's pixel-space scheduler clips on purpose, so the reference gets the model's own back.
    pipe.scheduler = own_scheduler()
    captured = []
    # The pipeline calls the UNet with return_dict=False, so the hook sees a tuple.
    handle = components.denoiser.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    size = latents.shape[-1] * pipe.vae_scale_factor  # pixel-space models have no VAE: factor 8, unused
    try:
        pipe(
            prompt,
            height=size,
            width=size,
            latents=latents,
            num_images_per_prompt=latents.shape[0],
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="latent",
        )
    finally:
        handle.remove()
    norms = []
    for eps in captured:  # the pipeline batches [uncond; cond]
        eps_uncond, eps_cond = eps.chunk(2)
        norms.append((eps_cond - eps_uncond).flatten(1).norm(dim=1))
    return torch.stack(norms, dim=1).numpy()  # [G, T]


TESTBED = Path(__file__).resolve().parents[1] / "testbed" / "model"
# Both models are held to rtol 1e-4. A random tiny model's text barely moves the noise
# (||eps_c - eps_u|| falls to ~1e-5 ||eps|| at late steps), so float32 rounding of eps
# (~6e-8 ||eps||, ||eps|| ~ 16 here) is also allowed as an absolute tolerance there.
TINY_ATOL = 1e-6


def load_model(path: str):
    return load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": path}))


@pytest.mark.parametrize("model, atol", [("tiny", TINY_ATOL), ("testbed", 0.0)])
@pytest.mark.parametrize("seed_mode", ["shared", "per_prompt"])
def test_scorer_matches_diffusers_pipeline_reference(request, model, atol, seed_mode):
    path = str(TESTBED) if model == "testbed" else request.getfixturevalue("tiny_model_dir")
    cfg = score_cfg(seed_mode=seed_mode, steps=5, generations=2)
    scorer = Scorer(load_model(path), cfg, device="cpu")
    batch = scorer.score(PROMPTS, IDS)
    latents = scorer.initial_latents(IDS)
    reference = load_model(path)  # its own copy: the scorer changes its UNet's attention processors
    for i, prompt in enumerate(PROMPTS):
        expected = reference_norms(reference, prompt, latents[i].clone(), cfg.steps, cfg.guidance_scale)
        np.testing.assert_allclose(batch.step_norms[i], expected, rtol=1e-4, atol=atol)
        assert batch.d_mem[i] == pytest.approx(expected.mean(), rel=1e-4, abs=atol)


@pytest.mark.parametrize("model", ["tiny", "testbed"])
def test_shared_text_attention_equals_diffusers_attention(request, model):
    path = str(TESTBED) if model == "testbed" else request.getfixturevalue("tiny_model_dir")
    scorer, stock = Scorer(load_model(path), score_cfg(), device="cpu"), load_model(path).denoiser
    assert scorer.shares_text
    prompts = SharedText(scorer.encode(PROMPTS).embeddings)
    n, g = len(PROMPTS), 3
    cond = prompts.embeddings.repeat_interleave(g, dim=0)
    uncond = scorer.empty_embedding.expand_as(cond)
    x = torch.randn(2 * n * g, *scorer.latent_shape, generator=torch.Generator().manual_seed(0))
    t = scorer.timesteps()[1]
    cases = [  # the layouts the sampling loop uses: both halves of guidance, then each half alone
        (x, torch.cat([uncond, cond]), [(scorer.empty_text, n * g), (prompts, g)]),
        (x[: n * g], cond, [(prompts, g)]),
        (x[:g], uncond[:g], [(scorer.empty_text, g)]),
    ]
    with torch.no_grad():
        for latents, context, layout in cases:
            shared = scorer.predict_noise(latents, t, context, layout)
            expected = stock(latents, t, encoder_hidden_states=context).sample
            torch.testing.assert_close(shared, expected, rtol=1e-5, atol=1e-6)


def test_text_keys_and_values_are_projected_once_per_trajectory(components):
    scorer = Scorer(components, score_cfg(steps=4), device="cpu")
    calls = []
    cross = [m for m in components.denoiser.modules() if isinstance(m, Attention) and m.is_cross_attention]
    handles = [m.to_k.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0])) for m in cross]
    try:
        scorer.score(PROMPTS, IDS)
        first = list(calls)
        calls.clear()
        scorer.score(PROMPTS, IDS)
    finally:
        for handle in handles:
            handle.remove()
    # 4 steps x 2 x 4 prompts x 2 generations samples per layer without sharing; with it, each
    # layer projects the 4 prompts once and the empty prompt once for the scorer's lifetime.
    assert sorted(first) == sorted([1, len(PROMPTS)] * len(cross))
    assert calls == [len(PROMPTS)] * len(cross)


def test_batch_invariance(components):
    scorer = Scorer(components, score_cfg(), device="cpu")
    together = scorer.score(PROMPTS, IDS)
    alone = [scorer.score([p], [i]) for p, i in zip(PROMPTS, IDS)]
    reordered = scorer.score(PROMPTS[::-1], IDS[::-1])
    for k in range(len(PROMPTS)):
        np.testing.assert_allclose(alone[k].step_norms[0], together.step_norms[k], rtol=1e-4, atol=TINY_ATOL)
        np.testing.assert_allclose(reordered.step_norms[len(PROMPTS) - 1 - k], together.step_norms[k], rtol=1e-4, atol=TINY_ATOL)


def test_seed_modes_differ_and_are_reproducible(components):
    shared = Scorer(components, score_cfg(seed_mode="shared"), device="cpu").score(PROMPTS[:2], IDS[:2])
    per_prompt = Scorer(components, score_cfg(seed_mode="per_prompt"), device="cpu").score(PROMPTS[:2], IDS[:2])
    again = Scorer(components, score_cfg(seed_mode="per_prompt"), device="cpu").score(PROMPTS[:2], IDS[:2])
    assert not np.allclose(shared.step_norms, per_prompt.step_norms)
    np.testing.assert_array_equal(per_prompt.step_norms, again.step_norms)


def test_screening_scores_the_first_k_steps_of_the_full_trajectory(components):
    scorer = Scorer(components, score_cfg(steps=6), device="cpu")
    full = scorer.score(PROMPTS[:2], IDS[:2])
    screened = scorer.score(PROMPTS[:2], IDS[:2], steps=2)
    assert screened.step_norms.shape == (2, 2, 2)
    np.testing.assert_allclose(screened.step_norms, full.step_norms[:, :, :2], rtol=1e-5)


def test_nonfinite_weights_are_flagged(components, tiny_model_dir):
    broken = load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": tiny_model_dir}))
    with torch.no_grad():
        broken.denoiser.conv_out.bias.fill_(float("nan"))
    batch = Scorer(broken, score_cfg(), device="cpu").score(PROMPTS[:1], IDS[:1])
    assert batch.nonfinite.tolist() == [True] and np.isnan(batch.d_mem[0])


def test_truncation_flag(components):
    scorer = Scorer(components, score_cfg(steps=1, generations=1), device="cpu")
    long_prompt = " ".join(["pleural effusion"] * 200)
    encoded = scorer.encode([long_prompt, PROMPTS[0]])
    assert encoded.truncated.tolist() == [True, False]
    assert encoded.n_tokens[0] > components.max_length
    assert encoded.embeddings.shape[1] == components.max_length
