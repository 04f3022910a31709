"""Benchmarks of the Ray service (not tests): run `python bench/ray_bench.py`, read the printed tables.

1. throughput: the Ray Data pipeline (in-process Ray, one actor on the machine's cores) against
   the single-process scorer on the same prompts and model, side by side, with the ratio;
2. driver memory: the driver's peak RSS for a small and a large corpus. The large corpus is made
   resumable: all but `--memory-scored` prompts are already in part files (written by this
   parent process, not the measured driver), so the driver does everything a 100K-prompt run
   asks of it (done set, anti-join, streaming, k-way consolidation of every row, the d_mem
   column for the analysis) while scoring only a few prompts on these CPUs.

The cascade's recall against its cost is bench/cascade_frontier.py's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrmem.config import load_config
from cxrmem.models.loading import fingerprint_model
from cxrmem.runfiles import RunLayout
from cxrmem.score_key import config_hash
from cxrmem.storage import Store

log = logging.getLogger("ray_bench")


def write_prompts(path: str, n: int) -> None:
    """n distinct report-like prompts with the prompts.parquet columns the analysis reads."""
    from cxrmem.corpus.synthetic import generate_reports
    from cxrmem.corpus.text import prompt_id

    impressions = [r["impression"] for r in generate_reports(min(n, 2000), seed=0)]
    texts = [f"{impressions[i % len(impressions)]} Study {i}." for i in range(n)]
    table = pa.table(
        {
            "prompt_id": [prompt_id(t) for t in texts],
            "prompt": texts,
            "n_reports": np.ones(n, np.int32),
            "has_marker": np.array(["___" in t for t in texts]),
            "n_markers": np.array([t.count("___") for t in texts], np.int32),
        }
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


def bench_config(output: str, model: str, args, *extra: str):
    return load_config(
        None,
        [
            f"run.output={output}",
            f"model.path={model}",
            f"score.steps={args.steps}",
            f"score.generations={args.generations}",
            f"score.batch_size={args.batch_size}",
            f"ray.batch_size={args.batch_size * 4}",
            "ray.num_workers=1",
            f"ray.num_cpus_per_worker={args.cpus}",
            "ray.progress_every_s=10",
            *extra,
        ],
    )


# ---------------------------------------------------------------- 1. throughput


def throughput(args, model: str, work: str) -> dict:
    import torch

    from cxrmem.distributed.pipeline import scored_batches
    from cxrmem.distributed.session import ray_session
    from cxrmem.stages import score
    from cxrmem.stages.worker import ModelWorker

    run = os.path.join(work, "throughput")
    write_prompts(os.path.join(run, "prompts.parquet"), args.prompts)
    cfg = bench_config(run, model, args)
    table = pq.read_table(os.path.join(run, "prompts.parquet"), columns=["prompt_id", "prompt"])

    # Both sides are timed from "nothing loaded": the single process loads its model, the pipeline
    # starts its actor (a process, imports, the model) before the first batch.
    torch.set_num_threads(args.cpus)
    start = time.perf_counter()
    worker = ModelWorker(cfg, Store(), fingerprint_model(cfg.model))
    load_s = time.perf_counter() - start
    worker(table)
    single = args.prompts / (time.perf_counter() - start)
    single_scoring = args.prompts / (time.perf_counter() - start - load_s)
    del worker

    with ray_session(cfg.ray):
        result = score.run(cfg, scored_batches=scored_batches)
    return {
        "prompts": args.prompts,
        "single_process_prompts_per_s": round(single, 3),
        "single_process_load_s": round(load_s, 2),
        "ray_prompts_per_s": result.prompts_per_s,
        "ray_startup_s": result.startup_s,
        "ratio": round(result.prompts_per_s / single, 3),
        "single_process_prompts_per_s_after_load": round(single_scoring, 3),
        "ray_prompts_per_s_after_startup": result.prompts_per_s_after_startup,
        "ratio_after_startup": round(result.prompts_per_s_after_startup / single_scoring, 3),
    }


# ---------------------------------------------------------------- 2. driver memory


def prefill_parts(cfg, fingerprint: str, n_done: int) -> None:
    """Part files for the first n_done prompts, as an interrupted run would have left them."""
    from cxrmem.stages import score_parts

    layout = RunLayout(cfg.run.output)
    prompts = pq.read_table(layout.prompts, columns=["prompt_id", "prompt"]).slice(0, n_done)
    rng = np.random.default_rng(0)
    g, t = cfg.score.generations, cfg.score.steps
    for sequence, lo in enumerate(range(0, n_done, cfg.ray.checkpoint_every)):
        chunk = prompts.slice(lo, cfg.ray.checkpoint_every)
        norms = rng.random((chunk.num_rows, g, t), dtype=np.float32)
        part = pa.table(
            {
                "prompt_id": chunk["prompt_id"],
                "prompt": chunk["prompt"],
                "d_mem": pa.array(norms.mean(axis=(1, 2)), pa.float32()),
                "step_norms": pa.array(norms.tolist(), pa.list_(pa.list_(pa.float32()))),
                "nonfinite": pa.array(np.zeros(chunk.num_rows, bool)),
                "n_tokens": pa.array(np.full(chunk.num_rows, 20, np.int32)),
                "truncated": pa.array(np.zeros(chunk.num_rows, bool)),
                "model_fingerprint": pa.array([fingerprint] * chunk.num_rows),
                "config_hash": pa.array([config_hash(cfg)] * chunk.num_rows),
            }
        )
        score_parts.write_part(Store(), part, layout.score_parts, sequence)


def driver_memory(args, model: str, work: str, n: int) -> dict:
    """Prepare a corpus of n prompts and measure a fresh driver process on it."""
    run = os.path.join(work, f"memory-{n}")
    write_prompts(os.path.join(run, "prompts.parquet"), n)
    cfg = bench_config(run, model, args)
    prefill_parts(cfg, fingerprint_model(cfg.model), max(0, n - args.memory_scored))
    command = [sys.executable, __file__, "--measure-driver", run, "--model", model, *sys.argv[1:]]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the measured driver failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: reset VmHWM to the current RSS


def measure_driver(args, run: str, model: str) -> None:
    """In a fresh process: score what is left, consolidate, analyse; print peak RSS as JSON."""
    from cxrmem.distributed.pipeline import scored_batches
    from cxrmem.distributed.session import ray_session
    from cxrmem.stages import analyze, score

    cfg = bench_config(run, model, args, "analyze.top_percent=1")
    with ray_session(cfg.ray):
        baseline_kb = status_kb("VmRSS")
        reset_peak_rss()  # the peak from here on: what the run itself adds to a connected driver
        result = score.run(cfg, scored_batches=scored_batches)
        analyze.run(cfg)
        peak_kb = status_kb("VmHWM")
    print(
        json.dumps(
            {
                "prompts": result.total,
                "scored_now": result.computed,
                "resumed": result.resumed,
                "rows_consolidated": result.rows,
                "driver_rss_after_ray_init_mb": round(baseline_kb / 1024, 1),
                "driver_peak_rss_mb_since_init": round(peak_kb / 1024, 1),
                "driver_peak_rss_mb_lifetime": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers model folder (default: a tiny model built here)")
    # One thread each by default: on a shared 2-core machine, 2 OpenMP threads per process measured
    # 5x slower than 1 (spin-waiting threads that other processes preempt).
    parser.add_argument("--cpus", type=int, default=1, help="torch threads of the single process and of the Ray actor")
    parser.add_argument("--prompts", type=int, default=1024, help="prompts of the throughput comparison")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per UNet call (x4 per Ray batch)")
    parser.add_argument("--memory-sizes", default="1000,100000", help="corpus sizes of the driver-memory runs")
    parser.add_argument("--memory-scored", type=int, default=1000, help="prompts actually scored in each memory run")
    parser.add_argument("--only", choices=["throughput", "memory"], action="append")
    parser.add_argument("--measure-driver", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    if args.measure_driver:
        measure_driver(args, args.measure_driver, args.model)
        return
    work = tempfile.mkdtemp(prefix="ray_bench_")
    model = args.model
    if model is None:
        from cxrmem.corpus.synthetic import tokenizer_texts
        from cxrmem.models.tiny import build_tiny_model

        model = build_tiny_model(os.path.join(work, "tiny"), tokenizer_texts(), seed=0)
    only = set(args.only or ["throughput", "memory"])
    if "throughput" in only:
        t = throughput(args, model, work)
        print(f"\nthroughput, {t['prompts']} prompts, {args.cpus} CPU threads, steps={args.steps}, G={args.generations}")
        print(f"  {'':<16}{'end to end':>14}{'after start-up':>16}  start-up")
        print(f"  {'single process':<16}{t['single_process_prompts_per_s']:>14.2f}"
              f"{t['single_process_prompts_per_s_after_load']:>16.2f}  {t['single_process_load_s']} s (model load)")
        print(f"  {'Ray pipeline':<16}{t['ray_prompts_per_s']:>14.2f}{t['ray_prompts_per_s_after_startup']:>16.2f}"
              f"  {t['ray_startup_s']} s (actor, model, first batch)")
        print(f"  {'ratio Ray/single':<16}{t['ratio']:>14.2f}{t['ratio_after_startup']:>16.2f}")
    if "memory" in only:
        print(f"\ndriver peak RSS (score {args.memory_scored} prompts, resume the rest, consolidate all, analyse)")
        for n in [int(v) for v in args.memory_sizes.split(",")]:
            m = driver_memory(args, model, work, n)
            print(f"  {m['prompts']:>8} prompts: RSS after ray.init {m['driver_rss_after_ray_init_mb']:>7.1f} MB,"
                  f" peak during the run {m['driver_peak_rss_mb_since_init']:>7.1f} MB"
                  f" (lifetime peak {m['driver_peak_rss_mb_lifetime']:.1f} MB; {m['rows_consolidated']} rows consolidated)")


if __name__ == "__main__":
    main()
