"""Which device a model replica runs on and the precision it then computes in.

Two rules the rest of the code relies on:
- a replica that is meant to run on a GPU (Ray gave it one, or `model.device` names CUDA) never
  falls back to the CPU in silence: a RadEdit prompt takes minutes there, and the stall watchdog
  would blame other jobs. It refuses at start with one line (`DeviceUnavailable`);
- scores computed in different effective precisions never share a resume key (`Precision`): the CPU
  runs a bfloat16 model in float32, and CUDA float32 uses TF32 only when `model.tf32` says so.

torch and Ray are imported where used: the configuration hashes a Precision without loading either.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass


class DeviceUnavailable(RuntimeError):
    """A replica that must run on CUDA cannot: the message is the one line a user acts on."""


class DeviceOutOfMemory(MemoryError):
    """One row's work alone does not fit the device: the message names the config key to lower."""


def nvidia_driver() -> str:
    """The node's NVIDIA driver as nvidia-smi reports it, or why it cannot be read."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found on this node"
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi does not answer ({err})"
    lines = done.stdout.split()
    return f"driver {lines[0]}" if done.returncode == 0 and lines else f"nvidia-smi failed ({done.stderr.strip()[:200]})"


def cuda_unavailable_line(why: str) -> str:
    import torch

    cuda = torch.version.cuda or "none: a CPU build"
    return (
        f"{why}, but torch {torch.__version__} (CUDA {cuda}) cannot use CUDA here ({nvidia_driver()}). Install a torch "
        "build whose CUDA the node's driver supports (the image's CUDA 13 needs driver R580 or newer), or run on CPUs "
        "on purpose with model.device=cpu and ray.num_gpus_per_worker=0."
    )


def resolve_device(name: str | None = "auto", gpu_assigned: bool = False):
    """The torch device of a replica for `model.device`; `gpu_assigned`: Ray gave this process a GPU.

    auto means CUDA when a GPU was assigned or CUDA works here, else the CPU. Wherever CUDA is meant
    and torch cannot use it, DeviceUnavailable, never the CPU.
    """
    import torch

    name = name or "auto"
    if name == "auto":
        name = "cuda" if gpu_assigned or torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "Ray gave this worker a GPU" if gpu_assigned else f"model.device is {name}"
        raise DeviceUnavailable(cuda_unavailable_line(why))
    return device


@dataclass(frozen=True)
class Precision:
    """The arithmetic a replica's scores come from: what the resume key hashes beside the settings."""

    dtype: str  # the UNet's and text encoder's dtype as run (float32 | bfloat16 | float16)
    device: str  # cpu | cuda
    tf32: bool  # CUDA float32 matmuls and convolutions in TF32

    @classmethod
    def of(cls, dtype: str, device_type: str, tf32: bool, cpu_half: bool = False) -> "Precision":
        """What a model configured with `dtype` computes in on `device_type`: the CPU runs half-precision
        models in float32 unless score.cpu_half, and TF32 only exists for float32 on CUDA."""
        if device_type == "cpu" and dtype != "float32" and not cpu_half:
            dtype = "float32"
        return cls(dtype, device_type, bool(tf32) and device_type == "cuda" and dtype == "float32")

    def describe(self) -> str:
        return f"{self.dtype} on {self.device}" + (" with TF32" if self.tf32 else "")


def planned_device(name: str | None, on_ray: bool, ray_gpus_per_worker: float) -> str:
    """`model.device` made concrete once, on the driver, so that the resume key and every replica agree:
    on Ray, CUDA where the scoring pool asks for GPUs (the cluster has them and ray.num_gpus_per_worker > 0);
    in this process, CUDA where torch can use it."""
    if name not in (None, "auto"):
        return name
    if on_ray:
        import ray

        return "cuda" if ray_gpus_per_worker > 0 and ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def output_layers_in_float32(unet) -> bool:
    """Run a half-precision UNet's last layers (conv_norm_out, its activation, conv_out) in float32, so that
    the noise prediction is not rounded to bfloat16's 3 significant digits at the end: d_mem is the norm of
    eps_c - eps_u, a difference of two nearly equal predictions, which that last rounding dominates
    (bench/RESULTS.md, "Precision"). The layers are a GroupNorm and one 3x3 convolution to 4 channels:
    their cost is negligible beside the UNet. False where the UNet has no such layers (nothing changed)."""
    import torch

    norm, out = getattr(unet, "conv_norm_out", None), getattr(unet, "conv_out", None)
    if out is None or out.weight.dtype == torch.float32:
        return False
    first = norm if norm is not None else out
    first.float().register_forward_pre_hook(lambda module, args: tuple(a.float() for a in args))
    out.float()
    return True


def set_tf32(device, enabled: bool) -> None:
    """TF32 on or off for this process's CUDA float32 matmuls and cuDNN convolutions (torch allows
    TF32 convolutions by default: off unless asked, so float32 means float32)."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
