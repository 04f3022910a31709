"""Random-initialised models in diffusers layout, built in seconds, for tests and benchmarks.

`build_tiny_model` makes a small text-to-image model with the parts RadEdit has (UNet with
cross-attention, BERT text encoder, WordPiece tokenizer, DDIM scheduler, VAE), so the real
loading and scoring code runs on it. `radedit_shaped=True` gives RadEdit's UNet architecture
(SD-1.x size, cross-attention dim 768, 4x64x64 latents) and a BERT-base text encoder, with
random weights, for memory and throughput work.
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterable

import sentencepiece
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, BertTokenizerFast, T5Tokenizer

from cxrmem.models.radedit import DEFAULT_NOISE_SCHEDULE, RADEDIT_SCHEDULER

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
T5_EXTRA_IDS = 100  # T5's sentinels <extra_id_0..99>, which its published tokenizer_config.json declares


def radedit_scheduler(**overrides) -> DDIMScheduler:
    """The DDIM scheduler docs/design.md fixes for RadEdit, with the noise schedule the RadEdit loader uses."""
    return DDIMScheduler(**{**RADEDIT_SCHEDULER, **DEFAULT_NOISE_SCHEDULE, **overrides})


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 1000, max_length: int = 128) -> BertTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer trained on `texts` (like CXR-BERT's, but small)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(texts, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, do_lower_case=True)


def train_t5_tokenizer(texts: Iterable[str], folder: str, vocab_size: int = 1000, max_length: int = 300) -> T5Tokenizer:
    """A T5 SentencePiece unigram tokenizer trained on `texts` (T5's ids: pad 0, eos 1, unk 2, no bos), written to
    `folder` as published T5 checkpoints hold it (PixArt-Sigma's tokenizer/: spiece.model, tokenizer_config.json,
    special_tokens_map.json) and loaded from there. No tokenizer.json: transformers builds the tokenizer from
    spiece.model, through sentencepiece and protobuf, as it must for a real checkpoint."""
    model = io.BytesIO()
    # A soft vocabulary limit: a small corpus may not hold vocab_size pieces. One thread: the same pieces every time.
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, model_type="unigram",
                                             vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                             bos_id=-1, num_threads=1, minloglevel=2)  # fmt: skip
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]}  # fmt: skip
    config = {**special, "tokenizer_class": "T5Tokenizer", "extra_ids": T5_EXTRA_IDS, "model_max_length": max_length}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as stream:
        stream.write(model.getvalue())
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as stream:
            json.dump(content, stream, indent=2)
    return T5Tokenizer.from_pretrained(folder)


def tiny_unet(cross_attention_dim: int, sample_size: int = 8, in_channels: int = 4) -> UNet2DConditionModel:
    # Small enough that per-call overhead, not arithmetic, dominates: what batching is meant to fix.
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        # diffusers reads this as the number of heads: 2 heads of 8-16 channels. SD's 8 would give
        # heads of 2-4 channels, whose per-head attention overhead swamps this model's arithmetic.
        attention_head_dim=2,
        norm_num_groups=8,
    )


# SD-1.x UNet architecture (RadEdit's): 4x64x64 latents, cross-attention 768; diffusers' defaults for the rest.
RADEDIT_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
                "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8}  # fmt: skip


def radedit_shaped_unet() -> UNet2DConditionModel:
    """RadEdit's UNet architecture with random weights."""
    return UNet2DConditionModel(**RADEDIT_UNET)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.13025,
    )


def build_tiny_model(out_dir: str, texts: Iterable[str], radedit_shaped: bool = False, seed: int = 0) -> str:
    """Write a random-initialised model in diffusers layout to `out_dir`, its tokenizer trained on `texts`."""
    torch.manual_seed(seed)
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=30522 if radedit_shaped else 1000)
    if radedit_shaped:
        text_config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512)  # BERT-base, as CXR-BERT
        unet = radedit_shaped_unet()
    else:
        text_config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        unet = tiny_unet(cross_attention_dim=text_config.hidden_size)
    text_encoder = BertModel(text_config, add_pooling_layer=False)
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=radedit_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
