"""Cross-attention that projects each distinct text embedding to keys and values once per trajectory.

A scoring batch sends 2 x N x G samples through the UNet at every step, but holds only N + 1
distinct text embeddings (the N prompts and the empty prompt), the same at every step. Diffusers'
attention projects keys and values for every sample at every step. `SharedTextAttnProcessor`
projects each distinct embedding once per layer and keeps the result for the whole trajectory;
the samples that share an embedding are folded into one query sequence, which is exact because
attention treats every query independently.

The caller describes the batch with a `TextLayout` passed in `cross_attention_kwargs`, and still
passes the full per-sample `encoder_hidden_states`: other UNet parts (a text time embedding) use
them, and any layer the processor cannot serve falls back to diffusers' own attention on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


@dataclass(eq=False)
class SharedText:
    """Distinct text embeddings [K, L, D] and, per attention layer, the keys and values made of them."""

    embeddings: torch.Tensor
    projections: dict = field(default_factory=dict)  # Attention module -> (keys, values), each [K, L, inner]
    token_scales: Optional[torch.Tensor] = None  # [K, L] float32: attention to each token re-scaled (rescale_attention)

    def keys_values(self, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        if attn not in self.projections:
            self.projections[attn] = (attn.to_k(self.embeddings), attn.to_v(self.embeddings))
        return self.projections[attn]


# The batch as consecutive blocks of samples: in a block (text, r), each of text's K embeddings
# is the context of r consecutive samples, so the block holds K x r samples.
TextLayout = list[tuple[SharedText, int]]


def attend_to_shared_text(attn: Attention, hidden_states: torch.Tensor, layout: TextLayout) -> torch.Tensor:
    """Cross-attention of hidden_states [S, Q, C] to the layout's texts; equals AttnProcessor2_0's result."""
    n_samples, n_queries, _ = hidden_states.shape
    query = attn.to_q(hidden_states)
    inner = query.shape[-1]
    heads, head_dim = attn.heads, inner // attn.heads
    outputs, start = [], 0
    for text, repeats in layout:
        keys, values = text.keys_values(attn)
        rows = keys.shape[0]
        block = rows * repeats
        # [rows * repeats, Q, inner] -> [rows, heads, repeats * Q, head_dim]: the samples of one text
        # become one long query sequence against that text's keys.
        q = query[start : start + block].reshape(rows, repeats * n_queries, heads, head_dim).transpose(1, 2)
        k = keys.view(rows, -1, heads, head_dim).transpose(1, 2)
        v = values.view(rows, -1, heads, head_dim).transpose(1, 2)
        if text.token_scales is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)
            out = rescale_attention(probs, text.token_scales[:, None, None, :]).to(v.dtype) @ v
        outputs.append(out.transpose(1, 2).reshape(block, n_queries, inner))
        start += block
    if start != n_samples:
        raise ValueError(f"text layout covers {start} samples but the UNet batch has {n_samples}")
    hidden_states = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return attn.to_out[1](attn.to_out[0](hidden_states))  # projection, then dropout


def rescale_attention(probs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [..., L] with token j's weight times scales[..., j], the mass taken moved to token 0.

    Ren et al. (ECCV 2024) mitigate memorization by lowering the cross-attention to the trigger
    tokens and raising it on the beginning token. Their paper re-weights logits; here the
    probability mass that the scale takes from the target tokens goes to the first token ([CLS]
    for BERT, BOS for CLIP), so that every other token keeps exactly the attention it had, and the
    rows still sum to one. Scales of 1 leave the probabilities as they are; scale 0 masks a token.
    """
    taken = (probs * (1 - scales)).sum(dim=-1, keepdim=True)
    out = probs * scales
    return torch.cat([out[..., :1] + taken, out[..., 1:]], dim=-1)


class SharedTextAttnProcessor:
    """Serves cross-attention from a `TextLayout` when one is given; otherwise the layer's own processor."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, text_layout=None
    ):
        shared = text_layout is not None and encoder_hidden_states is not None
        if not shared or attention_mask is not None or hidden_states.ndim != 3:
            if shared and any(text.token_scales is not None for text, _ in text_layout):
                raise ValueError("attention re-scaling is not supported with an attention mask or 4-D hidden states")
            extra = {} if temb is None else {"temb": temb}
            return self.fallback(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **extra
            )
        return attend_to_shared_text(attn, hidden_states, text_layout)


def _plain_cross_attention(attn: Attention) -> bool:
    """True where attend_to_shared_text computes exactly what the layer's processor would."""
    if not attn.is_cross_attention:
        return True  # self-attention is always left to the layer's own processor
    return (
        isinstance(attn.processor, AttnProcessor2_0)
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_cross is None
        and attn.norm_q is None
        and attn.norm_k is None
        and attn.added_kv_proj_dim is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
    )


def share_text_projections(unet) -> bool:
    """Give every attention layer of `unet` a SharedTextAttnProcessor; False (and no change) if one can't.

    Layers keep their own processor as the fallback, so calls without a text layout are unchanged.
    """
    processors = unet.attn_processors
    if all(isinstance(p, SharedTextAttnProcessor) for p in processors.values()):
        return True
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    if not all(_plain_cross_attention(m) for m in layers):
        return False
    unet.set_attn_processor({name: SharedTextAttnProcessor(p) for name, p in processors.items()})
    return True


# -- capture of cross-attention probabilities (detectors, cxrmem/detectors.py) ----------------
class TokenAttentionCapture:
    """Wraps a layer's processor; on cross-attention calls, records each sample's distribution over tokens.

    The record is `reduce` of softmax(q k^T * scale) [S, heads, Q, L], by default its mean over heads
    and query positions ([S, L] per call), appended to `records`. The layer's output still comes from
    the wrapped processor, unchanged. Only plain cross-attention is read (no cross norm, no spatial or
    group norm, 3-D hidden states).
    """

    def __init__(self, wrapped, records: list, reduce=None):
        self.wrapped = wrapped
        self.records = records
        self.reduce = reduce or (lambda probs: probs.mean(dim=(1, 2)))

    # Named parameters, not **kwargs: diffusers drops cross_attention_kwargs a processor does not name.
    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, text_layout=None
    ):
        if attn.is_cross_attention and encoder_hidden_states is not None:
            self.records.append(self.reduce(attention_probabilities(attn, hidden_states, encoder_hidden_states)))
        extra = {k: v for k, v in (("temb", temb), ("text_layout", text_layout)) if v is not None}
        return self.wrapped(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **extra
        )


def attention_probabilities(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """[S, Q, C] queries against [S, L, D] text -> [S, heads, Q, L] float32 attention probabilities."""
    normed = attn.norm_cross is not None or attn.spatial_norm is not None or attn.group_norm is not None
    if hidden_states.ndim != 3 or normed:
        raise ValueError(f"cross-attention capture supports plain attention layers only, not {type(attn).__name__} here")
    query, key = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
    heads = attn.heads
    q = query.view(query.shape[0], query.shape[1], heads, -1).transpose(1, 2).float()
    k = key.view(key.shape[0], key.shape[1], heads, -1).transpose(1, 2).float()
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)


def capture_token_attention(unet, records: list, reduce=None) -> dict:
    """Wrap every attention processor of `unet` in a TokenAttentionCapture; returns the old ones to restore."""
    old = dict(unet.attn_processors)
    unet.set_attn_processor({name: TokenAttentionCapture(p, records, reduce) for name, p in old.items()})
    return old
