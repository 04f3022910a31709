"""Load a text-to-image diffusion model's parts for scoring, offline, from local files or S3.

Two kinds of model store (docs/design.md, Model):

- `diffusers`: any folder with a `model_index.json` (tokenizer, text_encoder, unet, scheduler,
  optional vae), which is how the tests and the testbed run;
- `radedit`: RadEdit assembled from a local Hugging Face hub cache (see `radedit.py`).

`model.adapters` lists LoRA adapters fused into the denoiser after loading (see `adapters.py`); the
fingerprint covers the base and each adapter with its scale.

An `s3://` model store (or adapter) is first copied to `model.cache_dir` and then loaded like a local one.
Everything is loaded on the CPU with `local_files_only=True`; placing it on a device is the
scorer's job unless `device` is given.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from typing import Callable, Optional

import torch

from cxrmem import storage
from cxrmem.layouts import LAYOUTS
from cxrmem.models.adapters import adapter_weight_file, fuse_adapters
from cxrmem.models.components import (
    Components,
    ModelLoadError,
    guarded,
    load_checked,
    load_diffusers_model,
    prompt_length,
    read_json_file,
    scoring_scheduler,
    torch_dtype,
)
from cxrmem.models.fingerprint import adapted_fingerprint, model_fingerprint
from cxrmem.models.radedit import load_radedit, load_radedit_tokenizer, radedit_fingerprint
from cxrmem.storage import Store

# Written last into a local copy of an s3:// store: its presence means the copy is complete.
COMPLETE_MARKER = ".cxrmem-complete.json"


def load_components(model_cfg, store: Optional[Store] = None, need_vae: bool = False, device=None) -> Components:
    """Tokenizer, text encoder, UNet, DDIM scheduler (and the VAE when `need_vae`) of `model_cfg`."""
    root = local_model_root(model_cfg, store)
    if model_cfg.kind == "radedit":
        components = load_radedit(model_cfg, root, need_vae=need_vae)
    else:
        components = load_diffusers_folder(root, torch_dtype(model_cfg.dtype), need_vae=need_vae)
    adapters = adapter_files(model_cfg, store)
    if adapters:
        fuse_adapters(components.denoiser, adapters, components.layout)
        components.source += "".join(f" + LoRA {path} (scale {scale:g})" for path, scale in adapters)
    if device is not None:
        for module in (components.text_encoder, components.denoiser, components.vae, *components.extras.values()):
            if isinstance(module, torch.nn.Module):
                module.to(device)
    return components


def blind_steps(model_cfg, store: Optional[Store] = None) -> int:
    """Leading sampling steps whose text-conditional difference is 0 by construction, from the scheduler config alone
    (no weights loaded): 1 on a flow-matching model, whose schedule starts at sigma = 1 where the epsilon a velocity
    implies is x_t whatever the denoiser predicts (cxrmem/scoring/prediction.py FlowVelocity), else 0. A first-step
    screen ranks nothing there (bench/RESULTS.md, "Transformer testbed")."""
    from cxrmem.scoring.prediction import is_flow_matching

    if model_cfg.kind == "radedit":  # DDIM on epsilon (cxrmem/models/radedit.py)
        return 0
    store = store or Store.from_config()
    uri = f"{model_cfg.path.rstrip('/')}/scheduler/scheduler_config.json"
    return int(is_flow_matching(store.read_json(uri))) if store.exists(uri) else 0  # a folder without one fails to load, named


def fingerprint_model(model_cfg, store: Optional[Store] = None) -> str:
    """The model's fingerprint from its files alone (content hashes of weights and configs, the base's
    and each adapter's with its scale), loading nothing."""
    root = local_model_root(model_cfg, store)
    if model_cfg.kind == "radedit":
        base = radedit_fingerprint(model_cfg, root)
    else:
        base = model_fingerprint(diffusers_parts(root, read_model_index(root)))
    return adapted_fingerprint(base, adapter_files(model_cfg, store))


def adapter_files(model_cfg, store: Optional[Store] = None) -> list[tuple[str, float]]:
    """(local weights file, scale) of each of `model.adapters`, in order; s3:// adapters copied to model.cache_dir."""
    return [
        (adapter_weight_file(local_copy(adapter.path, model_cfg.cache_dir, store, key=f"model.adapters[{i}].path")), adapter.scale)
        for i, adapter in enumerate(model_cfg.adapters)
    ]


