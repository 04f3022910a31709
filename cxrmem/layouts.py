"""The model layouts cxrmem scores: which denoiser and text parts a diffusers folder holds (LAYOUTS, one row each).

A folder's layout is the first row whose denoiser class and text parts its model_index.json names; the Scorer
conditions and calls the denoiser as that row's entry of cxrmem/scoring/denoisers.py DENOISERS says (the same
names, held equal by tests/test_denoisers.py). A layout is one row here, one class there, a tiny replica and its
parity test against the diffusers pipeline. No torch here: the loaders and the config checks read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Layout:
    describes: str  # the models it covers, for the one-line refusal of anything else
    denoiser: str  # model_index.json entry of the denoiser
    denoiser_class: str  # its diffusers class
    text_parts: tuple[str, ...] = ("tokenizer", "text_encoder")  # model_index.json entries of the text side, loaded in order
    max_length: Optional[int] = None  # tokens per prompt when the pipeline fixes it (max_sequence_length); None: the tokenizer's
    pipeline: str = "StableDiffusionPipeline"  # the diffusers pipeline of the layout, named in refusals
    lora_loader: Optional[str] = "StableDiffusionLoraLoaderMixin"  # that pipeline's diffusers LoRA loader (None: it has none)

    def components(self) -> tuple[str, ...]:
        """The model_index.json entries (and subfolders) loading reads, the VAE apart."""
        return (*self.text_parts, self.denoiser, "scheduler")

    def matches(self, index: dict) -> bool:
        """model_index.json names this denoiser class (and a second text encoder exactly when the layout has one:
        an SDXL folder is not an SD one). The other parts are checked afterwards, so that a missing one is named."""
        entry, second = index.get(self.denoiser), index.get("text_encoder_2")
        has_second = isinstance(second, list) and len(second) == 2 and bool(second[1])
        return isinstance(entry, list) and entry[1:] == [self.denoiser_class] and has_second == ("text_encoder_2" in self.text_parts)


LAYOUTS = {
    "unet": Layout("SD-1.x/2.x-style UNets (epsilon, v or sample prediction; RadEdit, RoentGen, MINIM)", "unet", "UNet2DConditionModel"),
    "sdxl": Layout("SDXL-style UNets with added conditioning (two CLIP encoders, pooled embedding, time ids)", "unet",
                   "UNet2DConditionModel", ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
                   pipeline="StableDiffusionXLPipeline", lora_loader="StableDiffusionXLLoraLoaderMixin"),
    # PixArt-Sigma's and Sana's pipelines encode max_sequence_length = 300 tokens.
    "pixart": Layout("PixArt-style diffusion transformers (T5 encoder)", "transformer", "PixArtTransformer2DModel", max_length=300,
                     pipeline="PixArtSigmaPipeline", lora_loader=None),
    "sana": Layout("Sana-style flow-matching diffusion transformers (Gemma-style encoder)", "transformer", "SanaTransformer2DModel",
                   max_length=300, pipeline="SanaPipeline", lora_loader="SanaLoraLoaderMixin"),
}  # fmt: skip
