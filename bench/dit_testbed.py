"""Benchmark (not a test): d_mem on the flow-matching transformer testbed beside the UNet testbed, and what the
default cascade does on each (issue 35, item 6).

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/dit_testbed.py --config conf/testbed.yaml conf/testbed_dit.yaml

Per testbed config: the prompts `cxrmem testbed evaluate` scores (every planted prompt and the same seeded sample
of never-duplicated ones), fully scored once with the Scorer at the config's G, w and T = testbed.eval_steps
(shared seeds), the [N, G, T] norms cached (`--cache`). From them:

- AUC and TPR at 1% FPR of the planted prompts against the never-duplicated ones, d_mem over all steps and the
  first step alone (evaluate.detection_rows, the numbers `testbed evaluate` writes);
- the default `cascade.stages` (cascade_frontier.cascade_outcome, the cascade's own ranking rule `screen_top`,
  ties kept; a stage deeper than T looks at all T steps): its recall of the full d_mem's top 1% of these prompts
  and of the planted prompts, how many prompts each stage keeps, and its denoiser evaluations per prompt.

The prompts are the evaluation sample, not every training prompt as bench/cascade_frontier.py scores at T=50:
on the shared CPU the transformer's full scoring of all 1,024 prompts did not fit the time this was run in.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bench.cascade_frontier import Screen, Testbed, cascade_outcome  # noqa: E402
from cxrmem.config import load_config  # noqa: E402
from cxrmem.corpus.text import prompt_id  # noqa: E402
from cxrmem.detectors import screen_top  # noqa: E402
from cxrmem.models.loading import load_components  # noqa: E402
from cxrmem.results_page import cpu_name, write_results  # noqa: E402
from cxrmem.scoring.dmem import d_mem  # noqa: E402
from cxrmem.scoring.scorer import Scorer  # noqa: E402
from cxrmem.scoring.settings import ScoreSettings  # noqa: E402
from cxrmem.stages.cascade import dmem_cost, evaluations  # noqa: E402
from cxrmem.testbed.evaluate import MANIFEST, detection_rows, evaluation_prompts  # noqa: E402

SECTION = "## Transformer testbed against the UNet testbed: d_mem and the default cascade (issue 35)"


def score_config(cfg):
    return OmegaConf.merge(cfg.score, {"steps": cfg.testbed.eval_steps or cfg.score.steps, "screening_steps": None})


def scored(cfg, cache: str, batch: int) -> tuple[pd.DataFrame, np.ndarray, str]:
    """The evaluation prompts, their [N, G, T] norms (from `cache` when there) and the sampler's name."""
    tb, score_cfg = cfg.testbed, score_config(cfg)
    frame = evaluation_prompts(pd.read_csv(os.path.join(tb.out, MANIFEST)), tb.eval_unique, tb.seed)
    components = load_components(OmegaConf.merge(cfg.model, {"path": tb.out}))
    sampler = type(components.scheduler).__name__
    if os.path.exists(cache):
        return frame, np.load(cache)["norms"], sampler
    scorer = Scorer(components, ScoreSettings.of(score_cfg), device="cpu")
    prompts, norms = frame.prompt.tolist(), []
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        norms.append(scorer.score(chunk, [prompt_id(p) for p in chunk], steps=score_cfg.steps).step_norms)
        print(f"{tb.out}: {lo + len(chunk)}/{len(prompts)} prompts scored", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    np.savez(cache, norms=np.concatenate(norms))
    return frame, np.load(cache)["norms"], sampler


def cascade_rows(norms: np.ndarray, planted: np.ndarray, stages: tuple[Screen, ...], batch: int, shared: bool) -> dict:
    """The default cascade on these prompts: recall of the full top 1% and of the planted, survivors per stage."""
    testbed = Testbed.of(norms, OmegaConf.create({"seed_mode": "shared" if shared else "per_prompt"}))
    outcome = cascade_outcome(testbed, stages, batch)
    survivors, kept = np.arange(len(norms)), []
    for stage in stages:
        survivors = screen_top(survivors, norms[survivors, : stage.generations, : stage.steps].mean(axis=(1, 2)), stage.keep_percent)
        kept.append(len(survivors))
    return {**outcome, "kept": kept, "top": len(testbed.target), "planted_recall": float(np.isin(np.flatnonzero(planted), survivors).mean())}


def testbed_result(config: str, args) -> dict:
    cfg = load_config(config)
    name = os.path.basename(os.path.normpath(cfg.testbed.out))
    frame, norms, sampler = scored(cfg, os.path.join(args.cache, f"{name}.npz"), args.batch)
    full, _ = d_mem(torch.from_numpy(norms))
    first, _ = d_mem(torch.from_numpy(norms[:, :, :1]))
    levels = list(cfg.testbed.duplication_levels)
    stages = tuple(Screen(s.steps, s.generations or cfg.score.generations, s.keep_percent) for s in cfg.cascade.stages)
    planted = frame.planted.to_numpy()
    return {
        "config": config, "name": name, "sampler": sampler, "shape": norms.shape,
        "full": detection_rows(full.numpy(), frame, levels), "first": detection_rows(first.numpy(), frame, levels),
        "first_step_zero": bool((norms[:, :, 0] == 0).all()),
        "cascade": cascade_rows(norms, planted, stages, args.batch, cfg.score.seed_mode == "shared"), "stages": stages,
        "full_cost": evaluations(dmem_cost(score_config(cfg), norms.shape[2]), len(norms), args.batch) / len(norms),
    }  # fmt: skip


def markdown(results: list[dict], args, minutes: float) -> str:
    n, g, t = results[0]["shape"]
    lines = [
        SECTION, "",
        f"Command: `OMP_NUM_THREADS=2 bench/dit_testbed.py --config {' '.join(args.config)}` ({cpu_name()}, 2 cores shared with "
        f"other jobs; {minutes:.0f} min for the scoring not cached). {n} prompts per testbed (the planted ones and the "
        f"seeded never-duplicated sample of `cxrmem testbed evaluate`), G={g}, T={t}, w=7.5, shared seeds.", "",
        "| testbed | sampler | d_mem | AUC | TPR at 1% FPR | AUC 32 / 64 / 128 copies |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in results:
        for label, key in (("all steps", "full"), ("first step", "first")):
            overall, *levels = r[key]
            per_level = " / ".join(f"{row['auc']:.3f}" for row in levels)
            lines.append(f"| {r['name']} | {r['sampler']} | {label} | {overall['auc']:.3f} | {overall['tpr_at_1pct_fpr']:.2f} | {per_level} |")
    lines += [
        "",
        "The default `cascade.stages` (" + ", ".join(map(str, results[0]["stages"])) + ") on the same prompts: prompts each stage "
        "keeps, recall of the full d_mem's top 1% and of the planted prompts among the fully scored, denoiser evaluations per prompt "
        "(continuing trajectories, counted as `cascade.evaluations` counts them) against the full score's.", "",
        "| testbed | first step all zero | kept per stage | fully scored | recall top 1% | recall planted | evaluations per prompt | full score |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in results:
        c = r["cascade"]
        lines.append(f"| {r['name']} | {'yes' if r['first_step_zero'] else 'no'} | {' / '.join(map(str, c['kept']))} | {c['fully_scored']} "
                     f"| {c['recall']:.2f} (of {c['top']}) | {c['planted_recall']:.2f} | {c['continued']:.2f} | {r['full_cost']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["conf/testbed.yaml", "conf/testbed_dit.yaml"])
    parser.add_argument("--batch", type=int, default=16, help="prompts per scoring batch (and the cascade cost's batch)")
    parser.add_argument("--cache", default="runs/dit_testbed", help="folder of the per-testbed norms")
    parser.add_argument("--results", default="bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    started = time.time()
    results = [testbed_result(config, args) for config in args.config]
    text = markdown(results, args, (time.time() - started) / 60)
    print(text)
    write_results(args.results, SECTION, text)


if __name__ == "__main__":
    main()
