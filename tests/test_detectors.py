"""The detectors of cxrmem/detectors.py on tiny real models: values, batch invariance, declared costs."""

import hashlib
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from cxrmem import detectors
from cxrmem.detectors import REGISTRY, Cost, DetectorSettings
from cxrmem.models.loading import load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings

PROMPTS = [
    "No acute cardiopulmonary process.",
    "Compared to ___, moderate right pleural effusion has increased.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Mild cardiomegaly without pulmonary edema.",
]
IDS = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in PROMPTS]
SETTINGS = DetectorSettings(generations=2, steps=2)
TESTBED = os.path.join(os.path.dirname(__file__), os.pardir, "testbed", "model")


def make_scorer(model_dir: str, **score) -> Scorer:
    components = load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": model_dir}))
    return Scorer(components, ScoreSettings.of(OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"steps": 4, **score})), device="cpu")


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return make_scorer(tiny_model_dir)


# -- pure functions ---------------------------------------------------------------------------
def test_entropy_of_uniform_and_peaked_token_distributions():
    uniform = torch.full((1, 2, 3, 8), 1 / 8)
    peaked = torch.zeros(1, 1, 1, 8)
    peaked[..., 0] = 1.0
    assert detectors.attention_entropy(uniform)[0] == pytest.approx(math.log(8), rel=1e-6)
    assert detectors.attention_entropy(peaked)[0] == pytest.approx(0.0, abs=1e-6)


def test_alignment_is_the_cosine_of_uncond_and_guidance_direction():
    u = torch.tensor([[[1.0, 0.0]]])  # [N=1, G=1, 2]
    assert detectors.alignment(u, torch.tensor([[[3.0, 0.0]]]))[0] == pytest.approx(1.0)
    assert detectors.alignment(u, torch.tensor([[[1.0, 5.0]]]))[0] == pytest.approx(0.0, abs=1e-7)


def test_screen_top_orients_scores_and_skips_nonfinite(monkeypatch):
    ids = np.array(["a", "b", "c", "d"])
    scores = np.array([3.0, np.nan, 1.0, 2.0])
    assert detectors.screen_top(ids, scores, 50.0).tolist() == ["a", "d"]
    lower = detectors.Detector("lower", ("lower",), False, lambda g, k, s: Cost(g), "test")
    monkeypatch.setitem(REGISTRY, "lower", lower)
    assert detectors.screen_top(ids, scores, 50.0, screen="lower").tolist() == ["c", "d"]


def test_declared_costs():
    assert REGISTRY["dmem"].cost(4, 1, True) == Cost(4, 4)
    assert REGISTRY["dmem"].cost(4, 50, True).evaluations(10) == 10 * 4 * 99 + 4  # the cascade's 2 G T, less shared uncond
    assert REGISTRY["dmem"].cost(4, 50, False).evaluations(10) == 2 * 4 * 50 * 10
    assert REGISTRY["sharpness"].cost(1, 1, True) == Cost(1, 1, jvps_per_prompt=2)
    assert REGISTRY["anisotropy"].cost(1, 1, False) == Cost(4)
    assert REGISTRY["attention_entropy"].cost(3, 1, True) == Cost(3)


# -- on the tiny model ----------------------------------------------------------------------
def test_every_detector_gives_one_finite_value_per_prompt(scorer):
    out = scorer.detect(PROMPTS, IDS, list(REGISTRY), SETTINGS)
    expected = {column for d in REGISTRY.values() for column in d.columns}
    assert set(out) == expected
    for column, values in out.items():
        assert values.shape == (len(PROMPTS),) and values.dtype == np.float32, column
        assert np.isfinite(values).all(), column
    assert (out["attention_entropy"] > 0).all() and (np.abs(out["anisotropy_alignment"]) <= 1 + 1e-6).all()


def test_dmem_detector_is_the_screening_score(scorer):
    out = scorer.detect(PROMPTS, IDS, ["dmem"], DetectorSettings(generations=4, steps=2))
    np.testing.assert_allclose(out["dmem"], scorer.score(PROMPTS, IDS, steps=2).d_mem, rtol=1e-6)


