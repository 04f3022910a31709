"""The GPU path's guards, on this CPU machine with real tiny models: a replica meant for CUDA refuses
instead of falling back to the CPU, a CUDA out-of-memory error halves the chunk and gives the same
scores, VAE decodes go in slices, and scores of another effective precision are never resumed."""

import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cxrmem.config import load_config
from cxrmem.models.loading import load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.score_key import config_hash
from cxrmem.scoring.device import DeviceOutOfMemory, DeviceUnavailable, Precision, resolve_device
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings
from tests.test_scoring import IDS, PROMPTS

requires_cpu_torch = pytest.mark.skipif(torch.cuda.is_available(), reason="shows the refusal of a torch without CUDA")


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": tiny_model_dir}), need_vae=True)


def settings(**overrides) -> ScoreSettings:
    return ScoreSettings.of(OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"generations": 2, "steps": 3, **overrides}))


class UNetWithLimitedMemory(torch.nn.Module):
    """The tiny UNet on a device that holds at most `limit` samples per call: a bigger call raises the
    error CUDA raises (torch.cuda.OutOfMemoryError) before computing anything."""

    def __init__(self, unet: torch.nn.Module, limit: int):
        super().__init__()
        self.unet, self.limit, self.calls = unet, limit, []

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, sample, *args, **kwargs):
        self.calls.append(len(sample))
        if len(sample) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"injected: {len(sample)} samples > {self.limit}")
        return self.unet(sample, *args, **kwargs)


@requires_cpu_torch
def test_a_replica_meant_for_cuda_refuses_with_one_line_instead_of_running_on_the_cpu():
    with pytest.raises(DeviceUnavailable) as refused:
        resolve_device("auto", gpu_assigned=True)
    line = str(refused.value)
    assert "\n" not in line and "Ray gave this worker a GPU" in line
    assert f"torch {torch.__version__}" in line and "model.device=cpu" in line and "R580" in line
    with pytest.raises(DeviceUnavailable, match="model.device is cuda:1"):
        resolve_device("cuda:1")
    assert resolve_device("auto").type == "cpu"  # nothing asked for a GPU: the CPU is the plan, not a fallback


def test_an_out_of_memory_error_halves_the_chunk_and_gives_the_same_scores(components, caplog):
    reference = Scorer(components, settings(seed_mode="per_prompt")).score(PROMPTS, IDS)
    scorer = Scorer(components, settings(seed_mode="per_prompt"))
    limited = UNetWithLimitedMemory(scorer.denoiser.module, limit=2 * 2)  # one prompt x G=2 x both guidance halves
    scorer.denoiser.module = limited
    with caplog.at_level(logging.WARNING, logger="cxrmem.scoring.scorer"):
        scored = scorer.score(PROMPTS, IDS)
    # Batch composition differs, so the kernels block the sums differently: close, never ==. The late steps' norms
    # are small differences of nearly equal predictions (about 4e-4 here): their tolerance is absolute.
    np.testing.assert_allclose(scored.d_mem, reference.d_mem, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scored.step_norms, reference.step_norms, rtol=1e-4, atol=5e-6)
    assert "retrying with 1 prompts per call" in caplog.text and "score.batch_size" in caplog.text
    assert scorer._chunks["score"].fits == 1
    calls_before = len(limited.calls)
    scorer.score(PROMPTS[:2], IDS[:2])  # the size that fit is kept: no failing call first
    assert max(limited.calls[calls_before:]) <= 4


def test_one_prompt_that_does_not_fit_names_the_key_to_lower(components):
    scorer = Scorer(components, settings())
    scorer.denoiser.module = UNetWithLimitedMemory(scorer.denoiser.module, limit=1)
    with pytest.raises(DeviceOutOfMemory, match="lower score.batch_size"):
        scorer.score(PROMPTS[:2], IDS[:2])


def test_sliced_decodes_equal_one_decode(components):
    latents = torch.randn(5, *components.latent_shape, generator=torch.Generator().manual_seed(0))
    whole = Scorer(components, settings(), decode_batch=5).decode(latents)
    sliced_scorer = Scorer(components, settings(), decode_batch=2)
    sliced = sliced_scorer.decode(latents)
    assert sliced.shape == whole.shape and sliced.shape[0] == 5
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
    assert sliced_scorer._chunks["decode"].fits == 2


def test_the_score_key_hashes_the_effective_precision():
    def key(*overrides):
        return config_hash(load_config(None, list(overrides)))

    # The CPU runs a bfloat16 model in float32: the same arithmetic, the same key.
    assert key("model.device=cpu", "model.dtype=bfloat16") == key("model.device=cpu", "model.dtype=float32")
    assert key("model.device=cpu", "model.dtype=bfloat16", "score.cpu_half=true") != key("model.device=cpu")
    assert key("model.device=cuda", "model.dtype=bfloat16") != key("model.device=cpu", "model.dtype=bfloat16")
    assert key("model.device=cuda", "model.tf32=true") != key("model.device=cuda")
    assert key("model.device=cuda", "model.dtype=bfloat16", "model.tf32=true") == key("model.device=cuda", "model.dtype=bfloat16")
    assert Precision.of("bfloat16", "cpu", tf32=True).describe() == "float32 on cpu"


