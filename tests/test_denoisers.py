"""Every layout's tiny replica against its own diffusers pipeline: the Scorer's conditional and unconditional
predictions at every step are the pipeline's, and its step norms are the pipeline's predictions converted to
epsilon by the docs/design.md formulas (written out here, independently of cxrmem/scoring/prediction.py)."""

import json
import logging
import os

import numpy as np
import pytest
import sentencepiece
import torch
from diffusers import PixArtSigmaPipeline, SanaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from omegaconf import OmegaConf

from cxrmem.layouts import LAYOUTS
from cxrmem.mitigation import runnable_strategies
from cxrmem.models.loading import diffusers_parts, load_components, read_model_index
from cxrmem.models.settings import ModelConfig
from cxrmem.models.tiny_layouts import BUILDERS
from cxrmem.scoring.denoisers import DENOISERS
from cxrmem.scoring.scorer import Scorer
from cxrmem.strategies import MitigationSettings
from tests.test_scoring import IDS, PROMPTS, score_cfg

STEPS, G = 3, 2
# layout -> (the layout row it must load as, its pipeline, the pipeline's options beyond the defaults)
CASES = {
    "sd2_v": ("unet", StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}, {}),
    "sdxl": ("sdxl", StableDiffusionXLPipeline, {}, {}),
    "pixart": ("pixart", PixArtSigmaPipeline, {}, {"use_resolution_binning": False}),
    "sana": ("sana", SanaPipeline, {}, {"use_resolution_binning": False}),
}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from cxrmem.corpus.synthetic import tokenizer_texts

    root = tmp_path_factory.mktemp("layouts")
    return {name: build(str(root / name), tokenizer_texts()) for name, build in BUILDERS.items()}


def load(path: str, need_vae: bool = False):
    return load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": path}), need_vae=need_vae)


