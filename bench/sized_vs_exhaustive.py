"""Benchmark (not a test): the sized audit against the exhaustive one, from the same scores (issue 33).

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/sized_vs_exhaustive.py --testbed model [--prompts 256]
        [--steps 20] [--top-percent 4] [--work runs/sized_vs_exhaustive] [key=value ...]
    PYTHONPATH=$PWD .venv/bin/python bench/sized_vs_exhaustive.py --table [--results bench/RESULTS.md]

Per testbed (`model`: testbed/model, `iuxray`: testbed/iuxray), at conf/demo.yaml's settings: the corpus is the
testbed's first `--prompts` training prompts (the 24 planted first), read from its exported training images'
table (cxrmem/testbed/export.py) so that each prompt's source id is its own training image. prepare, score and
analyze run once (no reference: F0 reads the scores alone, the same in both modes); that run is copied to two
runs, and attribute, mitigate, copies and report run on each:

- `sized`: mitigation and attribution at their defaults: mitigation on the marker-stratified sample
  (mitigation.sample_size 40), sequential with the equivalence stop (margin 0.1); attribution of at most 40
  prompts, leave-one-out on the 10 most memorized, the gradient and leave-one-out over the first k steps with k
  the defaults' share of T (40 of 50: k = 4 at T = 5, 16 at T = 20; at a T below 40 the default k = 40 would
  be all T, the exhaustive setting);
- `exhaustive`: every memorized prompt mitigated with every strategy (sample_size null, sequential false),
  every one attributed and left out word by word (max_prompts, leave_one_out_prompts null), over all T steps.

The copies settings are the same in both: the generations at w = 1 only (where the testbed reproduces its
training images; at the scoring w = 7.5 its generations are over-guided), `--copy-generations` per prompt and
strategy, `--controls` controls, pixel embedder at 32, the phantom reader's fidelity. Compared: the card's
F1, F2 and F3 verdicts (metrics.json), per strategy the copy-rate and d_mem conclusions of the judgement at
w = 1 (summary.json copies; the paired 95% interval read as lowers / raises / no change), the counted
denoiser evaluations per stage (summary.json cost) and the wall time. Each testbed's comparison is kept as
<work>/<testbed>/comparison.json; `--table` writes the section of bench/RESULTS.md from those present.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrmem.config import load_config  # noqa: E402
from cxrmem.results_page import cpu_name, write_results  # noqa: E402
from cxrmem.runfiles import Run, RunLayout  # noqa: E402
from cxrmem.storage import Store  # noqa: E402

SECTION = "## Sized against exhaustive audits on both testbeds (issue 33)"
TESTBEDS = {"model": ("testbed/model", "conf/testbed.yaml"), "iuxray": ("testbed/iuxray", "conf/testbed_iuxray.yaml")}
FINDINGS = ("F1", "F2", "F3")
MODES = {  # each mode's overrides; attribution.steps is set from T (mode_overrides)
    "sized": [],  # mitigation and attribution at their defaults (conf/demo.yaml sets neither's sizes)
    "exhaustive": ["mitigation.sample_size=null", "mitigation.sequential=false", "attribution.max_prompts=null",
                   "attribution.leave_one_out_prompts=null"],
}  # fmt: skip
DEFAULT_K = (40, 50)  # attribution.steps of T at the defaults (k = 40 of the paper's T = 50, bench/RESULTS.md)
LATER_STAGES = ("attribute", "mitigate", "copies", "report")


def base_config(args, testbed: str, images: str, output: str, extra=()):
    model = TESTBEDS[testbed][0]
    return load_config(ROOT / "conf" / "demo.yaml", [
        f"run.output={output}", "run.overwrite=true", f"model.path={model}", f"corpus.path={images}/images.csv",
        "corpus.id_columns=[source_id]", f"corpus.max_reports={args.prompts}", f"images.source={images}/images.csv",
        "images.study_column=source_id", f"analyze.known_memorized={model}/manifest.csv", "analyze.reference=null",
        f"analyze.top_percent={args.top_percent}", f"score.steps={args.steps}", f"mitigation.steps={args.steps}",
        "copies.guidance=1.0", "copies.second_guidance=null", f"copies.generations={args.copy_generations}",
        f"copies.n_controls={args.controls}", "copies.pixel_size=32", "fidelity.measure=phantom_reader",
        "report.top_prompts=2", *args.overrides, *extra,
    ])  # fmt: skip


def export_images(testbed: str, folder: str) -> None:
    """The testbed's training images and their table, rendered with the corpus settings it was trained with."""
    from cxrmem.testbed.export import export_training_images

    model, training = TESTBEDS[testbed]
    if not os.path.exists(f"{folder}/images.csv"):
        export_training_images(model, folder, load_config(ROOT / training, [f"testbed.out={model}"]).corpus)


