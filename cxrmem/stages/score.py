"""`cxrmem score`: score every prompt of a run not yet scored under (model fingerprint, config hash).

    prompts.parquet -> scored batches -> a part file every ray.checkpoint_every prompts
        -> consolidated into scores.parquet (sorted by prompt_id)

The scored batches come from an executor: `local_batches` maps a ModelWorker over the prompts in
this process; cxrmem/distributed/pipeline.py streams them from a Ray actor pool. Either way the
part files are the unit of resume, so an interrupted run rescored with the same settings scores
only what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from cxrmem import storage
from cxrmem.interrupts import note_scored, stop_requested
from cxrmem.progress import Progress
from cxrmem.publish import stage_writes
from cxrmem.runfiles import Run, RunLayout
from cxrmem.score_key import config_hash, effective_precision
from cxrmem.scoring.device import Precision, planned_device
from cxrmem.scoring.scorer import UNetWork
from cxrmem.settings import with_overrides
from cxrmem.stages import score_parts
from cxrmem.stages.results import ScoreResult
from cxrmem.stages.worker import ModelWorker
from cxrmem.storage import Store

log = logging.getLogger(__name__)

# (cfg, store, fingerprint, prompts_uri, ids to skip, work=tally) -> scored batches (scores.parquet rows); the
# executor adds the model work of every batch it yields to the tally (cxrmem/scoring/scorer.py UNetWork).
ScoredBatches = Callable[..., Iterator[pa.Table]]


def local_batches(
    cfg, store: Store, fingerprint: str, prompts_uri: str, skip_ids: pa.Array, carry=None, *, work: UNetWork
) -> Iterator[pa.Table]:
    """Scored batches from one ModelWorker in this process, their model work added to `work`; `carry`: trajectories
    it continues (the cascade, cxrmem/stages/continuation.py)."""
    prompts = store.read_table(prompts_uri, columns=["prompt_id", "prompt"])
    if len(skip_ids):
        prompts = prompts.filter(pc.invert(pc.is_in(prompts["prompt_id"], value_set=skip_ids)))
    worker = ModelWorker(cfg, store, fingerprint, carry=carry)
    for lo in range(0, prompts.num_rows, cfg.score.batch_size):
        table, spent = worker.measured(worker, prompts.slice(lo, cfg.score.batch_size))
        work += spent
        yield table


def stream_to_parts(store: Store, batches: Iterator[pa.Table], layout: RunLayout, every: int, progress: Progress) -> int:
    """Write the scored batches as a part file per `every` rows; the number of parts written.

    Interrupted (SIGTERM / SIGINT), the batches already received are written as one more part
    before the stop goes on: a resumed run does not score them again.
    """
    pending: list[pa.Table] = []
    rows = parts = 0
    try:
        for batch in batches:
            pending.append(batch)
            rows += batch.num_rows
            progress.update(batch.num_rows)
            note_scored(progress.already_done + progress.done, progress.already_done + progress.total)
            if rows >= every:
                score_parts.write_part(store, pa.concat_tables(pending), layout.score_parts, parts)
                pending, rows, parts = [], 0, parts + 1
    except BaseException:
        if stop_requested() and pending:  # SIGTERM / SIGINT (as whatever exception it reached us)
            score_parts.write_part(store, pa.concat_tables(pending), layout.score_parts, parts)
            log.warning("interrupted: the %d prompts scored since the last part are kept in one more part", rows)
        raise
    if pending:
        score_parts.write_part(store, pa.concat_tables(pending), layout.score_parts, parts)
        parts += 1
    return parts


def with_planned_device(cfg):
    """cfg with model.device made concrete once, here on the driver: the resume key hashes the precision the
    workers compute in, and each worker gets the same device (one meant for CUDA refuses if it cannot use it)."""
    on_ray = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # the Ray executor runs in a Ray session
    device = planned_device(cfg.model.device, on_ray, cfg.ray.num_gpus_per_worker)
    return cfg if device == cfg.model.device else with_overrides(cfg, model__device=device)


PRECISION_RECORD = "precision.json"  # beside the score parts: the precision they were computed in


def keep_one_precision(store: Store, layout: RunLayout, precision: Precision) -> None:
    """Refuse to resume score parts computed in another effective precision (bfloat16 against float32 differs
    by up to 16% of d_mem on the testbed: bench/RESULTS.md); record this run's precision for the next resume."""
    record = storage.join(layout.score_parts, PRECISION_RECORD)
    parts = store.list_files(layout.score_parts, suffix=".parquet")
    if parts and store.exists(record):
        before = Precision(**store.read_json(record))
        if before != precision:
            raise ValueError(
                f"the {len(parts)} score parts under {layout.score_parts} were computed in {before.describe()}; this run "
                f"would compute in {precision.describe()}. Resume with the same precision (model.dtype={before.dtype} "
                f"model.device={before.device} model.tf32={str(before.tf32).lower()}), or delete {layout.score_parts} "
                "to score everything again in the new one"
            )
    store.write_json(record, dataclasses.asdict(precision))


