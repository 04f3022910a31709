"""`prepare` on the real IU X-ray reports and on synthetic MIMIC-style corpora of growing size.

    python bench/prepare_bench.py [--sizes 100000 1000000] [--model DIR]

Each case runs in a fresh process, so that its peak RSS (getrusage ru_maxrss) is its own. Prints
the IU X-ray corpus statistics, then one line per synthetic size: reports/s (wall) with the ratio
to the smallest size (linear scaling keeps it near 1.0x), reports per CPU-second (fair on a
shared machine; includes imports and tokenizer loading), time per stage and peak memory.
Without --model a tiny diffusers model is built (its WordPiece tokenizer counts the tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_case(case: str, model: str, output: str, n_reports: int) -> dict:
    from cxrmem.config import load_config
    from cxrmem.stages import prepare

    overrides = [f"model.path={model}", f"run.output={output}", f"corpus.source={case}"]
    if case == "synthetic":
        overrides += [f"corpus.synthetic.n_reports={n_reports}", "corpus.progress_every=250000"]
    summary = prepare.run(load_config(None, overrides)).to_json()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    summary["cpu_s"] = usage.ru_utime + usage.ru_stime  # the machine may be shared: CPU time is the fair measure
    return summary


def in_subprocess(case: str, model: str, output: str, n_reports: int = 0) -> dict:
    command = [sys.executable, __file__, "--case", case, "--model", model, "--output", output, "--n", str(n_reports)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--model", help="diffusers model folder whose tokenizer counts tokens (default: a tiny one)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.model, args.output, args.n), default=str))
        return

    work = tempfile.mkdtemp(prefix="prepare_bench_")
    model = args.model
    if model is None:
        from cxrmem.corpus.synthetic import tokenizer_texts
        from cxrmem.models.tiny import build_tiny_model

        model = build_tiny_model(os.path.join(work, "model"), tokenizer_texts())

    iu = in_subprocess("iuxray", model, os.path.join(work, "iuxray"))
    print("IU X-ray (torchxrayvision NLMCXR_reports.tgz)")
    print(f"  reports read           {iu['reports_read']}")
    print(f"  reports with a prompt  {iu['reports_with_prompt']}  (skipped: {iu['skipped']})")
    print(f"  unique prompts         {iu['prompts_unique']}  ({iu['prompts_single_report']} seen once)")
    print(f"  share with markers     {iu['marker_share_unique']:.1%} of unique prompts, {iu['marker_share_reports']:.1%} of reports")
    print(f"  sections used          {iu['sections']}")
    print("  most duplicated prompts:")
    for top in iu["top_duplicated"]:
        print(f"    {top['n_reports']:5d}  {top['prompt']}")

    print("\nsynthetic MIMIC-style corpus (prepare end to end: generate, extract, dedup, tokenize, write)")
    print(
        f"  {'reports':>9} {'unique':>8} {'reports/s':>10} {'ratio':>6} {'per CPU-s':>10} {'read s':>7} "
        f"{'tokenize s':>10} {'total s':>8} {'CPU s':>7} {'peak RSS MB':>11}"
    )
    base = None
    for n in args.sizes:
        s = in_subprocess("synthetic", model, os.path.join(work, f"synthetic_{n}"), n)
        base = base or s["reports_per_s"]
        seconds = s["seconds"]
        print(
            f"  {s['reports_read']:>9} {s['prompts_unique']:>8} {s['reports_per_s']:>10.0f} {s['reports_per_s'] / base:>5.2f}x "
            f"{s['reports_read'] / s['cpu_s']:>10.0f} {seconds['read']:>7.1f} {seconds['tokenize']:>10.1f} "
            f"{seconds['total']:>8.1f} {s['cpu_s']:>7.1f} {s['peak_rss_mb']:>11.0f}"
        )
    print(f"\noutputs under {work}")


if __name__ == "__main__":
    main()
