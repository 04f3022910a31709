"""RadEdit assembled from a local Hugging Face hub cache, offline, without remote code.

`model.path` is the cache root (for example ~/.cache/huggingface/hub) holding three snapshots:

    models--microsoft--radedit/snapshots/<rev>/unet/{config.json, diffusion_pytorch_model.safetensors}
    models--stabilityai--sdxl-vae/snapshots/<rev>/{config.json, diffusion_pytorch_model.safetensors}
    models--microsoft--BiomedVLP-BioViL-T/snapshots/<rev>/{config.json, pytorch_model.bin, vocab.txt, ...}

`model.path: hf-cache` (or empty) means huggingface_hub's own cache: $HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub. huggingface_hub resolves each snapshot offline
(`snapshot_download(..., local_files_only=True)`): the configured revision (a commit hash, or a
ref name under `refs/`), else the one `refs/main` names; a repo with no usable ref and exactly
one snapshot uses that one. Whatever is missing is reported in one error that lists every
missing part and where it was looked for.

Text encoder. BioViL-T publishes CXR-BERT (`architectures: ["CXRBertModel"]`, with an `auto_map`
to code in the snapshot). That class is transformers' `BertForMaskedLM` (a `bert` BertModel
without pooler, plus the `cls` masked-LM head) with an extra `cls_projection_head`, and its
output [0] is the last hidden state of the `bert` encoder. RadEdit feeds exactly that output
[0] to the UNet's cross-attention; neither head takes part. So loading the checkpoint's `bert.*`
tensors into transformers' own `BertModel(add_pooling_layer=False)`, built from the config's BERT
fields, computes the same output [0] bit for bit, and no remote code runs. The `cls.*` and
`cls_projection_head.*` tensors are skipped; any other tensor, and any BERT tensor the
checkpoint lacks, is an error (it would mean the snapshot is not the architecture described
here). The pickle is read with `torch.load(weights_only=True)`, which cannot execute code.
`model.radedit.trust_remote_code=true` (config validation requires a pinned `text_revision`)
instead loads the snapshot's own class through `AutoModel`; its output [0] is the same tensor.

Tokenizer: BioViL-T's WordPiece vocabulary and tokenizer_config.json, with
`model_max_length = model.radedit.tokenizer_max_length` (128, as RadEdit sets it).

Scheduler: exactly docs/design.md's constructor call, DDIMScheduler(beta_schedule="linear",
clip_sample=False, prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1), which
is also the one in RadEdit's published usage. Every argument it leaves out keeps DDIMScheduler's
default, so the noise schedule is the DDPM linear one, beta_start=0.0001, beta_end=0.02,
num_train_timesteps=1000 (and set_alpha_to_one=True); not Stable Diffusion 1.x's
0.00085/0.012, which belong with its "scaled_linear" schedule. These values are written out
below, so that a change of diffusers' defaults cannot shift them. If the RadEdit snapshot ships
`scheduler/scheduler_config.json`, its beta_start, beta_end and num_train_timesteps are used
instead (the model's own record of its training schedule); the docs/design.md settings still apply.

VAE (only when `need_vae`): the SDXL VAE, latents scaled by `model.radedit.vae_scaling_factor`
(0.13025). The fingerprint covers the VAE's files whenever the snapshot exists, so that it does
not depend on `need_vae`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from cxrmem.models.components import (
    Components,
    ModelLoadError,
    freeze,
    guarded,
    load_checked,
    load_diffusers_model,
    read_json_file,
    scoring_scheduler,
    torch_dtype,
)
from cxrmem.models.fingerprint import model_fingerprint

DEFAULT_NOISE_SCHEDULE = {"beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000, "set_alpha_to_one": True}
NOISE_SCHEDULE_KEYS = ("beta_start", "beta_end", "num_train_timesteps")
RADEDIT_SCHEDULER = {
    "beta_schedule": "linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}
WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text": ("model.safetensors", "pytorch_model.bin"),
}
# CXR-BERT checkpoint prefixes: the BERT encoder we load, and the heads RadEdit never uses.
BERT_PREFIX = "bert."
UNUSED_PREFIXES = ("cls.", "cls_projection_head.")
# model.path value (or an empty one) that means huggingface_hub's default cache.
HF_CACHE = "hf-cache"


def hub_cache_root(model_cfg, cache_root: str) -> str:
    """huggingface_hub's own cache when model.path is unset or "hf-cache" ($HF_HUB_CACHE, else
    $HF_HOME/hub, else ~/.cache/huggingface/hub); otherwise the cache root model.path names."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE if model_cfg.path in (None, "", HF_CACHE) else cache_root


