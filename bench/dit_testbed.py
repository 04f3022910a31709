"""Benchmark (not a test): d_mem on the flow-matching transformer testbed beside the UNet testbed, and what the
default cascade does on each (issue 35, item 6).

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/dit_testbed.py --config conf/testbed.yaml conf/testbed_dit.yaml

Per testbed config, d_mem's detection: the prompts `cxrmem testbed evaluate` scores (every planted prompt and the
same seeded sample of never-duplicated ones), fully scored with the Scorer at the config's G, w and T =
testbed.eval_steps (shared seeds), norms cached under `--cache`; AUC and TPR at 1% FPR of the planted prompts against
the never-duplicated ones, d_mem over all steps and the first step alone (evaluate.detection_rows, the numbers
`testbed evaluate` writes), and over the first two steps (the default cascade's second screen).

The default `cascade.stages` on the testbeds of `--cascade` (by default the transformer only: the UNet testbed's is
section "Cascade frontier at T=50, G=4"): as bench/cascade_frontier.py measures it, on every distinct training prompt
fully scored at G=4 and the T the default stages are set for (50), the norms cached as that script caches them
(runs/cascade_frontier/<name>.npz), then the stages applied with the run's ranking rule (`screen_top`, ties kept):
prompts each stage keeps, recall of the full d_mem's top 1% and of the planted prompts, denoiser evaluations per
prompt (cascade_frontier.cascade_outcome).
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

from bench.cascade_frontier import Screen, Testbed, cascade_outcome, full_norms, testbed_prompts  # noqa: E402
from cxrmem.config import load_config  # noqa: E402
from cxrmem.corpus.text import prompt_id  # noqa: E402
from cxrmem.detectors import screen_top  # noqa: E402
from cxrmem.models.loading import blind_steps, load_components  # noqa: E402
from cxrmem.results_page import cpu_name, write_results  # noqa: E402
from cxrmem.scoring.dmem import d_mem  # noqa: E402
from cxrmem.scoring.scorer import Scorer  # noqa: E402
from cxrmem.scoring.settings import ScoreSettings  # noqa: E402
from cxrmem.stages.cascade import dmem_cost, evaluations, plan  # noqa: E402
from cxrmem.testbed.evaluate import MANIFEST, detection_rows, evaluation_prompts  # noqa: E402

# d_mem over all steps, and the cascade's first two screens' depths (the first step of a flow-matching schedule is 0).
SCREENS = {"full": None, "first step": 1, "first two steps": 2}
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


def cascade_rows(norms: np.ndarray, planted: np.ndarray, stages: tuple[Screen, ...], batch: int, score_cfg) -> dict:
    """The stages on these norms: survivors per stage, recall of the full top 1% and of the planted, evaluations."""
    testbed = Testbed.of(norms, score_cfg)
    outcome = cascade_outcome(testbed, stages, batch)
    survivors, kept = np.arange(len(norms)), []
    for stage in stages:
        survivors = screen_top(survivors, norms[survivors, : stage.generations, : stage.steps].mean(axis=(1, 2)), stage.keep_percent)
        kept.append(len(survivors))
    full_cost = evaluations(dmem_cost(score_cfg, norms.shape[2]), len(norms), batch) / len(norms)
    return {**outcome, "kept": kept, "top": len(testbed.target), "n": len(norms), "full_cost": full_cost,
            "planted_recall": float(np.isin(np.flatnonzero(planted), survivors).mean()),
            "first_step_zero": bool((norms[:, :, 0] == 0).all())}  # fmt: skip


def detection(config: str, args) -> dict:
    cfg = load_config(config)
    name = os.path.basename(os.path.normpath(cfg.testbed.out))
    frame, norms, sampler = scored(cfg, os.path.join(args.cache, f"{name}.npz"), args.batch)
    levels = list(cfg.testbed.duplication_levels)
    rows = {key: detection_rows(d_mem(torch.from_numpy(norms[:, :, :k]))[0].numpy(), frame, levels) for key, k in SCREENS.items()}
    return {"name": name, "sampler": sampler, "shape": norms.shape, **rows}


def cascade(config: str, args) -> dict:
    """The default stages on every distinct training prompt of the testbed, fully scored at T=args.cascade_steps."""
    base = load_config(config)
    cfg = load_config(config, [f"model.path={base.testbed.out}", f"score.steps={args.cascade_steps}", "score.screening_steps=null"])
    name = os.path.basename(os.path.normpath(base.testbed.out))
    # A sample (--cascade-prompts) is a prefix of one seeded order, cached apart from the full scoring's.
    limit, order_seed = args.cascade_prompts, (base.testbed.seed if args.cascade_prompts else None)
    cache = os.path.join("runs/cascade_frontier", f"{name}{f'_sample{order_seed}' if limit else ''}.npz")
    norms = full_norms(base.testbed.out, cache, cfg, args.batch, limit, order_seed)
    planted_by_prompt = pd.read_csv(os.path.join(base.testbed.out, MANIFEST)).drop_duplicates("prompt").set_index("prompt").planted
    planted = planted_by_prompt.loc[testbed_prompts(base.testbed.out, order_seed)[: len(norms)]].to_numpy()
    sample = f"a seeded random sample of {len(norms)}" if len(norms) < len(planted_by_prompt) else f"all {len(norms)}"
    # as configured, and as the cascade plans them on this model (a d_mem screen past the blind first step of flow matching)
    plans = {"configured": plan(cfg), "planned for the model": plan(cfg, blind_steps(cfg.model))}
    rows = {}
    for label, stages in plans.items():
        screens = tuple(Screen(s.steps, s.generations, s.keep_percent) for s in stages)
        rows[label] = {"stages": screens, **cascade_rows(norms, planted, screens, args.batch, cfg.score)}
    return {"name": name, "steps": args.cascade_steps, "sample": sample, "rows": rows}


def markdown(results: list[dict], cascades: list[dict], args, minutes: float) -> str:
    n, g, t = results[0]["shape"]
    lines = [
        SECTION, "",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} bench/dit_testbed.py {' '.join(sys.argv[1:])}` "
        f"({cpu_name()}, 2 cores shared with other jobs; {minutes:.0f} min for the scoring not cached). {n} prompts per testbed (the planted ones and the "
        f"seeded never-duplicated sample of `cxrmem testbed evaluate`), G={g}, T={t}, w=7.5, shared seeds.", "",
        "| testbed | sampler | d_mem | AUC | TPR at 1% FPR | AUC per duplication level (copies ascending) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in results:
        for key in SCREENS:
            label = "all steps" if key == "full" else key
            overall, *levels = r[key]
            per_level = " / ".join(f"{row['auc']:.3f}" for row in levels)
            lines.append(f"| {r['name']} | {r['sampler']} | {label} | {overall['auc']:.3f} | {overall['tpr_at_1pct_fpr']:.2f} | {per_level} |")
    for c in cascades:
        first = next(iter(c["rows"].values()))
        lines += [
            "", f"The default `cascade.stages` on {c['sample']} distinct training prompts of {c['name']}, fully scored at G={g}, "
            f"T={c['steps']}, as configured and as `cascade.plan` runs them on this model (a d_mem screen reads at least one "
            "step past the model's blind first steps: cxrmem/models/loading.py `blind_steps`): the prompts each stage keeps, "
            f"recall of the full d_mem's top 1% ({first['top']} prompts) and of the planted prompts among the fully scored, and "
            "denoiser evaluations per prompt (continuing trajectories, as `cascade.evaluations` counts them) against the full "
            f"score's. Every prompt's first-step norm is zero: {'yes' if first['first_step_zero'] else 'no'}.", "",
            "| stages | screens (k, G, keep %) | kept per stage | fully scored | recall top 1% | recall planted | evaluations per prompt | full score |",
            "|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for label, r in c["rows"].items():
            screens = ", ".join(f"({s.steps}, {s.generations}, {s.keep_percent:g})" for s in r["stages"])
            lines.append(f"| {label} | {screens} | {' / '.join(map(str, r['kept']))} | {r['fully_scored']} | {r['recall']:.2f} "
                         f"| {r['planted_recall']:.2f} | {r['continued']:.2f} | {r['full_cost']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["conf/testbed.yaml", "conf/testbed_dit.yaml"])
    parser.add_argument("--batch", type=int, default=16, help="prompts per scoring batch (and the cascade cost's batch)")
    parser.add_argument("--cache", default="runs/dit_testbed", help="folder of the per-testbed norms")
    parser.add_argument("--cascade", nargs="*", default=["conf/testbed_dit.yaml"], help="configs whose testbed the cascade runs on")
    parser.add_argument("--cascade-steps", type=int, default=50, help="T of the cascade's full score (the default stages' T)")
    parser.add_argument("--cascade-prompts", type=int, default=None, help="a seeded random sample of this many prompts (default: all)")
    parser.add_argument("--results", default="bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    started = time.time()
    results = [detection(config, args) for config in args.config]
    cascades = [cascade(config, args) for config in args.cascade]
    text = markdown(results, cascades, args, (time.time() - started) / 60)
    print(text)
    write_results(args.results, SECTION, text)


if __name__ == "__main__":
    main()
