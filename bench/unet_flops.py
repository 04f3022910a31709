"""Benchmark (not a test): achieved FLOP/s of the RadEdit-shaped UNet against the device's peak.

One UNet call on random weights (cxrmem.models.tiny.radedit_shaped_unet: SD-1.x UNet, 4x64x64
latents, 128-token text of width 768). Its FLOPs per sample are bench/unet_cost.py's count, attention
included (0.808 TFLOP for RadEdit's UNet; FlopCounterMode on the call would miss attention on a CPU);
the first call is the warm-up, the next are timed (wall clock, synchronised on a GPU). Reported per
batch size: seconds per call, UNet sample evaluations per second, achieved GFLOP/s, and its ratio to

- the peak (bench/unet_cost.py): on the CPU, cores x clock x FMA units x lanes x 2 from `lscpu` /
  /proc/cpuinfo; on a GPU, the data sheet's dense peak for the dtype (H100 / H200: bf16 989 TFLOP/s,
  float32 67), or --peak-tflops;
- the limit this machine shows: a large matrix product of the same dtype (2048^3 float32 on the CPU,
  8192^3 on a GPU), the most a dense kernel reaches here.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/unet_flops.py --batch-sizes 1 --repeats 2

On a GPU, bench/gpu_bench.py measures the same and more in one run (batch grown until it does not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench.unet_cost

from bench.unet_cost import RADEDIT_TEXT_TOKENS, cpu_peak_gflops, gpu_peak_tflops, unet_flops  # noqa: E402
from cxrmem.models.tiny import radedit_shaped_unet  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


@torch.no_grad()
def unet_call(unet, batch: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    x = torch.randn(batch, 4, 64, 64, device=device, dtype=dtype)
    t = torch.full((batch,), 999, device=device)
    text = torch.randn(batch, RADEDIT_TEXT_TOKENS, 768, device=device, dtype=dtype)
    unet(x, t, encoder_hidden_states=text)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        unet(x, t, encoder_hidden_states=text)
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    flops = unet_flops(dict(unet.config), RADEDIT_TEXT_TOKENS).total * batch  # attention included (bench/unet_cost.py)
    return {"batch": batch, "seconds_per_call": seconds, "samples_per_s": batch / seconds,
            "tflop_per_sample": flops / batch / 1e12, "gflops": flops / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: from lscpu, or the GPU's data sheet)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        peak = {"source": "lscpu", **cpu_peak_gflops(args.threads)}
        limit = matmul_gflops(device, dtype, 2048)
    else:
        name = torch.cuda.get_device_name()
        peak = {"source": f"{name} data sheet, dense", "peak_gflops": (gpu_peak_tflops(name, args.dtype) or float("nan")) * 1000}
        limit = matmul_gflops(device, dtype, 8192, repeats=10)
    if args.peak_tflops:
        peak = {"source": "--peak-tflops", "peak_gflops": args.peak_tflops * 1000}
    unet = radedit_shaped_unet().eval().to(device, dtype)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        row = unet_call(unet, batch, device, dtype, args.repeats)
        row["of_peak"], row["of_matmul"] = row["gflops"] / peak["peak_gflops"], row["gflops"] / limit
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": args.device, "dtype": args.dtype, "threads": args.threads, "peak": peak, "matmul_gflops": limit, "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(result, stream, indent=1)


if __name__ == "__main__":
    main()