def mode_steps(mode: str, steps: int) -> int:
    """attribution.steps: all T exhaustively; sized, the defaults' share of T (40 of 50), as the demo's T is not 50."""
    return steps if mode == "exhaustive" else max(1, round(steps * DEFAULT_K[0] / DEFAULT_K[1]))


def timed(stages, cfg, run: Run) -> dict:
    seconds = {}
    for name, stage in stages:
        start = time.time()
        stage.run(cfg, run)
        seconds[name] = round(time.time() - start, 1)
    return seconds


def conclusion(change) -> str:
    """A paired 95% interval read as lowers / raises / no change (– where none was computed)."""
    if not change or change.get("ci_low") is None:
        return "–"
    return "lowers" if change["ci_high"] < 0 else "raises" if change["ci_low"] > 0 else "no change"


def verdict(metrics: dict, finding: str) -> str:
    """The card's verdict of a finding, from metrics.json's code of it (cxrmem/report.py VERDICT_CODES)."""
    code = metrics.get(f"finding.{finding}")
    if code == 1:
        return "supported"
    if code == 0:
        adjusted = finding == "F1" and metrics.get("finding.F1.after_adjustment")
        return "not supported after adjustment" if adjusted else "not supported"
    return "inconclusive" if code == -1 else "–"


def mode_result(folder: str, seconds: dict) -> dict:
    """One mode's verdicts, per-strategy conclusions at w = 1, counted evaluations and wall seconds."""
    metrics = json.loads(Path(folder, "metrics.json").read_text())
    summary = json.loads(Path(folder, "summary.json").read_text())
    guidances = (summary.get("copies") or {}).get("guidances") or {}
    rows = ((guidances.get("w=1") or {}).get("judgement") or {}).get("strategies") or []
    strategies = {r["strategy"]: {"prompts": r["prompts"], "copies": r["copies"], "copy_rate": r["copy_rate"],
                                  "copy_rate_change": r["copy_rate_change"], "copy": conclusion(r["copy_rate_change"]),
                                  "d_mem_change": r["d_mem_change"], "d_mem": conclusion(r["d_mem_change"])}
                  for r in rows}  # fmt: skip
    cost = summary.get("cost") or {}
    return {
        "verdicts": {f: verdict(metrics, f) for f in FINDINGS},
        "f2_pairs": metrics.get("finding.F2.pairs"),
        "strategies": strategies,
        "halve_copying": ((guidances.get("w=1") or {}).get("judgement") or {}).get("halve_copying"),
        "evaluations": {stage: work["evaluations"] for stage, work in (cost.get("stages") or {}).items()},
        "evaluations_per_prompt": cost.get("evaluations_per_prompt"),
        "seconds": seconds,
    }


