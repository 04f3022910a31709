"""Loading diffusers model folders (and model stores in S3) into scoring components."""

import json
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cxrmem import storage
from cxrmem.models.loading import COMPLETE_MARKER, ModelLoadError, fingerprint_model, load_components, load_tokenizer
from cxrmem.models.settings import ModelConfig
from cxrmem.storage import Store


def model_cfg(path, **settings):
    return OmegaConf.structured(ModelConfig(path=str(path), **settings))


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny model for tests that change or damage it."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_diffusers_folder_loads_frozen_components_on_the_cpu(tiny_model_dir):
    components = load_components(model_cfg(tiny_model_dir))
    assert type(components.text_encoder).__name__ == "BertModel"
    assert type(components.denoiser).__name__ == "UNet2DConditionModel"
    assert type(components.scheduler).__name__ == "DDIMScheduler"
    assert components.vae is None
    assert components.vae_scaling_factor == 0.13025
    assert components.latent_shape == (4, 8, 8)
    assert components.max_length == components.tokenizer.model_max_length == 128
    assert components.source == f"diffusers:{tiny_model_dir}"
    for module in (components.text_encoder, components.denoiser):
        assert not module.training
        assert all(not p.requires_grad and p.device.type == "cpu" for p in module.parameters())
    # The weights are the files' (nothing initialised at random, no pooler added).
    saved = load_file(os.path.join(tiny_model_dir, "text_encoder", "model.safetensors"))
    assert set(components.text_encoder.state_dict()) == set(saved)
    for name, tensor in components.text_encoder.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert load_tokenizer(model_cfg(tiny_model_dir)).model_max_length == 128


def test_vae_and_dtype(tiny_model_dir):
    components = load_components(model_cfg(tiny_model_dir, dtype="bfloat16"), need_vae=True)
    assert type(components.vae).__name__ == "AutoencoderKL"
    assert components.denoiser.dtype == components.text_encoder.dtype == torch.bfloat16
    assert components.vae.dtype == torch.float32
    # The fingerprint is of the files: it needs no model loaded.
    assert fingerprint_model(model_cfg(tiny_model_dir, dtype="bfloat16")) == fingerprint_model(model_cfg(tiny_model_dir))


def test_any_scheduler_config_becomes_ddim_with_its_noise_schedule(model_copy):
    scheduler_config = model_copy / "scheduler" / "scheduler_config.json"
    edit_json(scheduler_config, _class_name="PNDMScheduler", beta_start=0.001, beta_schedule="scaled_linear", skip_prk_steps=True)
    (model_copy / "model_index.json").write_text(
        (model_copy / "model_index.json").read_text().replace("DDIMScheduler", "PNDMScheduler")
    )
    scheduler = load_components(model_cfg(model_copy)).scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert (scheduler.config.beta_start, scheduler.config.beta_schedule) == (0.001, "scaled_linear")


def test_fingerprint_follows_content_not_location(tiny_model_dir, model_copy):
    original = fingerprint_model(model_cfg(tiny_model_dir))
    assert fingerprint_model(model_cfg(model_copy)) == original
    edit_json(model_copy / "scheduler" / "scheduler_config.json", steps_offset=0)
    changed_config = fingerprint_model(model_cfg(model_copy))
    assert changed_config != original
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one byte of tensor data
    weights.write_bytes(bytes(data))
    assert fingerprint_model(model_cfg(model_copy)) not in (original, changed_config)


def test_missing_folder_or_model_index(tmp_path, model_copy):
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'absent'} does not exist"):
        load_components(model_cfg(tmp_path / "absent"))
    (model_copy / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match=f"{model_copy} has no model_index.json"):
        load_components(model_cfg(model_copy))


def test_missing_components_are_listed(model_copy):
    shutil.rmtree(model_copy / "unet")
    shutil.rmtree(model_copy / "vae")
    edit_json(model_copy / "model_index.json", text_encoder=[None, None])
    with pytest.raises(ModelLoadError) as err:
        load_components(model_cfg(model_copy))
    assert str(model_copy) in str(err.value)
    assert "subfolder unet/ is missing" in str(err.value)
    assert "no 'text_encoder' entry" in str(err.value)
    assert "names a vae but subfolder vae/ is missing" in str(err.value)


