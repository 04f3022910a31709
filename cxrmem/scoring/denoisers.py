"""The denoisers the Scorer drives: one class per model layout (cxrmem/layouts.py names them), each knowing
how its pipeline turns prompts into conditioning and how it calls its network.

The Scorer's sampling loop, norms and update are the same for all of them; what differs is here:

- `encode(prompts)`: the text conditioning of each prompt as ONE tensor [N, L', D'] (the "text" the Scorer
  carries, repeats, batches and differentiates). A layout whose network needs more than hidden states packs it
  into that tensor, and only its own `__call__` unpacks it: SDXL's pooled embedding is one extra row, a masked
  encoder's attention mask (PixArt, Sana) one extra channel. So every path that moves text embeddings works on
  every layout without knowing what is inside.
- `unconditional()`: the pipeline's own unconditional input [1, L', D'] (the empty prompt, or SDXL's zeros when
  its pipeline forces them).
- `__call__(x, t, text, layout)`: the network's raw output (what the scheduler's `prediction_type` says it is;
  cxrmem/scoring/prediction.py converts it to epsilon) for inputs x [M, C, H, W], timesteps t (one or [M]) and
  text [M, L', D'].
- `capabilities`: what UNet-only machinery (cxrmem/scoring/attention.py) can run on it; a detector or mitigation
  strategy that needs one it lacks is skipped with a reason (cxrmem/detectors.py, cxrmem/strategies.py `needs`;
  the capabilities are named in cxrmem/capabilities.py).

The transformer and SDXL layouts encode with their diffusers pipeline's own `encode_prompt`, with the defaults
its `__call__` declares, so that their conditioning is the pipeline's by construction.
"""

from __future__ import annotations

import inspect
import logging
from typing import Optional

import torch

from cxrmem.capabilities import CROSS_ATTENTION, PLAIN_TEXT
from cxrmem.layouts import LAYOUTS
from cxrmem.scoring.attention import TextLayout, share_text_projections

log = logging.getLogger(__name__)


class UNetDenoiser:
    """A UNet2DConditionModel conditioned on the text encoder's last hidden state (SD-1.x/2.x, RadEdit, MINIM)."""

    def __init__(self, components, device: torch.device, use_attention_mask: bool):
        self.module, self.components, self.device = components.denoiser, components, device
        self.use_attention_mask = use_attention_mask
        # Keys and values of the text embeddings made once, not for every sample at every step
        # (cxrmem/scoring/attention.py); False where the UNet's attention is not the plain kind.
        self.shares_text = share_text_projections(self.module)
        self.capabilities = {CROSS_ATTENTION, PLAIN_TEXT} if self.shares_text else {PLAIN_TEXT}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.components.tokenizer(
            prompts, padding="max_length", max_length=self.components.max_length, truncation=True, return_tensors="pt"
        )
        mask = tokens["attention_mask"].to(self.device) if self.use_attention_mask else None
        return self.components.text_encoder(tokens["input_ids"].to(self.device), attention_mask=mask)[0]

    def unconditional(self) -> torch.Tensor:
        return self.encode([""])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, layout: Optional[TextLayout]) -> torch.Tensor:
        kwargs = {"text_layout": layout} if self.shares_text else None
        return self.module(x, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample


class PipelineText:
    """Conditioning made by the model's diffusers pipeline itself (`encode_prompt`), with no VAE loaded."""

    encode_options: tuple[str, ...] = ()  # __call__ defaults that encode_prompt takes too

    def __init__(self, components, device: torch.device, use_attention_mask: bool):
        import diffusers

        self.module, self.components, self.device = components.denoiser, components, device
        self.shares_text = False  # the text tensor is packed: the shared projections would read the packing
        self.capabilities: set[str] = set()
        # The layout's diffusers pipeline: its encode_prompt and __call__ defaults are the layout's conditioning.
        layout = LAYOUTS[components.layout]
        self.pipeline_name = layout.pipeline
        pipeline_class = getattr(diffusers, self.pipeline_name)
        parts = {"tokenizer": components.tokenizer, "text_encoder": components.text_encoder, **components.extras,
                 layout.denoiser: components.denoiser, "scheduler": components.scheduler}  # fmt: skip
        wanted = inspect.signature(pipeline_class.__init__).parameters
        self.pipeline = pipeline_class(vae=None, **{name: part for name, part in parts.items() if name in wanted},
                                       **self.pipeline_options(components))  # fmt: skip
        # What the pipeline's __call__ uses when a caller passes nothing: the layout's conditioning is that.
        defaults = {name: p.default for name, p in inspect.signature(pipeline_class.__call__).parameters.items()}
        self.options = {name: defaults[name] for name in self.encode_options if name in defaults}

    def pipeline_options(self, components) -> dict:
        return {}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self._encode(prompts, negative=False)

    def unconditional(self) -> torch.Tensor:
        return self._encode([""], negative=True)

    def _encode(self, prompts: list[str], negative: bool) -> torch.Tensor:
        """The packed conditioning of `prompts`, or (negative) the pipeline's unconditional input [1, ...]."""
        raise NotImplementedError


class TransformerDenoiser(PipelineText):
    """A diffusion transformer conditioned on a masked text encoder's hidden states (PixArt: T5; Sana: Gemma).
    The attention mask rides as the text tensor's last channel; the network is called as the pipeline calls it."""

    encode_options = ("negative_prompt", "max_sequence_length", "complex_human_instruction", "clean_caption")
    call_options: dict = {}  # further keyword arguments the pipeline passes the transformer

    def __init__(self, components, device: torch.device, use_attention_mask: bool):
        super().__init__(components, device, use_attention_mask)
        if self.options.get("clean_caption"):
            from diffusers.utils import is_bs4_available, is_ftfy_available

            if not (is_bs4_available() and is_ftfy_available()):
                # The pipeline would fall back to lower-casing on every call, warning each time: once is enough.
                log.warning("%s cleans captions by default, which needs bs4 and ftfy: prompts are lower-cased only, "
                            "as the pipeline itself does without them", self.pipeline_name)  # fmt: skip
                self.options["clean_caption"] = False
        config = self.module.config
        self.timestep_scale = float(getattr(config, "timestep_scale", 1.0) or 1.0)
        # A learned-variance transformer predicts [eps, variance]; the pipelines keep the first half.
        self.learned_sigma = config.out_channels // 2 == config.in_channels

    def _encode(self, prompts: list[str], negative: bool) -> torch.Tensor:
        positive, mask, uncond, uncond_mask = self.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=negative, device=self.device, **self.options
        )[:4]
        embeddings, mask = (uncond[:1], uncond_mask[:1]) if negative else (positive, mask)
        return torch.cat([embeddings, mask.to(embeddings.dtype)[..., None]], dim=-1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, layout: Optional[TextLayout]) -> torch.Tensor:
        embeddings, mask = text[..., :-1], text[..., -1] > 0.5  # a perturbed text cannot flip the mask
        timestep = t.to(x.device).expand(len(x)) * self.timestep_scale
        output = self.module(
            x, encoder_hidden_states=embeddings, encoder_attention_mask=mask.to(embeddings.dtype), timestep=timestep,
            return_dict=False, **self.call_options,
        )[0]
        return output.chunk(2, dim=1)[0] if self.learned_sigma else output


