"""LoRA adapters on a base model (`model.adapters`), loaded with the diffusers LoRA loader of the layout's own pipeline
(peft) and fused into the denoiser's weights before scoring.

Fused, because the scorer then runs a plain denoiser: no peft layers at run time, the same cost per step as the
base, and nothing in the sampling loop (or the detectors and strategies that reach into a UNet's attention) needs to
know about adapters. Each adapter enters as W + scale * (alpha / r) * B A, which is what diffusers'
`set_adapters(..., weights)` then `fuse_lora()` compute.

Supported: denoiser LoRA of the layouts whose diffusers pipeline has a LoRA loader (cxrmem/layouts.py
`lora_loader`): UNet LoRA (diffusers/peft keys under `unet.`, or kohya's `lora_unet_` keys) on SD and SDXL, and
transformer LoRA (keys under `transformer.`) on Sana, in a safetensors file. Refused, with the file named: a layout
whose pipeline has no LoRA loader (PixArt-Sigma's), text-encoder LoRA (transformers needs peft >= 0.22 for it),
DoRA / LoKr / LoHa, keys for another denoiser, and an adapter whose shapes or module names do not fit the base
(trained on another model).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from cxrmem.layouts import LAYOUTS, Layout
from cxrmem.models.components import ModelLoadError, first_line, guarded

# The file diffusers' LoRA training scripts and `save_lora_weights` write.
WEIGHT_FILE = "pytorch_lora_weights.safetensors"
SUPPORTED = (f"supported: denoiser LoRA on the {', '.join(name for name, layout in LAYOUTS.items() if layout.lora_loader)} layouts "
             f"(UNet LoRA in diffusers/peft or kohya layout, transformer LoRA in diffusers/peft layout), in {WEIGHT_FILE} "
             "(or the folder's one .safetensors file)")
# Key fragments of adapter types peft knows but diffusers' SD loader does not load as LoRA (DoRA's scales it drops).
OTHER_ADAPTER_TYPES = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", ".lokr_": "LoKr", ".hada_": "LoHa"}


def adapter_weight_file(folder: str) -> str:
    """The adapter's weights: `pytorch_lora_weights.safetensors`, else the folder's only .safetensors file."""
    if not os.path.isdir(folder):
        raise ModelLoadError(f"LoRA adapter folder {folder} does not exist; check model.adapters")
    found = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if WEIGHT_FILE in found:
        return os.path.join(folder, WEIGHT_FILE)
    if len(found) == 1:
        return os.path.join(folder, found[0])
    what = f"{len(found)} .safetensors files ({', '.join(found)})" if found else f"no .safetensors file ({', '.join(sorted(os.listdir(folder))) or 'empty'})"
    raise ModelLoadError(f"LoRA adapter folder {folder} holds {what}, so no LoRA weights to load; {SUPPORTED}")


def check_lora_keys(weight_file: str) -> None:
    """Refuse a file that is not a LoRA diffusers' SD loader would load in full (read from its header only)."""
    from safetensors import safe_open

    def read_keys():
        with safe_open(weight_file, framework="pt") as stream:
            return list(stream.keys())

    keys = guarded("LoRA adapter", weight_file, read_keys)
    for fragment, kind in OTHER_ADAPTER_TYPES.items():
        if any(fragment in key for key in keys):
            raise ModelLoadError(f"LoRA adapter {weight_file} is a {kind} adapter (keys with {fragment!r}), not plain LoRA; {SUPPORTED}")
    plain = [key for key in keys if "lora" not in key]
    if not keys or plain:
        example = plain[0] if plain else "no tensors"
        raise ModelLoadError(f"{weight_file} is not a LoRA adapter ({len(plain)} of {len(keys)} tensors are not LoRA weights, e.g. {example}); {SUPPORTED}")


def lora_loader(layout_name: str):
    """The diffusers LoRA loader of the layout's pipeline; a layout whose pipeline has none is refused in one line."""
    import diffusers.loaders

    layout = LAYOUTS[layout_name]
    if layout.lora_loader is None:
        raise ModelLoadError(f"model.adapters: the base is a {layout_name} layout ({layout.describes}), whose diffusers pipeline "
                             f"{layout.pipeline} has no LoRA loader, so no adapter can be loaded onto it; {SUPPORTED}")  # fmt: skip
    return getattr(diffusers.loaders, layout.lora_loader)


