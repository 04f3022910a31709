"""Benchmark (not a test): calibrated calls on the testbed, and the null check (issue 34).

1. testbed/model on its first 512 training prompts (the demo's corpus when measured: the 24 planted, then 488 others),
   against a reference of fresh synthetic impressions (the generator the testbed was trained from, another
   seed), every training prompt of the testbed removed from it. Truth: the planted prompts (the testbed's
   manifest); the realized false-discovery rate is the share of discoveries that are not planted.
2. testbed/iuxray_heldout: the IU X-ray testbed trained without a seeded 30% of its distinct impressions
   (conf/testbed_iuxray_heldout.yaml), audited on its training prompts against those held-out impressions.
3. The null check: the IU X-ray testbed (testbed/iuxray) audited on synthetic prompts it never saw, against
   other synthetic prompts. Nothing is memorized: F0 must read "not supported" with about zero discoveries.

Both run the real stages (prepare, score, reference, analyze) in this process at the settings given.
bench/calibration_harm.py reads these runs: the calls judged by copies, the reference size the tail needs, and the
analyze settings against a split-reference null.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/calibration.py
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import pyarrow.parquet as pq

from cxrmem.config import load_config
from cxrmem.corpus.synthetic import generate_reports
from cxrmem.findings import FindingInputs, f0_memorizes
from cxrmem.results_page import cpu_name, write_results
from cxrmem.runfiles import Run, RunLayout
from cxrmem.stages import analyze, prepare, reference, score
from cxrmem.storage import Store

SECTION = "## Calibrated calls: p-values against prompts the model never saw (CPU)"


def synthetic_table(path: str, n: int, seed: int, exclude: set[str]) -> str:
    """A CSV of `n` distinct synthetic impressions of this seed that are not in `exclude`."""
    texts, seen = [], set(exclude)
    for report in generate_reports(20 * n, seed=seed):
        text = report["impression"]
        if text not in seen:
            seen.add(text)
            texts.append(text)
        if len(texts) == n:
            break
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame({"prompt": texts}).to_csv(path, index=False)
    return path


def audit(name: str, overrides: list[str]) -> dict:
    cfg = load_config("conf/demo.yaml", overrides)
    started = time.time()
    prepare.run(cfg)
    score.run(cfg)
    ref = reference.run(cfg)
    analyze.run(cfg)
    layout = RunLayout(cfg.run.output)
    summary = Run(Store(), layout).read_summary()
    calibration = summary.calibration
    q = pq.read_table(layout.calibration).to_pandas()
    known = pd.read_csv(cfg.analyze.known_memorized) if cfg.analyze.known_memorized else None
    row = {"testbed": name, "corpus": len(q), "reference": calibration.reference["prompts"],
           "dropped": calibration.reference["dropped_in_corpus"], "global_p": calibration.global_p,
           "f0": f0_memorizes(FindingInputs(summary.analysis, calibration=calibration)).verdict,
           "top_set": calibration.top_set_overlap["top_set"], "minutes": (time.time() - started) / 60,
           "reference_scored": ref.computed}  # fmt: skip
    planted = None
    if known is not None:
        from cxrmem.analysis import known_memorized_ids

        planted = known_memorized_ids(known)
    top = set(pd.read_csv(layout.memorized)["prompt_id"]) if os.path.exists(layout.memorized) else set()
    for level in (0.05, 0.10):
        called = q[q["q_value"] <= level]["prompt_id"]
        row[f"discoveries@{level}"] = len(called)
        row[f"in_top@{level}"] = int(called.isin(top).sum())
        if planted is not None:
            in_corpus = q["prompt_id"].isin(planted)
            row[f"recall@{level}"] = float(called.isin(planted).sum() / in_corpus.sum()) if in_corpus.any() else None
            row[f"fdr@{level}"] = float((~called.isin(planted)).mean()) if len(called) else 0.0
    print(row, flush=True)
    return row


def markdown(rows: list[dict], settings: str) -> str:
    lines = [SECTION, "", f"Command: `OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/calibration.py` ({settings}; CPU: {cpu_name()}).",
             "Length-conditional conformal p-values with the fitted upper tail (the defaults), Benjamini-Hochberg q-values; truth for",
             "testbed/model: the planted prompts (realized FDR = share of discoveries not planted). The null check audits the IU X-ray",
             "testbed on synthetic prompts it never saw, against other synthetic prompts.", "",
             "| testbed | corpus | reference (dropped) | F0 p | F0 | top set | q<=0.05: discoveries, in top set, recall, FDR "
             "| q<=0.10: discoveries, in top set, recall, FDR | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(r, level):
        recall = r.get(f"recall@{level}")
        fdr = r.get(f"fdr@{level}")
        return (f"{r[f'discoveries@{level}']}, {r[f'in_top@{level}']}, {'–' if recall is None else f'{recall:.2f}'}, "
                f"{'–' if fdr is None else f'{fdr:.2f}'}")  # fmt: skip

    for r in rows:
        lines.append(f"| {r['testbed']} | {r['corpus']} | {r['reference']} ({r['dropped']}) | {r['global_p']:.3g} | {r['f0']} | {r['top_set']} |"
                     f" {cell(r, 0.05)} | {cell(r, 0.1)} | {r['minutes']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/calibration")
    parser.add_argument("--reference", type=int, default=400, help="reference prompts per testbed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--null-corpus", type=int, default=300)
    parser.add_argument("--results", default="bench/RESULTS.md")
    parser.add_argument("--only", choices=["model", "iuxray_heldout", "null"], default=None,
                        help="run this audit alone; its table goes under a heading of its own")
    args = parser.parse_args()
    chosen = {args.only} if args.only else {"model", "iuxray_heldout", "null"}
    common = [f"score.steps={args.steps}", f"score.generations={args.generations}", "run.overwrite=true",
              "analyze.length_adjusted=false", "analyze.top_percent=1"]  # fmt: skip
    training = set(pd.read_csv("testbed/model/manifest.csv")["prompt"])
    ref_model = synthetic_table(f"{args.work}/reference_model.csv", args.reference, seed=101, exclude=training)
    rows = [audit("testbed/model (demo corpus)", [*common, f"run.output={args.work}/model", f"analyze.reference={ref_model}",
                                                   "corpus.max_reports=512"])] if "model" in chosen else []  # the demo's corpus was 512
    heldout = "testbed/iuxray_heldout"  # conf/testbed_iuxray_heldout.yaml: trained without 30% of the impressions
    if "iuxray_heldout" in chosen and os.path.exists(f"{heldout}/reference.csv"):
        rows.append(audit("testbed/iuxray_heldout (its training prompts)", [
            *common, f"run.output={args.work}/iuxray_heldout", f"model.path={heldout}", f"corpus.path={heldout}/manifest.csv",
            "corpus.max_reports=null", f"analyze.known_memorized={heldout}/manifest.csv", f"analyze.reference={heldout}/reference.csv",
        ]))  # fmt: skip
    null_corpus = synthetic_table(f"{args.work}/null_corpus.csv", args.null_corpus, seed=202, exclude=set())
    null_ref = synthetic_table(f"{args.work}/null_reference.csv", args.reference, seed=303, exclude=set())
    rows += [] if "null" not in chosen else [audit("null: testbed/iuxray on unseen synthetic prompts", [
        *common, f"run.output={args.work}/null", "model.path=testbed/iuxray", f"corpus.path={null_corpus}", "corpus.max_reports=null",
        "analyze.known_memorized=null", f"analyze.reference={null_ref}",
    ])]  # fmt: skip
    section = SECTION + (f" -- {args.only} alone" if args.only else "")
    text = markdown(rows, f"T={args.steps}, G={args.generations}, w=7.5").replace(SECTION, section, 1)
    if args.only:
        text = text.replace("bench/calibration.py`", f"bench/calibration.py --only {args.only}`", 1)
    print(text)
    write_results(args.results, section, text)


if __name__ == "__main__":
    main()
