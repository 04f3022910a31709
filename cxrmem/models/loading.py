"""Load a text-to-image diffusion model's parts for scoring, offline, from local files or S3.

Two kinds of model store (docs/design.md, Model):

- `diffusers`: any folder with a `model_index.json` (tokenizer, text_encoder, unet, scheduler,
  optional vae), which is how the tests and the testbed run;
- `radedit`: RadEdit assembled from a local Hugging Face hub cache (see `radedit.py`).

An `s3://` model store is first copied to `model.cache_dir` and then loaded like a local one.
Everything is loaded on the CPU with `local_files_only=True`; placing it on a device is the
scorer's job unless `device` is given.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from cxrmem import storage
from cxrmem.models.fingerprint import model_fingerprint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler")
# Written last into a local copy of an s3:// store: its presence means the copy is complete.
COMPLETE_MARKER = ".cxrmem-complete.json"
# Tokenizers without a real limit report a huge model_max_length (transformers' VERY_LARGE_INTEGER).
UNBOUNDED_LENGTH = 1_000_000


class ModelLoadError(ValueError):
    """A model store that cannot be loaded, with the path and what to do in the message."""


@dataclass
class Components:
    """The loaded parts of a text-to-image model, as the scorer uses them."""

    tokenizer: object
    text_encoder: torch.nn.Module  # output [0] is the last hidden state [N, L, D]
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    scheduler: object  # diffusers DDIMScheduler
    vae: Optional[torch.nn.Module]  # None when not requested, or for a pixel-space model
    vae_scaling_factor: float
    max_length: int  # tokens per prompt (the tokenizer pads and truncates to this)
    fingerprint: str  # content hash of the files of every component (see fingerprint.py)
    source: str  # where the model came from, for logs and summaries

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.unet.config
        size = config.sample_size  # an int, or [height, width] for non-square models
        height, width = (size, size) if isinstance(size, int) else size
        return (config.in_channels, height, width)


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def load_components(model_cfg, storage_cfg=None, need_vae: bool = False, device=None) -> Components:
    """Tokenizer, text encoder, UNet, DDIM scheduler (and the VAE when `need_vae`) of `model_cfg`."""
    root = local_model_root(model_cfg, storage_cfg)
    if model_cfg.kind == "radedit":
        from cxrmem.models.radedit import load_radedit

        components = load_radedit(model_cfg, root, need_vae=need_vae)
    else:
        components = load_diffusers_folder(root, torch_dtype(model_cfg.dtype), need_vae=need_vae)
    if device is not None:
        for module in (components.text_encoder, components.unet, components.vae):
            if module is not None:
                module.to(device)
    return components


def load_tokenizer(model_cfg, storage_cfg=None):
    """Only the tokenizer (cheap: no weights), with `model_max_length` set to the model's prompt length."""
    root = local_model_root(model_cfg, storage_cfg)
    if model_cfg.kind == "radedit":
        from cxrmem.models.radedit import load_radedit_tokenizer

        return load_radedit_tokenizer(model_cfg, root)
    index = read_model_index(root)
    tokenizer = load_named_tokenizer(root, index)
    text_config = read_json_file(os.path.join(root, "text_encoder", "config.json"), "text encoder config")
    tokenizer.model_max_length = prompt_length(tokenizer, text_config)
    return tokenizer


# ---------------------------------------------------------------- diffusers folders