def read_lora(weight_file: str, layout_name: str) -> tuple[dict, dict | None, dict | None]:
    """(denoiser state dict, network alphas, metadata) as the layout pipeline's LoRA loader reads the file (kohya keys
    converted where it converts them)."""
    loader, layout = lora_loader(layout_name), LAYOUTS[layout_name]
    check_lora_keys(weight_file)
    folder, name = os.path.split(weight_file)
    read = guarded("LoRA adapter", weight_file,
                   lambda: loader.lora_state_dict(folder, weight_name=name, local_files_only=True, return_lora_metadata=True))  # fmt: skip
    # The UNet loaders also return the kohya network alphas; the transformer loaders have none.
    state_dict, alphas, metadata = read if len(read) == 3 else (read[0], None, read[1])
    prefixes = sorted({key.split(".", 1)[0] for key in state_dict})
    if any(prefix.startswith("text_encoder") for prefix in prefixes):
        raise ModelLoadError(
            f"LoRA adapter {weight_file} adapts a text encoder (text_encoder* keys): cxrmem fuses denoiser LoRA only "
            f"(transformers needs peft >= 0.22 to load text-encoder adapters); {SUPPORTED}"
        )
    if prefixes != [layout.denoiser]:
        other = next(key for key in state_dict if not key.startswith(f"{layout.denoiser}."))
        raise ModelLoadError(
            f"LoRA adapter {weight_file} has keys for no {layout.denoiser} of a {layout_name} layout (e.g. {other}): an adapter "
            f"for another denoiser (SD3, Flux, a UNet on a transformer or the reverse...) or an old unprefixed layout; {SUPPORTED}"
        )
    return state_dict, alphas, metadata


def load_adapter(denoiser: torch.nn.Module, weight_file: str, name: str, layout_name: str) -> None:
    """Inject one adapter's LoRA layers into `denoiser` under `name`, every tensor of the file or none."""
    from peft import get_peft_model_state_dict

    layout = LAYOUTS[layout_name]
    state_dict, alphas, metadata = read_lora(weight_file, layout_name)
    try:
        # What each pipeline loader's load_lora_into_unet / load_lora_into_transformer does with what it read.
        denoiser.load_lora_adapter(state_dict, prefix=layout.denoiser, network_alphas=alphas, adapter_name=name, metadata=metadata)
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, or target modules the base lacks
        raise ModelLoadError(
            f"LoRA adapter {weight_file} does not fit the base model's {layout.denoiser} ({type(err).__name__}: {first_line(err)}); "
            "an adapter loads only onto the base it was trained on: check model.path and model.adapters"
        ) from None
    # The loader only logs tensors it could not place, and gives layers the file has no tensor for their initial
    # values: an adapter applied in part is another model.
    provided, loaded = lora_names(state_dict, layout), set(get_peft_model_state_dict(denoiser, adapter_name=name))
    if provided != loaded:
        unplaced, unfilled = sorted(provided - loaded), sorted(loaded - provided)
        example = unplaced[0] if unplaced else unfilled[0]
        raise ModelLoadError(
            f"LoRA adapter {weight_file} does not match the base model's {layout.denoiser} module for module: {len(unplaced)} of its "
            f"{len(provided)} tensors name modules the base lacks and {len(unfilled)} adapted layers get no tensor "
            f"(e.g. {example}); it was trained on another base: check model.path and model.adapters"
        )


def lora_names(state_dict: dict, layout: Layout) -> set[str]:
    """The names the loader gives the file's denoiser tensors inside the model (peft's lora_A / lora_B)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    names = {key.removeprefix(f"{layout.denoiser}."): value for key, value in state_dict.items()}
    if not any("lora_A" in key for key in names):  # the loader converts diffusers' older lora.down / lora.up names
        names = convert_unet_state_dict_to_peft(names)
    return set(names)


def fuse_adapters(denoiser: torch.nn.Module, adapters: Sequence[tuple[str, float]], layout_name: str) -> None:
    """Fuse each (weights file, scale) into the `layout_name` denoiser's weights, then remove the LoRA layers: a plain
    denoiser remains."""
    names = [f"adapter{i}" for i in range(len(adapters))]
    for name, (weight_file, _) in zip(names, adapters):
        load_adapter(denoiser, weight_file, name, layout_name)
    denoiser.set_adapters(names, weights=[float(scale) for _, scale in adapters])
    denoiser.fuse_lora(adapter_names=names)
    denoiser.unload_lora()