def cached_revisions(cache_root: str, repo_id: str) -> dict[str, str]:
    """Commit hash -> snapshot folder of every cached snapshot of a model repo, in huggingface_hub's
    layout. Listed directly: scan_cache_dir drops a whole repo when one of its refs is stale."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = os.path.join(cache_root, repo_folder_name(repo_id=repo_id, repo_type="model"), "snapshots")
    names = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    return {name: os.path.join(snapshots, name) for name in names if os.path.isdir(os.path.join(snapshots, name))}


def resolve_snapshot(cache_root: str, repo_id: str, revision: Optional[str], knob: str) -> tuple[Optional[str], Optional[str]]:
    """(snapshot folder, None), or (None, what is wrong) for one repo of the hub cache.

    huggingface_hub resolves the revision (a commit hash or a ref name; None: refs/main) offline.
    When it cannot, a cache holding exactly one snapshot of the repo and no refs/main (a copied
    snapshot) still resolves; otherwise the error lists what the cache holds.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_root, local_files_only=True), None
    except LocalEntryNotFoundError:
        pass
    available = cached_revisions(cache_root, repo_id)
    hint = f"download it into this cache: hf download {repo_id} --revision <commit> --cache-dir {cache_root}"
    if not available:
        return None, f"{repo_id}: no snapshot folder in {cache_root} ({hint})"
    if revision:
        return None, f"{repo_id}: revision {revision!r} ({knob}) is not in {cache_root} (available: {sorted(available)})"
    if len(available) == 1:
        return next(iter(available.values())), None
    return None, f"{repo_id}: several snapshots in {cache_root} and no usable refs/main: {sorted(available)}; set {knob} to one of them"