class PixArtDenoiser(TransformerDenoiser):
    call_options = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


class SanaDenoiser(TransformerDenoiser):
    """Sana's transformer: called as TransformerDenoiser calls it, with no further options."""


class AddedConditionUNet(PipelineText):
    """An SDXL-style UNet: two CLIP encoders' penultimate hidden states, plus the second's pooled embedding and the
    time ids (original size, crop, target size) as added conditioning. The pooled embedding rides as one extra
    row of the text tensor (zero-padded to its width); the time ids are the same for every sample."""

    def __init__(self, components, device: torch.device, use_attention_mask: bool):
        super().__init__(components, device, use_attention_mask)
        size = [side * components.image_scale for side in components.latent_shape[1:]]
        # The pipeline's defaults: original and target size the image's, crop (0, 0).
        self.time_ids = torch.tensor([size + [0, 0] + size], dtype=torch.float32, device=device)
        self.pooled_width = components.extras["text_encoder_2"].config.projection_dim

    def pipeline_options(self, components) -> dict:
        return {"force_zeros_for_empty_prompt": bool(components.index.get("force_zeros_for_empty_prompt", True))}

    def _encode(self, prompts: list[str], negative: bool) -> torch.Tensor:
        # No negative prompt, as a pipeline call without one: force_zeros_for_empty_prompt then gives zeros.
        positive, uncond, pooled, uncond_pooled = self.pipeline.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=negative)
        embeddings, pooled = (uncond[:1], uncond_pooled[:1]) if negative else (positive, pooled)
        width = embeddings.shape[-1]
        if pooled.shape[-1] > width:
            raise ValueError(f"SDXL-style model: pooled text embedding ({pooled.shape[-1]}) wider than its hidden states ({width})")
        row = torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))[:, None]
        return torch.cat([embeddings, row.to(embeddings.dtype)], dim=1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, layout: Optional[TextLayout]) -> torch.Tensor:
        embeddings, pooled = text[:, :-1], text[:, -1, : self.pooled_width]
        added = {"text_embeds": pooled, "time_ids": self.time_ids.to(x.dtype).expand(len(x), -1)}
        return self.module(x, t, encoder_hidden_states=embeddings, added_cond_kwargs=added).sample


DENOISERS = {"unet": UNetDenoiser, "sdxl": AddedConditionUNet, "pixart": PixArtDenoiser, "sana": SanaDenoiser}


def denoiser(components, device: torch.device, use_attention_mask: bool):
    """The DENOISERS row of `components.layout`, on `device`."""
    return DENOISERS[components.layout](components, device, use_attention_mask)