def read_json_file(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({err}); restore it from the model's source") from None


def read_model_index(root: str) -> dict:
    """model_index.json of a diffusers folder, checked for the components scoring needs."""
    path = os.path.join(root, "model_index.json")
    if not os.path.isdir(root):
        raise ModelLoadError(f"model folder {root} does not exist; set model.path to a diffusers model folder")
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"{root} has no model_index.json, so it is not a diffusers model folder; set model.path to one "
            "(or model.kind=radedit for a Hugging Face hub cache)"
        )
    index = read_json_file(path, "model index")
    problems = []
    for name in REQUIRED_COMPONENTS:
        if not has_component(index, name):
            problems.append(f"model_index.json has no {name!r} entry")
        elif not os.path.isdir(os.path.join(root, name)):
            problems.append(f"subfolder {name}/ is missing")
    if has_component(index, "unet") and index["unet"][1] != "UNet2DConditionModel":
        problems.append(f"unet is a {index['unet'][1]}; scoring needs a text-conditional UNet2DConditionModel")
    if has_component(index, "vae") and not os.path.isdir(os.path.join(root, "vae")):
        problems.append("model_index.json names a vae but subfolder vae/ is missing")
    if problems:
        raise ModelLoadError(f"model folder {root} is incomplete: " + "; ".join(problems))
    return index


def has_component(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and bool(entry[1])


def named_class(index: dict, name: str, library: str):
    """The class model_index.json names for component `name`, from the library it names."""
    entry_library, class_name = index[name]
    if entry_library != library:
        raise ModelLoadError(f"model_index.json: {name} comes from {entry_library!r}; cxrmem loads {library} {name}s only")
    module = importlib.import_module(library)
    if not hasattr(module, class_name):
        raise ModelLoadError(f"model_index.json: {name} class {class_name!r} is not in the installed {library}")
    return getattr(module, class_name)


def guarded(what: str, path: str, load: Callable):
    """Run `load`, turning a library failure into an error that names the component and its path."""
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as err:  # the libraries raise OSError, ValueError, SafetensorError, ...
        raise ModelLoadError(
            f"could not load the {what} from {path}: {type(err).__name__}: {err}. "
            "Check that its config and weight files are complete (re-copy or rebuild the model)."
        ) from err


def load_named_tokenizer(root: str, index: dict):
    tokenizer_class = named_class(index, "tokenizer", "transformers")
    path = os.path.join(root, "tokenizer")
    return guarded("tokenizer", path, lambda: tokenizer_class.from_pretrained(path, local_files_only=True))


def prompt_length(tokenizer, text_config: dict) -> int:
    """Tokens per prompt: the tokenizer's limit, capped by the text encoder's position table."""
    limits = [tokenizer.model_max_length] if tokenizer.model_max_length < UNBOUNDED_LENGTH else []
    limits += [text_config["max_position_embeddings"]] if "max_position_embeddings" in text_config else []
    if not limits:
        raise ModelLoadError("neither the tokenizer nor the text encoder config states a maximum prompt length")
    return int(min(limits))


def load_checked(what: str, path: str, load: Callable) -> torch.nn.Module:
    """A frozen model from `load() -> (model, loading_info)`; tensors missing from the files are an
    error (both libraries would otherwise initialise them at random, with only a log warning)."""

    def run():
        model, info = load()
        missing = sorted(info["missing_keys"])
        if missing:
            raise ModelLoadError(f"the {what} weights in {path} lack {len(missing)} tensors, e.g. {missing[:5]}")
        return model

    return freeze(guarded(what, path, run))


def load_transformers_model(model_class, path: str, dtype: torch.dtype, what: str) -> torch.nn.Module:
    options = {}
    # A BERT pooler feeds only output [1]; the UNet is conditioned on output [0], and checkpoints
    # saved without a pooler would otherwise get a random one.
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        options["add_pooling_layer"] = False
    return load_checked(
        what,
        path,
        lambda: model_class.from_pretrained(path, local_files_only=True, dtype=dtype, output_loading_info=True, **options),
    )


def load_diffusers_model(model_class, root: str, subfolder: Optional[str], dtype: torch.dtype, what: str) -> torch.nn.Module:
    path = os.path.join(root, subfolder) if subfolder else root
    return load_checked(
        what,
        path,
        lambda: model_class.from_pretrained(
            root, subfolder=subfolder, local_files_only=True, dtype=dtype, output_loading_info=True
        ),
    )


def ddim_scheduler(scheduler_config: dict):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config)