def test_a_resume_under_another_effective_precision_refuses(tiny_model_dir, tmp_path):
    from cxrmem.models.loading import fingerprint_model
    from cxrmem.runfiles import RunLayout
    from cxrmem.stages import prepare, score
    from cxrmem.stages.score_parts import write_part
    from cxrmem.stages.worker import ModelWorker
    from cxrmem.storage import Store

    base = [f"run.output={tmp_path}", f"model.path={tiny_model_dir}", "corpus.synthetic.n_reports=30", "model.device=cpu"]
    cfg = load_config(None, [*base, "score.steps=2", "score.generations=1"])
    prepare.run(cfg)
    store, layout = Store(), RunLayout(str(tmp_path))
    prompts = store.read_table(layout.prompts, columns=["prompt_id", "prompt"]).slice(0, 4)
    score.keep_one_precision(store, layout, Precision("float32", "cpu", False))  # as a first run records it
    fingerprint = fingerprint_model(cfg.model, store)
    write_part(store, ModelWorker(cfg, store, fingerprint)(prompts), layout.score_parts, 0)  # the run was stopped here
    half = load_config(None, [*base, "score.steps=2", "score.generations=1", "model.dtype=bfloat16", "score.cpu_half=true"])
    with pytest.raises(ValueError, match=r"computed in float32 on cpu; this run would compute in bfloat16 on cpu.*model.dtype=float32"):
        score.run(half)
    assert store.list_files(layout.score_parts, suffix=".parquet")  # nothing was thrown away
    done = score.run(cfg)  # the same precision resumes
    assert done.resumed == 4 and done.rows == done.total


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_the_sync_free_ddim_update_is_diffusers_step(prediction_type, clip_sample):
    from diffusers import DDIMScheduler

    from cxrmem.scoring.ddim import DDIMUpdate

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=clip_sample,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)  # fmt: skip
    scheduler.set_timesteps(10)
    update = DDIMUpdate(scheduler, scheduler.timesteps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    for i, t in enumerate(scheduler.timesteps):  # every step, the last (final_alpha_cumprod) included
        output = torch.randn(x.shape, generator=generator)
        expected = scheduler.step(output, t, x).prev_sample
        torch.testing.assert_close(update(i, output, x), expected, rtol=1e-6, atol=1e-6)
        x = expected


def test_a_trajectory_with_the_sync_free_update_is_the_diffusers_one(components):
    scorer = Scorer(components, settings(steps=5))
    ours = scorer.score(PROMPTS[:2], IDS[:2])
    encoded, latents = scorer.encode(PROMPTS[:2]), scorer.initial_latents(IDS[:2])
    x = latents.reshape(-1, *latents.shape[2:]).clone()
    cond = encoded.embeddings.repeat_interleave(2, dim=0)
    norms = []
    for t in scorer.timesteps():  # the loop written with diffusers' own step
        with torch.no_grad():
            eps_u = scorer.predict_noise(x, t, scorer.empty_embedding.expand_as(cond))
            eps_c = scorer.predict_noise(x, t, cond)
        norms.append((eps_c - eps_u).flatten(1).norm(dim=1))
        x = scorer._scheduler.step(eps_u + 7.5 * (eps_c - eps_u), t, x).prev_sample
    reference = torch.stack(norms, dim=1).reshape(2, 2, -1)
    np.testing.assert_allclose(ours.step_norms, reference.numpy(), rtol=1e-4, atol=1e-6)


def test_float32_output_layers_bring_bfloat16_d_mem_closer_to_float32(tiny_model_dir):
    def d_mem(dtype: str, float32_output: bool = True) -> np.ndarray:
        parts = load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": tiny_model_dir, "dtype": dtype}))
        scorer = Scorer(parts, settings(cpu_half=True, generations=2, steps=2), float32_output=float32_output)
        if dtype != "float32":
            assert (parts.denoiser.conv_out.weight.dtype == torch.float32) == float32_output
            assert parts.denoiser.conv_in.weight.dtype == torch.bfloat16  # the rest of the UNet stays in bfloat16
        return scorer.score(PROMPTS, IDS).d_mem

    full = d_mem("float32")
    plain, mixed = d_mem("bfloat16", float32_output=False), d_mem("bfloat16")
    error_plain, error_mixed = np.abs(plain - full) / full, np.abs(mixed - full) / full
    print(f"relative d_mem error against float32: bf16 {error_plain.max():.2e}, bf16 with float32 output layers {error_mixed.max():.2e}")
    assert error_mixed.mean() < error_plain.mean()
