"""The deterministic DDIM update (eta 0) without host syncs: the sampling loop's step.

diffusers' `DDIMScheduler.step` indexes `alphas_cumprod` (a CPU tensor) with the timestep (a device
scalar) and compares the previous timestep with 0 in Python: several device-to-host copies per step,
which stall a GPU between UNet calls and rule out CUDA graphs. `DDIMUpdate` reads the schedule once
per trajectory, on the host, and keeps each step's coefficients as Python floats, so a step is a few
fused tensor ops on the device. The arithmetic is diffusers' (Song et al., DDIM, eq. 12 with sigma 0),
including `clip_sample` and the three prediction types; tests compare it with `DDIMScheduler.step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCoefficients:
    sqrt_alpha: float  # sqrt(alpha_bar_t)
    sqrt_beta: float  # sqrt(1 - alpha_bar_t)
    sqrt_alpha_prev: float  # sqrt(alpha_bar_{t-1}) (final_alpha_cumprod after the last step)
    sqrt_beta_prev: float  # sqrt(1 - alpha_bar_{t-1})


class DDIMUpdate:
    """x_t -> x_{t-1} for the timesteps of one trajectory, given the model's output at each."""

    def __init__(self, scheduler, timesteps: torch.Tensor, prediction_type: str | None = None):
        """`prediction_type`: what the outputs given to the update are (default: the scheduler's own)."""
        config = scheduler.config
        if getattr(config, "thresholding", False):
            raise ValueError("DDIM with dynamic thresholding is not supported: set thresholding=false in the scheduler config")
        self.prediction_type = prediction_type or config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"DDIM prediction_type {self.prediction_type!r}: expected epsilon, v_prediction or sample")
        self.clip = float(config.clip_sample_range) if config.clip_sample else None
        stride = config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod.cpu()
        final = torch.as_tensor(scheduler.final_alpha_cumprod).cpu()
        self.steps = []
        for t in timesteps.cpu().tolist():  # one copy of the schedule per trajectory, not per step
            alpha = alphas[t]
            alpha_prev = alphas[t - stride] if t - stride >= 0 else final
            # float32 square roots, as the scheduler takes them, then kept as Python floats
            self.steps.append(StepCoefficients(
                float(alpha**0.5), float((1 - alpha) ** 0.5), float(alpha_prev**0.5), float((1 - alpha_prev) ** 0.5),
            ))  # fmt: skip

    def __call__(self, i: int, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x after the i-th step of the trajectory, from the model's output at that step."""
        c = self.steps[i]
        if self.prediction_type == "epsilon":
            x0, eps = (x - c.sqrt_beta * model_output) / c.sqrt_alpha, model_output
        elif self.prediction_type == "v_prediction":
            x0, eps = c.sqrt_alpha * x - c.sqrt_beta * model_output, c.sqrt_alpha * model_output + c.sqrt_beta * x
        else:  # the model predicts x_0
            x0 = model_output
            eps = (x - c.sqrt_alpha * x0) / c.sqrt_beta
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return c.sqrt_alpha_prev * x0 + c.sqrt_beta_prev * eps
