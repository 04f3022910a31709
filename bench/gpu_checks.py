"""Benchmark (not a test): the GPU checks of bench/gpu.sh, from the runs it scored.

- cascade: the share of the full d_mem's top 1% (a run that fully scored every prompt) that the
  cascade run fully scored, with the cascade's evaluations per prompt and its self-check
  (summary.json "cascade");
- precision: the overlap of the top 1% of a bfloat16 run with that of a float32 run, and the
  Spearman correlation of their d_mem.

    python3 bench/gpu_checks.py --full RUN --cascade RUN --fp32 RUN --bf16 RUN --json OUT.json --results RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow.parquet as pq
from scipy.stats import spearmanr

from cxrmem.stats import top_percent_mask
from cxrmem.testbed.evaluate import write_results


def scores(run: str):
    table = pq.read_table(os.path.join(run, "scores.parquet"), columns=["prompt_id", "d_mem"]).to_pandas()
    return table.set_index("prompt_id")["d_mem"]


def top_ids(values, percent: float = 1.0) -> set:
    return set(values.index[top_percent_mask(values.to_numpy(), percent)[0]])


def cascade_check(full_run: str, cascade_run: str) -> dict:
    full, kept = scores(full_run), scores(cascade_run)
    target = top_ids(full)
    section = json.load(open(os.path.join(cascade_run, "summary.json")))["cascade"]
    return {"recall": len(target & set(kept.index)) / len(target), "top": len(target), "prompts": len(full),
            "evaluations_per_prompt": section["evaluations"]["per_prompt"], "stages": section["stages"],
            "rounds": len(section["rounds"]), "verdict": section["verdict"], "audit": section["audit"]}


def precision_check(fp32_run: str, bf16_run: str) -> dict:
    a, b = scores(fp32_run), scores(bf16_run)
    b = b.loc[a.index]
    return {"top1_overlap": len(top_ids(a) & top_ids(b)) / len(top_ids(a)), "spearman": float(spearmanr(a, b)[0]),
            "max_rel_diff": float(np.max(np.abs(a - b) / np.abs(a)))}


def markdown(result: dict) -> str:
    lines = [f"GPU: {result.get('gpu', '?')}; written by bench/gpu.sh.", ""]
    unet = result.get("unet")
    if unet:
        lines += ["RadEdit-shaped UNet, bf16, random weights (bench/unet_flops.py): per batch size, UNet evaluations/s, "
                  f"TFLOP/s and model FLOP utilisation against {unet['peak']['peak_gflops'] / 1000:.0f} TFLOP/s "
                  f"({unet['peak']['source']}); a {8192}^3 bf16 matmul reached {unet['matmul_gflops'] / 1000:.0f} TFLOP/s.", "",
                  "| batch | s / call | UNet evals / s | prompts / s at G=4, T=50 | TFLOP/s | MFU |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch']} | {r['seconds_per_call']:.4f} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / 400:.3f} | "
                  f"{r['gflops'] / 1000:.1f} | {r['of_peak']:.1%} |" for r in unet["rows"]]
        lines.append("")
    for name in ("cascade", "precision"):
        if name in result:
            lines += [f"{name}: `{json.dumps(result[name])}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("full", "cascade", "fp32", "bf16", "unet", "gpu"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--json")
    parser.add_argument("--results")
    args = parser.parse_args()
    result = {"gpu": args.gpu}
    if args.unet and os.path.exists(args.unet):
        result["unet"] = json.load(open(args.unet))
    if args.full and args.cascade:
        result["cascade"] = cascade_check(args.full, args.cascade)
    if args.fp32 and args.bf16:
        result["precision"] = precision_check(args.fp32, args.bf16)
    print(json.dumps({k: v for k, v in result.items() if k != "unet"}, indent=1))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)
    if args.results:
        write_results(args.results, "## GPU", "## GPU\n\n" + markdown(result) + "\n")


if __name__ == "__main__":
    main()
