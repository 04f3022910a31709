"""Benchmark (not a test): full audits at 10K / 30K / 100K prompts on a local multi-node Ray cluster,
and the pipeline's own ceiling.

A cluster of `--nodes` Ray nodes on loopback (ray.cluster_utils.Cluster: one head and workers, each
`--cpus-per-node` logical CPUs and its own object store) runs, for each size, in a fresh driver
process (so that its peak RSS is its own):

- audit: `cxrmem audit` of a synthetic corpus of about N unique prompts (corpus.synthetic.n_reports =
  synthetic.REPORTS_PER_UNIQUE N = 2.5 N: 250,000 reports give 101,121 unique prompts), the tiny
  model at G=1, T=1, one scoring actor per node,
  attribution and mitigation capped (`--explain` prompts each, one step, two generations).
  Per stage: wall seconds (the audit's timings), and for the whole driver: peak RSS (VmHWM), object
  store peak (cluster total minus available, sampled every second) and bytes spilled (Ray's memory
  summary), the files of the published run (count, bytes), report.html's size and, where a headless
  Chromium is on PATH, the time to load it and to sort its memorized table (report.memorized_rows =
  1% of the prompts, at most 1,000).
- ceiling: prompts.parquet -> Ray Data read -> actor pool -> driver -> part files -> scores.parquet
  with a worker that scores nothing (`NullWorker`: zeros in the scores.parquet layout), the most
  prompts/s any screen can move through this pipeline here.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench/scale.py --sizes 10000 --ceiling 100000
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class NullWorker:
    """An actor with the pool's ModelWorker interface that loads no model: the pipeline without its model."""

    def __init__(self, cfg, store, fingerprint: str = "", need_vae: bool = False, torch_threads=None):
        from cxrmem.score_key import config_hash

        self.fingerprint, self.key = fingerprint, config_hash(cfg)

    def score_block(self, cfg, fingerprint, batch, carried=None):
        from cxrmem.scoring.scorer import UNetWork

        self.fingerprint = fingerprint
        return self(batch), UNetWork()  # no model, no work

    def __call__(self, batch):
        from cxrmem.scoring.scorer import ScoreBatch
        from cxrmem.stages.worker import scores_table

        n = batch.num_rows
        scored = ScoreBatch(np.zeros(n, np.float32), np.zeros((n, 1, 1), np.float32), np.zeros(n, bool), np.zeros(n, int), np.zeros(n, bool))
        return scores_table(batch.column("prompt_id").to_pylist(), batch.column("prompt").to_pylist(), scored, self.fingerprint, self.key)


