"""Benchmark (not a test): which multi-stage cascade recovers the full d_mem's top 1% at the least cost.

Every distinct training prompt of each testbed (`manifest.csv`) is fully scored once at the paper's
settings (G=4, T=50, shared seeds, w=7.5), keeping the [N, G, T] step norms. Because the noises of
generation g do not depend on G (cxrmem/scoring/seeds.py) and a screen over k steps runs the first k
steps of the same trajectory, every dmem screen (k steps, G' generations) is the mean of
norms[:, :G', :k]: one scoring gives every cascade's screens and its ground truth.

A cascade is a list of stages (k, G', keep %), each ranking the survivors of the one before with
`detectors.screen_top` (the run's rule), then the full d_mem on the last survivors. Reported per
cascade: recall of the full top 1% (`stats.top_percent_mask`, ties kept) and UNet sample evaluations
per corpus prompt from the registry's declared costs (`cascade.evaluations`, the summary's arithmetic),
both restarting every stage (Ray) and continuing trajectories (in process: a stage at the full G
continues the deepest earlier stage at the full G, cxrmem/stages/continuation.py).

The default is the cheapest cascade (in-process cost) with recall 1.0 on every testbed given.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/cascade_frontier.py --testbed testbed/model testbed/iuxray

Norms are cached per testbed (`--cache`, default runs/cascade_frontier/<name>.npz) and the scoring
resumes from them, so a second call only recomputes the table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cxrmem.config import load_config
from cxrmem.corpus.text import prompt_id
from cxrmem.detectors import REGISTRY, screen_top
from cxrmem.models.loading import load_components
from cxrmem.results_page import cpu_name, write_results
from cxrmem.scoring.scorer import Scorer
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.stages.cascade import dmem_cost, evaluations
from cxrmem.stats import top_percent_mask

SECTION = "## Cascade frontier at T=50, G=4 (issue 21)"
TARGET_EVALUATIONS = 10.0  # the target per corpus prompt
TOP_PERCENT = 1.0  # the memorized set (analyze.top_percent)


@dataclass(frozen=True)
class Screen:
    steps: int
    generations: int
    keep_percent: float

    def __str__(self) -> str:
        return f"k={self.steps} G={self.generations} keep {self.keep_percent:g}%"


def testbed_prompts(path: str, order_seed: int | None = None) -> list[str]:
    """The testbed's distinct prompts in manifest order (planted first), or in one seeded random order: any prefix
    of it is then a simple random sample of the testbed."""
    prompts = pd.read_csv(os.path.join(path, "manifest.csv"))["prompt"].drop_duplicates().tolist()
    return prompts if order_seed is None else [prompts[i] for i in np.random.default_rng(order_seed).permutation(len(prompts))]


def full_norms(path: str, cache: str, cfg, batch: int, limit: int | None, order_seed: int | None = None, save_every: int = 8) -> np.ndarray:
    """[N, G, T] norms of every distinct prompt (the first `limit` of `testbed_prompts`), resumed from (and saved every
    `save_every` batches to) `cache`."""
    prompts = testbed_prompts(path, order_seed)[:limit]
    done = list(np.load(cache)["norms"]) if os.path.exists(cache) else []
    scorer = Scorer(load_components(cfg.model), ScoreSettings.of(cfg.score), device="cpu")
    started, resumed = time.time(), len(done)
    for lo in range(len(done), len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        scored = scorer.score(chunk, [prompt_id(p) for p in chunk], steps=cfg.score.steps)
        done.extend(scored.step_norms)
        if (lo // batch) % save_every == save_every - 1 or lo + batch >= len(prompts):
            os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
            np.savez(cache, norms=np.stack(done))
            rate = (len(done) - resumed) / max(time.time() - started, 1e-9)
            print(f"{path}: {len(done)}/{len(prompts)} prompts fully scored ({rate:.2f}/s)", file=sys.stderr, flush=True)
    return np.stack(done)


def dmem_evaluations(g: int, k: int, m: int, from_steps: int, shared: bool, batch: int) -> int:
    """UNet evaluations of a (k steps, G = g) d_mem for m prompts, continuing from `from_steps` already run (0: restart)."""
    c = evaluations(REGISTRY["dmem"].cost(g, k, shared), m, batch)
    if from_steps:  # what the continuation saves (cxrmem/stages/continuation.py's count)
        c -= evaluations(REGISTRY["dmem"].cost(g, from_steps, shared), m, batch)
    return c


@dataclass
class Testbed:
    """One testbed's full scoring: the [N, G, T] norms and the full d_mem's top 1% (indices)."""

    norms: np.ndarray
    target: np.ndarray
    shared: bool  # shared seeds: the first step's unconditional pass is made once per batch

    @classmethod
    def of(cls, norms: np.ndarray, score_cfg) -> "Testbed":
        target = np.flatnonzero(top_percent_mask(norms.mean(axis=(1, 2)), TOP_PERCENT)[0])
        return cls(norms, target, score_cfg.seed_mode == "shared")


def cascade_outcome(testbed: Testbed, stages: tuple[Screen, ...], batch: int) -> dict:
    """Recall of the full top 1% and evaluations per corpus prompt, restarting and continuing."""
    norms = testbed.norms
    n, full_g, full_t = norms.shape
    survivors = np.arange(n)
    restart = continued = 0
    carried_steps = 0  # steps of the deepest earlier stage at the full G (what a later one continues)

    def cost(g: int, k: int, m: int, from_steps: int) -> int:
        return dmem_evaluations(g, k, m, from_steps, testbed.shared, batch)

    for stage in stages:
        restart += cost(stage.generations, stage.steps, len(survivors), 0)
        continues = stage.generations == full_g and 0 < carried_steps < stage.steps
        continued += cost(stage.generations, stage.steps, len(survivors), carried_steps if continues else 0)
        screen = norms[survivors, : stage.generations, : stage.steps].mean(axis=(1, 2))
        survivors = screen_top(survivors, screen, stage.keep_percent)
        if stage.generations == full_g:
            carried_steps = max(carried_steps, stage.steps)
    final = cost(full_g, full_t, len(survivors), carried_steps)
    restart += cost(full_g, full_t, len(survivors), 0)
    return {
        "recall": np.isin(testbed.target, survivors).mean(),
        "fully_scored": len(survivors),
        "restart": restart / n,
        "continued": (continued + final) / n,
        "final": final / n,  # the full d_mem's part of the continued cost
    }


def candidates(full_g: int) -> list[tuple[Screen, ...]]:
    """One- to four-stage dmem cascades over a grid of depths, generations and keep shares (a later
    stage never looks at fewer steps and generations than the one before it)."""
    gens = sorted({1, 2, full_g})
    one = [(Screen(k, g, q),) for k in (1, 2, 3, 5) for g in gens for q in (1.5, 2, 3, 5, 10)]
    two = [
        (Screen(1, g1, q1), Screen(k2, g2, q2))
        for g1, q1 in itertools.product(gens, (3, 5, 10, 20, 30))
        for k2, g2 in itertools.product((2, 3, 5, 10, 20), gens)
        for q2 in (10, 15, 20, 25, 30, 40, 50)
        if g2 >= g1
    ]
    three = [
        (Screen(1, 1, q1), Screen(k2, full_g, q2), Screen(k3, full_g, q3))
        for q1, q2, q3 in itertools.product((10, 20, 30), (20, 30, 50), (15, 20, 30, 50))
        for k2, k3 in ((2, 5), (2, 10), (3, 10), (5, 20))
    ]
    # Progressive pruning along the trajectory: after a cheap start, each stage continues the one before
    # at the full G and drops a few more prompts, so the late steps are run for fewer of them.
    four = [
        (Screen(1, 1, q1), Screen(2, full_g, q2), Screen(k3, full_g, q3), Screen(k4, full_g, q4))
        for q1, q2 in ((5, 50), (10, 20), (10, 25), (10, 30), (10, 40))
        for k3, q3 in itertools.product((5, 10, 20, 30), (40, 50, 60, 70, 80, 90))
        for k4, q4 in itertools.product((20, 30, 40, 45), (50, 60, 70, 80, 90))
        if k4 > k3
    ]
    return one + two + three + four


RANKED_SCREENS = ((1, 1), (1, 4), (2, 4), (5, 4), (10, 4), (20, 4))  # (k, G') whose ranking of the top 1% is shown


def worst_rank(testbed: Testbed, steps: int, generations: int) -> int:
    """The rank (1 = highest) under a (steps, generations) dmem screen of the full top 1%'s lowest-ranked prompt:
    a cascade ending in that screen must fully score at least this many prompts to hold the whole top 1%."""
    screen = testbed.norms[:, :generations, :steps].mean(axis=(1, 2))
    ranks = np.argsort(np.argsort(-screen, kind="stable"), kind="stable") + 1
    return int(ranks[testbed.target].max())


def frontier(rows: pd.DataFrame) -> pd.DataFrame:
    """Per worst-case recall, the cheapest cascade reaching it (the in-process cost)."""
    best = rows.sort_values(["continued", "restart"]).drop_duplicates("recall_min")
    best = best.sort_values("continued")
    return best[best.recall_min >= best.recall_min.cummax()]


def figure(rows: pd.DataFrame, path: str) -> None:
    """Every candidate's worst-case recall against its in-process cost, the frontier and the target."""
    from cxrmem.figures import BLUE, GREY, RED, _figure, _save

    fig, axes = _figure(7.5, 4.2)
    ax = axes[0, 0]
    ax.scatter(rows.continued, rows.recall_min, s=6, color=GREY, alpha=0.5, label=f"{len(rows):,} cascades (1-4 dmem stages)")
    best = frontier(rows)
    ax.step(best.continued, best.recall_min, where="post", color=BLUE, lw=2, label="frontier (cheapest at each recall)")
    ax.axvline(TARGET_EVALUATIONS, color=RED, ls="--", lw=1, label=f"target: {TARGET_EVALUATIONS:g} evaluations per prompt")
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per corpus prompt (in process, continuing trajectories; log scale)")
    ax.set_ylabel("recall of the full top 1% (worst testbed)")
    ax.set_title("Cascade cost against recall at G=4, T=50")
    ax.legend(loc="lower right", frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    with open(path, "wb") as out:
        _save(fig, out)


def markdown(rows: pd.DataFrame, names: list[str], sizes: dict, ranks: dict, args, minutes: float) -> str:
    cols = [f"recall {n}" for n in names]
    lines = [
        SECTION,
        "",
        f"Command: `bench/cascade_frontier.py --testbed {' '.join(args.testbed)}` ({cpu_name()}, {args.cpus} threads; "
        f"this call {minutes:.0f} min: it scored only what `--cache` lacked). Every distinct training prompt fully "
        f"scored once at G={args.generations}, T={args.steps}, w=7.5, shared seeds ("
        + ", ".join(f"{n}: {sizes[n]}" for n in names)
        + "); each dmem screen is the mean of the first k steps of the first G' generations of the same trajectories. "
        "Recall: share of the full d_mem's top 1% among the fully scored. Evaluations: UNet samples per corpus prompt "
        "(declared costs, batch 16), restarting every stage (Ray) and continuing trajectories (in process).",
        "",
        "The frontier (cheapest cascade at each worst-case recall over the testbeds):",
        "",
        "| stages, then the full d_mem | " + " | ".join(cols) + " | evaluations, continued | evaluations, restarted |",
        "| --- | " + " | ".join("---" for _ in cols) + " | --- | --- |",
    ]
    for _, row in frontier(rows).iterrows():
        lines.append(
            f"| {row.stages} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + f" | {row.continued:.2f} | {row.restart:.2f} |"
        )
    full = rows.iloc[0]
    lines += ["", f"Fully scoring every prompt costs {full.full_cost:.1f} evaluations per prompt."]
    exact = rows[rows.recall_min == 1.0].sort_values(["continued", "restart", "share"]).head(args.show)
    lines += ["", f"The {len(exact)} cheapest cascades with full recall on every testbed:", ""]
    lines += [
        "| stages | fully scored (share) | evaluations, continued | of which the full d_mem | evaluations, restarted |",
        "| --- | --- | --- | --- | --- |",
    ]
    for _, row in exact.iterrows():
        lines.append(f"| {row.stages} | {row.share:.2%} | {row.continued:.2f} | {row.final:.2f} | {row.restart:.2f} |")
    if len(exact):
        best = exact.iloc[0]
        verdict = "meets" if best.continued <= TARGET_EVALUATIONS else "misses"
        lines += [
            "",
            f"The cheapest full-recall cascade costs {best.continued:.2f} evaluations per prompt in process ({best.restart:.2f} "
            f"restarting): it {verdict} the target of {TARGET_EVALUATIONS:g}. {best.final:.2f} of them are the full d_mem's "
            f"remaining steps for the {best.share:.2%} of the corpus that reach it.",
        ]
    lines += [
        "",
        "Where the top 1% sits in a screen's ranking: the rank of its lowest-ranked prompt (the fewest prompts a cascade "
        "ending in that screen must fully score; the top 1% itself is " + ", ".join(f"{n}: {ranks[n]['top']}" for n in names) + " prompts):",
        "",
        "| screen | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for k, g in RANKED_SCREENS:
        lines.append(f"| k={k} G={g} | " + " | ".join(str(ranks[n].get((k, g), "–")) for n in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", nargs="+", default=["testbed/model", "testbed/iuxray"])
    parser.add_argument("--steps", type=int, default=50, help="T of the full score")
    parser.add_argument("--generations", type=int, default=4, help="G of the full score")
    parser.add_argument("--batch", type=int, default=16, help="prompts per scoring batch (and the cost's batch)")
    parser.add_argument("--cpus", type=int, default=2, help="torch threads")
    parser.add_argument("--cache", default="runs/cascade_frontier", help="folder of the per-testbed norms")
    parser.add_argument("--show", type=int, default=8, help="cheapest full-recall cascades listed")
    parser.add_argument("--limit", type=int, help="first N distinct prompts only (a quick check; the cache is per testbed)")
    parser.add_argument("--results", default="bench/RESULTS.md")
    parser.add_argument("--figure", default="bench/cascade_frontier.png", help="PNG of recall against cost")
    args = parser.parse_args()
    torch.set_num_threads(args.cpus)
    started = time.time()
    per_testbed, sizes = {}, {}
    for path in args.testbed:
        cfg = load_config(None, [f"model.path={path}", f"score.steps={args.steps}", f"score.generations={args.generations}"])
        name = os.path.basename(os.path.normpath(path))
        norms = full_norms(path, os.path.join(args.cache, f"{name}.npz"), cfg, args.batch, args.limit)
        sizes[name] = len(norms)
        per_testbed[name] = Testbed.of(norms, cfg.score)
        score_cfg = cfg.score
    rows = []
    for stages in candidates(args.generations):
        row = {"stages": ", ".join(map(str, stages))}
        outcomes = {name: cascade_outcome(testbed, stages, args.batch) for name, testbed in per_testbed.items()}
        for name, outcome in outcomes.items():
            row[f"recall {name}"] = outcome["recall"]
        row["recall_min"] = min(o["recall"] for o in outcomes.values())
        row["continued"] = max(o["continued"] for o in outcomes.values())
        row["restart"] = max(o["restart"] for o in outcomes.values())
        row["share"] = max(o["fully_scored"] / sizes[name] for name, o in outcomes.items())
        row["final"] = max(o["final"] for o in outcomes.values())
        rows.append(row)
    frame = pd.DataFrame(rows)
    n = next(iter(sizes.values()))
    frame["full_cost"] = evaluations(dmem_cost(score_cfg, args.steps), n, args.batch) / n
    ranks = {
        name: {"top": len(testbed.target),
               **{(k, g): worst_rank(testbed, k, g) for k, g in RANKED_SCREENS if g <= args.generations and k <= args.steps}}
        for name, testbed in per_testbed.items()
    }
    text = markdown(frame, list(per_testbed), sizes, ranks, args, (time.time() - started) / 60)
    figure(frame, args.figure)
    print(text)
    write_results(args.results, SECTION, text + f"\n![recall against cost]({os.path.relpath(args.figure, os.path.dirname(args.results))})\n")


if __name__ == "__main__":
    main()
