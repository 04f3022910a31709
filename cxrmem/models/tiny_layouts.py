"""Random-initialised tiny replicas of every layout cxrmem/layouts.py names but the plain SD one (tiny.py),
saved in diffusers layout by the matching diffusers pipeline, built offline in seconds for the parity tests.

Each keeps what makes its layout different (the parameterisation, the added conditioning, the transformer and its
text encoder class, the scheduler its pipeline declares) and nothing of its size. Tokenizers are trained on local
texts (tiny.py), no vocabulary is downloaded: the WordPiece one where the pipelines only call them, and PixArt's a T5
SentencePiece one in the files a published PixArt-Sigma folder holds, so loading reads what it reads on a real one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

import torch
from diffusers import (
    AutoencoderDC,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model, T5Config, T5EncoderModel

from cxrmem.models.tiny import tiny_vae, train_t5_tokenizer, train_wordpiece_tokenizer

# SD-2.x's own scheduler (stable-diffusion-2-1): a scaled-linear DDPM schedule, predicting v.
SD2_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                 "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1}  # fmt: skip
TEXT_WIDTH = 32


def clip_text(tokenizer, projection: bool = False, hidden: int = TEXT_WIDTH):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_clip_tokenizer(texts: list[str]):
    return train_wordpiece_tokenizer(texts, vocab_size=1000, max_length=77)  # CLIP's 77 tokens


def save(pipeline, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_sd2_v(out_dir: str, texts: Iterable[str], seed: int = 0) -> str:
    """SD-2.x-style: a CLIP text encoder, a UNet with linear projections in its transformers, v-prediction."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(list(texts))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )  # fmt: skip
    pipeline = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text(tokenizer), tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(**SD2_SCHEDULER), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    return save(pipeline, out_dir)


def build_tiny_sdxl(out_dir: str, texts: Iterable[str], seed: int = 0) -> str:
    """SDXL-style: two CLIP encoders (the second with a projection, whose pooled output is added conditioning),
    their penultimate hidden states concatenated, and time ids through an added embedding."""
    torch.manual_seed(seed)
    texts = list(texts)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(texts), tiny_clip_tokenizer(texts)
    text_encoder, text_encoder_2 = clip_text(tokenizer, hidden=16), clip_text(tokenizer_2, projection=True)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16 + TEXT_WIDTH, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8,
    )  # fmt: skip
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")  # fmt: skip
    pipeline = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)  # fmt: skip
    return save(pipeline, out_dir)


def build_tiny_pixart(out_dir: str, texts: Iterable[str], seed: int = 0) -> str:
    """PixArt-Sigma-style: a T5 encoder (attention-masked) with its SentencePiece tokenizer, a transformer with learned
    variance (8 output channels for 4 latent ones), epsilon prediction on a DDPM schedule."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as published:
        tokenizer = train_t5_tokenizer(list(texts), published)
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=16,
            sample_size=8, patch_size=2, caption_channels=TEXT_WIDTH, use_additional_conditions=False, norm_num_groups=8,
        )  # fmt: skip
        scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
        pipeline = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(), transformer=transformer,
                                       scheduler=scheduler)  # fmt: skip
        save(pipeline, out_dir)
        # transformers 5 saves the tokenizer as tokenizer.json; the published folder holds spiece.model instead.
        shutil.rmtree(os.path.join(out_dir, "tokenizer"))
        shutil.copytree(published, os.path.join(out_dir, "tokenizer"))
    return out_dir


def build_tiny_sana(out_dir: str, texts: Iterable[str], seed: int = 0) -> str:
    """Sana-style: a Gemma-2 decoder as text encoder (attention-masked, the pipeline's instruction prefix), a linear-
    attention transformer predicting the flow velocity, and the flow-matching Euler scheduler (shift 3, Sana's)."""
    torch.manual_seed(seed)
    tokenizer = train_wordpiece_tokenizer(list(texts), vocab_size=1000, max_length=1024)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                                            pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
        cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_WIDTH, sample_size=8, patch_size=1,
    )  # fmt: skip
    pipeline = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_dc_vae(), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip
    return save(pipeline, out_dir)


def tiny_dc_vae() -> AutoencoderDC:
    """Sana's kind of VAE, a deep-compression autoencoder, one channel (grey): the copies stage and mitigation decode
    through it as through a real Sana's. Three levels (x4): SanaPipeline wants image sides divisible by 32."""
    levels = 3
    return AutoencoderDC(in_channels=1, latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock",) * levels,
                         decoder_block_types=("ResBlock",) * levels, encoder_block_out_channels=(8, 16, 16),
                         decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1,) * levels,
                         decoder_layers_per_block=(1,) * levels, encoder_qkv_multiscales=((),) * levels,
                         decoder_qkv_multiscales=((),) * levels, upsample_block_type="interpolate", downsample_block_type="Conv",
                         scaling_factor=0.41407)  # fmt: skip


BUILDERS = {"sd2_v": build_tiny_sd2_v, "sdxl": build_tiny_sdxl, "pixart": build_tiny_pixart, "sana": build_tiny_sana}