class Sampler(threading.Thread):
    """Every second: this process's RSS and the cluster's object store in use (peaks kept)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.store_peak = threading.Event(), 0

    def run(self):
        import ray

        while not self.stop.wait(1.0):
            try:
                total = ray.cluster_resources().get("object_store_memory", 0)
                used = total - ray.available_resources().get("object_store_memory", total)
                self.store_peak = max(self.store_peak, used)
            except Exception:  # noqa: BLE001 - the cluster is going down at the end
                pass


def vm_hwm_mb() -> float:
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def spilled_mb() -> float | None:
    try:
        from ray._private.internal_api import memory_summary

        found = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
        return float(found.group(1)) if found else 0.0
    except Exception:  # noqa: BLE001 - an internal API: absent or changed in another Ray
        return None


def run_files(folder: str) -> dict:
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files]
    return {"files": len(sizes), "bytes": int(sum(sizes))}


def browser_timing(report: str) -> dict | None:
    """Seconds to load report.html and to sort its memorized table by one column, in headless Chromium."""
    sys.path.insert(0, ROOT)
    from bench.chromium import Chromium, which_browser

    binary = which_browser()
    if binary is None:
        return None
    browser = Chromium(binary)
    try:
        start = time.perf_counter()
        browser.open(report, 1280, 800)
        loaded = time.perf_counter() - start
        rows = browser.js("document.querySelectorAll('#memorized-table tbody tr').length")
        start = time.perf_counter()
        browser.js("document.querySelectorAll('#memorized-table th')[2].click(); document.body.offsetHeight")
        return {"load_s": loaded, "sort_s": time.perf_counter() - start, "rows": rows}
    finally:
        browser.close()


def child_audit(args) -> dict:
    import ray

    from cxrmem.config import load_config
    from cxrmem.corpus.synthetic import REPORTS_PER_UNIQUE
    from cxrmem.distributed.audit import run_audit

    out = os.path.join(args.work, f"audit_{args.n}")
    rows = min(1000, max(1, args.n // 100))
    cfg = load_config(None, [
        f"run.output={out}", f"model.path={args.model}", "model.device=cpu", "run.overwrite=true",
        f"corpus.synthetic.n_reports={int(REPORTS_PER_UNIQUE * args.n)}", "score.steps=1", "score.generations=1", "score.batch_size=64",
        f"ray.num_workers={args.nodes}", "ray.num_cpus_per_worker=1", "ray.batch_size=256", "ray.checkpoint_every=8192",
        f"attribution.max_prompts={args.explain}", "attribution.steps=1", "attribution.generations=1", "attribution.leave_one_out=false",
        f"mitigation.sample_size={args.explain}", "mitigation.n_generations=2", "mitigation.steps=1", "mitigation.optimisation_iters=1",
        "report.grid_generations=2", f"report.memorized_rows={rows}",
    ])
    ray.init(address=args.address, logging_level="WARNING", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    result = run_audit(cfg)
    wall = time.perf_counter() - start
    sampler.stop.set()
    spilled = spilled_mb()
    ray.shutdown()
    summary = json.load(open(os.path.join(out, "summary.json")))
    report = os.path.join(out, "report.html")
    return {
        "n_target": args.n, "prompts": summary["analysis"]["counts"]["prompts"],
        "memorized": result["memorized_count"], "timings_s": result["timings_s"], "wall_s": wall,
        "driver_peak_rss_mb": vm_hwm_mb(), "object_store_peak_mb": sampler.store_peak / 2**20, "spilled_mb": spilled,
        **run_files(out), "report_bytes": os.path.getsize(report), "browser": browser_timing(report),
    }


def child_ceiling(args) -> dict:
    import ray

    from cxrmem.config import load_config
    from cxrmem.distributed.pipeline import scored_batches
    from cxrmem.runfiles import Run
    from cxrmem.stages import score

    sys.path.insert(0, HERE)
    from ray_bench import write_prompts

    out = os.path.join(args.work, f"ceiling_{args.n}")
    write_prompts(os.path.join(out, "prompts.parquet"), args.n)
    cfg = load_config(None, [f"run.output={out}", f"model.path={args.model}", f"ray.num_workers={args.nodes}",
                             "ray.num_cpus_per_worker=1", f"ray.batch_size={args.ceiling_batch}", "ray.checkpoint_every=16384"])
    ray.init(address=args.address, logging_level="WARNING")
    start = time.perf_counter()
    result = score.run(cfg, Run.of(cfg).with_fingerprint("null"), functools.partial(scored_batches, worker=NullWorker))
    wall = time.perf_counter() - start
    ray.shutdown()
    return {"n": args.n, "wall_s": wall, "prompts_per_s": result.computed / wall, "ray_batch_size": args.ceiling_batch,
            "driver_peak_rss_mb": vm_hwm_mb(), "parts": result.parts_written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,30000,100000", help="unique prompts of the audits, comma-separated ('' for none)")
    parser.add_argument("--ceiling", type=int, default=100000, help="prompts of the ceiling run (0: none)")
    parser.add_argument("--ceiling-batch", type=int, default=4096, help="ray.batch_size of the ceiling run")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs per node: one for its actor, one for Ray Data's read tasks")
    parser.add_argument("--explain", type=int, default=4, help="memorized prompts attributed and mitigated")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for one run before it is stopped")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", choices=["audit", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps((child_audit if args.child == "audit" else child_ceiling)(args)), flush=True)
        return

    import signal

    from ray.cluster_utils import Cluster

    # A stopped bench (timeout, Ctrl-C) still shuts its cluster down: SIGTERM unwinds through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from cxrmem.corpus.synthetic import tokenizer_texts
    from cxrmem.models.tiny import build_tiny_model
    from cxrmem.results_page import cpu_name

    work = tempfile.mkdtemp(prefix="cxrscale")
    model = build_tiny_model(os.path.join(work, "model"), tokenizer_texts(), seed=0)
    node = {"num_cpus": args.cpus_per_node, "object_store_memory": 256 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    for _ in range(args.nodes - 1):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "nodes": args.nodes, "cpus_per_node": args.cpus_per_node, "runs": []}
    jobs = [("ceiling", args.ceiling)] if args.ceiling else []
    jobs += [("audit", int(n)) for n in args.sizes.split(",") if n]
    try:
        for kind, n in jobs:
            command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--address", cluster.address, "--n", str(n),
                       "--work", work, "--model", model, "--nodes", str(args.nodes), "--explain", str(args.explain),
                       "--ceiling-batch", str(args.ceiling_batch)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=args.timeout)
                line = next((out for out in done.stdout.splitlines() if out.startswith("RESULT ")), None)
                run = {"kind": kind, "n": n, **(json.loads(line[7:]) if line else {"error": done.stderr[-2000:]})}
            except subprocess.TimeoutExpired:
                run = {"kind": kind, "n": n, "error": f"stopped after {args.timeout:.0f} s"}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    finally:
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
