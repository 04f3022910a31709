"""The memorization score of Wen et al. (ICLR 2024), as the paper uses it. Pure tensor math."""

from __future__ import annotations

import torch


def guided_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: the noise that drives the sampling trajectory."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def noise_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """|| eps_c - eps_u ||_2 over all latent elements of each sample, in float32: [B, ...] -> [B]."""
    return difference_norm(eps_cond.float() - eps_uncond.float())


def difference_norm(difference: torch.Tensor) -> torch.Tensor:
    """|| eps_c - eps_u ||_2 of a difference already taken (and converted to epsilon): [B, ...] -> [B]."""
    return difference.flatten(1).norm(dim=1)


def d_mem(step_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d_mem = mean of the text-conditional noise norms over generations and steps.

    step_norms: [N, G, T]. Returns (d_mem [N], nonfinite [N]); a prompt with any non-finite norm
    gets d_mem = NaN and is flagged, so it is never averaged in silently.
    """
    nonfinite = ~torch.isfinite(step_norms).flatten(1).all(dim=1)
    score = step_norms.float().flatten(1).mean(dim=1)
    return torch.where(nonfinite, torch.full_like(score, float("nan")), score), nonfinite
