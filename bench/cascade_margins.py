"""Benchmark (not a test): the cascade's recall of the full top 1% with fixed keep shares against margins set by its
screen models (`cascade.expected_missed_target`), on full-score ground truth.

Every distinct prompt of a testbed is fully scored once at G=4, T=50 (bench/cascade_frontier.py `full_norms`, in one
seeded random order, so that a cache cut short is a simple random sample of the testbed: the corpus is then that
sample). Each dmem screen (k steps, G' generations) is the mean of the first k steps of the first G' generations of
those trajectories, as in the frontier, so one scoring gives every round of a cascade.

The rounds are cxrmem/stages/cascade.py's, replayed on the norms with its own functions: `screen_top` per stage,
the audit sample (`audit_sample_ids`), the memorized threshold, the misses, the bounds and margins
(`audit_bounds` over `stage_scores`), the next round's shares (`wider_shares`). A round rescreens only the prompts
new to a stage, and a stage at the full G continues the trajectories an earlier stage of the same round computed
(the run's carry); the audit's evaluations are counted apart. Reported per testbed and mode: the recall of the
full d_mem's top 1% (`stats.top_percent_mask`, ties kept) among the fully scored prompts, the screens' and full
score's evaluations per prompt, the audit's, `expected_missed` and `recall_lower_bound` of the last round.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/cascade_margins.py --testbed testbed/random_markers ...
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time

import numpy as np
import torch

from bench.cascade_frontier import dmem_evaluations, full_norms, testbed_prompts
from cxrmem.cascade_bounds import audit_bounds
from cxrmem.config import load_config
from cxrmem.corpus.text import prompt_id
from cxrmem.detectors import screen_top
from cxrmem.formatting import fmt
from cxrmem.models.loading import blind_steps
from cxrmem.results_page import cpu_name, write_results
from cxrmem.stages.cascade import Round, Screened, audit_sample_ids, memorized_threshold, plan, stage_scores, wider_shares
from cxrmem.stats import top_percent_mask

SECTION = "## Cascade margins on four testbeds at T=50, G=4 (issue 33)"
ORDER_SEED = 0  # the scoring order of every testbed's prompts (a prefix is a random sample)


class Replay:
    """One cascade run on a testbed's norms: what it screened, fully scored and audited so far, and its spending."""

    def __init__(self, norms: np.ndarray, ids: np.ndarray, cfg, batch: int):
        self.norms, self.ids, self.cfg, self.batch = norms, ids, cfg, batch
        self.full = norms.mean(axis=(1, 2))
        self.shared = cfg.score.seed_mode == "shared"
        self.screened_before: list[set] = []
        self.scored, self.audited = set(), set()
        self.spent = {"screens": 0, "full": 0, "audit": 0}

    def cost(self, g: int, k: int, prompts: list[int], carried: dict) -> int:
        """Evaluations of a (k, g) d_mem for these prompts, each continuing from its carried steps."""
        groups: dict[int, int] = {}
        for p in prompts:
            start = carried.get(p, 0) if g == self.norms.shape[1] else 0
            groups[start if start < k else 0] = groups.get(start if start < k else 0, 0) + 1
        return sum(dmem_evaluations(g, k, m, start, self.shared, self.batch) for start, m in groups.items())

    def stages_round(self, stages) -> tuple[np.ndarray, list[Screened], list[dict]]:
        """Every stage on the survivors of the one before: the last survivors (indices), each stage's screen, its row."""
        full_g = self.norms.shape[1]
        while len(self.screened_before) < len(stages):
            self.screened_before.append(set())
        survivors, screened, rows, carried = np.arange(len(self.ids)), [], [], {}
        for i, stage in enumerate(stages):
            scores = self.norms[survivors, : stage.generations, : stage.steps].mean(axis=(1, 2))
            chosen = screen_top(survivors, scores, stage.keep_percent)
            new = [p for p in survivors.tolist() if p not in self.screened_before[i]]
            spent = self.cost(stage.generations, stage.steps, new, carried)
            self.spent["screens"] += spent
            self.screened_before[i].update(new)
            if stage.generations == full_g:  # the carry: this round's computed trajectories of the stage's survivors
                fresh = set(new)
                carried = {p: stage.steps for p in chosen.tolist() if p in fresh}
            screened.append(Screened(self.ids[survivors], scores, np.isin(survivors, chosen)))
            rows.append({"keep_percent": stage.keep_percent, "screened": len(survivors), "kept": len(chosen), "evaluations": spent})
            survivors = chosen
        new = [p for p in survivors.tolist() if p not in self.scored]
        self.spent["full"] += self.cost(full_g, self.norms.shape[2], new, carried)
        self.scored.update(new)
        return survivors, screened, rows

    def audit(self, stages, screened: list[Screened]):
        """The round's audit sample, misses and bounds, as cxrmem/stages/cascade.py `check_round` makes them."""
        cfg, full_cost_per = self.cfg, dmem_evaluations(self.norms.shape[1], self.norms.shape[2], 1, 0, self.shared, 1)
        scored = np.array(sorted(self.scored))
        rejected = np.setdiff1d(np.arange(len(self.ids)), scored)
        sample_ids = audit_sample_ids(self.ids, self.ids[rejected], cfg.cascade.audit_sample, cfg.cascade.audit_seed)
        sample = np.flatnonzero(np.isin(self.ids, sample_ids))
        new = [p for p in sample.tolist() if p not in self.audited]
        self.spent["audit"] += dmem_evaluations(self.norms.shape[1], self.norms.shape[2], len(new), 0, self.shared, self.batch)
        self.audited.update(new)
        threshold = memorized_threshold(np.concatenate([self.full[scored], self.full[sample]]), len(self.ids), cfg.analyze.top_percent)
        missed = sample[self.full[sample] >= threshold]
        by_stage = [int(np.isin(self.ids[missed], s.ids[~s.kept]).sum()) for s in screened]
        checked = Round([], len(scored), len(rejected), len(sample), len(missed), by_stage)
        target = cfg.cascade.expected_missed_target
        bounds = audit_bounds(
            len(rejected), len(sample), len(missed), int(np.sum(self.full[scored] >= threshold)),
            stage_scores(stages, screened, (self.ids[scored], self.full[scored]), (self.ids[sample], self.full[sample]),
                         {self.ids[p]: self.norms[p] for p in np.concatenate([scored, sample]).tolist()},
                         len(sample) / len(rejected) if len(rejected) else None),
            threshold, full_cost_per, None if target is None else target / len(stages),
        )  # fmt: skip
        return checked, bounds