def run_testbed(args, testbed: str) -> None:
    """prepare, score and analyze once, then the later stages in each mode; the wall seconds go to timings.json."""
    from cxrmem.stages import analyze, attribute, copies, mitigate, prepare, report, score

    work = Path(args.work) / testbed
    images = str(work / "images")
    export_images(testbed, images)
    cfg = base_config(args, testbed, images, str(work / "base"))
    store, start = Store(), time.time()
    settings = {"threads": int(os.environ["OMP_NUM_THREADS"]), "prompts": args.prompts, "steps": args.steps, "top_percent": args.top_percent,
                "copy_generations": args.copy_generations, "controls": args.controls, "overrides": args.overrides}  # fmt: skip
    if args.reuse_base and (work / "timings.json").exists():  # the scored run of an earlier call at these settings
        timings = {**json.loads((work / "timings.json").read_text()), "settings": settings}
    else:
        base = timed((("prepare", prepare), ("score", score), ("analyze", analyze)), cfg, Run(store, RunLayout(cfg.run.output)))
        timings = {"settings": settings, "base": base}
        (work / "timings.json").write_text(json.dumps(timings, indent=1))
    later = [(name, {"attribute": attribute, "mitigate": mitigate, "copies": copies, "report": report}[name]) for name in LATER_STAGES]
    for mode in args.modes:
        overrides, folder = MODES[mode], work / mode
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(work / "base", folder)
        mode_cfg = base_config(args, testbed, images, str(folder), [*overrides, f"attribution.steps={mode_steps(mode, args.steps)}"])
        timings[mode] = timed(later, mode_cfg, Run(store, RunLayout(str(folder))))
        timings["wall_s"] = round(time.time() - start, 1)
        (work / "timings.json").write_text(json.dumps(timings, indent=1))


def compare(args, testbed: str) -> dict:
    """The comparison of one testbed's two runs (run_testbed's), kept as comparison.json."""
    work = Path(args.work) / testbed
    timings = json.loads((work / "timings.json").read_text())
    analysis = json.loads((work / "base" / "summary.json").read_text())["analysis"]
    result = {"testbed": TESTBEDS[testbed][0], "cpu": cpu_name(), **timings["settings"], "memorized": analysis.get("memorized_count"),
              "base_seconds": timings["base"], "wall_s": timings["wall_s"],
              "modes": {mode: mode_result(str(work / mode), timings[mode]) for mode in MODES}}  # fmt: skip
    result["equal"] = agreement(result["modes"])
    (work / "comparison.json").write_text(json.dumps(result, indent=1))
    return result


def agreement(modes: dict) -> dict:
    """Which of the verdicts and per-strategy conclusions are the same in both modes."""
    sized, full = modes["sized"], modes["exhaustive"]
    out = {f: sized["verdicts"][f] == full["verdicts"][f] for f in FINDINGS}
    for strategy in full["strategies"]:
        a, b = sized["strategies"].get(strategy, {}), full["strategies"][strategy]
        out[f"{strategy} copy"] = a.get("copy") == b["copy"]
        out[f"{strategy} d_mem"] = a.get("d_mem") == b["d_mem"]
    return out


# -- the Markdown section -------------------------------------------------------------------------
def interval(change) -> str:
    if not change or change.get("ci_low") is None:
        return "–"
    return f"{change['mean']:+.2f} [{change['ci_low']:+.2f}, {change['ci_high']:+.2f}] ({change['n']})"