def load_tokenizer(model_cfg, store: Optional[Store] = None):
    """Only the tokenizer (cheap: no weights), with `model_max_length` set to the model's prompt length."""
    root = local_model_root(model_cfg, store)
    if model_cfg.kind == "radedit":
        return load_radedit_tokenizer(model_cfg, root)
    index = read_model_index(root)
    tokenizer = load_named_tokenizer(root, index)
    fixed = LAYOUTS[model_layout(root, index)].max_length
    if fixed:
        tokenizer.model_max_length = fixed
        return tokenizer
    text_config = read_json_file(os.path.join(root, "text_encoder", "config.json"), "text encoder config")
    tokenizer.model_max_length = prompt_length(tokenizer, text_config)
    return tokenizer


# ---------------------------------------------------------------- diffusers folders


def read_model_index(root: str) -> dict:
    """model_index.json of a diffusers folder, checked for the components its layout needs."""
    path = os.path.join(root, "model_index.json")
    if not os.path.isdir(root):
        raise ModelLoadError(f"model folder {root} does not exist; set model.path to a diffusers model folder")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{root} {unsupported_folder(root)}, so it is not a diffusers model folder; cxrmem scores "
                             f"diffusers folders of {supported_layouts()} (model.kind=diffusers), or RadEdit from a Hugging "
                             "Face hub cache (model.kind=radedit)")  # fmt: skip
    index = read_json_file(path, "model index")
    layout = LAYOUTS[model_layout(root, index)]
    problems = []
    for name in layout.components():
        if not has_component(index, name):
            problems.append(f"model_index.json has no {name!r} entry")
        elif not os.path.isdir(os.path.join(root, name)):
            problems.append(f"subfolder {name}/ is missing")
    if has_component(index, "vae") and not os.path.isdir(os.path.join(root, "vae")):
        problems.append("model_index.json names a vae but subfolder vae/ is missing")
    if problems:
        raise ModelLoadError(f"model folder {root} is incomplete: " + "; ".join(problems))
    return index


def unsupported_folder(root: str) -> str:
    """What a folder without model_index.json holds, in a few words (a MONAI bundle is recognised by name)."""
    if os.path.isfile(os.path.join(root, "configs", "metadata.json")):
        return "is a MONAI bundle (configs/metadata.json), not a diffusers pipeline, and has no model_index.json"
    return "has no model_index.json"


def model_layout(root: str, index: dict) -> str:
    """The LAYOUTS row of a diffusers folder: the first whose denoiser class and text parts model_index.json names."""
    for name, layout in LAYOUTS.items():
        if layout.matches(index):
            return name
    denoiser = next((f"{key} {index[key][1]}" for key in ("unet", "transformer", "prior") if has_component(index, key)), "no denoiser")
    raise ModelLoadError(f"{root} is a {index.get('_class_name', 'diffusers')} pipeline with {denoiser}; cxrmem scores "
                         f"{supported_layouts()}")  # fmt: skip


def supported_layouts() -> str:
    return "; ".join(f"{layout.describes} ({layout.denoiser_class})" for layout in LAYOUTS.values())


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


def load_named_tokenizer(root: str, index: dict, name: str = "tokenizer"):
    tokenizer_class = named_class(index, name, "transformers")
    path = os.path.join(root, name)
    return guarded(name.replace("_", " "), path, lambda: tokenizer_class.from_pretrained(path, local_files_only=True))


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


def load_diffusers_folder(root: str, dtype: torch.dtype, need_vae: bool = False) -> Components:
    """A diffusers text-to-image folder of any LAYOUTS row; its scheduler becomes the sampling loop's
    (cxrmem/models/components.py `scoring_scheduler`) with the same config."""
    from diffusers import DDIMScheduler

    index = read_model_index(root)
    name = model_layout(root, index)
    layout = LAYOUTS[name]
    texts = {part: load_text_part(root, index, part, dtype) for part in layout.text_parts}
    denoiser_class = named_class(index, layout.denoiser, "diffusers")
    denoiser = load_diffusers_model(denoiser_class, root, layout.denoiser, dtype, {"unet": "UNet"}.get(layout.denoiser, layout.denoiser))
    scheduler_path = os.path.join(root, "scheduler")
    scheduler = guarded("scheduler", scheduler_path, lambda: scoring_scheduler(DDIMScheduler.load_config(scheduler_path)))
    tokenizer, text_encoder = texts.pop("tokenizer"), texts.pop("text_encoder")
    tokenizer.model_max_length = layout.max_length or prompt_length(tokenizer, text_encoder.config.to_dict())

    vae, scaling_factor, image_scale = None, 1.0, 8
    if has_component(index, "vae"):
        vae_config = read_json_file(os.path.join(root, "vae", "config.json"), "VAE config")
        scaling_factor = float(vae_config.get("scaling_factor", 1.0))
        # As the pipelines compute it: 2 ** (levels - 1) (a deep-compression autoencoder names its encoder's levels).
        levels = vae_config.get("block_out_channels") or vae_config.get("encoder_block_out_channels") or [0] * 4
        image_scale = 2 ** (len(levels) - 1)
        if need_vae:
            # float32 whatever model.dtype says: decoding is cheap next to sampling, and SD VAEs overflow in float16.
            vae = load_diffusers_model(named_class(index, "vae", "diffusers"), root, "vae", torch.float32, "VAE")

    return Components(
        tokenizer, text_encoder, denoiser, scheduler, vae,
        vae_scaling_factor=scaling_factor, max_length=tokenizer.model_max_length, source=f"diffusers:{root}",
        layout=name, extras=texts, index=index, image_scale=image_scale,
    )


