"""LoRA adapters on a base model (`model.adapters`), loaded with diffusers' own LoRA loader (peft) and
fused into the UNet's weights before scoring.

Fused, because the scorer then runs a plain UNet2DConditionModel: no peft layers at run time, the same
cost per step as the base, and nothing in the sampling loop (or the detectors and strategies that reach
into the UNet's attention) needs to know about adapters. Each adapter enters as W + scale * (alpha / r) * B A,
which is what diffusers' `set_adapters(..., weights)` then `fuse_lora()` compute.

Supported: UNet LoRA in the layouts diffusers' Stable Diffusion loader reads (diffusers/peft keys under
`unet.`, or kohya's `lora_unet_` keys), in a safetensors file. Refused, with the file named: text-encoder
LoRA (transformers needs peft >= 0.22 for it), DoRA / LoKr / LoHa, keys for another denoiser (SD3, Flux,
PixArt...), and an adapter whose shapes or module names do not fit the base (trained on another model).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from cxrmem.models.components import ModelLoadError, first_line, guarded

# The file diffusers' LoRA training scripts and `save_lora_weights` write.
WEIGHT_FILE = "pytorch_lora_weights.safetensors"
SUPPORTED = f"supported: UNet LoRA in diffusers/peft or kohya layout, in {WEIGHT_FILE} (or the folder's one .safetensors file)"
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


def read_lora(weight_file: str) -> tuple[dict, dict | None, dict | None]:
    """(UNet state dict, network alphas, metadata) as diffusers' SD loader reads the file, kohya keys converted."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    check_lora_keys(weight_file)
    folder, name = os.path.split(weight_file)
    state_dict, alphas, metadata = guarded(
        "LoRA adapter", weight_file,
        lambda: StableDiffusionLoraLoaderMixin.lora_state_dict(folder, weight_name=name, local_files_only=True, return_lora_metadata=True),
    )
    prefixes = sorted({key.split(".", 1)[0] for key in state_dict})
    if any(prefix.startswith("text_encoder") for prefix in prefixes):
        raise ModelLoadError(
            f"LoRA adapter {weight_file} adapts a text encoder (text_encoder* keys): cxrmem fuses UNet LoRA only "
            f"(transformers needs peft >= 0.22 to load text-encoder adapters); {SUPPORTED}"
        )
    if prefixes != ["unet"]:
        other = next(key for key in state_dict if not key.startswith("unet."))
        raise ModelLoadError(
            f"LoRA adapter {weight_file} has keys for no Stable Diffusion UNet (e.g. {other}): an adapter for another "
            f"denoiser (SD3, Flux, PixArt...) or an old unprefixed layout; {SUPPORTED}"
        )
    return state_dict, alphas, metadata


def load_adapter(unet: torch.nn.Module, weight_file: str, name: str) -> None:
    """Inject one adapter's LoRA layers into `unet` under `name`, every tensor of the file or none."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import get_peft_model_state_dict

    state_dict, alphas, metadata = read_lora(weight_file)
    try:
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet, adapter_name=name, metadata=metadata)
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, or target modules the base lacks
        raise ModelLoadError(
            f"LoRA adapter {weight_file} does not fit the base model's UNet ({type(err).__name__}: {first_line(err)}); "
            "an adapter loads only onto the base it was trained on: check model.path and model.adapters"
        ) from None
    # The loader only logs tensors it could not place, and gives layers the file has no tensor for their initial
    # values: an adapter applied in part is another model.
    provided, loaded = unet_lora_names(state_dict), set(get_peft_model_state_dict(unet, adapter_name=name))
    if provided != loaded:
        unplaced, unfilled = sorted(provided - loaded), sorted(loaded - provided)
        example = unplaced[0] if unplaced else unfilled[0]
        raise ModelLoadError(
            f"LoRA adapter {weight_file} does not match the base model's UNet module for module: {len(unplaced)} of its "
            f"{len(provided)} tensors name modules the base lacks and {len(unfilled)} adapted layers get no tensor "
            f"(e.g. {example}); it was trained on another base: check model.path and model.adapters"
        )


def unet_lora_names(state_dict: dict) -> set[str]:
    """The names the loader gives the file's UNet tensors inside the model (peft's lora_A / lora_B)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    names = {key.removeprefix("unet."): value for key, value in state_dict.items()}
    if not any("lora_A" in key for key in names):  # the loader converts diffusers' older lora.down / lora.up names
        names = convert_unet_state_dict_to_peft(names)
    return set(names)


def fuse_adapters(unet: torch.nn.Module, adapters: Sequence[tuple[str, float]]) -> None:
    """Fuse each (weights file, scale) into `unet`'s weights, then remove the LoRA layers: a plain UNet remains."""
    names = [f"adapter{i}" for i in range(len(adapters))]
    for name, (weight_file, _) in zip(names, adapters):
        load_adapter(unet, weight_file, name)
    unet.set_adapters(names, weights=[float(scale) for _, scale in adapters])
    unet.fuse_lora(adapter_names=names)
    unet.unload_lora()