def testbed_markdown(r: dict) -> str:
    sized, full = r["modes"]["sized"], r["modes"]["exhaustive"]
    lines = [f"### {r['testbed']}: {r['prompts']} prompts, T={r['steps']}, top {r['top_percent']}% = {r['memorized']} "
             f"memorized; copies at w = 1, {r['copy_generations']} generations, {r['controls']} controls; {r['cpu']}, "
             f"{r['threads']} threads, wall {r['wall_s'] / 60:.1f} min (the scored run: "
             f"{', '.join(f'{k} {v:.0f} s' for k, v in r['base_seconds'].items())})", "",
             "| finding | sized | exhaustive | equal |", "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {f} | {sized['verdicts'][f]} | {full['verdicts'][f]} | {'yes' if r['equal'][f] else '**no**'} |" for f in FINDINGS]
    lines += ["", "Per strategy at w = 1 (paired against original, 95% interval, (pairs)): copy-rate change and d_mem change "
              "(the scoring guidance), each read as lowers / raises / no change.", "",
              "| strategy | copy rate change, sized | exhaustive | equal | d_mem change, sized | exhaustive | equal |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for strategy, b in full["strategies"].items():
        if strategy == "original":
            continue
        a = sized["strategies"].get(strategy, {})
        lines.append(f"| {strategy} | {a.get('copy', '–')} {interval(a.get('copy_rate_change'))} | {b['copy']} "
                     f"{interval(b['copy_rate_change'])} | {'yes' if r['equal'][f'{strategy} copy'] else '**no**'} | "
                     f"{a.get('d_mem', '–')} {interval(a.get('d_mem_change'))} | {b['d_mem']} {interval(b['d_mem_change'])} | "
                     f"{'yes' if r['equal'][f'{strategy} d_mem'] else '**no**'} |")  # fmt: skip
    stages = list(dict.fromkeys([*full["evaluations"], *sized["evaluations"]]))
    lines += ["", "| counted denoiser evaluations | " + " | ".join(stages) + " | per corpus prompt | wall s (attribute, mitigate, copies, report) |",
              "| --- |" + " --- |" * (len(stages) + 2)]  # fmt: skip
    for mode, m in (("sized", sized), ("exhaustive", full)):
        secs = ", ".join(f"{m['seconds'][s]:.0f}" for s in LATER_STAGES)
        lines.append(f"| {mode} | " + " | ".join(f"{m['evaluations'].get(s, 0):,}" for s in stages) +
                     f" | {m['evaluations_per_prompt']:.1f} | {secs} |")  # fmt: skip
    return "\n".join(lines)


def command(r: dict) -> str:
    testbed = next(name for name, (model, _) in TESTBEDS.items() if model == r["testbed"])
    return (f"`OMP_NUM_THREADS={r['threads']} nice -n 10 PYTHONPATH=$PWD .venv/bin/python bench/sized_vs_exhaustive.py --testbed "
            f"{testbed} --prompts {r['prompts']} --steps {r['steps']} --top-percent {r['top_percent']:g} --controls {r['controls']} "
            f"--copy-generations {r['copy_generations']}{''.join(' ' + o for o in r['overrides'])}`")  # fmt: skip


def table(args) -> str:
    done = [json.loads(p.read_text()) for t in TESTBEDS if (p := Path(args.work) / t / "comparison.json").exists()]
    parts = [SECTION] + [f"Command: {command(r)}, then `--table`.\n\n{testbed_markdown(r)}" for r in done]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", choices=list(TESTBEDS), nargs="+", default=["model"])
    parser.add_argument("--work", default="runs/sized_vs_exhaustive")
    parser.add_argument("--prompts", type=int, default=256, help="corpus.max_reports: the testbed's first training prompts")
    parser.add_argument("--steps", type=int, default=20, help="T: score.steps, mitigation.steps, the exhaustive attribution.steps")
    parser.add_argument("--top-percent", type=float, default=4.0)
    parser.add_argument("--copy-generations", type=int, default=4)
    parser.add_argument("--controls", type=int, default=50)
    parser.add_argument("--reuse-base", action="store_true", help="keep the scored run of an earlier call (same settings)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="the modes to run again (the others' runs and timings are kept from an earlier call)")
    parser.add_argument("--compare", action="store_true", help="only compare the runs already there")
    parser.add_argument("--table", action="store_true", help="write the RESULTS section from the saved comparisons")
    parser.add_argument("--results", default="bench/RESULTS.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.table:
        text = table(args)
        print(text)
        write_results(args.results, SECTION, text)
        return
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for testbed in args.testbed:
        if not args.compare:
            run_testbed(args, testbed)
        result = compare(args, testbed)
        print(json.dumps(result, indent=1))
        print(testbed_markdown(result))


if __name__ == "__main__":
    main()