def load_text_part(root: str, index: dict, name: str, dtype: torch.dtype):
    """A tokenizer (`tokenizer*`) or a text encoder (`text_encoder*`) that model_index.json names."""
    if name.startswith("tokenizer"):
        return load_named_tokenizer(root, index, name)
    return load_transformers_model(named_class(index, name, "transformers"), os.path.join(root, name), dtype, name.replace("_", " "))


def diffusers_parts(root: str, index: dict) -> dict[str, str]:
    """The files a diffusers folder's fingerprint covers: every component folder its layout reads and model_index.json."""
    names = LAYOUTS[model_layout(root, index)].components() + (("vae",) if has_component(index, "vae") else ())
    return {**{name: os.path.join(root, name) for name in names}, "model_index": os.path.join(root, "model_index.json")}


# ---------------------------------------------------------------- s3:// model stores


def local_model_root(model_cfg, store: Optional[Store] = None) -> str:
    """model.path itself when local; for s3:// (any remote storage) a complete local copy under model.cache_dir."""
    # A hub cache holds every file twice once uploaded (snapshots dereference the blobs): copy only what loading reads.
    keep = hub_cache_file if model_cfg.kind == "radedit" else None
    return local_copy(model_cfg.path, model_cfg.cache_dir, store, keep=keep)


def local_copy(path: str, cache_dir: str, store: Optional[Store] = None, keep: Optional[Callable[[str], bool]] = None,
               key: str = "model.path") -> str:
    """`path` itself when local; for s3:// (any remote storage) a complete local copy under `cache_dir`.
    `key` is the config key that named `path`, for the error when nothing is there."""
    local = storage.local_path(path)
    if local is not None:
        return local
    uri = path.rstrip("/")
    # Keyed by endpoint and URI: the same bucket name on two S3 services is two stores.
    store = store or Store.from_config()
    identity = f"{store.backend(uri).endpoint} {uri}"
    local = os.path.join(os.path.expanduser(cache_dir), hashlib.sha256(identity.encode()).hexdigest()[:16])
    copy_store(store, uri, local, keep=keep, key=key)
    return local


def hub_cache_file(relative: str) -> bool:
    parts = relative.split("/")
    return len(parts) >= 3 and parts[0].startswith("models--") and parts[1] in ("refs", "snapshots")


def copy_store(store: Store, uri: str, local: str, keep: Optional[Callable[[str], bool]] = None, key: str = "model.path") -> None:
    """Copy the files under `uri` to `local` unless a complete copy is already there.

    Each file is streamed to a temporary name and renamed into place (storage.copy_file), and the
    marker is written last, so that a copy interrupted (or raced by another worker on the same
    node) is never taken as complete.
    """
    marker = os.path.join(local, COMPLETE_MARKER)
    if os.path.isfile(marker):
        return
    files = store.list_files(uri)
    chosen = [(f, storage.relative(f, uri)) for f in files]
    chosen = [(f, name) for f, name in chosen if keep is None or keep(name)]
    if not chosen:
        raise ModelLoadError(f"model store {uri} holds no model files; check {key} and the S3 endpoint")
    for source, name in chosen:
        # A key is data: one like `a/../../x` must not write outside the cache folder.
        store.copy_file(source, storage.join_inside(local, name, f"model store key under {uri}"))
    store.write_json(marker, {"source": uri, "files": [name for _, name in chosen]})
