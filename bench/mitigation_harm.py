"""Mitigations judged by the harm on the committed testbed: copy rate (paired against original), fidelity,
d_mem change and cost per strategy, through the mitigate, copies and report stages.

    python bench/mitigation_harm.py [--out runs/mitigation-harm] [--steps 10] [--generations 4] [--controls 50]
        [--per-group 4] [key=value ...]

The memorized set is the testbed's 24 planted prompts themselves (the ground truth: the d_mem
top 5% of the demo is nearly the same set, bench/RESULTS.md), so that no scoring pass is needed;
controls are drawn from the other training prompts. The training images are the testbed's
phantoms (`cxrmem testbed export`), the fidelity measure the committed phantom reader. Prints the
judgement per guidance (the copies summary's `judgement`) as JSON, with the CPU and wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from cxrmem.config import load_config  # noqa: E402
from cxrmem.results_page import cpu_name  # noqa: E402
from cxrmem.runfiles import Run, RunLayout  # noqa: E402
from cxrmem.storage import Store  # noqa: E402


def config(args):
    images = f"{args.images}/images.csv"
    return load_config(ROOT / "conf" / "demo.yaml", [
        f"run.output={args.out}", "run.overwrite=true", f"corpus.path={images}", "corpus.id_columns=[source_id]",
        "corpus.max_reports=null", f"images.source={images}", "images.study_column=source_id",
        f"score.steps={args.steps}", f"score.generations={args.g}", f"mitigation.steps={args.steps}",
        f"mitigation.n_generations={args.generations}", f"copies.generations={args.generations}",
        f"copies.n_controls={args.controls}", "copies.pixel_size=32", "fidelity.measure=phantom_reader",
        "report.top_prompts=2", *args.overrides,
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mitigation-harm")
    parser.add_argument("--images", default="testbed/images")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--g", type=int, default=2, help="score.generations: noises of the d_mem change")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--controls", type=int, default=50)
    parser.add_argument("--per-group", type=int, default=4, help="planted prompts per duplication level and marker condition (of 4)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from cxrmem.stages import copies, mitigate, prepare, report
    from cxrmem.testbed.export import export_training_images

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.time()
    cfg = config(args)
    export_training_images(str(ROOT / "testbed" / "model"), args.images, cfg.corpus)
    store, layout = Store(), RunLayout(args.out)
    run = Run(store, layout)
    prepare.run(cfg, run)
    prompts = store.read_table(layout.prompts, columns=["prompt_id", "prompt"]).to_pandas()
    manifest = pd.read_csv(ROOT / "testbed" / "model" / "manifest.csv").query("planted")
    groups = manifest.assign(marked=manifest.prompt.str.contains("___")).groupby(["n_copies", "marked"], sort=False)
    planted = set(groups.head(args.per_group).prompt)
    memorized = prompts[prompts.prompt.isin(planted)].assign(d_mem=float("nan"), n_reports=1)
    run.write_memorized(memorized)
    timings = {}
    for name, stage in (("mitigate", mitigate), ("copies", copies), ("report", report)):
        t = time.time()
        result = stage.run(cfg, run)
        timings[name] = round(time.time() - t, 1)
    judged = {w: g["judgement"] for w, g in result_copies(store, layout).items()}
    print(json.dumps({"cpu": cpu_name(), "threads": int(os.environ["OMP_NUM_THREADS"]), "memorized": len(memorized),
                      "wall_s": round(time.time() - start, 1), "stage_s": timings, "report": result.get("report"),
                      "judgement": judged}, indent=1))  # fmt: skip


def result_copies(store: Store, layout: RunLayout) -> dict:
    """Per guidance the judgement, recomputed from the run's copies.parquet and mitigation.parquet."""
    from cxrmem.judgement import halves_copying, judge_strategies

    copies = store.read_table(layout.copies).to_pandas()
    mitigation = store.read_table(layout.mitigation).to_pandas()
    order = list(dict.fromkeys(mitigation["strategy"]))
    out = {}
    for guidance in sorted(set(copies["guidance"].astype(float))):
        rows = judge_strategies(copies, mitigation, guidance, order)
        out[f"w={guidance:g}"] = {"judgement": {"strategies": [r.as_dict() for r in rows], "halve_copying": halves_copying(rows)}}
    return out


def print_table(judged: dict) -> None:
    """The judgement as a Markdown table per guidance (for bench/RESULTS.md)."""
    def ci(d, digits=2):
        return "baseline" if not d else f"{d['mean']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"

    for name, j in judged.items():
        print(f"\n{name}; halve the copy rate with fidelity within 10 points: {j['halve_copying'] or 'none'}\n")
        print("| strategy | prompts | copies | copy rate | change vs original [95% CI] | similarity change | fidelity | "
              "fidelity change | d_mem change (w = 7.5) | evaluations / generation |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in j["strategies"]:
            print(f"| {r['strategy']} | {r['prompts']} | {r['copies']} | {r['copy_rate']:.2f} | {ci(r['copy_rate_change'])} | "
                  f"{ci(r['similarity_change'], 4)} | {r['fidelity']:.2f} | {ci(r['fidelity_change'])} | "
                  f"{ci(r['d_mem_change'])} | {r['evaluations']} |")


if __name__ == "__main__" and sys.argv[1:2] == ["--table"]:
    print_table({w: g["judgement"] for w, g in result_copies(Store(), RunLayout(sys.argv[2])).items()})
    sys.exit(0)


if __name__ == "__main__":
    main()
