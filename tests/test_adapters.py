"""model.adapters: LoRA adapters built offline with peft on the tiny base, fused and scored as diffusers' own
pipeline runs them, fingerprinted with the base, and refused with one line when they cannot be scored."""

import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import SanaPipeline, SanaTransformer2DModel, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model_state_dict

from cxrmem.config import load_config
from cxrmem.layouts import LAYOUTS
from cxrmem.models.adapters import WEIGHT_FILE
from cxrmem.models.components import ModelLoadError
from cxrmem.models.fingerprint import model_fingerprint
from cxrmem.models.loading import diffusers_parts, fingerprint_model, load_components, read_model_index
from cxrmem.models.settings import ModelConfig
from cxrmem.models.tiny import tiny_unet
from cxrmem.output_guard import check_inputs
from cxrmem.report import run_facts
from cxrmem.scoring.scorer import Scorer
from cxrmem.settings import ConfigError
from tests.test_models_loading import upload
from tests.test_scoring import IDS, PROMPTS, TINY_ATOL, reference_norms, score_cfg

# SD's attention projections, where LoRA training scripts put their adapters.
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def model_cfg(path, *adapters):
    """The model section with `adapters` as (path, scale) pairs."""
    listed = [{"path": str(folder), "scale": scale} for folder, scale in adapters]
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": path, "adapters": listed})


