"""N decoded generations per prompt at a given guidance, through the Scorer's own methods.

Each prompt's initial latents come from `Scorer.initial_latents` (the run's seed mode), so the
generations of a prompt are the same whichever batch it is decoded in, and a memorized prompt's
generations here start from the noises its d_mem was scored on.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

# (prompt texts, their prompt ids, embeddings [B, L, D], initial latents [B, N, ...], guidance w) -> the keyword
# arguments of Scorer.sample a mitigation strategy generates with (cxrmem.mitigation.strategy_sampling)
SamplingPlan = Callable[[list[str], list[str], torch.Tensor, torch.Tensor, float], dict]


def generate(
    scorer,
    prompts: Sequence[str],
    prompt_ids: Sequence[str],
    n_generations: int,
    guidance: float,
    batch_size: int,
    plan: Optional[SamplingPlan] = None,
) -> torch.Tensor:
    """Decoded generations [P, N, C, H, W] in [0, 1] on the CPU, at guidance `guidance`.

    `batch_size` prompts (each with its N generations) go through one sampling run. `plan`
    changes what the sampling starts from (a mitigation strategy: the embedding, the initial
    noise, the guidance schedule or the attention to some tokens). At w = 1 without a schedule a step is one
    conditional pass (Scorer.sample's `record_norms`): `strategies.Strategy.evaluations` declares it.
    """
    if len(prompts) != len(prompt_ids) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(prompt_ids)} prompt ids: need the same, non-zero number")
    images = []
    for start in range(0, len(prompts), batch_size):
        ids, texts = list(prompt_ids[start : start + batch_size]), list(prompts[start : start + batch_size])
        embeddings = scorer.encode(texts).embeddings
        latents = scorer.initial_latents(ids, n_generations)
        inputs = {"cond_embeddings": embeddings, "latents": latents, "guidance": guidance}
        if plan is not None:
            inputs = plan(texts, ids, embeddings, latents, guidance)
        final = scorer.sample(**inputs, record_norms=False).final_latents  # the images only: at w = 1 one pass a step
        decoded = scorer.decode(final.flatten(0, 1))
        images.append(decoded.reshape(*final.shape[:2], *decoded.shape[1:]))
    return torch.cat(images)
