"""RadEdit assembled from a miniature replica of its Hugging Face cache snapshots."""

import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from bench.hub_cache import repo_dir, set_ref
from cxrmem.config import ConfigError, load_config
from cxrmem.models.loading import ModelLoadError, fingerprint_model, load_components, load_tokenizer
from cxrmem.models.settings import ModelConfig, RadEditConfig
from tests.radedit_replica import TEXT_REPO, UNET_REPO, VAE_REPO, build_radedit_replica

PROMPTS = ["No acute cardiopulmonary process.", "Small left pleural effusion since ___ , stable ___ ."]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """(cache root, repo -> commit) of a replica shared read-only by this module's tests."""
    root = str(tmp_path_factory.mktemp("hub"))
    return root, build_radedit_replica(root)


@pytest.fixture
def replica_copy(replica, tmp_path):
    """A private copy of the replica (symlinks into its own blobs) for tests that damage it."""
    root = str(tmp_path / "hub")
    shutil.copytree(replica[0], root, symlinks=True)
    return root, replica[1]


def radedit_cfg(root, **radedit):
    return OmegaConf.structured(ModelConfig(kind="radedit", path=root, radedit=RadEditConfig(**radedit)))


def snapshot(root, repo, commit):
    return os.path.join(repo_dir(root, repo), "snapshots", commit)


