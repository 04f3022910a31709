"""The one FLOP count per UNet sample, attention included, and the peaks that model FLOP utilisation divides by.

Every MFU in bench/ (gpu_bench.py, unet_flops.py) and the cost lines of README.md and
bench/RESULTS.md take their FLOP count from `unet_flops` here. RadEdit's UNet (SD-1.x architecture,
4x64x64 latents, 128 text tokens of width 768) costs

    0.808 TFLOP per sample: 0.679 in convolutions and linear layers, 0.128 in attention (16%)

Counted, not estimated: torch's FlopCounterMode (2 FLOP per multiply-add, convolutions and
matmuls; softmax, normalisation and activations are not counted, as in the usual model-FLOP
convention) on the meta device, where no arithmetic runs (a RadEdit-shaped count takes under a
second). Attention is counted twice over, and the two must agree (`FlopCount.agree`):

- analytically, from the shapes of every `scaled_dot_product_attention` call as it is made:
  QK^T and PV cost 2 B heads Lq Lk d each, 4 B heads Lq Lk d per layer;
- by the counter itself, with attention forced onto its math kernel
  (`sdpa_kernel(SDPBackend.MATH)`: batched matmuls, which it counts), against a count in which every
  attention call is replaced by an empty tensor of its output's shape (what is left: no attention).

Why the forcing: on a CPU, FlopCounterMode counts nothing for attention (torch sends it to a fused
CPU kernel that has no FLOP formula), so a count made there with the default kernel leaves
attention out. That is how README.md came to cite 0.679 TFLOP before issue 30.

    PYTHONPATH=$PWD .venv/bin/python bench/unet_cost.py              # RadEdit's count, both ways
    PYTHONPATH=$PWD .venv/bin/python bench/unet_cost.py --check-cpu  # and the CPU's default kernel against both
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxrmem

RADEDIT_TEXT_TOKENS = 128  # RadEdit's tokenizer_max_length: the keys of every cross-attention layer

# Dense peaks (no sparsity) from NVIDIA's data sheets, TFLOP/s: tensor cores for bf16/fp16 and TF32,
# the CUDA cores for plain fp32. The H100 SXM (HBM3, the lent nvidia-h100-x1) and the H200 share them.
GPU_PEAKS = {
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.5, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.5, "float32": 67.0},
}


@dataclass(frozen=True)
class FlopCount:
    """FLOP of one UNet forward, per sample."""

    total: float  # with attention (math kernel, counted)
    without_attention: float  # convolutions and linear layers only
    attention_analytic: float  # 4 B heads Lq Lk d summed over the attention calls
    attention_calls: int  # scaled_dot_product_attention calls per forward

    @property
    def attention_counted(self) -> float:
        return self.total - self.without_attention

    @property
    def agree(self) -> bool:
        """The counter's attention (math kernel) equals the analytic count, to rounding."""
        return abs(self.attention_counted - self.attention_analytic) <= 1e-9 * max(self.total, 1.0)

    def as_dict(self) -> dict:
        return {**asdict(self), "attention_counted": self.attention_counted, "agree": self.agree}


def _sdpa_recorder(stub: bool):
    """A TorchFunctionMode that records each scaled_dot_product_attention call's FLOP (4 B heads Lq Lk d) and,
    with `stub`, returns an empty tensor of the output's shape instead of computing it."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class Recorder(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.flop, self.calls = 0, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                query, key, value = args[:3]
                *batch, lq, d = query.shape
                lk, dv = key.shape[-2], value.shape[-1]
                rows = 1
                for size in batch:
                    rows *= size
                self.flop += 2 * rows * lq * lk * d + 2 * rows * lq * lk * dv  # QK^T, then PV
                self.calls += 1
                if stub:
                    return query.new_empty((*batch, lq, dv))
            return func(*args, **kwargs)

    return Recorder()


def count_call(unet, x, t, text, kernel: str = "math") -> tuple[float, float, int]:
    """(counted FLOP, analytic attention FLOP, attention calls) of one forward `unet(x, t, text)`.

    kernel: "math" forces attention onto the math kernel; "default" lets torch choose (on a CPU that counts
    no attention); "none" replaces attention by an empty tensor (counts none, by construction)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    recorder = _sdpa_recorder(stub=kernel == "none")
    backend = sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext()
    with torch.no_grad(), backend, FlopCounterMode(display=False) as counter, recorder:
        unet(x, t, encoder_hidden_states=text)
    return float(counter.get_total_flops()), float(recorder.flop), recorder.calls


def count_unet(unet, text_tokens: int, batch: int = 2, device: str = "meta") -> FlopCount:
    """The per-sample count of `unet` (its own weights, or a copy on `device`) at `batch` samples."""
    import torch

    config = unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, config.in_channels, height, width, device=device, dtype=unet.dtype)
    t = torch.full((batch,), 999, device=device)
    text = torch.randn(batch, text_tokens, config.cross_attention_dim, device=device, dtype=unet.dtype)
    total, analytic, calls = count_call(unet, x, t, text, "math")
    without, _, _ = count_call(unet, x, t, text, "none")
    return FlopCount(total / batch, without / batch, analytic / batch, calls)


