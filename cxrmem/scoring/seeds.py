"""Initial latents, seeded exactly as docs/design.md fixes them.

A generation's noise depends only on (seed, g) in `shared` mode, or on (seed, prompt_id, g) in
`per_prompt` mode, never on batch size, worker or shard, so scores are reproducible anywhere.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch


def noise_seed(seed: int, g: int, prompt_id: Optional[str] = None) -> int:
    """The 63-bit generator seed of generation g (and of prompt_id in per_prompt mode)."""
    key = f"{seed}:{g}" if prompt_id is None else f"{seed}:{prompt_id}:{g}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def initial_latents(
    shape: Sequence[int],
    seed: int,
    generations: int,
    prompt_ids: Optional[Sequence[str]] = None,
    init_noise_sigma: float = 1.0,
) -> torch.Tensor:
    """Latents [N, G, C, H, W] in float32 on the CPU.

    `prompt_ids=None` is the shared mode: one row of G noises, [1, G, C, H, W], which every prompt
    sees (callers broadcast it). With prompt ids, each prompt gets its own G noises.
    """

    def draw(prompt_id: Optional[str]) -> torch.Tensor:
        noises = [
            torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(noise_seed(seed, g, prompt_id)))
            for g in range(generations)
        ]
        return torch.stack(noises)

    rows = [draw(None)] if prompt_ids is None else [draw(pid) for pid in prompt_ids]
    return torch.stack(rows) * init_noise_sigma