def load_diffusers_folder(root: str, dtype: torch.dtype, need_vae: bool = False) -> Components:
    """A diffusers text-to-image folder; its scheduler becomes a DDIMScheduler with the same config."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    index = read_model_index(root)
    tokenizer = load_named_tokenizer(root, index)
    text_path = os.path.join(root, "text_encoder")
    text_encoder = load_transformers_model(named_class(index, "text_encoder", "transformers"), text_path, dtype, "text encoder")
    unet = load_diffusers_model(UNet2DConditionModel, root, "unet", dtype, "UNet")
    scheduler_path = os.path.join(root, "scheduler")
    scheduler = guarded("scheduler", scheduler_path, lambda: ddim_scheduler(DDIMScheduler.load_config(scheduler_path)))
    tokenizer.model_max_length = prompt_length(tokenizer, text_encoder.config.to_dict())

    has_vae = has_component(index, "vae")
    vae, scaling_factor = None, 1.0
    if has_vae:
        vae_config = read_json_file(os.path.join(root, "vae", "config.json"), "VAE config")
        scaling_factor = float(vae_config.get("scaling_factor", 1.0))
        if need_vae:
            # float32 whatever model.dtype says: decoding is cheap next to sampling, and SD VAEs overflow in float16.
            vae = load_diffusers_model(AutoencoderKL, root, "vae", torch.float32, "VAE")

    parts = {name: os.path.join(root, name) for name in REQUIRED_COMPONENTS + (("vae",) if has_vae else ())}
    parts["model_index"] = os.path.join(root, "model_index.json")
    return Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        vae_scaling_factor=scaling_factor,
        max_length=tokenizer.model_max_length,
        fingerprint=model_fingerprint(parts),
        source=f"diffusers:{root}",
    )


# ---------------------------------------------------------------- s3:// model stores


def local_model_root(model_cfg, storage_cfg=None) -> str:
    """model.path itself when local; for s3:// a complete local copy under model.cache_dir."""
    if not storage.is_s3(model_cfg.path):
        return os.path.abspath(os.path.expanduser(model_cfg.path))
    uri = model_cfg.path.rstrip("/")
    # Keyed by endpoint and URI: the same bucket name on two S3 services is two stores.
    key = f"{storage.s3_settings(storage_cfg).endpoint} {uri}"
    local = os.path.join(os.path.expanduser(model_cfg.cache_dir), hashlib.sha256(key.encode()).hexdigest()[:16])
    # A hub cache holds every file twice once uploaded (snapshots dereference the blobs): copy only what loading reads.
    keep = hub_cache_file if model_cfg.kind == "radedit" else None
    copy_store(uri, local, storage_cfg, keep=keep)
    return local


def hub_cache_file(relative: str) -> bool:
    parts = relative.split("/")
    return len(parts) >= 3 and parts[0].startswith("models--") and parts[1] in ("refs", "snapshots")


def copy_store(uri: str, local: str, storage_cfg=None, keep: Optional[Callable[[str], bool]] = None) -> None:
    """Copy the files under `uri` to `local` unless a complete copy is already there.

    Each file is streamed to a temporary name and renamed into place (storage.copy_file), and the
    marker is written last, so that a copy interrupted (or raced by another worker on the same
    node) is never taken as complete.
    """
    marker = os.path.join(local, COMPLETE_MARKER)
    if os.path.isfile(marker):
        return
    files = storage.list_files(uri, storage_cfg)
    chosen = [(f, storage.relative(f, uri)) for f in files]
    chosen = [(f, name) for f, name in chosen if keep is None or keep(name)]
    if not chosen:
        raise ModelLoadError(f"model store {uri} holds no model files; check model.path and the S3 endpoint")
    for source, name in chosen:
        storage.copy_file(source, os.path.join(local, *name.split("/")), src_cfg=storage_cfg)
    partial = f"{marker}.partial-{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as stream:
        json.dump({"source": uri, "files": [name for _, name in chosen]}, stream, indent=1)
    os.replace(partial, marker)