# The alignment is a cosine of eps_c - eps_u at low noise, where a random tiny model's text moves
# eps by ~1e-3 of its norm: float32 rounding that depends on the batch shows up at ~1e-5 of the
# cosine's range [-1, 1], so the two columns holding it get an absolute tolerance of 1e-4.
ATOL = {"anisotropy": 1e-4, "anisotropy_alignment": 1e-4}


@pytest.mark.parametrize("seed_mode", ["shared", "per_prompt"])
def test_batch_invariance(tiny_model_dir, seed_mode):
    scorer = make_scorer(tiny_model_dir, seed_mode=seed_mode)
    whole = scorer.detect(PROMPTS, IDS, list(REGISTRY), SETTINGS)
    parts = [scorer.detect(PROMPTS[i : i + 1], IDS[i : i + 1], list(REGISTRY), SETTINGS) for i in (3, 0)]
    for column, values in whole.items():
        atol = ATOL.get(column, 1e-6)
        np.testing.assert_allclose(parts[0][column][0], values[3], rtol=1e-4, atol=atol, err_msg=column)
        np.testing.assert_allclose(parts[1][column][0], values[0], rtol=1e-4, atol=atol, err_msg=column)


@pytest.mark.parametrize("seed_mode", ["shared", "per_prompt"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_unet_work_matches_declared_cost(tiny_model_dir, name, seed_mode):
    scorer = make_scorer(tiny_model_dir, seed_mode=seed_mode)
    samples = []
    hook = scorer.denoiser.module.register_forward_hook(lambda module, args, kwargs, out: samples.append(args[0].shape[0]), with_kwargs=True)
    try:
        scorer.detect(PROMPTS[:3], IDS[:3], [name], SETTINGS)
    finally:
        hook.remove()
    cost = REGISTRY[name].cost_of(SETTINGS.generations, SETTINGS.steps, seed_mode == "shared", scorer.settings.steps)
    # a JVP call runs each of its samples once, and so does the forward pass of a VJP
    assert sum(samples) == cost.evaluations(3) + cost.jvps(3) + cost.vjps(3)


@pytest.mark.skipif(not os.path.exists(os.path.join(TESTBED, "manifest.csv")), reason="no committed testbed")
def test_sharpness_jvp_matches_central_difference():
    """On the trained testbed (a random model's text barely moves eps, so a difference quotient of
    eps_c - eps_u would be float32 rounding), along the guidance direction scaled to RMS 1:
    the JVP agrees with (f(x + h v) - f(x - h v)) / 2h to 2% at h = 1e-2 (1e-1: curvature, 1e-3: rounding)."""
    scorer = make_scorer(TESTBED, steps=20)
    embeddings = scorer.encode(PROMPTS[:2]).embeddings
    latents = scorer.initial_latents(IDS[:2], 1)
    t = scorer.timesteps()[0]
    u, c = scorer.noise_pair(embeddings, latents, t, shared=False)
    v = (c - u) / (c - u).flatten(2).norm(dim=2)[..., None, None, None] * (c[0, 0].numel() ** 0.5)
    product = scorer.noise_difference_jvp(embeddings, latents, t, v)
    h = 1e-2
    plus_u, plus_c = scorer.noise_pair(embeddings, latents + h * v, t, shared=False)
    minus_u, minus_c = scorer.noise_pair(embeddings, latents - h * v, t, shared=False)
    quotient = ((plus_c - plus_u) - (minus_c - minus_u)) / (2 * h)
    error = (product - quotient).flatten(1).norm(dim=1) / product.flatten(1).norm(dim=1)
    assert (error < 2e-2).all(), error


def test_token_attention_sums_to_one_and_restores_processors(scorer):
    before = {name: type(p) for name, p in scorer.denoiser.module.attn_processors.items()}
    probs = scorer.token_attention(scorer.encode(PROMPTS[:2]).embeddings, scorer.initial_latents(IDS[:2], 2), scorer.timesteps()[0])
    n_cross = sum(1 for m in scorer.denoiser.module.modules() if getattr(m, "is_cross_attention", False))
    assert probs.shape == (2, 2, n_cross, scorer.empty_embedding.shape[1])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, n_cross))
    assert {name: type(p) for name, p in scorer.denoiser.module.attn_processors.items()} == before