def save_lora(denoiser, out_dir, seed: int, pipeline=StableDiffusionPipeline, rank: int = 4, alpha: int = 8) -> str:
    """A random LoRA on `denoiser`'s attention projections, saved as diffusers' training scripts for `pipeline` save one
    (UNet scripts in diffusers' lora.down / lora.up names, transformer ones in peft's).

    lora_B is drawn too (peft's default starts it at zero, an adapter that changes nothing), and alpha / r = 2
    so that a loader ignoring the metadata's lora_alpha would score another model."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=ATTENTION_PROJECTIONS, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser.add_adapter(config)
    layers, name = get_peft_model_state_dict(denoiser), "unet" if isinstance(denoiser, UNet2DConditionModel) else "transformer"
    layers = convert_state_dict_to_diffusers(layers) if name == "unet" else layers
    pipeline.save_lora_weights(str(out_dir), **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": config.to_dict()})
    return str(out_dir)


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet", local_files_only=True)
    return save_lora(unet, tmp_path_factory.mktemp("lora"), seed=1)


def scored(cfg, prompts=PROMPTS, ids=IDS):
    """The Scorer's d_mem batch, and the UNet's output at every step (one call per step: [uncond; cond], each
    prompt-major over the prompts' G noises)."""
    scorer = Scorer(load_components(cfg), score_cfg(seed_mode="per_prompt", steps=3, generations=2), device="cpu")
    outputs = []
    handle = scorer.denoiser.module.register_forward_hook(lambda module, args, output: outputs.append(output.sample.clone()))
    try:
        batch = scorer.score(prompts, ids)
    finally:
        handle.remove()
    return scorer, batch, outputs


def pipeline_outputs(components, prompt, latents, steps, guidance):
    """The UNet's outputs at every step when diffusers' StableDiffusionPipeline samples `prompt`."""
    outputs = []
    handle = components.denoiser.register_forward_hook(lambda module, args, output: outputs.append(output[0].clone()))
    try:
        norms = reference_norms(components, prompt, latents, steps, guidance)
    finally:
        handle.remove()
    return norms, outputs


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_scorer_with_an_adapter_matches_the_pipeline_with_it_loaded(tiny_model_dir, lora_dir, scale):
    cfg = model_cfg(tiny_model_dir, (lora_dir, scale))
    scorer, batch, outputs = scored(cfg, PROMPTS[:2], IDS[:2])
    settings = scorer.settings
    reference = load_components(model_cfg(tiny_model_dir))  # the base, the adapter loaded the pipeline's way, unfused
    scheduler = type(reference.scheduler).from_config(reference.scheduler.config)  # the pipeline changes its scheduler's config
    pipe = StableDiffusionPipeline(vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer, unet=reference.denoiser,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.load_lora_weights(lora_dir, adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[scale])
    latents = scorer.initial_latents(IDS[:2])
    worst = 0.0
    for i, prompt in enumerate(PROMPTS[:2]):
        norms, expected = pipeline_outputs(reference, prompt, latents[i].clone(), settings.steps, settings.guidance_scale)
        g = settings.generations
        for step, theirs in zip(outputs, expected):  # the pipeline's: [uncond; cond] of this prompt's G noises
            for ours, pipelines in zip(step.chunk(2), theirs.chunk(2)):  # unconditional, then conditional
                torch.testing.assert_close(ours[i * g : (i + 1) * g], pipelines, rtol=1e-4, atol=1e-5)
                worst = max(worst, (ours[i * g : (i + 1) * g] - pipelines).abs().max().item())
        np.testing.assert_allclose(batch.step_norms[i], norms, rtol=1e-4, atol=TINY_ATOL)
        assert batch.d_mem[i] == pytest.approx(norms.mean(), rel=1e-4, abs=TINY_ATOL)
    print(f"largest |scorer - pipeline| noise prediction difference at scale {scale}: {worst:.3g}")


def test_an_adapter_is_fused_into_a_plain_frozen_unet_and_changes_d_mem(tiny_model_dir, lora_dir):
    _, base, _ = scored(model_cfg(tiny_model_dir))
    scorer, adapted, _ = scored(model_cfg(tiny_model_dir, (lora_dir, 1.0)))
    unet = scorer.denoiser.module
    assert not any("lora" in name for name, _ in unet.named_parameters()) and not unet.training
    assert not any(parameter.requires_grad for parameter in unet.parameters())
    assert np.all(np.abs(adapted.d_mem - base.d_mem) > 1e-3 * np.abs(base.d_mem))


def test_fingerprint_covers_each_adapter_and_its_scale(tiny_model_dir, lora_dir, tmp_path):
    base = fingerprint_model(model_cfg(tiny_model_dir))
    # Without adapters the fingerprint is what it was before adapters existed: old results are not rescored.
    assert base == model_fingerprint(diffusers_parts(tiny_model_dir, read_model_index(tiny_model_dir)))
    adapted = fingerprint_model(model_cfg(tiny_model_dir, (lora_dir, 1.0)))
    moved = shutil.copytree(lora_dir, tmp_path / "moved")
    assert adapted == fingerprint_model(model_cfg(tiny_model_dir, (moved, 1.0)))  # content, not location
    assert adapted == fingerprint_model(model_cfg(tiny_model_dir, (lora_dir, 1.0)))
    other = {
        "another scale": fingerprint_model(model_cfg(tiny_model_dir, (lora_dir, 0.5))),
        "another adapter": fingerprint_model(model_cfg(tiny_model_dir, (resaved(lora_dir, tmp_path / "other", scaled=2.0), 1.0))),
        "a second adapter": fingerprint_model(model_cfg(tiny_model_dir, (lora_dir, 1.0), (moved, 1.0))),
    }
    assert len({base, adapted, *other.values()}) == 2 + len(other), other


def resaved(lora_dir, out_dir, rename=lambda key: key, extra=None, scaled=1.0) -> str:
    """A copy of the adapter with its keys renamed, tensors added or its up-projections scaled."""
    source = os.path.join(lora_dir, WEIGHT_FILE)
    tensors = {rename(key): value * scaled if ".up." in key else value for key, value in safetensors.torch.load_file(source).items()}
    os.makedirs(out_dir, exist_ok=True)
    with safetensors.safe_open(source, framework="pt") as stream:
        metadata = stream.metadata()
    safetensors.torch.save_file({**tensors, **(extra or {})}, os.path.join(out_dir, WEIGHT_FILE), metadata=metadata)
    return str(out_dir)


def other_base_lora(tiny_model_dir, out_dir) -> str:
    """A LoRA trained on a UNet whose cross-attention reads 48-wide text: the tiny base reads 32."""
    return save_lora(tiny_unet(cross_attention_dim=48), out_dir, seed=2)


def no_weights(tiny_model_dir, lora_dir, out_dir) -> str:
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w") as stream:
        stream.write("weights to follow")
    return str(out_dir)


def full_weights(tiny_model_dir, lora_dir, out_dir) -> str:
    shutil.copytree(os.path.join(tiny_model_dir, "unet"), out_dir)
    return str(out_dir)


TEXT_ENCODER_KEY = "text_encoder.encoder.layer.0.attention.self.query.lora.down.weight"
REFUSALS = {
    "no weights": (no_weights, r"holds no \.safetensors file \(README\.md\)"),
    "full weights": (full_weights, r"is not a LoRA adapter \(\d+ of \d+ tensors are not LoRA weights"),
    "DoRA": (lambda base, lora, out: resaved(lora, out, extra={"unet.mid_block.dora_scale": torch.ones(4)}), "is a DoRA adapter"),
    "another denoiser": (lambda base, lora, out: resaved(lora, out, rename=lambda k: k.replace("unet.", "transformer.", 1)),
                         r"keys for no unet of a unet layout \(e\.g\. transformer\."),
    "text encoder": (lambda base, lora, out: resaved(lora, out, extra={TEXT_ENCODER_KEY: torch.ones(2, 32)}), "adapts a text encoder"),
    "another base": (lambda base, lora, out: other_base_lora(base, out), "does not fit the base model's unet"),
    "a module the base lacks": (lambda base, lora, out: resaved(lora, out, rename=lambda k: k.replace("attn2.to_k", "attn2.to_kv")),
                                r"does not match the base model's unet module for module: 8 of its 64 tensors name modules the base lacks"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")  # peft's note on the module the base lacks
def test_adapters_that_cannot_be_scored_are_refused_in_one_line(tiny_model_dir, lora_dir, tmp_path, case):
    build, message = REFUSALS[case]
    folder = build(tiny_model_dir, lora_dir, tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match=message) as refused:
        load_components(model_cfg(tiny_model_dir, (folder, 1.0)))
    assert "\n" not in str(refused.value) and str(folder) in str(refused.value)


def test_adapter_keys_are_checked_reported_and_an_input_no_run_writes_into(lora_dir):
    cfg = load_config(None, [f"model.adapters=[{{path: {lora_dir}, scale: 0.5}}]"])
    assert [(a.path, a.scale) for a in cfg.model.adapters] == [(lora_dir, 0.5)]
    assert run_facts(None, cfg)["model"].endswith(f" + LoRA {lora_dir} (scale 0.5)")  # the report's summary card
    with pytest.raises(ConfigError, match=r"is inside model.adapters\[0\].path"):
        check_inputs(cfg, os.path.join(lora_dir, "run"))
    with pytest.raises(ConfigError, match=r"'model.adapters\[0\].path' is empty"):
        load_config(None, ["model.adapters=[{scale: 0.5}]"])


@pytest.mark.s3
def test_an_s3_adapter_is_copied_and_fingerprinted_as_the_local_one(tiny_model_dir, lora_dir, s3_bucket, s3_storage_cfg, tmp_path):
    from cxrmem.storage import Store

    uri = f"s3://{s3_bucket}/adapters/lora"
    upload(lora_dir, uri, Store.from_config(s3_storage_cfg))
    cfg = OmegaConf.merge(model_cfg(tiny_model_dir, (uri, 1.0)), {"cache_dir": str(tmp_path / "cache")})
    components = load_components(cfg, Store.from_config(s3_storage_cfg))
    assert str(tmp_path / "cache") in components.source
    assert fingerprint_model(cfg, Store.from_config(s3_storage_cfg)) == fingerprint_model(model_cfg(tiny_model_dir, (lora_dir, 1.0)))


# -- LoRA on the other layouts (issue 35): SDXL's and Sana's pipelines have LoRA loaders, PixArt-Sigma's has none -------
# layout -> its denoiser's class and the pipeline whose LoRA saver (and loader) its adapters go through
LORA_REPLICAS = {"sdxl": (UNet2DConditionModel, StableDiffusionXLPipeline), "sana": (SanaTransformer2DModel, SanaPipeline)}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from cxrmem.corpus.synthetic import tokenizer_texts
    from cxrmem.models.tiny_layouts import BUILDERS

    root = tmp_path_factory.mktemp("replicas")
    return {name: BUILDERS[name](str(root / name), tokenizer_texts()) for name in ("sdxl", "sana", "pixart")}


def save_replica_lora(name: str, base: str, out_dir, seed: int) -> str:
    """A random LoRA on the `name` replica's denoiser, saved by its pipeline as its diffusers training script does."""
    denoiser_class, pipeline = LORA_REPLICAS[name]
    denoiser = denoiser_class.from_pretrained(base, subfolder=LAYOUTS[name].denoiser, local_files_only=True)
    return save_lora(denoiser, out_dir, seed, pipeline)


@pytest.mark.parametrize("name", list(LORA_REPLICAS))
def test_an_adapter_is_scored_as_the_layouts_pipeline_runs_it_and_fingerprinted(replicas, name, tmp_path):
    from tests.test_denoisers import STEPS, G, captured_outputs, pipeline_outputs

    base, scale = replicas[name], 0.5
    lora = save_replica_lora(name, base, tmp_path / "lora", seed=1)
    settings = score_cfg(generations=G, steps=STEPS)
    scorer = Scorer(load_components(model_cfg(base, (lora, scale))), settings, device="cpu")
    assert not any("lora" in key for key, _ in scorer.denoiser.module.named_parameters())  # fused: a plain denoiser
    latents, encoded = scorer.initial_latents(IDS[:1]), scorer.encode(PROMPTS[1:2])
    ours = captured_outputs(scorer.denoiser.module, lambda: scorer.sample(encoded.embeddings, latents))

    def adapt(pipe):  # the base with the adapter loaded by the layout pipeline's own LoRA loader, unfused
        pipe.load_lora_weights(lora, adapter_name="lora")
        pipe.set_adapters(["lora"], adapter_weights=[scale])

    expected, _ = pipeline_outputs(name, base, PROMPTS[1], latents[0], adapt)
    plain = Scorer(load_components(model_cfg(base)), settings, device="cpu")
    unadapted = captured_outputs(plain.denoiser.module, lambda: plain.sample(encoded.embeddings, latents))
    assert len(ours) == len(expected) == STEPS
    worst = max((mine - theirs).abs().max().item() for mine, theirs in zip(ours, expected))  # both halves, every step
    moved = min((mine - base_out).abs().max().item() for mine, base_out in zip(ours, unadapted))
    print(f"{name} LoRA (scale {scale}): largest |scorer - {LAYOUTS[name].pipeline}| {worst:.3g}; "
          f"smallest step change from the base {moved:.3g}")  # fmt: skip
    for mine, theirs in zip(ours, expected):  # [uncond; cond]: both predictions, at every step
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert moved > 1e-3  # the adapter changes the predictions: the parity is not the base's against itself
    other = save_replica_lora(name, base, tmp_path / "other", seed=2)
    prints = {fingerprint_model(model_cfg(base)), fingerprint_model(model_cfg(base, (lora, scale))),
              fingerprint_model(model_cfg(base, (other, scale)))}  # fmt: skip
    assert len(prints) == 3


def test_an_adapter_on_a_layout_whose_pipeline_has_no_lora_loader_is_refused_in_one_line(replicas, tmp_path):
    lora = save_replica_lora("sana", replicas["sana"], tmp_path / "lora", seed=1)
    with pytest.raises(ModelLoadError, match=r"a pixart layout .* PixArtSigmaPipeline has no LoRA loader.*supported: .*sana") as refused:
        load_components(model_cfg(replicas["pixart"], (lora, 1.0)))
    assert "\n" not in str(refused.value)
