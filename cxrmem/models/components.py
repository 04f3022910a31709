"""The pieces every model loader shares: the loaded parts (`Components`), dtype names, freezing,
JSON and weight loading that turns library failures into errors naming the component and its path.

`loading.py` (diffusers folders, s3:// stores) and `radedit.py` (RadEdit from a Hugging Face
cache) both build on these; neither imports the other's internals.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cxrmem.scoring.prediction import check_prediction_type, is_flow_matching, prediction_type

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tokenizers without a real limit report a huge model_max_length (transformers' VERY_LARGE_INTEGER).
UNBOUNDED_LENGTH = 1_000_000


class ModelLoadError(ValueError):
    """A model store that cannot be loaded, with the path and what to do in the message."""


@dataclass
class Components:
    """The loaded parts of a text-to-image model, as the scorer uses them."""

    tokenizer: object
    text_encoder: torch.nn.Module  # output [0] is the last hidden state [N, L, D]
    denoiser: torch.nn.Module  # the network the sampling loop calls: a UNet2DConditionModel or a diffusion transformer
    scheduler: object  # diffusers DDIMScheduler, or FlowMatchEulerDiscreteScheduler for a flow-matching model
    vae: Optional[torch.nn.Module]  # None when not requested, or for a pixel-space model
    vae_scaling_factor: float
    max_length: int  # tokens per prompt (the tokenizer pads and truncates to this)
    source: str  # where the model came from, for logs and summaries
    layout: str = "unet"  # the cxrmem/layouts.py LAYOUTS row: how the Scorer conditions and calls the denoiser
    extras: dict = field(default_factory=dict)  # further text parts the layout names (SDXL: tokenizer_2, text_encoder_2)
    index: dict = field(default_factory=dict)  # model_index.json (pipeline options such as force_zeros_for_empty_prompt)
    image_scale: int = 8  # image pixels per latent pixel (2 ** (VAE levels - 1)); SDXL's time ids are in pixels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.denoiser.config
        size = config.sample_size  # an int, or [height, width] for non-square models
        height, width = (size, size) if isinstance(size, int) else size
        return (config.in_channels, height, width)


def null_copy(components: Components, seed: int) -> Components:
    """The same model with its text encoders and denoiser re-initialised from `seed`: same classes, configs,
    tokenizers and scheduler, no VAE. What "nothing learned" attributes to, for the attribution null.

    The weights are drawn inside a forked RNG, so the caller's random state is left as it was, and
    the same seed gives the same weights (the construction order is fixed by the configs)."""
    denoiser = components.denoiser
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = reinitialised_text_encoder(components.text_encoder)
        null_denoiser = type(denoiser).from_config(denoiser.config)
        extras = {name: reinitialised_text_encoder(part) if isinstance(part, torch.nn.Module) else part
                  for name, part in components.extras.items()}  # fmt: skip
    # Built in float32; a half-precision model's null matches it.
    as_model = lambda module: freeze(module.to(denoiser.dtype))  # noqa: E731
    return Components(
        components.tokenizer, as_model(text_encoder), as_model(null_denoiser), components.scheduler, None,
        vae_scaling_factor=components.vae_scaling_factor, max_length=components.max_length,
        source=f"null (re-initialised, seed {seed}) of {components.source}", layout=components.layout,
        extras={name: as_model(part) if isinstance(part, torch.nn.Module) else part for name, part in extras.items()},
        index=components.index, image_scale=components.image_scale,
    )


def reinitialised_text_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """A text encoder of the same class and config with fresh weights (a BERT keeps its pooler or its lack of one)."""
    import inspect

    options = {}
    if "add_pooling_layer" in inspect.signature(type(encoder).__init__).parameters:
        options["add_pooling_layer"] = getattr(encoder, "pooler", None) is not None
    return type(encoder)(encoder.config, **options)


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def read_json_file(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({err}); restore it from the model's source") from None


def guarded(what: str, path: str, load: Callable):
    """Run `load`, turning a library failure into an error that names the component and its path."""
    try:
        return load()
    except ModelLoadError:
        raise
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused it, over several lines of its own
        kind = "is not" if os.path.isfile(path) else "holds a pickle that is not"
        raise ModelLoadError(
            f"the {what} at {path} {kind} a weights-only checkpoint: unpickling it would run code or build objects "
            f"other than tensors ({refused_global(err)}); refused. Use safetensors files, or a checkpoint of tensors only"
        ) from None
    except Exception as err:  # the libraries raise OSError, ValueError, SafetensorError, ...
        raise ModelLoadError(
            f"could not load the {what} from {path}: {type(err).__name__}: {first_line(err)}. "
            "Check that its config and weight files are complete (re-copy or rebuild the model)."
        ) from err


def refused_global(err: BaseException) -> str:
    """What torch's weights-only unpickler refused (`Unsupported global: GLOBAL io.open`), without its advice to load anyway."""
    match = re.search(r"Unsupported (?:global|operand)[^.]*?(?:GLOBAL \S+|\d+)", str(err))
    return match.group(0) if match else "an object torch does not allow"


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error: the CLI prints one line."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


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


def load_diffusers_model(model_class, root: str, subfolder: Optional[str], dtype: torch.dtype, what: str) -> torch.nn.Module:
    path = os.path.join(root, subfolder) if subfolder else root
    return load_checked(
        what,
        path,
        lambda: model_class.from_pretrained(
            root, subfolder=subfolder, local_files_only=True, dtype=dtype, output_loading_info=True
        ),
    )


def scoring_scheduler(scheduler_config: dict):
    """The scheduler the sampling loop steps with, built from the model's own config: FlowMatchEulerDiscreteScheduler
    for a flow-matching model (a DPM-Solver on flow sigmas, Sana's own, gives its flow_shift as the shift), else a
    DDIMScheduler with the model's noise schedule. A prediction type the Scorer cannot convert to epsilon is refused."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    check_prediction_type(prediction_type(scheduler_config))
    if is_flow_matching(scheduler_config):
        shift = scheduler_config.get("shift", scheduler_config.get("flow_shift", 1.0))
        return FlowMatchEulerDiscreteScheduler.from_config({**scheduler_config, "shift": shift})
    return DDIMScheduler.from_config(scheduler_config)