def test_unconditional_unet_is_refused(model_copy):
    edit_json(model_copy / "model_index.json", unet=["diffusers", "UNet2DModel"])
    with pytest.raises(ModelLoadError, match="UNet2DModel"):
        load_components(model_cfg(model_copy))


def test_truncated_weights_name_the_component(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"could not load the UNet from {model_copy / 'unet'}"):
        load_components(model_cfg(model_copy))


def test_weights_lacking_tensors_are_refused(model_copy):
    from safetensors.torch import save_file

    weights = model_copy / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["encoder.layer.1.attention.self.query.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="encoder.layer.1.attention.self.query.weight"):
        load_components(model_cfg(model_copy))


def test_invalid_config_json_names_the_file(model_copy):
    (model_copy / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=str(model_copy / "text_encoder")):
        load_components(model_cfg(model_copy))


def test_unknown_text_encoder_class(model_copy):
    edit_json(model_copy / "model_index.json", text_encoder=["transformers", "NoSuchTextModel"])
    with pytest.raises(ModelLoadError, match="NoSuchTextModel"):
        load_components(model_cfg(model_copy))


def upload(local_root, uri, storage_cfg):
    """Upload a folder as a plain S3 prefix (symlinks dereferenced, as `aws s3 sync` does)."""
    for folder, _, names in os.walk(local_root, followlinks=True):
        for name in names:
            path = os.path.join(folder, name)
            Store.from_config(storage_cfg).copy_file(path, storage.join(uri, os.path.relpath(path, local_root)))


@pytest.mark.s3
def test_s3_model_store_is_copied_once(tiny_model_dir, s3_bucket, s3_storage_cfg, tmp_path):
    uri = f"s3://{s3_bucket}/models/tiny"
    upload(tiny_model_dir, uri, Store.from_config(s3_storage_cfg))
    cfg = model_cfg(uri, cache_dir=str(tmp_path / "cache"))
    store = Store.from_config(s3_storage_cfg)
    components = load_components(cfg, store)
    expected = fingerprint_model(model_cfg(tiny_model_dir))
    assert fingerprint_model(cfg, store) == expected
    (local,) = (tmp_path / "cache").iterdir()
    assert (local / COMPLETE_MARKER).is_file()
    assert components.source == f"diffusers:{local}"

    # A complete copy is used as it is, without asking S3 again.
    Store.from_config(s3_storage_cfg).delete_tree(uri)
    assert not Store.from_config(s3_storage_cfg).exists(storage.join(uri, "model_index.json"))
    assert fingerprint_model(cfg, store) == expected
    # A copy without its marker (interrupted) is redone.
    upload(tiny_model_dir, uri, Store.from_config(s3_storage_cfg))
    (local / COMPLETE_MARKER).unlink()
    (local / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    assert fingerprint_model(cfg, store) == expected


@pytest.mark.s3
def test_s3_radedit_cache_copies_snapshots_only(s3_bucket, s3_storage_cfg, tmp_path):
    from tests.radedit_replica import build_radedit_replica

    hub = tmp_path / "hub"
    build_radedit_replica(str(hub))
    uri = f"s3://{s3_bucket}/hf-hub"
    upload(hub, uri, Store.from_config(s3_storage_cfg))
    cfg = model_cfg(uri, kind="radedit", cache_dir=str(tmp_path / "cache"))
    components = load_components(cfg, Store.from_config(s3_storage_cfg), need_vae=True)
    assert components.vae is not None
    assert fingerprint_model(cfg, Store.from_config(s3_storage_cfg)) == fingerprint_model(model_cfg(hub, kind="radedit"))
    (local,) = (tmp_path / "cache").iterdir()
    copied = {p.relative_to(local).parts[1] for p in local.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER}
    assert copied == {"refs", "snapshots"}
