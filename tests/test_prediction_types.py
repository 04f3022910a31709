"""d_mem means the same on every parameterisation: a v-prediction model's output is converted to the noise it
implies before the norm, and its trajectory is diffusers' own; what cannot be scored is refused in one line."""

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cxrmem.models.loading import ModelLoadError, load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings
from tests.test_scoring import IDS, PROMPTS


def model_with_scheduler(tiny_model_dir, tmp_path, **changes) -> str:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(folder)


def scorer_of(path: str, steps: int = 4) -> Scorer:
    components = load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": path}))
    settings = ScoreSettings.of(OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"generations": 2, "steps": steps}))
    return Scorer(components, settings, device="cpu")


def test_a_v_prediction_model_is_scored_on_the_noise_its_velocity_implies(tiny_model_dir, tmp_path):
    scorer = scorer_of(model_with_scheduler(tiny_model_dir, tmp_path, prediction_type="v_prediction", clip_sample=False))
    assert scorer.prediction_type == "v_prediction"
    ours = scorer.score(PROMPTS[:2], IDS[:2])
    # The loop written with diffusers' own DDIM step on the raw velocity, guidance in v (linear, so the same).
    scheduler = scorer._scheduler
    alphas = scheduler.alphas_cumprod
    encoded, latents = scorer.encode(PROMPTS[:2]), scorer.initial_latents(IDS[:2])
    x = latents.reshape(-1, *latents.shape[2:]).clone()
    cond = encoded.embeddings.repeat_interleave(2, dim=0)
    uncond = scorer.empty_embedding.expand_as(cond)
    norms = []
    for t in scorer.timesteps():
        with torch.no_grad():
            v_u = scorer.denoiser.module(x, t, encoder_hidden_states=uncond).sample
            v_c = scorer.denoiser.module(x, t, encoder_hidden_states=cond).sample
        norms.append(alphas[t].sqrt() * (v_c - v_u).flatten(1).norm(dim=1))  # ||eps_c - eps_u|| = sqrt(a) ||v_c - v_u||
        x = scheduler.step(v_u + 7.5 * (v_c - v_u), t, x).prev_sample
    np.testing.assert_allclose(ours.step_norms, torch.stack(norms, dim=1).reshape(2, 2, -1).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.latents.reshape(x.shape).numpy(), x.numpy(), rtol=1e-4, atol=1e-5)


def test_epsilon_models_are_untouched_by_the_conversion(tiny_model_dir):
    scorer = scorer_of(tiny_model_dir)
    x, t = torch.randn(2, *scorer.latent_shape), scorer.timesteps()[0]
    cond = scorer.encode(PROMPTS[:2]).embeddings
    with torch.no_grad():
        assert torch.equal(scorer.predict_noise(x, t, cond), scorer.denoiser.module(x, t, encoder_hidden_states=cond).sample)


def test_an_unknown_prediction_type_an_unknown_denoiser_and_a_monai_bundle_are_refused_in_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="prediction_type 'x0_residual'; cxrmem converts epsilon, v_prediction") as refused:
        scorer_of(model_with_scheduler(tiny_model_dir, tmp_path, prediction_type="x0_residual"))
    assert "\n" not in str(refused.value)
    index = tmp_path / "model" / "model_index.json"
    data = json.loads(index.read_text())
    data["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    del data["unet"]
    index.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="with transformer FluxTransformer2DModel; cxrmem scores SD-1.x.*SanaTransformer2DModel"):
        scorer_of(str(tmp_path / "model"))
    bundle = tmp_path / "monai_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="is a MONAI bundle .*; cxrmem scores diffusers folders of SD-1.x") as refused:
        scorer_of(str(bundle))
    assert "\n" not in str(refused.value)