def replay(norms: np.ndarray, ids: np.ndarray, cfg, batch: int, blind: int = 0) -> dict:
    """The cascade's rounds on these norms under `cfg` (its stages planned past the model's `blind` first steps, as
    the run plans them): its recall of the full top 1% and what it reports."""
    run, stages = Replay(norms, ids, cfg, batch), plan(cfg, blind)
    rounds = []
    for number in range(1, cfg.cascade.max_rounds + 1):
        _, screened, rows = run.stages_round(stages)
        checked, bounds = run.audit(stages, screened)
        rounds.append(rows)
        shares = wider_shares(cfg, stages, checked, bounds.stages, screened)
        short = [i for i, share in enumerate(shares) if share > stages[i].keep_percent]
        if not short or number == cfg.cascade.max_rounds:
            break
        for i in short:
            stages[i].keep_percent = shares[i]
    target = np.flatnonzero(top_percent_mask(run.full, cfg.analyze.top_percent)[0])
    n = len(ids)
    return {
        "recall": float(np.isin(target, list(run.scored)).mean()), "members": len(target), "fully_scored": len(run.scored),
        "per_prompt": (run.spent["screens"] + run.spent["full"]) / n, "audit_per_prompt": run.spent["audit"] / n,
        "expected_missed": bounds.expected_missed, "recall_lower_bound": bounds.recall_lower_bound, "rounds": len(rounds),
        "shares": ", ".join(f"{s.keep_percent:.3g}" for s in stages), "short": short if number == cfg.cascade.max_rounds else [],
    }  # fmt: skip