# -- on the committed testbed ----------------------------------------------------------------
@pytest.mark.slow  # ~15 s alone, over a minute on a loaded 2-core machine
@pytest.mark.skipif(not os.path.exists(os.path.join(TESTBED, "manifest.csv")), reason="no committed testbed")
def test_best_screen_holds_every_planted_prompt():
    """The bench's best screen, the first-step d_mem with 4 generations (4.3 UNet evaluations per
    prompt, AUC 0.998 in bench/RESULTS.md "Detectors"), puts all 24 planted prompts of the testbed
    inside its top 15% of 24 planted + 200 never-duplicated prompts (T = 20)."""
    torch.set_num_threads(1)
    manifest = pd.read_csv(os.path.join(TESTBED, "manifest.csv"))
    unique = manifest[~manifest.planted & (manifest.n_copies == 1)].sample(n=200, random_state=0)
    frame = pd.concat([manifest[manifest.planted], unique])
    scorer = make_scorer(TESTBED, steps=20)
    ids = np.array([hashlib.sha256(p.encode()).hexdigest()[:16] for p in frame.prompt])
    scores = np.concatenate(
        [
            scorer.detect(frame.prompt.tolist()[i : i + 32], ids[i : i + 32].tolist(), ["dmem"], DetectorSettings(4, 1))["dmem"]
            for i in range(0, len(frame), 32)
        ]
    )
    kept = set(detectors.screen_top(ids, scores, 15.0, screen="dmem").tolist())
    assert set(ids[frame.planted.to_numpy()].tolist()) <= kept


# -- the issue-21 detectors: latent updates, Hessian difference, bright ending ----------------
def test_latent_update_is_the_norm_of_the_ddim_step(scorer):
    """k = 1: the mean over G of ||x_after_one_step - x_T||, from a trajectory run here."""
    out = scorer.detect(PROMPTS[:2], IDS[:2], ["latent_update"], DetectorSettings(generations=2, steps=1))
    latents = scorer.initial_latents(IDS[:2], 2)
    trajectory = scorer.sample(scorer.encode(PROMPTS[:2]).embeddings, latents, steps=1)
    expected = (trajectory.final_latents - latents).flatten(2).norm(dim=2).mean(dim=1).numpy()
    np.testing.assert_allclose(out["latent_update"], expected, rtol=1e-5)
    assert detectors.mean_over_steps(torch.tensor([[[1.0, float("nan")]], [[1.0, 3.0]]])).tolist()[1] == 2.0
    assert np.isnan(detectors.mean_over_steps(torch.tensor([[[1.0, float("nan")]]]))[0])