@functools.lru_cache(maxsize=None)
def _count_config(config_json: str, text_tokens: int) -> FlopCount:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**json.loads(config_json)).eval()
    return count_unet(unet, text_tokens)


def unet_flops(config: dict | None = None, text_tokens: int = RADEDIT_TEXT_TOKENS) -> FlopCount:
    """The FLOP count per sample of a UNet2DConditionModel of `config` (default: RadEdit's architecture)
    attending to `text_tokens` tokens, counted on the meta device (cached)."""
    from cxrmem.models.tiny import RADEDIT_UNET

    config = dict(RADEDIT_UNET if config is None else config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return _count_config(json.dumps(config, sort_keys=True, default=list), text_tokens)


def radedit_flops() -> FlopCount:
    """RadEdit's UNet, 128 text tokens: the number README.md and bench/RESULTS.md cite."""
    return unet_flops()


def scoring_flop_per_prompt(flop_per_sample: float, generations: int = 4, steps: int = 50) -> float:
    """UNet FLOP of one prompt's d_mem: G generations x T steps x 2 guidance halves (model FLOP: the first
    step's shared unconditional pass and the shared text projections save under 1% at RadEdit's size)."""
    return flop_per_sample * generations * steps * 2


def cpu_peak_gflops(threads: int) -> dict:
    """cores (the threads used, at most the cores) x GHz x 2 FMA units x lanes x 2 FLOP (float32).

    Lanes from /proc/cpuinfo's flags (AVX-512: 16 float32 lanes, AVX2 + FMA: 8, else 4); two FMA units
    per core is an assumption (Zen 2-4, Intel server cores since Skylake): lscpu does not say."""
    info = open("/proc/cpuinfo", encoding="utf-8").read()
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split())
    mhz = max(float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M))
    cores = min(threads, os.cpu_count() or 1)
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    return {"cores": cores, "ghz": mhz / 1000, "lanes_fp32": lanes, "fma_units": 2,
            "peak_gflops": cores * mhz / 1000 * 2 * lanes * 2}


def gpu_peak_tflops(device_name: str, dtype: str, tf32: bool = False) -> float | None:
    """The data-sheet dense peak of a known GPU for `dtype` (float32 with `tf32`: the TF32 tensor-core peak)."""
    key = "tf32" if dtype == "float32" and tf32 else dtype
    for name, peaks in GPU_PEAKS.items():  # the more specific names first
        if name in device_name:
            return peaks.get(key)
    return None


def peak_tflops(device: str, dtype: str, tf32: bool = False, threads: int | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) of `device` ("cpu" or "cuda...") in `dtype`."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        peak = gpu_peak_tflops(name, dtype, tf32)
        return peak, f"{name}, data sheet, dense {'tf32' if dtype == 'float32' and tf32 else dtype}" if peak else f"{name}: no peak known"
    cpu = cpu_peak_gflops(threads or os.cpu_count() or 1)
    return cpu["peak_gflops"] / 1000, (f"{cpu['cores']} cores x {cpu['ghz']:.3f} GHz x 2 FMA units x {cpu['lanes_fp32']} "
                                       "float32 lanes x 2 (lscpu, /proc/cpuinfo)")


def mfu(samples_per_s: float, flop_per_sample: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: samples/s x FLOP per sample / peak FLOP/s (peak in TFLOP/s)."""
    return None if not peak else samples_per_s * flop_per_sample / (peak * 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-cpu", action="store_true",
                        help="also count a small RadEdit-shaped UNet (32x32 latents) on real CPU tensors: default kernel, math kernel")
    args = parser.parse_args()
    count = radedit_flops()
    print(json.dumps({"unet": "RadEdit-shaped", "text_tokens": RADEDIT_TEXT_TOKENS, **count.as_dict(),
                      "tflop_per_sample": round(count.total / 1e12, 4),
                      "tflop_without_attention": round(count.without_attention / 1e12, 4),
                      "tflop_per_prompt_G4_T50": round(scoring_flop_per_prompt(count.total) / 1e12, 1)}))
    if args.check_cpu:
        import torch
        from diffusers import UNet2DConditionModel

        from cxrmem.models.tiny import RADEDIT_UNET

        unet = UNet2DConditionModel(**{**RADEDIT_UNET, "sample_size": 32}).eval()
        x, t, text = torch.randn(1, 4, 32, 32), torch.tensor([999]), torch.randn(1, RADEDIT_TEXT_TOKENS, 768)
        default, analytic, _ = count_call(unet, x, t, text, "default")
        math, _, _ = count_call(unet, x, t, text, "math")
        print(json.dumps({"cpu_32x32": {"default_kernel": default, "math_kernel": math, "attention_analytic": analytic,
                                        "default_plus_analytic_equals_math": abs(default + analytic - math) <= 1e-9 * math}}))


if __name__ == "__main__":
    main()