def markdown(rows: list[dict], args, minutes: float) -> str:
    lines = [
        SECTION, "",
        f"Command: `OMP_NUM_THREADS=1 nice -n 10 bench/cascade_margins.py --testbed {' '.join(args.testbed)}` ({cpu_name()}, "
        f"1 thread, 2 cores shared with other jobs; this call {minutes:.0f} min, most of it the one-off full scoring). "
        f"Ground truth: every prompt scored (a testbed not fully scored is the seeded random sample scored so far, "
        f"column 'prompts') at G=4, T=50, w=7.5, shared seeds; the cascade's rounds replayed on those norms with "
        f"cxrmem/stages/cascade.py's own functions (cascade.max_rounds 4; the audit sample of 200 rejected prompts is the default, "
        f"a large share of a 1,024-prompt corpus; 20 is about its share at 10,000). Recall: share of "
        f"the full d_mem's top 1% among the fully scored. Evaluations: UNet samples per corpus prompt, screens and full score "
        f"(continuing trajectories within a round; a prompt a stage screened in an earlier round is not rescreened), the audit apart. "
        f"'fixed' (the default): the default stages, widened x2 only where the audit finds a miss (cascade.expected_missed_target=null, "
        f"cascade.widen_above_expected_missed=null); 'fixed + model': also where a stage's screen model expects more than "
        f"cascade.widen_above_expected_missed={args.widen_above:g} lost members; "
        f"'margins': the same first-round shares, then each stage widened to what its screen model needs for "
        f"cascade.expected_missed_target={args.target:g} in all.",
        "",
        "| testbed | prompts | top 1% | audit sample | mode | recall | evaluations per prompt | audit per prompt | rounds | final keep % "
        "| expected_missed | recall_lower_bound |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['testbed']} | {r['prompts']} | {r['members']} | {r['audit']} | {r['mode']} "
            f"| {r['recall']:.2f} ({round(r['recall'] * r['members'])}/{r['members']}) "
            f"| {r['per_prompt']:.2f} | {r['audit_per_prompt']:.1f} | {r['rounds']}{' (max)' if r['short'] else ''} | {r['shares']} "
            f"| {fmt(r['expected_missed'])} | {fmt(r['recall_lower_bound'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", nargs="+", default=["testbed/model", "testbed/iuxray", "testbed/random_markers", "testbed/no_markers"])
    parser.add_argument("--cache", default="runs/cascade_margins", help="folder of the per-testbed norms (gitignored)")
    parser.add_argument("--score", action="store_true", help="fully score what the caches lack (else use them as they are)")
    parser.add_argument("--target", type=float, default=None, help="cascade.expected_missed_target (default: the config's, else 0.5)")
    parser.add_argument("--widen-above", type=float, default=1.0, help="cascade.widen_above_expected_missed of the 'fixed + model' rows")
    parser.add_argument("--audit-sample", type=int, nargs="+", default=[200, 20], help="cascade.audit_sample values to replay")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ignore-blind-steps", action="store_true", help="plan the stages as configured on a flow model too")
    parser.add_argument("--results", default="bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started, rows = time.time(), []
    for path in args.testbed:
        name = os.path.basename(os.path.normpath(path))
        cache = os.path.join(args.cache, f"{name}.npz")
        base = load_config(None, [f"model.path={path}", "score.steps=50", "score.generations=4"])
        if args.score:
            full_norms(path, cache, base, args.batch, None, order_seed=ORDER_SEED, save_every=2)
        if not os.path.exists(cache):
            print(f"{path}: no norms in {cache}; run with --score", file=sys.stderr)
            continue
        norms = np.load(cache)["norms"]
        ids = np.array([prompt_id(p) for p in testbed_prompts(path, ORDER_SEED)[: len(norms)]])
        # margins: the config's target, else 0.5, the measured setting (the config's default is null: margins off)
        args.target = args.target if args.target is not None else (base.cascade.expected_missed_target or 0.5)
        modes = (("fixed", "null", "null"), ("fixed + model", "null", args.widen_above), ("margins", args.target, "null"))
        for audit, (mode, target, above) in itertools.product(args.audit_sample, modes):
            cfg = load_config(None, [f"model.path={path}", "score.steps=50", "score.generations=4", f"cascade.audit_sample={audit}",
                                     f"cascade.expected_missed_target={target}", f"cascade.widen_above_expected_missed={above}"])  # fmt: skip
            blind = 0 if args.ignore_blind_steps else blind_steps(cfg.model)
            rows.append({"testbed": name, "prompts": len(norms), "audit": audit, "mode": mode + (" (k = 1 kept)" if args.ignore_blind_steps else ""),
                         **replay(norms, ids, copy.deepcopy(cfg), args.batch, blind)})  # fmt: skip
            print(rows[-1], file=sys.stderr, flush=True)
    text = markdown(rows, args, (time.time() - started) / 60)
    print(text)
    write_results(args.results, SECTION, text)


if __name__ == "__main__":
    main()
