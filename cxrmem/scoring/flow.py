"""The flow-matching Euler update without host syncs: the sampling loop's step for rectified-flow models.

diffusers' `FlowMatchEulerDiscreteScheduler.step` (deterministic) is x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i,
with the scheduler's own sigmas after `set_timesteps`. `FlowEulerUpdate` reads those sigmas once per trajectory
and keeps each step's difference as a Python float (the float32 difference the scheduler takes), so a step is
one fused op on the device, as `DDIMUpdate` does for DDIM. Tests compare it with the scheduler's step.
"""

from __future__ import annotations

import torch


class FlowEulerUpdate:
    """x_t -> x_{t-1} for the timesteps of one trajectory, given the velocity predicted at each."""

    def __init__(self, scheduler, timesteps: torch.Tensor):
        if getattr(scheduler.config, "stochastic_sampling", False):
            raise ValueError("flow matching with stochastic_sampling is not deterministic: set it false in the scheduler config")
        schedule = scheduler.timesteps.cpu().tolist()
        sigmas = scheduler.sigmas.cpu()  # float32, one more than the timesteps (the terminal sigma)
        first = schedule.index(float(timesteps[0])) if len(timesteps) else 0  # a continued trajectory starts later
        self.dt = [float(sigmas[first + i + 1] - sigmas[first + i]) for i in range(len(timesteps))]

    def __call__(self, i: int, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.dt[i] * model_output
