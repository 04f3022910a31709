"""Benchmark (not a test): achieved FLOP/s of the RadEdit-shaped UNet against the device's peak.

One UNet call on random weights (cxrmem.models.tiny.radedit_shaped_unet: SD-1.x UNet, 4x64x64
latents, 128-token text of width 768). Its FLOPs are counted on the first call
(torch.utils.flop_counter, matmuls and convolutions, 2 FLOP per multiply-add), which is also the
warm-up; the next calls are timed (wall clock, synchronised on a GPU). Reported per batch size:
seconds per call, UNet sample evaluations per second, achieved GFLOP/s, and its ratio to

- the peak: on the CPU, cores x clock x FMA units x lanes x 2 from `lscpu` / /proc/cpuinfo
  (AVX-512: 16 float32 lanes, AVX2 + FMA: 8; two FMA units per core, as on AMD Zen 2 to 4 and
  Intel server cores since Skylake: an assumption, lscpu does not say); on a GPU, the H200's dense
  bf16 989 TFLOP/s (float32: 67 TFLOP/s), or --peak-tflops;
- the limit this machine shows: a large matrix product of the same dtype (2048^3 float32 on the CPU,
  8192^3 on a GPU), the most a dense kernel reaches here.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/unet_flops.py --batch-sizes 1 --repeats 2
    python3 bench/unet_flops.py --device cuda --dtype bfloat16 --batch-sizes 8,16,32,64,128,256 --json $OUT/unet.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cxrmem.models.tiny import radedit_shaped_unet

GPU_PEAK_TFLOPS = {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}  # H200 SXM dense, from NVIDIA's data sheet


def cpu_peak_gflops(threads: int) -> dict:
    """cores (the threads used, at most the cores) x GHz x 2 FMA units x lanes x 2 FLOP."""
    info = open("/proc/cpuinfo", encoding="utf-8").read()
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split())
    mhz = max(float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M))
    cores = min(threads, os.cpu_count() or 1)
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    return {"cores": cores, "ghz": mhz / 1000, "lanes_fp32": lanes, "fma_units": 2,
            "peak_gflops": cores * mhz / 1000 * 2 * lanes * 2}


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
    text = torch.randn(batch, 128, 768, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=text)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        unet(x, t, encoder_hidden_states=text)
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    flops = counter.get_total_flops()
    return {"batch": batch, "seconds_per_call": seconds, "samples_per_s": batch / seconds,
            "tflop_per_sample": flops / batch / 1e12, "gflops": flops / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: from lscpu, or the H200's)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        peak = {"source": "lscpu", **cpu_peak_gflops(args.threads)}
        limit = matmul_gflops(device, dtype, 2048)
    else:
        peak = {"source": "H200 data sheet, dense", "peak_gflops": GPU_PEAK_TFLOPS[args.dtype] * 1000}
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