def test_text_encoder_is_cxr_bert_encoder_output(replica):
    """Output [0] equals CXR-BERT's: the last hidden state of BertForMaskedLM's encoder on the same checkpoint."""
    from transformers import BertConfig, BertForMaskedLM

    root, commits = replica
    components = load_components(radedit_cfg(root))
    text_dir = snapshot(root, TEXT_REPO, commits[TEXT_REPO])
    checkpoint = torch.load(os.path.join(text_dir, "pytorch_model.bin"), weights_only=True)
    published = OmegaConf.to_container(OmegaConf.load(os.path.join(text_dir, "config.json")))
    reference = BertForMaskedLM(BertConfig(**{k: v for k, v in published.items() if k not in ("architectures", "auto_map", "model_type")}))
    heads = {k: v for k, v in checkpoint.items() if not k.startswith("cls_projection_head.") and not k.endswith("position_ids")}
    assert not reference.load_state_dict(heads, strict=False).missing_keys
    reference.eval()

    assert type(components.text_encoder).__name__ == "BertModel"
    assert not components.text_encoder.training
    assert not any(p.requires_grad for p in components.text_encoder.parameters())
    tokens = components.tokenizer(PROMPTS, padding="max_length", max_length=components.max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ours = components.text_encoder(tokens.input_ids)[0]
        expected = reference(tokens.input_ids, output_hidden_states=True).hidden_states[-1]
    assert ours.shape == (2, 128, 32)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_tokenizer_scheduler_and_shapes_follow_design(replica):
    root, commits = replica
    components = load_components(radedit_cfg(root))
    assert components.max_length == 128
    assert components.tokenizer.model_max_length == 128
    assert components.tokenizer.tokenize("No ACUTE ___") == ["no", "acute", "_", "_", "_"]
    config = components.scheduler.config
    assert type(components.scheduler).__name__ == "DDIMScheduler"
    assert (config.beta_schedule, config.clip_sample, config.prediction_type) == ("linear", False, "epsilon")
    assert (config.timestep_spacing, config.steps_offset) == ("trailing", 1)
    assert (config.beta_start, config.beta_end, config.num_train_timesteps) == (0.0001, 0.02, 1000)
    assert components.vae is None
    assert components.vae_scaling_factor == 0.13025
    assert components.latent_shape == (4, 8, 8)
    for commit in commits.values():
        assert commit in components.source
    assert load_tokenizer(radedit_cfg(root)).model_max_length == 128


def test_noise_schedule_comes_from_a_shipped_scheduler_config(tmp_path):
    root = str(tmp_path / "hub")
    build_radedit_replica(root, with_scheduler=True)
    config = load_components(radedit_cfg(root)).scheduler.config
    assert (config.beta_start, config.beta_end, config.num_train_timesteps) == (0.001, 0.02, 500)
    assert (config.beta_schedule, config.timestep_spacing) == ("linear", "trailing")


def test_vae_loads_only_when_needed(replica):
    root, _ = replica
    with_vae = load_components(radedit_cfg(root), need_vae=True)
    without = load_components(radedit_cfg(root), need_vae=False)
    assert type(with_vae.vae).__name__ == "AutoencoderKL" and without.vae is None


def flip_byte(path, offset):
    """Change one byte of the blob behind `path` (the hub cache's snapshot files are symlinks)."""
    real = os.path.realpath(path)
    data = bytearray(open(real, "rb").read())
    data[offset] ^= 0x01
    open(real, "wb").write(bytes(data))


def perturb_checkpoint(path):
    """One weight of a pickled checkpoint changed (a raw byte flip could break the zip container)."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["bert.encoder.layer.0.output.dense.bias"][0] += 1e-3
    os.remove(path)
    torch.save(checkpoint, path)


@pytest.mark.parametrize(
    "repo, name, change",
    [
        (UNET_REPO, "unet/diffusion_pytorch_model.safetensors", lambda p: flip_byte(p, -1)),
        (TEXT_REPO, "pytorch_model.bin", perturb_checkpoint),
        (TEXT_REPO, "vocab.txt", lambda p: flip_byte(p, -2)),
        (VAE_REPO, "diffusion_pytorch_model.safetensors", lambda p: flip_byte(p, -1)),
    ],
)
def test_fingerprint_changes_with_any_weight_byte(replica, replica_copy, repo, name, change):
    root, commits = replica_copy
    before = fingerprint_model(radedit_cfg(root))
    assert before == fingerprint_model(radedit_cfg(replica[0]))  # location does not matter
    change(os.path.join(snapshot(root, repo, commits[repo]), name))
    after = fingerprint_model(radedit_cfg(root))
    assert after != before


def test_revision_selection(replica_copy):
    root, commits = replica_copy
    unet_repo = repo_dir(root, UNET_REPO)
    old = commits[UNET_REPO]
    new = "0" * 40
    shutil.copytree(os.path.join(unet_repo, "snapshots", old), os.path.join(unet_repo, "snapshots", new), symlinks=True)

    assert f"unet@{old}" in load_components(radedit_cfg(root)).source  # refs/main
    assert f"unet@{new}" in load_components(radedit_cfg(root, unet_revision=new)).source  # pinned hash
    set_ref(root, UNET_REPO, new, ref="experiment")
    assert f"unet@{new}" in load_components(radedit_cfg(root, unet_revision="experiment")).source  # ref name

    os.remove(os.path.join(unet_repo, "refs", "main"))
    with pytest.raises(ModelLoadError) as ambiguous:
        load_components(radedit_cfg(root))
    message = str(ambiguous.value)
    assert old in message and new in message and "model.radedit.unet_revision" in message
    with pytest.raises(ModelLoadError, match="not in"):
        load_components(radedit_cfg(root, unet_revision="f" * 40))

    shutil.rmtree(os.path.join(unet_repo, "snapshots", new))
    assert f"unet@{old}" in load_components(radedit_cfg(root)).source  # the only snapshot


def test_missing_parts_are_listed_in_one_error(replica_copy):
    root, commits = replica_copy
    os.remove(os.path.join(snapshot(root, UNET_REPO, commits[UNET_REPO]), "unet", "diffusion_pytorch_model.safetensors"))
    os.remove(os.path.join(snapshot(root, TEXT_REPO, commits[TEXT_REPO]), "vocab.txt"))
    shutil.rmtree(repo_dir(root, VAE_REPO))
    with pytest.raises(ModelLoadError) as err:
        load_components(radedit_cfg(root), need_vae=True)
    message = str(err.value)
    assert "UNet: no weights in" in message and "diffusion_pytorch_model.safetensors" in message
    assert "vocab.txt is missing" in message
    assert "stabilityai/sdxl-vae: no snapshot folder" in message
    # Without need_vae the missing VAE is no problem, but the others still are.
    with pytest.raises(ModelLoadError) as err:
        load_components(radedit_cfg(root), need_vae=False)
    assert "sdxl-vae" not in str(err.value) and "vocab.txt" in str(err.value)


def test_hf_cache_means_huggingface_hubs_own_cache(replica, monkeypatch):
    """model.path=hf-cache reads HF_HUB_CACHE (huggingface_hub sets it from $HF_HUB_CACHE or $HF_HOME at import)."""
    import huggingface_hub.constants

    root, commits = replica
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", root)
    components = load_components(radedit_cfg("hf-cache"))
    assert f"radedit:{root} " in components.source and f"unet@{commits[UNET_REPO]}" in components.source
    assert load_tokenizer(radedit_cfg("hf-cache"))("No acute process.")["input_ids"]


def test_missing_cache_root_names_the_knob(tmp_path):
    with pytest.raises(ModelLoadError, match="set model.path"):
        load_components(radedit_cfg(str(tmp_path / "nowhere")))


def test_unknown_checkpoint_tensors_are_refused(replica_copy):
    root, commits = replica_copy
    weights = os.path.join(snapshot(root, TEXT_REPO, commits[TEXT_REPO]), "pytorch_model.bin")
    checkpoint = torch.load(weights, weights_only=True)
    checkpoint["vision_encoder.conv.weight"] = torch.zeros(1)
    os.remove(weights)
    torch.save(checkpoint, weights)
    with pytest.raises(ModelLoadError, match="vision_encoder.conv.weight"):
        load_components(radedit_cfg(root))


def test_missing_encoder_tensors_are_refused(replica_copy):
    root, commits = replica_copy
    weights = os.path.join(snapshot(root, TEXT_REPO, commits[TEXT_REPO]), "pytorch_model.bin")
    checkpoint = torch.load(weights, weights_only=True)
    del checkpoint["bert.encoder.layer.1.output.dense.weight"]
    os.remove(weights)
    torch.save(checkpoint, weights)
    with pytest.raises(ModelLoadError, match="encoder.layer.1.output.dense.weight"):
        load_components(radedit_cfg(root))


def test_remote_code_needs_a_pinned_revision(replica):
    with pytest.raises(ConfigError, match="text_revision"):
        load_config(overrides=["model.kind=radedit", "model.radedit.trust_remote_code=true"])
    with pytest.raises(ModelLoadError, match="text_revision"):
        load_components(radedit_cfg(replica[0], trust_remote_code=True))


def test_opt_in_remote_code_gives_the_same_encoder_output(replica, tmp_path, monkeypatch):
    """With trust_remote_code and a pinned revision the snapshot's own class runs; output [0] is unchanged."""
    import transformers.dynamic_module_utils

    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    root, commits = replica
    ours = load_components(radedit_cfg(root))
    remote = load_components(radedit_cfg(root, trust_remote_code=True, text_revision=commits[TEXT_REPO]))
    assert type(remote.text_encoder).__name__ == "CXRBertModel"
    assert not remote.text_encoder.training
    tokens = ours.tokenizer(PROMPTS, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(remote.text_encoder(tokens.input_ids)[0], ours.text_encoder(tokens.input_ids)[0], rtol=0, atol=0)
    remote_cfg = radedit_cfg(root, trust_remote_code=True, text_revision=commits[TEXT_REPO])
    assert fingerprint_model(remote_cfg) != fingerprint_model(radedit_cfg(root))  # a different loader, a different record


class Payload:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused_in_one_line(replica_copy, tmp_path):
    root, commits = replica_copy
    weights = os.path.join(snapshot(root, TEXT_REPO, commits[TEXT_REPO]), "pytorch_model.bin")
    marker = tmp_path / "payload-ran"
    os.remove(weights)
    torch.save({"bert.embeddings.word_embeddings.weight": Payload(str(marker))}, weights)
    with pytest.raises(ModelLoadError) as refused:
        load_components(radedit_cfg(root))
    message = str(refused.value)
    assert "\n" not in message and weights in message and "not a weights-only checkpoint" in message, message
    assert "Unsupported global" in message and "\x1b" not in message and "can still be loaded" not in message
    assert not marker.exists()
