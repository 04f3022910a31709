"""The transformer testbed (testbed.denoiser=sana): the shared training loop trains a Sana-style flow-matching
transformer on the testbed's training set, and the folder it saves loads and scores through the Scorer."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cxrmem.config import ConfigError
from cxrmem.models.loading import load_components
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.testbed.train import TRAINING_TARGETS, CachedConditioning, flow_target, optimise, prepare, train
from tests.test_testbed import tiny_testbed_config

SMALL_DIT = {"testbed.denoiser": "sana", "testbed.text_hidden_size": 16, "testbed.text_layers": 1, "testbed.transformer_layers": 1,
             "testbed.transformer_width": 16, "testbed.patch_size": 4}  # fmt: skip


@pytest.fixture(scope="module")
def trained_tiny_dit(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dit"))
    return out, train(tiny_testbed_config(out, **SMALL_DIT))


def test_a_short_transformer_training_loads_and_scores_with_finite_d_mem(trained_tiny_dit):
    out, summary = trained_tiny_dit
    cfg = tiny_testbed_config(out, **SMALL_DIT)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    components = load_components(OmegaConf.merge(cfg.model, {"path": out}))
    assert components.layout == "sana" and components.vae is None and components.latent_shape == (1, 16, 16)
    assert type(components.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    scorer = Scorer(components, ScoreSettings.of(cfg.score), device="cpu")
    batch = scorer.score(["Severe cardiomegaly.", "No acute cardiopulmonary process."], ["a", "b"])
    assert np.isfinite(batch.d_mem).all() and (batch.d_mem > 0).all()
    # Flow matching starts at sigma = 1, where the velocity's text difference implies no noise difference.
    assert (batch.step_norms[:, :, 0] == 0).all() and (batch.step_norms[:, :, 1:] > 0).all()


def test_evaluate_writes_the_transformer_section_with_a_degenerate_first_step(trained_tiny_dit, tmp_path):
    from cxrmem.testbed.evaluate import SECTIONS, evaluate

    out, _ = trained_tiny_dit
    results = tmp_path / "RESULTS.md"
    cfg = tiny_testbed_config(out, **SMALL_DIT, **{"testbed.eval_unique": 6, "testbed.eval_steps": 2, "testbed.results": str(results)})
    result = evaluate(cfg)
    assert [row["auc"] for row in result["first_step"]] == [0.5, 0.5, 0.5]  # every first-step score ties at 0
    text = results.read_text()
    assert SECTIONS["synthetic", "sana"].heading in text and "flow-matching Euler steps" in text


def test_the_flow_target_is_the_velocity_between_image_and_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    x0, noise = torch.randn(64, 1, 4, 4), torch.randn(64, 1, 4, 4)
    noisy, timesteps, target = flow_target(scheduler, x0, noise, torch.Generator().manual_seed(0))
    sigma = (timesteps / scheduler.config.num_train_timesteps).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(target, noise - x0)
    assert timesteps.min() > 0 and timesteps.max() <= 1000 and len(set(timesteps.tolist())) > 10
    assert set(TRAINING_TARGETS) == {"epsilon", "flow_prediction"}


@pytest.mark.parametrize("denoiser", ["unet", "sana"])
def test_a_frozen_text_encoder_keeps_its_weights_and_the_saved_model_conditions_as_the_cache(denoiser, tmp_path):
    extra = {**SMALL_DIT, "testbed.denoiser": denoiser, "testbed.block_out_channels": "[8,16]", "testbed.text_encoder_steps": 0}
    cfg = tiny_testbed_config(str(tmp_path), **extra)
    torch.manual_seed(0)
    training_set, network, images = prepare(cfg)
    encoder, denoiser_before = ({k: v.clone() for k, v in part.state_dict().items()} for part in (network.text_encoder, network.denoiser))
    losses, _, _ = optimise(network, training_set, images, cfg.testbed)
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert all(torch.equal(value, network.text_encoder.state_dict()[key]) for key, value in encoder.items())
    assert any(not torch.equal(value, network.denoiser.state_dict()[key]) for key, value in denoiser_before.items())
    # The Scorer reading the saved folder conditions every training text, and the empty prompt, as training did.
    texts = training_set.training_texts
    cache = CachedConditioning(network, len(texts), batch=8)
    network.save(str(tmp_path))
    scorer = Scorer(load_components(OmegaConf.merge(cfg.model, {"path": str(tmp_path)})), ScoreSettings.of(cfg.score), device="cpu")
    torch.testing.assert_close(scorer.encode(texts).embeddings, cache.table)
    torch.testing.assert_close(scorer.empty_embedding, cache.empty)
    assert len(texts) > 2 and (cache.table[0] - cache.table[1]).abs().max() > 1e-3  # the frozen encoder tells prompts apart


def test_the_text_encoder_trains_for_its_steps_and_is_frozen_after(tmp_path):
    cfg = tiny_testbed_config(str(tmp_path), **{"testbed.block_out_channels": "[8,16]", "testbed.text_encoder_steps": 1})
    training_set, network, images = prepare(cfg)
    before = {k: v.clone() for k, v in network.text_encoder.state_dict().items()}
    optimise(network, training_set, images, cfg.testbed)
    assert any(not torch.equal(value, network.text_encoder.state_dict()[key]) for key, value in before.items())
    assert not any(p.requires_grad for p in network.text_encoder.parameters()) and not network.text_encoder.training


def test_the_text_encoder_steps_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="testbed.text_encoder_steps"):
        tiny_testbed_config(str(tmp_path), **{"testbed.text_encoder_steps": -1})


def test_an_unknown_testbed_denoiser_is_refused_by_its_key(tmp_path):
    with pytest.raises(ConfigError, match="testbed.denoiser"):
        tiny_testbed_config(str(tmp_path), **{"testbed.denoiser": "dit"})


def test_on_the_flow_model_the_cascade_first_screen_reads_a_second_step_and_prunes(trained_tiny_dit, tiny_model_dir, tmp_path):
    """The first step's norm is 0 for every prompt here (above), so a k = 1 screen keeps every prompt as a tie and
    prunes nothing. The cascade reads the scheduler config (no weights) and starts its d_mem screens at k = 2 on a
    flow-matching model, where the screen ranks and keeps its share; a UNet's first screen stays at k = 1."""
    import json

    from cxrmem.cli import main
    from cxrmem.config import load_config
    from cxrmem.models.loading import blind_steps
    from cxrmem.runfiles import Run, RunLayout
    from cxrmem.stages import cascade
    from tests.test_cascade import cfg_for

    out, _ = trained_tiny_dit
    run = tmp_path / "run"
    first_screen = "cascade.stages=[{screen: dmem, keep_percent: 25, steps: 1, generations: 1}]"
    cfg = cfg_for(out, run, first_screen, "cascade.audit_sample=0")
    assert blind_steps(cfg.model) == 1 and blind_steps(load_config(None, [f"model.path={tiny_model_dir}"]).model) == 0
    assert [s.steps for s in cascade.plan(cfg, 1)] == [2] and [s.steps for s in cascade.plan(cfg)] == [1]
    assert main(["prepare", f"run.output={run}", "corpus.synthetic.n_reports=40"]) == 0
    cascade.run_cascade(cfg, Run.of(cfg).with_fingerprint("fp-dit"))
    section = json.loads(open(RunLayout(str(run)).summary).read())["cascade"]
    stage = section["rounds"][-1]["stages"][0]
    assert section["stages"][0]["steps"] == 2 and (stage["screened"], stage["kept"]) == (34, 9)  # 40 reports, 34 distinct
