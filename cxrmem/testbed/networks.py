"""The denoisers a testbed can be trained as (`testbed.denoiser`), one NETWORKS row each: how it is built, how a
batch of training texts becomes its conditioning, how it is called and how it is saved.

- `unet`: the committed testbed (testbed/model): a UNet2DConditionModel predicting the noise on a DDIM schedule,
  conditioned on a jointly trained BERT (cxrmem/testbed/train.py says why each choice).
- `sana`: a Sana-style diffusion transformer (SanaTransformer2DModel) predicting the flow-matching velocity, with a
  Gemma-2 text encoder from random initialisation (conf/testbed_dit.yaml keeps it frozen and its conditioning
  cached: `testbed.text_encoder_steps`, train.py `CachedConditioning`), saved as a SanaPipeline folder without a VAE
  (Sana's layout allows none: scoring never decodes and the testbed denoises pixels). It is conditioned through
  cxrmem/scoring/denoisers.py `SanaDenoiser`, the Scorer's own: the training texts are encoded exactly as the
  audit encodes them (the pipeline's instruction prefix, attention mask and 300 kept tokens) and the unconditional
  input is the pipeline's own, so the testbed cannot be trained on a conditioning the audit does not reproduce.

Both share the training loop of train.py; the loss differs only by the scheduler's parameterisation (train.py
`TRAINING_TARGETS`).
"""

from __future__ import annotations

import inspect
import json
import os

import diffusers
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel, UNet2DConditionModel
from transformers import BertConfig, BertModel, Gemma2Config, Gemma2Model

from cxrmem.models.components import Components
from cxrmem.models.tiny import radedit_scheduler
from cxrmem.scoring.denoisers import SanaDenoiser

# Channels per attention head of the Sana-style network's self- and cross-attention.
HEAD_DIM = 16
# Gemma-2's attention is eager only (softcapped logits), and it reads ~500 tokens per prompt (the instruction prefix
# and 300 more): trained jointly, its score matrices are most of a training step's CPU time, so few heads.
TEXT_HEADS = 2
# Rotary positions cost no parameters: room for the instruction prefix and the pipeline's 300 tokens.
GEMMA_POSITIONS = 2048


def build_unet(tb_cfg) -> UNet2DConditionModel:
    widths = tuple(tb_cfg.block_out_channels)
    plain, attn = len(widths) - 1, 1
    return UNet2DConditionModel(
        sample_size=tb_cfg.image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attn,
        up_block_types=("CrossAttnUpBlock2D",) * attn + ("UpBlock2D",) * plain,
        layers_per_block=1,
        cross_attention_dim=tb_cfg.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=8,
        # The attention-pooled prompt is added to the timestep embedding, so every ResNet block
        # sees the text: memorizing a prompt's image then takes far fewer CPU steps.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_text_encoder(tb_cfg, vocab_size: int) -> BertModel:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=tb_cfg.text_hidden_size,
        num_hidden_layers=tb_cfg.text_layers,
        num_attention_heads=4,
        intermediate_size=2 * tb_cfg.text_hidden_size,
        max_position_embeddings=tb_cfg.max_tokens,
    )
    return BertModel(config, add_pooling_layer=False)


class UNetNetwork:
    """The committed testbed's UNet and BERT; prompts are token ids padded to testbed.max_tokens, without a mask."""

    def __init__(self, tb, tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        self.denoiser, self.text_encoder = build_unet(tb), build_text_encoder(tb, len(tokenizer))
        # Pixel space: the predicted clean image is clipped to [-1, 1] (train.py says why).
        self.scheduler = radedit_scheduler(clip_sample=True)
        self.token_ids = tokenizer(texts, padding="max_length", max_length=tb.max_tokens, truncation=True, return_tensors="pt")["input_ids"]
        self.empty_ids = tokenizer([""], padding="max_length", max_length=tb.max_tokens, return_tensors="pt")["input_ids"]

    @staticmethod
    def vocabulary_texts() -> list[str]:
        return []

    def condition(self, text_index: np.ndarray, dropped: torch.Tensor) -> torch.Tensor:
        ids = self.token_ids[text_index]  # fancy indexing copies
        ids[dropped] = self.empty_ids[0]
        return self.text_encoder(ids)[0]  # no attention mask: the scorer, like RadEdit's pipeline, passes none

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.denoiser(noisy, timesteps, encoder_hidden_states=text).sample

    def save(self, out: str) -> None:
        """Diffusers layout (pixel space: no vae entry)."""
        os.makedirs(out, exist_ok=True)
        parts = {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder, "unet": self.denoiser, "scheduler": self.scheduler}
        for name, part in parts.items():
            options = {} if name in ("tokenizer", "scheduler") else {"safe_serialization": True}
            part.save_pretrained(os.path.join(out, name), **options)
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
        index.update({name: [type(part).__module__.split(".")[0], type(part).__name__] for name, part in parts.items()})
        index["vae"] = [None, None]
        with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as stream:
            json.dump(index, stream, indent=2)


class SanaNetwork:
    """A Sana-style flow-matching transformer over 32x32 one-channel pixels, conditioned as the Scorer conditions it.

    Flow shift 1 (none): Sana's 3 moves the schedule toward pure noise for 1024-pixel images, whose latents keep far
    more redundancy at a given noise level than 32x32 pixels do.
    """

    def __init__(self, tb, tokenizer, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, texts
        width = tb.text_hidden_size
        self.text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=tb.text_layers,
            num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_HEADS, head_dim=width // TEXT_HEADS,
            max_position_embeddings=GEMMA_POSITIONS, pad_token_id=tokenizer.pad_token_id,
        ))  # fmt: skip
        heads = tb.transformer_width // HEAD_DIM
        self.denoiser = SanaTransformer2DModel(
            in_channels=1, out_channels=1, num_attention_heads=heads, attention_head_dim=HEAD_DIM, num_layers=tb.transformer_layers,
            num_cross_attention_heads=heads, cross_attention_head_dim=HEAD_DIM, cross_attention_dim=tb.transformer_width,
            caption_channels=width, sample_size=tb.image_size, patch_size=tb.patch_size,
        )  # fmt: skip
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        components = Components(tokenizer, self.text_encoder, self.denoiser, self.scheduler, None, 1.0, 0, "testbed training", layout="sana")
        self.conditioning = SanaDenoiser(components, torch.device("cpu"), use_attention_mask=True)

    @staticmethod
    def vocabulary_texts() -> list[str]:
        """The pipeline's instruction prefix: in the vocabulary it is ~200 word pieces, not ~550 characters' worth,
        and the text encoder reads it before every prompt."""
        return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)

    def condition(self, text_index: np.ndarray, dropped: torch.Tensor) -> torch.Tensor:
        text = self.conditioning.encode([self.texts[i] for i in text_index])
        return torch.where(dropped[:, None, None], self.conditioning.unconditional(), text)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.conditioning(noisy, timesteps, text, None)

    def save(self, out: str) -> None:
        """A SanaPipeline folder without a VAE."""
        pipeline = SanaPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=None, transformer=self.denoiser,
                                scheduler=self.scheduler)  # fmt: skip
        pipeline.save_pretrained(out, safe_serialization=True)


NETWORKS = {"unet": UNetNetwork, "sana": SanaNetwork}