def captured_outputs(module, run) -> list[torch.Tensor]:
    """The denoiser's output at every call of `run()` (a tuple or a ModelOutput: its first entry)."""
    outputs = []
    handle = module.register_forward_hook(lambda m, args, output: outputs.append(output[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return outputs


def pipeline_outputs(name: str, path: str, prompt: str, latents: torch.Tensor, adapt=None) -> tuple[list[torch.Tensor], object]:
    """The denoiser's outputs at each step of the diffusers pipeline itself, run on its own copy of the model
    (`adapt(pipe)` first, where given: the adapters loaded the pipeline's way)."""
    _, pipeline_class, build_options, call_options = CASES[name]
    parts = load(path, need_vae=True)  # with its VAE: the pipeline's image scale comes from it
    modules = {"tokenizer": parts.tokenizer, "text_encoder": parts.text_encoder, "vae": parts.vae, **parts.extras,
               ("transformer" if "transformer" in parts.index else "unet"): parts.denoiser,
               "scheduler": type(parts.scheduler).from_config(parts.scheduler.config)}  # fmt: skip
    pipe = pipeline_class(**modules, **build_options)
    pipe.scheduler = type(parts.scheduler).from_config(parts.scheduler.config)  # SD's constructor rewrites old configs
    if adapt is not None:
        adapt(pipe)
    size = latents.shape[-1] * pipe.vae_scale_factor
    run = lambda: pipe(prompt, height=size, width=size, latents=latents.clone(), num_images_per_prompt=G,  # noqa: E731
                       num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent", **call_options)
    return captured_outputs(parts.denoiser, run), parts.scheduler


def as_noise_difference(name: str, scheduler, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """eps_c - eps_u [G, ...] from one pipeline call's [uncond; cond] output, by the docs/design.md formulas."""
    uncond, cond = output.float().chunk(2)
    if name == "pixart":  # learned variance: the prediction is the first half of the channels
        uncond, cond = uncond[:, :4], cond[:, :4]
    difference = cond - uncond
    if name == "sd2_v":
        return scheduler.alphas_cumprod[int(t)].sqrt() * difference
    if name == "sana":
        return (1 - t / scheduler.config.num_train_timesteps) * difference
    return difference


@pytest.mark.parametrize("name", list(CASES))
def test_the_scorer_predicts_what_the_layouts_own_pipeline_predicts(replicas, name):
    layout = CASES[name][0]
    scorer = Scorer(load(replicas[name]), score_cfg(generations=G, steps=STEPS), device="cpu")
    assert scorer._components.layout == layout
    latents = scorer.initial_latents(IDS[:1])
    encoded = scorer.encode(PROMPTS[1:2])
    ours = captured_outputs(scorer.denoiser.module, lambda: scorer.sample(encoded.embeddings, latents, keep_differences=True))
    expected, scheduler = pipeline_outputs(name, replicas[name], PROMPTS[1], latents[0])
    assert len(ours) == len(expected) == STEPS
    for step, (mine, theirs) in enumerate(zip(ours, expected)):
        # Both halves of classifier-free guidance, at every step of the same trajectory.
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} step {step}: {m}")
    trajectory = scorer.sample(encoded.embeddings, latents)
    for step, t in enumerate(trajectory.timesteps):
        norms = as_noise_difference(name, scheduler, t, expected[step]).flatten(1).norm(dim=1)
        np.testing.assert_allclose(trajectory.step_norms[0, :, step].numpy(), norms.numpy(), rtol=1e-4, atol=1e-6)
    batch = scorer.score(PROMPTS, IDS)  # d_mem runs, and its conversion is not the identity where it must not be
    assert np.isfinite(batch.d_mem).all() and (batch.d_mem > 0).all()


@pytest.mark.parametrize("name", ["sdxl", "sana"])
def test_a_prompts_score_does_not_depend_on_its_batch(replicas, name):
    """Packed text (a pooled row, a mask channel) batches like plain text, and the seeds stay the prompt's own."""
    scorer = Scorer(load(replicas[name]), score_cfg(seed_mode="per_prompt"), device="cpu")
    together, alone = scorer.score(PROMPTS, IDS), scorer.score(PROMPTS[2:3], IDS[2:3])
    # Other batch compositions block the sums differently: close, never ==.
    np.testing.assert_allclose(together.step_norms[2], alone.step_norms[0], rtol=1e-4, atol=1e-6)


def test_every_layout_has_a_denoiser_and_a_replica():
    assert set(LAYOUTS) == set(DENOISERS)
    assert {layout for layout, *_ in CASES.values()} == set(LAYOUTS)  # the plain SD one's parity: tests/test_scoring.py


def test_the_fingerprint_covers_every_part_a_layout_loads(replicas):
    parts = diffusers_parts(replicas["sdxl"], read_model_index(replicas["sdxl"]))
    assert {"tokenizer_2", "text_encoder_2", "unet", "scheduler"} <= set(parts)
    assert "transformer" in diffusers_parts(replicas["sana"], read_model_index(replicas["sana"]))


def test_the_pixart_replicas_tokenizer_is_a_published_t5_one_and_loads_through_sentencepiece(replicas):
    """PixArt-Sigma's folder declares T5Tokenizer and ships spiece.model alone (no tokenizer.json): cxrmem's loader
    must convert it, and the tokenizer it gets splits prompts as SentencePiece itself does, then appends </s>."""
    root = replicas["pixart"]
    folder = os.path.join(root, "tokenizer")
    assert sorted(os.listdir(folder)) == ["special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
    assert read_model_index(root)["tokenizer"] == ["transformers", "T5Tokenizer"]
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as stream:
        assert json.load(stream)["tokenizer_class"] == "T5Tokenizer"
    tokenizer = load(root).tokenizer
    assert type(tokenizer).__name__ == "T5Tokenizer" and tokenizer.model_max_length == LAYOUTS["pixart"].max_length
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)  # T5's
    pieces = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "spiece.model"))
    ids = tokenizer(PROMPTS).input_ids
    assert ids == [pieces.encode(prompt) + [pieces.eos_id()] for prompt in PROMPTS]
    assert all(tokenizer.unk_token_id not in row and len(row) > 3 for row in ids)  # real pieces, not unknowns


def test_the_empty_prompt_is_each_pipelines_own_unconditional_input(replicas):
    """SDXL's pipeline forces zeros for an empty negative prompt; the others encode the empty string."""
    sdxl = Scorer(load(replicas["sdxl"]), score_cfg(), device="cpu")
    assert torch.count_nonzero(sdxl.empty_embedding) == 0
    sana = Scorer(load(replicas["sana"]), score_cfg(), device="cpu")
    mask = sana.empty_embedding[..., -1]
    assert mask.sum() >= 1 and mask.sum() < mask.shape[-1]  # the empty prompt's tokens only, not Sana's instruction


def test_unet_only_detectors_and_strategies_are_skipped_with_a_reason_elsewhere(replicas, caplog):
    pixart = Scorer(load(replicas["pixart"]), score_cfg(), device="cpu")
    with caplog.at_level(logging.WARNING, logger="cxrmem"):
        columns = pixart.detect(PROMPTS[:2], IDS[:2], ["dmem", "attention_entropy"])
    assert np.isfinite(columns["dmem"]).all() and np.isnan(columns["attention_entropy"]).all()
    assert "detector attention_entropy skipped" in caplog.text and "plain cross-attention layers of a UNet" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cxrmem"):
        again = pixart.detect(PROMPTS[:2], IDS[:2], ["dmem", "attention_entropy"])
    assert np.isnan(again["attention_entropy"]).all() and "skipped" not in caplog.text  # said once per model, not per batch
    settings = MitigationSettings(strategies=("original", "attention_rescaling", "embedding_noise", "delayed_guidance"))
    with caplog.at_level(logging.WARNING, logger="cxrmem"):
        assert runnable_strategies(pixart, settings)[0].strategies == ("original", "delayed_guidance")
    assert "mitigation strategy embedding_noise skipped: it needs a text tensor that is the encoder's hidden states alone" in caplog.text
    unet = Scorer(load(replicas["sd2_v"]), score_cfg(), device="cpu")
    assert runnable_strategies(unet, settings) == (settings, {})  # a plain UNet runs them all