def test_bright_ending_is_d_mem_under_a_uniform_mask_and_follows_the_mask():
    rng = torch.Generator().manual_seed(0)
    differences = [torch.randn(2, 3, 1, 4, 4, generator=rng) for _ in range(5)]  # T = 5 steps, N = 2, G = 3
    step_norms = torch.stack([d.flatten(2).norm(dim=2) for d in differences], dim=-1)
    uniform = torch.full((2, 3, 4, 4), 0.25)
    out = detectors.bright_ending_scores(uniform, differences)
    np.testing.assert_allclose(out["bright_ending"], step_norms.flatten(1).mean(dim=1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(out["bright_ending_attention"], [0.25, 0.25])
    # A mask on the pixels where eps_c - eps_u is large scores above one on the pixels where it is small.
    big = torch.zeros(1, 1, 1, 4, 4)
    big[..., :2, :] = 10.0
    steps = [big + 0.1]
    on, off = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    on[..., :2, :], off[..., 2:, :] = 1.0, 1.0
    assert detectors.bright_ending_scores(on, steps)["bright_ending"][0] > 5 * detectors.bright_ending_scores(off, steps)["bright_ending"][0]


def test_end_token_maps_pick_each_prompts_own_token(scorer):
    """Maps of two prompts with their own end positions match each prompt's maps alone, and summed over
    every token position they are 1 at every latent pixel (each query's attention sums to one)."""
    embeddings = scorer.encode(PROMPTS[:2]).embeddings
    x_in = scorer.initial_latents(IDS[:2], 2)
    t = scorer.timesteps()[-1]
    both = scorer.end_token_maps(embeddings, x_in, t, torch.tensor([3, 5]))
    alone = scorer.end_token_maps(embeddings[1:], x_in[1:], t, torch.tensor([5]))
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(both[0], scorer.end_token_maps(embeddings[:1], x_in[:1], t, torch.tensor([5]))[0])
    total = sum(scorer.end_token_maps(embeddings[:1], x_in[:1], t, torch.tensor([i])) for i in range(scorer.max_length))
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not os.path.exists(os.path.join(TESTBED, "manifest.csv")), reason="no committed testbed")
def test_hessian_difference_gradient_matches_central_difference():
    """On the trained testbed: <grad_x f, v> for f = 1/2 ||eps_c||^2 - 1/2 ||eps_u||^2 agrees with
    (f(x + h v) - f(x - h v)) / 2h to 2% along the gradient scaled to RMS 1 (a random direction is
    nearly orthogonal to it, and the quotient is then mostly rounding)."""
    scorer = make_scorer(TESTBED, steps=20)
    embeddings = scorer.encode(PROMPTS[:2]).embeddings
    latents = scorer.initial_latents(IDS[:2], 1)
    t = scorer.timesteps()[0]
    gradient = scorer.noise_energy_gradient(embeddings, latents, t)
    v = gradient / gradient.flatten(2).norm(dim=2)[..., None, None, None] * (gradient[0, 0].numel() ** 0.5)

    def energy(x):
        u, c = scorer.noise_pair(embeddings, x, t, shared=False)
        return 0.5 * (c.double().flatten(1).pow(2).sum(1) - u.double().flatten(1).pow(2).sum(1))

    h = 1e-2
    quotient = (energy(latents + h * v) - energy(latents - h * v)) / (2 * h)
    directional = (gradient.double() * v.double()).flatten(1).sum(1)
    assert torch.allclose(directional, quotient, rtol=2e-2), (directional, quotient)
    np.testing.assert_allclose(
        scorer.detect(PROMPTS[:2], IDS[:2], ["hessian_difference"], DetectorSettings(1))["hessian_difference"],
        gradient.double().flatten(1).pow(2).sum(1).numpy(), rtol=1e-4,
    )


def test_declared_costs_of_the_issue_21_detectors():
    """Counted by hand from what each method runs, not from the cost functions: with shared noises the
    first step is G conditional samples per prompt and G unconditional ones per batch, every later
    step 2G per prompt."""
    # latent_update: the d_mem trajectory, G=4, k=2: 4 + 8 per prompt, 4 per batch
    assert REGISTRY["latent_update"].cost(4, 2, True) == Cost(12, 4)
    assert REGISTRY["latent_update"].cost(4, 2, False) == Cost(16)
    # hessian_difference: both halves of G=3 noises through one forward with its backward
    assert REGISTRY["hessian_difference"].cost(3, 1, True) == Cost(0, vjps_per_prompt=6)
    # bright_ending runs the whole schedule (T=50) whatever detect.steps says, then the last step's
    # conditional pass again: 2 + 2 x 2 x 49 + 2 per prompt for G=2
    assert REGISTRY["bright_ending"].cost_of(2, 1, True, 50) == Cost(200, 2)
    assert REGISTRY["bright_ending"].cost_of(2, 1, False, 50) == Cost(202)
    assert REGISTRY["dmem"].cost_of(2, 1, True, 50) == Cost(2, 2)  # detect.steps = 1: the first step only
    assert all(d.compute is not None for d in REGISTRY.values())
