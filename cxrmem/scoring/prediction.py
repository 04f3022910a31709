"""What a denoiser predicts, and the noise epsilon it implies: d_mem is a norm of epsilon differences on every model.

One row of PREDICTIONS per parameterisation a scheduler config can declare (`prediction_type`; a flow-matching
scheduler declares none and predicts the velocity). Each row gives, at the model input x_t and timestep t,

- `noise(output, x, t)`: the epsilon the output implies (what attribution, mitigation and the detectors read);
- `difference_scale(t)`: the factor c(t) with eps_c - eps_u = c(t) (output_c - output_u), or None when the output
  is epsilon itself. The conversion is affine in the output with the same x_t for both guidance halves, so the
  text-conditional difference needs only c(t): the sampling loop scales the raw difference instead of
  subtracting two converted predictions (no cancellation of the x_t term, and epsilon models are untouched).

The derivations are in docs/design.md, "The score". Coefficients are gathered on the device by t: no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

FLOW_PREDICTION = "flow_prediction"  # what a flow-matching scheduler's model predicts: the velocity eps - x_0


class DDPMPrediction:
    """The DDPM family: x_t = sqrt(a) x_0 + sqrt(1 - a) eps with a = alpha_bar_t from the scheduler's table."""

    def __init__(self, scheduler, device: torch.device):
        self._alphas = scheduler.alphas_cumprod.to(device, torch.float32)

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        alpha = self._alphas[t.to(self._alphas.device).long()]
        return alpha.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)


class Epsilon(DDPMPrediction):
    def noise(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return output

    def difference_scale(self, t: torch.Tensor, like: torch.Tensor) -> Optional[torch.Tensor]:
        return None


class Velocity(DDPMPrediction):
    """v = sqrt(a) eps - sqrt(1 - a) x_0, so eps = sqrt(a) v + sqrt(1 - a) x_t and d eps = sqrt(a) d v."""

    def noise(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = self._alpha(t, output)
        return alpha.sqrt() * output + (1 - alpha).sqrt() * x.to(output.dtype)

    def difference_scale(self, t: torch.Tensor, like: torch.Tensor) -> Optional[torch.Tensor]:
        return self._alpha(t, like).sqrt()


class Sample(DDPMPrediction):
    """An x_0 prediction: eps = (x_t - sqrt(a) x_0) / sqrt(1 - a), so d eps = -sqrt(a / (1 - a)) d x_0."""

    def noise(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = self._alpha(t, output)
        return (x.to(output.dtype) - alpha.sqrt() * output) / (1 - alpha).sqrt()

    def difference_scale(self, t: torch.Tensor, like: torch.Tensor) -> Optional[torch.Tensor]:
        alpha = self._alpha(t, like)
        return -(alpha / (1 - alpha)).sqrt()


class FlowVelocity:
    """Rectified flow: x_t = (1 - s) x_0 + s eps with s = sigma_t = t / num_train_timesteps, velocity v = eps - x_0.
    x_0 = x_t - s v, so eps = x_t + (1 - s) v and d eps = (1 - s) d v."""

    def __init__(self, scheduler, device: torch.device):
        self._train_steps = float(scheduler.config.num_train_timesteps)

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.to(like.device, torch.float32) / self._train_steps).reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)

    def noise(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.to(output.dtype) + (1 - self._sigma(t, output)) * output

    def difference_scale(self, t: torch.Tensor, like: torch.Tensor) -> Optional[torch.Tensor]:
        return 1 - self._sigma(t, like)


PREDICTIONS = {"epsilon": Epsilon, "v_prediction": Velocity, "sample": Sample, FLOW_PREDICTION: FlowVelocity}


def prediction_type(scheduler_config) -> str:
    """The scheduler config's `prediction_type`; a flow-matching scheduler, which declares none, predicts the velocity."""
    declared = scheduler_config.get("prediction_type")
    if declared is None and is_flow_matching(scheduler_config):
        return FLOW_PREDICTION
    return declared or "epsilon"  # DDPM-family schedulers default to epsilon


def is_flow_matching(scheduler_config) -> bool:
    """A rectified-flow scheduler: a FlowMatch* class, or a DPM-Solver run on flow sigmas (Sana's own)."""
    name = str(scheduler_config.get("_class_name", ""))
    return "FlowMatch" in name or bool(scheduler_config.get("use_flow_sigmas")) or scheduler_config.get("prediction_type") == FLOW_PREDICTION


def check_prediction_type(name: str) -> None:
    if name not in PREDICTIONS:
        raise ValueError(f"the model's scheduler declares prediction_type {name!r}; cxrmem converts {', '.join(PREDICTIONS)} "
                         "to the noise epsilon and scores nothing else")  # fmt: skip


def prediction(scheduler, device: torch.device):
    """The PREDICTIONS row of `scheduler`'s config, on `device`."""
    name = prediction_type(scheduler.config)
    check_prediction_type(name)
    return PREDICTIONS[name](scheduler, device)