def first_existing(folder: str, names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def missing_files(folder: str, what: str, required: tuple[str, ...], weights: tuple[str, ...] = ()) -> list[str]:
    problems = [f"{what}: {os.path.join(folder, name)} is missing" for name in required if not os.path.isfile(os.path.join(folder, name))]
    if weights and first_existing(folder, weights) is None:
        problems.append(f"{what}: no weights in {folder} (looked for {' or '.join(weights)})")
    return problems


def locate_snapshots(model_cfg, cache_root: str, need_vae: bool, text_only: bool = False) -> dict[str, Optional[str]]:
    """Snapshot folders of the text, unet and vae repos, checked for their files; one error lists every problem.

    `text_only` checks just the tokenizer's files. The VAE snapshot is looked up even when not
    needed (for the fingerprint), but its absence is an error only with `need_vae`.
    """
    radedit = model_cfg.radedit
    cache_root = hub_cache_root(model_cfg, cache_root)
    if not os.path.isdir(cache_root):
        raise ModelLoadError(f"Hugging Face cache {cache_root} does not exist; set model.path to the hub cache root "
                             f"(or to {HF_CACHE!r} for $HF_HUB_CACHE / $HF_HOME/hub)")
    found, problems = {}, []
    found["text"], problem = resolve_snapshot(cache_root, radedit.text_repo, radedit.text_revision, "model.radedit.text_revision")
    if problem:
        problems.append(problem)
    elif text_only:
        problems += missing_files(found["text"], "tokenizer", ("vocab.txt",))
    else:
        problems += missing_files(found["text"], "text encoder", ("config.json", "vocab.txt"), WEIGHT_NAMES["text"])
    if not text_only:
        found["unet"], problem = resolve_snapshot(cache_root, radedit.unet_repo, radedit.unet_revision, "model.radedit.unet_revision")
        unet_folder = os.path.join(found["unet"] or "", "unet")
        problems += [problem] if problem else missing_files(unet_folder, "UNet", ("config.json",), WEIGHT_NAMES["unet"])
        found["vae"], problem = resolve_snapshot(cache_root, radedit.vae_repo, radedit.vae_revision, "model.radedit.vae_revision")
        if need_vae:
            problems += [problem] if problem else missing_files(found["vae"], "VAE", ("config.json",), WEIGHT_NAMES["vae"])
    if problems:
        listing = "\n  - ".join(problems)
        raise ModelLoadError(f"RadEdit cannot be assembled from the cache {cache_root}:\n  - {listing}")
    return found


def load_radedit_tokenizer(model_cfg, cache_root: str, text_snapshot: Optional[str] = None):
    from transformers import BertTokenizer

    text_snapshot = text_snapshot or locate_snapshots(model_cfg, cache_root, need_vae=False, text_only=True)["text"]
    max_length = model_cfg.radedit.tokenizer_max_length
    return guarded(
        "tokenizer",
        text_snapshot,
        lambda: BertTokenizer.from_pretrained(text_snapshot, local_files_only=True, model_max_length=max_length),
    )


def bert_config(config_path: str):
    """transformers BertConfig from the BERT fields of CXR-BERT's config.json (remote-code fields dropped)."""
    from transformers import BertConfig

    published = read_json_file(config_path, "text encoder config")
    bert_fields = set(BertConfig().to_dict())
    return BertConfig(**{key: value for key, value in published.items() if key in bert_fields and key not in ("architectures", "model_type", "auto_map")})


def read_text_weights(weights_path: str) -> dict[str, torch.Tensor]:
    if weights_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(weights_path)
    return torch.load(weights_path, map_location="cpu", weights_only=True)


def bert_state_dict(checkpoint: dict[str, torch.Tensor], weights_path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's `bert.*` tensors under BertModel's names; unused heads dropped, anything else refused."""
    encoder, unknown = {}, []
    for key, tensor in checkpoint.items():
        if key.startswith(BERT_PREFIX):
            encoder[key[len(BERT_PREFIX) :]] = tensor
        elif not key.startswith(UNUSED_PREFIXES):
            unknown.append(key)
    if unknown:
        raise ModelLoadError(
            f"{weights_path} holds tensors outside CXR-BERT's bert/cls/cls_projection_head: {sorted(unknown)[:10]}; "
            "this snapshot is not the published BioViL-T layout (use model.radedit.trust_remote_code with a pinned text_revision)"
        )
    return encoder


def load_bert_encoder(text_snapshot: str, dtype: torch.dtype) -> torch.nn.Module:
    """transformers BertModel holding CXR-BERT's encoder weights (see the module docstring)."""
    from transformers import BertModel

    weights_path = first_existing(text_snapshot, WEIGHT_NAMES["text"])
    model = BertModel(bert_config(os.path.join(text_snapshot, "config.json")), add_pooling_layer=False)
    encoder = bert_state_dict(guarded("text encoder weights", weights_path, lambda: read_text_weights(weights_path)), weights_path)
    # Checkpoints from older transformers also store the constant position-id buffer; it must match ours.
    for name, buffer in model.named_buffers():
        saved = encoder.pop(name, None)
        if saved is not None and not torch.equal(saved.to(buffer.dtype), buffer):
            raise ModelLoadError(f"{weights_path}: buffer bert.{name} differs from BERT's constant {name}")
    result = model.load_state_dict(encoder, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{weights_path} does not match the BERT built from its config.json: "
            f"missing {sorted(result.missing_keys)[:10]}, unexpected {sorted(result.unexpected_keys)[:10]}"
        )
    return freeze(model.to(dtype))


def load_remote_text_encoder(text_snapshot: str, dtype: torch.dtype) -> torch.nn.Module:
    """The snapshot's own CXR-BERT class (opt-in remote code, pinned revision)."""
    from transformers import AutoModel

    return load_checked(
        "text encoder (remote code)",
        text_snapshot,
        lambda: AutoModel.from_pretrained(
            text_snapshot, trust_remote_code=True, local_files_only=True, dtype=dtype, output_loading_info=True
        ),
    )


def radedit_scheduler_config(radedit_snapshot: str) -> dict:
    """docs/design.md's DDIM settings on the snapshot's noise schedule, else on DDIMScheduler's default one."""
    path = os.path.join(radedit_snapshot, "scheduler", "scheduler_config.json")
    schedule = dict(DEFAULT_NOISE_SCHEDULE)
    if os.path.isfile(path):
        published = read_json_file(path, "scheduler config")
        schedule.update({key: published[key] for key in NOISE_SCHEDULE_KEYS if key in published})
    return {**schedule, **RADEDIT_SCHEDULER}


def load_radedit(model_cfg, cache_root: str, need_vae: bool = False) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    radedit = model_cfg.radedit
    if radedit.trust_remote_code and not radedit.text_revision:
        raise ModelLoadError("model.radedit.trust_remote_code needs model.radedit.text_revision pinned to a snapshot hash")
    dtype = torch_dtype(model_cfg.dtype)
    cache_root = hub_cache_root(model_cfg, cache_root)
    found = locate_snapshots(model_cfg, cache_root, need_vae=need_vae)

    tokenizer = load_radedit_tokenizer(model_cfg, cache_root, found["text"])
    if radedit.trust_remote_code:
        text_encoder = load_remote_text_encoder(found["text"], dtype)
    else:
        text_encoder = load_bert_encoder(found["text"], dtype)
    unet_folder = os.path.join(found["unet"], "unet")
    unet = load_diffusers_model(UNet2DConditionModel, found["unet"], "unet", dtype, "UNet")
    hidden_size = text_encoder.config.hidden_size
    if unet.config.cross_attention_dim != hidden_size:
        raise ModelLoadError(
            f"UNet in {unet_folder} attends to {unet.config.cross_attention_dim}-d text, but the text encoder in "
            f"{found['text']} gives {hidden_size}-d; check model.radedit.unet_repo/text_repo"
        )
    scheduler_config = radedit_scheduler_config(found["unet"])
    scheduler = scoring_scheduler(scheduler_config)
    vae = None
    if need_vae:
        # float32 whatever model.dtype says: the SDXL VAE overflows in float16.
        vae = load_diffusers_model(AutoencoderKL, found["vae"], None, torch.float32, "VAE")

    revisions = " ".join(f"{name}@{os.path.basename(path)}" for name, path in found.items() if path)
    return Components(
        tokenizer, text_encoder, unet, scheduler, vae,
        vae_scaling_factor=radedit.vae_scaling_factor,
        max_length=radedit.tokenizer_max_length,
        source=f"radedit:{cache_root} {revisions}",
    )


def radedit_fingerprint(model_cfg, cache_root: str) -> str:
    """The fingerprint of the snapshots RadEdit would load, from their files and the loader's settings."""
    radedit = model_cfg.radedit
    found = locate_snapshots(model_cfg, cache_root, need_vae=False)
    parts = {"text_encoder": found["text"], "unet": os.path.join(found["unet"], "unet")}
    scheduler_folder = os.path.join(found["unet"], "scheduler")
    if os.path.isdir(scheduler_folder):
        parts["scheduler"] = scheduler_folder
    if found["vae"]:
        parts["vae"] = found["vae"]
    settings = {
        "scheduler": radedit_scheduler_config(found["unet"]),
        "max_length": radedit.tokenizer_max_length,
        "vae_scaling_factor": radedit.vae_scaling_factor,
        "text_encoder": "remote_code" if radedit.trust_remote_code else "bert",
    }
    return model_fingerprint(parts, settings)
