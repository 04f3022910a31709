"""Smoke test: RadEdit's UNet architecture (SD-1.x, 4x64x64 latents) runs one small batch on the CPU."""

import pytest
from omegaconf import OmegaConf

from cxrmem.cli import main
from cxrmem.models.loading import load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings


@pytest.mark.slow
def test_radedit_shaped_model_scores_a_small_batch(tmp_path):
    out = tmp_path / "radedit_shaped"
    assert main(["model", "tiny", "--radedit-shaped", "--out", str(out)]) == 0
    components = load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": str(out)}))
    assert components.latent_shape == (4, 64, 64)
    assert components.denoiser.config.cross_attention_dim == 768
    assert components.text_encoder.config.hidden_size == 768
    cfg = OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"generations": 1, "steps": 2})
    batch = Scorer(components, ScoreSettings.of(cfg), device="cpu").score(["Compared to ___, no change."], ["0" * 16])
    assert batch.step_norms.shape == (1, 1, 2)
    assert not batch.nonfinite[0] and batch.d_mem[0] > 0
