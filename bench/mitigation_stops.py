"""Benchmark (not a test): where the sequential rule stops each mitigation strategy, with and without the
equivalence stop, on a testbed's planted prompts, and what that leaves of mitigation's upper-bound cost.

bench/audit_cost.py projects mitigation as if every strategy ran the whole sample (an upper bound). The rule
(cxrmem/mitigation_sizing.py SequentialRule) reads only the paired d_mem changes, so this computes every
strategy's d_mem on every planted prompt once (cxrmem/mitigation.py `mitigate_prompts`, with the fewest
generations: the rule does not read them), in the stratified sample's order, and replays the rule's looks:

- per strategy, the prompts it ran at `equivalence_margin` 0 and at the default, and why it stopped;
- the decision it stopped on against the 95% interval over the whole sample (F3's comparison);
- the share of the upper bound the strategies' runs cost (declared evaluations per prompt x prompts run).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/mitigation_stops.py --config conf/testbed.yaml score.steps=20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cxrmem import strategies  # noqa: E402
from cxrmem.config import load_config  # noqa: E402
from cxrmem.corpus.text import prompt_id  # noqa: E402
from cxrmem.mitigation import mitigate_prompts  # noqa: E402
from cxrmem.mitigation_sizing import BASELINE, SequentialRule, paired_change, stratified_sample  # noqa: E402
from cxrmem.models.loading import load_components  # noqa: E402
from cxrmem.results_page import cpu_name, write_results  # noqa: E402
from cxrmem.scoring.scorer import Scorer  # noqa: E402
from cxrmem.scoring.settings import ScoreSettings  # noqa: E402
from cxrmem.stages.worker import mitigation_settings  # noqa: E402

HEADING = "## Mitigation: where the sequential rule stops"


def replay(frame: pd.DataFrame, order: list[str], names: tuple, cfg, margin: float) -> dict:
    """The rule's record per strategy when it looks every `look_every` prompts of `order` (every row computed)."""
    c = cfg.mitigation
    rule = SequentialRule(names, c.stop_level, c.sequential, margin)
    seen = frame.iloc[:0]
    for lo in range(0, len(order), c.look_every):
        if not rule.active:
            break
        seen = frame[frame["prompt_id"].isin(order[: lo + c.look_every])]
        rule.look(seen)
    return rule.finish(seen)


def table(name: str, frame: pd.DataFrame, order: list[str], cfg, settings, score) -> tuple[list[str], float, float]:
    """Markdown rows per strategy, and the strategies' evaluations at the default margin and at margin 0, as shares."""
    names = tuple(settings.strategies)
    at_zero, at_default = replay(frame, order, names, cfg, 0.0), replay(frame, order, names, cfg, cfg.mitigation.equivalence_margin)
    scored, generated = (score.generations, score.steps), (cfg.mitigation.n_generations, cfg.mitigation.steps or score.steps)
    cost = {s: strategies.row(s).evaluations(settings, scored, generated) for s in names}
    bound = sum(cost.values()) * len(order)
    # What the rows ran cost: each strategy's declared evaluations on the prompts it ran (0 where it changed nothing
    # and took original's results), at the full settings, not this bench's two generations.
    rank = {pid: i for i, pid in enumerate(order)}
    ran = frame.assign(at=frame["prompt_id"].map(rank), full=frame["strategy"].map(cost).where(frame["evaluations"] > 0, 0))
    spent = {m: sum(ran.loc[(ran["strategy"] == s) & (ran["at"] < record[s]["prompts"]), "full"].sum() for s in names) / bound
             for m, record in (("zero", at_zero), ("default", at_default))}  # fmt: skip
    rows = []
    for s in names:
        if s == BASELINE:
            continue
        full = paired_change(frame, s, 0.95)
        interval = "–" if full["ci_low"] is None else f"{full['mean']:+.3f} [{full['ci_low']:+.3f}, {full['ci_high']:+.3f}] ({full['n']})"
        rows.append(f"| {name} | {s} | {at_zero[s]['prompts']} | {at_default[s]['prompts']} | {at_default[s]['stopped']} | {interval} |")
    return rows, spent["default"], spent["zero"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/testbed.yaml")
    parser.add_argument("--manifest", default=None, help="planted prompts (default: <model.path>/manifest.csv)")
    parser.add_argument("--scores", default=None, help="a run's scores.parquet: its --top most memorized prompts instead of the planted")
    parser.add_argument("--top", type=int, default=40, help="with --scores: the memorized set's size")
    parser.add_argument("--results", default=None, help="write the table into this page (bench/RESULTS.md)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.scores:  # a memorized set as an audit makes one: the top of a run's d_mem
        planted = pd.read_parquet(args.scores, columns=["prompt_id", "prompt", "d_mem"]).nlargest(args.top, "d_mem")
    else:
        manifest = pd.read_csv(args.manifest or os.path.join(cfg.model.path, "manifest.csv"))
        planted = manifest[manifest["planted"]].assign(prompt_id=lambda f: f["prompt"].map(prompt_id))
    c = cfg.mitigation
    sample = stratified_sample(planted[["prompt", "prompt_id"]], cfg.corpus.marker_regex, c.sample_size, c.seed)
    score = ScoreSettings.of(cfg.score)
    scorer = Scorer(load_components(cfg.model), score, device="cpu")
    settings = mitigation_settings(cfg).replace(n_generations=2)  # the rule reads d_mem; generations are not needed
    start = time.perf_counter()
    frame, _, _ = mitigate_prompts(scorer, sample["prompt"].tolist(), sample["prompt_id"].tolist(), settings)
    seconds = time.perf_counter() - start
    rows, default, zero = table(cfg.model.path, frame, sample["prompt_id"].tolist(), cfg, mitigation_settings(cfg), score)
    chosen = f"--scores {args.scores} --top {args.top} " if args.scores else ""
    lines = [HEADING, "", f"Command: `OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/mitigation_stops.py --config {args.config} {chosen}"
             f"{' '.join(args.overrides)}` ({cpu_name()}; {seconds:.0f} s). {len(sample)} {'memorized' if args.scores else 'planted'} prompts "
             f"of {cfg.model.path} in the stratified sample's order, G={score.generations}, T={score.steps}, looks every {c.look_every}, "
             f"level {c.stop_level}{f'; the {args.top} highest d_mem of {args.scores}' if args.scores else ''}.", "",
             "| testbed | strategy | prompts run (margin 0) | prompts run (margin "
             f"{c.equivalence_margin:g}) | why it stopped | change over the whole sample, 95% (pairs) |", "|---|---|---|---|---|---|",
             *rows, "",
             f"Mitigation's cost as a share of the upper bound (every strategy on every prompt at its full cost): **{default:.0%}** with the "
             f"equivalence stop, {zero:.0%} without it (a strategy that changes nothing for a prompt costs nothing there)."]  # fmt: skip
    print("\n".join(lines))
    if args.results:
        write_results(args.results, HEADING, "\n".join(lines))


if __name__ == "__main__":
    main()
