"""`cxrmem audit` on Ray: prepare, score, analyze, attribute, mitigate, report, publish.

Scoring streams the corpus through a Ray Data actor pool (pipeline.py). The driver then reads
only the d_mem column (analysis), and sends the small memorized set to a few actors of the same
worker class, each loading the model once for both attribution and mitigation. The run is
published (manifest written last) only when every stage has finished; a failed run leaves no
manifest, and rerunning it resumes from its score parts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import pandas as pd

from cxrmem import storage
from cxrmem.attribution import merge_summary
from cxrmem.config import config_hash
from cxrmem.distributed.pipeline import model_fingerprint, score_corpus, with_overrides
from cxrmem.distributed.session import pool_size, ray_session
from cxrmem.distributed.workers import ModelWorker

log = logging.getLogger(__name__)


class StageTimer:
    """Wall seconds per stage, in run order, for summary.json."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        log.info("audit: %s ...", stage)
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 2)
        log.info("audit: %s done in %.1f s", stage, self.seconds[stage])


# ---------------------------------------------------------------- the memorized set on actors


def start_actors(cfg, n_prompts: int, need_vae: bool) -> list:
    import ray

    actors, gpus = pool_size(cfg.ray)
    worker = ray.remote(ModelWorker).options(
        num_cpus=cfg.ray.num_cpus_per_worker,
        num_gpus=gpus,
        max_restarts=cfg.ray.max_restarts,
        max_task_retries=-1 if cfg.ray.max_restarts else 0,  # a restarted actor reruns the lost chunk
    )
    count = max(1, min(actors, n_prompts))
    return [worker.remote(cfg, need_vae=need_vae, torch_threads=int(cfg.ray.num_cpus_per_worker)) for _ in range(count)]


def map_on_actors(actors: list, method: str, prompts: pd.DataFrame, *args) -> list:
    """`method(prompt_ids, prompts, *args)` on chunks spread over the actors; results in input order."""
    from ray.util import ActorPool

    # A few chunks per actor balance uneven prompts; always at least one so the result has its schema.
    size = max(1, math.ceil(len(prompts) / (4 * len(actors))))
    chunks = [prompts.iloc[lo : lo + size] for lo in range(0, max(len(prompts), 1), size)]
    pool = ActorPool(actors)
    return list(
        pool.map(
            lambda actor, chunk: getattr(actor, method).remote(chunk["prompt_id"].tolist(), chunk["prompt"].tolist(), *args),
            chunks,
        )
    )


def attribute_on_actors(actors: list, memorized: pd.DataFrame, cfg, layout: storage.RunLayout) -> dict:
    from cxrmem.attribution import write_attribution

    start = time.perf_counter()
    chosen = memorized.head(cfg.attribution.max_prompts) if cfg.attribution.max_prompts else memorized
    tokens = pd.concat(map_on_actors(actors, "attribute", chosen), ignore_index=True)
    return write_attribution(layout, tokens, time.perf_counter() - start, cfg.storage)


def mitigate_on_actors(actors: list, memorized: pd.DataFrame, cfg, layout: storage.RunLayout) -> dict:
    """As `cxrmem mitigate` (mitigation.mitigate_run), with the prompts spread over the actors."""
    from cxrmem.mitigation import save_generation_grid, write_mitigation

    start = time.perf_counter()
    chosen = memorized.head(cfg.mitigation.max_prompts) if cfg.mitigation.max_prompts else memorized
    # The memorized set is sorted by d_mem: the first `top_prompts` get image grids in the report.
    grid_ids = frozenset(chosen["prompt_id"].head(cfg.report.top_prompts))
    results = map_on_actors(actors, "mitigate", chosen, grid_ids)
    frame = pd.concat([rows for rows, _ in results], ignore_index=True)
    grids = {pid: grid for _, chunk_grids in results for pid, grid in chunk_grids.items()}
    figures = [save_generation_grid(layout, pid, grids[pid], cfg.storage) for pid in chosen["prompt_id"] if pid in grids]
    return write_mitigation(layout, frame, figures, time.perf_counter() - start, cfg)


def explain_memorized(cfg, timer: "StageTimer") -> dict:
    """tokens.parquet and mitigation.parquet for the memorized set, on one set of actors."""
    import ray

    from cxrmem.attribution import read_memorized

    results: dict = {}
    if not (cfg.attribution.enabled or cfg.mitigation.enabled):
        return results
    layout = storage.RunLayout(cfg.run.output)
    memorized = read_memorized(layout, cfg.storage, None)
    actors = start_actors(cfg, len(memorized), need_vae=cfg.mitigation.enabled)
    try:
        if cfg.attribution.enabled:
            with timer("attribute"):
                results["attribution"] = attribute_on_actors(actors, memorized, cfg, layout)
        if cfg.mitigation.enabled:
            with timer("mitigate"):
                results["mitigation"] = mitigate_on_actors(actors, memorized, cfg, layout)
    finally:
        for actor in actors:
            ray.kill(actor)
    return results


# ---------------------------------------------------------------- the audit


def run_audit(cfg) -> dict:
    """Every stage of one run at `run.output`, published at the end; returns the run's summary."""
    from cxrmem.analysis import analyze
    from cxrmem.publish import prepare_output, publish_run

    output = cfg.run.output
    work = prepare_output(output, cfg.storage, overwrite=cfg.run.overwrite)
    cfg = with_overrides(cfg, run__output=work)
    layout = storage.RunLayout(work)
    timer = StageTimer()
    start = time.perf_counter()
    with ray_session(cfg.ray):
        from cxrmem.corpus.prepare import check_same_corpus, prepare

        if storage.exists(layout.prompts, cfg.storage):
            check_same_corpus(cfg)  # resuming: the prompts must come from this config's corpus
        else:
            with timer("prepare"):
                prepare(cfg)
        with timer("fingerprint"):
            fingerprint = model_fingerprint(cfg)
        analysis_cfg = cfg
        with timer("score"):
            if cfg.cascade.enabled:
                from cxrmem.distributed.cascade import analysis_top_percent, run_cascade

                scoring = run_cascade(cfg, fingerprint)
                # scores.parquet holds the screened share only: the same top share of the whole corpus.
                analysis_cfg = with_overrides(cfg, analyze__top_percent=analysis_top_percent(cfg))
            else:
                scoring = score_corpus(cfg, fingerprint)
        with timer("analyze"):
            analysis = analyze(analysis_cfg)
        explained = explain_memorized(cfg, timer)
    audit = {
        "output": output,
        "scoring": scoring,
        "memorized_count": analysis["memorized_count"],
        "threshold": analysis["threshold"],
        "timings_s": timer.seconds,
    }
    merge_summary(layout, "audit", audit, cfg.storage)  # the report shows it
    with timer("report"):
        from cxrmem.report import build_report

        report = build_report(cfg)
    audit["timings_s"] = {**timer.seconds, "total": round(time.perf_counter() - start, 2)}
    merge_summary(layout, "audit", audit, cfg.storage)  # before publishing: the manifest checksums it
    with timer("publish"):
        manifest = publish_run(output, work, cfg.storage, fingerprint, cfg, extra={"config_hash": config_hash(cfg)})
    audit["timings_s"]["publish"] = timer.seconds["publish"]
    return {
        **audit,
        "model_fingerprint": fingerprint,
        "files": len(manifest["files"]),
        "report": report.get("report"),
        "explained": {stage: summary.get("prompts") for stage, summary in explained.items()},
    }