def fingerprinted(cfg, out: Optional[Run]) -> Run:
    """`out` (default: the run at cfg.run.output) with the fingerprint of cfg.model once known: a run alone
    computes it here, the audit once for every stage."""
    out = out or Run.of(cfg)
    if out.fingerprint is not None:
        return out
    from cxrmem.models.loading import fingerprint_model

    return out.with_fingerprint(fingerprint_model(cfg.model, out.store))


def run(
    cfg,
    out: Optional[Run] = None,
    scored_batches: ScoredBatches = local_batches,
    prompts_uri: Optional[str] = None,
    what: str = "scored",
    cost: Optional[str] = "score",
) -> ScoreResult:
    """Score the prompts of `prompts_uri` (default: the run's prompts.parquet) into the run's scores.parquet, with
    the model `out.fingerprint` names (computed here when unknown). The model work counted (`work` in the result)
    is recorded in summary.json's cost section as stage `cost` (None: a part of a stage that records its own,
    the cascade's screens or the reference)."""
    out = fingerprinted(cfg, out)
    store, layout, fingerprint = out.store, out.layout, out.fingerprint
    prompts_uri = prompts_uri or layout.prompts
    if not store.exists(prompts_uri):
        raise FileNotFoundError(f"{prompts_uri} does not exist; run `cxrmem prepare` for this run first")
    cfg = with_planned_device(cfg)
    key = config_hash(cfg)
    with stage_writes(store, cfg.run, "score"):
        keep_one_precision(store, layout, effective_precision(cfg))
        prompt_ids = store.read_table(prompts_uri, columns=["prompt_id"])["prompt_id"]
        done = score_parts.done_ids(store, score_parts.score_sources(store, layout), fingerprint, key)
        resumed = int(pc.sum(pc.is_in(prompt_ids, value_set=done)).as_py() or 0)
        progress = Progress(len(prompt_ids) - resumed, what, cfg.ray.progress_every_s, already_done=resumed)
        log.info("%s: %d prompts, %d already done", what, len(prompt_ids), resumed)
        note_scored(resumed, len(prompt_ids))
        parts_written, work = 0, UNetWork()
        if progress.total > 0:
            batches = scored_batches(cfg, store, fingerprint, prompts_uri, done, work=work)
            parts_written = stream_to_parts(store, batches, layout, cfg.ray.checkpoint_every, progress)
        merged = score_parts.consolidate(store, layout, fingerprint, key)
        if cost is not None:
            out.record_cost(cost, work.to_json())
    timing = progress.summary()
    return ScoreResult(
        scores=layout.scores, total=len(prompt_ids), computed=progress.done, resumed=resumed, parts_written=parts_written,
        rows=merged["rows"], duplicates_dropped=merged["duplicates"], seconds=timing["seconds"], prompts_per_s=timing["prompts_per_s"],
        startup_s=timing["startup_s"], prompts_per_s_after_startup=timing["prompts_per_s_after_startup"],
        model_fingerprint=fingerprint, config_hash=key, work=work.to_json(),
    )
