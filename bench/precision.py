"""Benchmark (not a test): d_mem computed in bfloat16 against float32 on the same prompts, on the CPU.

The bfloat16 run really computes in bfloat16 (`score.cpu_half`: the Scorer otherwise casts a
half-precision model back to float32 on the CPU); noise norms are taken in float32 from the
bfloat16 noise predictions, as on the GPU. Two models:

- the committed testbed: every planted prompt and a seeded sample of never-duplicated ones;
- the RadEdit-shaped model (SD-1.x UNet at 4x64x64, BERT-base text encoder, random weights),
  built in a temporary folder, with few prompts and steps (it is big for a CPU).

Reported: Spearman correlation of the two d_mem columns, overlap of their top 1% (share of the
float32 top 1% that the bfloat16 top 1% holds, `cxrmem.stats.top_percent_mask`), the largest
relative difference, and the seconds of each run.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/precision.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from cxrmem.corpus.synthetic import generate_reports, tokenizer_texts
from cxrmem.corpus.text import prompt_id
from cxrmem.models.loading import load_components
from cxrmem.models.settings import ModelConfig
from cxrmem.models.tiny import build_tiny_model
from cxrmem.results_page import cpu_name, write_results
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreConfig, ScoreSettings
from cxrmem.stats import top_percent_mask

SECTION = "## Precision: bfloat16 against float32 (CPU)"


def d_mem_in(dtype: str, model_dir: str, prompts: list[str], steps: int, generations: int, batch: int, float32_output: bool = True):
    """d_mem [N] of `prompts` with the model in `dtype` (bfloat16 kept as such on the CPU), and the seconds taken;
    `float32_output`: the UNet's output layers in float32 (the Scorer's default), else the whole UNet in `dtype`."""
    components = load_components(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": model_dir, "dtype": dtype}))
    score = OmegaConf.to_container(OmegaConf.structured(ScoreConfig))
    score.update(steps=steps, generations=generations, batch_size=batch, cpu_half=True)
    scorer = Scorer(components, ScoreSettings.of(score), device="cpu", float32_output=float32_output)
    started = time.time()
    scores = [
        scorer.score(prompts[i : i + batch], [prompt_id(p) for p in prompts[i : i + batch]], steps=steps).d_mem
        for i in range(0, len(prompts), batch)
    ]
    return np.concatenate(scores), time.time() - started


def compare(name: str, model_dir: str, prompts: list[str], steps: int, generations: int, batch: int) -> dict:
    full, full_s = d_mem_in("float32", model_dir, prompts, steps, generations, batch)
    half, half_s = d_mem_in("bfloat16", model_dir, prompts, steps, generations, batch)
    plain, _ = d_mem_in("bfloat16", model_dir, prompts, steps, generations, batch, float32_output=False)
    top_full, top_half = top_percent_mask(full, 1.0)[0], top_percent_mask(half, 1.0)[0]
    result = {
        "model": name,
        "prompts": len(prompts),
        "steps": steps,
        "generations": generations,
        "spearman": float(spearmanr(full, half).statistic),
        "top1_overlap": float((top_full & top_half).sum() / top_full.sum()),
        "top1_size": int(top_full.sum()),
        "max_rel_diff": float(np.max(np.abs(half - full) / np.abs(full))),
        "median_rel_diff": float(np.median(np.abs(half - full) / np.abs(full))),
        # the same without the float32 output layers: what they gain
        "max_rel_diff_plain": float(np.max(np.abs(plain - full) / np.abs(full))),
        "median_rel_diff_plain": float(np.median(np.abs(plain - full) / np.abs(full))),
        "spearman_plain": float(spearmanr(full, plain).statistic),
        "seconds_float32": full_s,
        "seconds_bfloat16": half_s,
    }
    print(result, flush=True)
    return result


def markdown(results: list[dict], cpu: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/precision.py` ({cpu}, 1 thread; the bfloat16"
        " run computes in bfloat16 on the CPU via `score.cpu_half`). Top-1% overlap: share of the float32 top 1% that the"
        " bfloat16 top 1% holds. bfloat16 runs the UNet's output layers (conv_norm_out, conv_out) in float32, the"
        " Scorer's default; \"plain\" is the whole UNet in bfloat16, for the gain.",
        "",
        "| model | prompts | T | G | Spearman (plain) | top-1% overlap (set size) | relative difference, max / median "
        "| plain: max / median | s float32 | s bfloat16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['prompts']} | {r['steps']} | {r['generations']} | {r['spearman']:.4f} ({r['spearman_plain']:.4f}) |"
            f" {r['top1_overlap']:.2f} ({r['top1_size']}) | {r['max_rel_diff']:.3f} / {r['median_rel_diff']:.3f} |"
            f" {r['max_rel_diff_plain']:.3f} / {r['median_rel_diff_plain']:.3f} | {r['seconds_float32']:.0f} | {r['seconds_bfloat16']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--testbed", default="testbed/model")
    parser.add_argument("--n-unique", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--radedit-prompts", type=int, default=8)
    parser.add_argument("--radedit-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default="bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = pd.read_csv(os.path.join(args.testbed, "manifest.csv"))
    unique = manifest[~manifest.planted & (manifest.n_copies == 1)].sample(n=args.n_unique, random_state=0)
    prompts = manifest[manifest.planted].prompt.tolist() + unique.prompt.tolist()
    results = [compare(args.testbed, args.testbed, prompts, args.steps, args.generations, 16)] if args.n_unique else []
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_model(folder, tokenizer_texts(), radedit_shaped=True)
        reports = [r["impression"] for r in generate_reports(args.radedit_prompts, seed=1)]
        results.append(compare("RadEdit-shaped (random weights)", folder, reports, args.radedit_steps, 1, 4))
    text = markdown(results, cpu_name())
    print(text)
    write_results(args.results, text.split("\n", 1)[0], text)


if __name__ == "__main__":
    main()
