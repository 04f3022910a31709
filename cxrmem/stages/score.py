"""`cxrmem score`: score every prompt of a run not yet scored under (model fingerprint, config hash).

    prompts.parquet -> scored batches -> a part file every ray.checkpoint_every prompts
        -> consolidated into scores.parquet (sorted by prompt_id)

The scored batches come from an executor: `local_batches` maps a ModelWorker over the prompts in
this process; cxrmem/distributed/pipeline.py streams them from a Ray actor pool. Either way the
part files are the unit of resume, so an interrupted run rescored with the same settings scores
only what is missing.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from cxrmem.config import config_hash
from cxrmem.interrupts import note_scored, stop_requested
from cxrmem.progress import Progress
from cxrmem.publish import stage_writes
from cxrmem.runfiles import RunLayout
from cxrmem.stages import score_parts
from cxrmem.stages.worker import ModelWorker
from cxrmem.storage import Store

log = logging.getLogger(__name__)

# (cfg, store, fingerprint, prompts_uri, ids to skip) -> scored batches (scores.parquet rows)
ScoredBatches = Callable[[object, Store, str, str, pa.Array], Iterator[pa.Table]]


def local_batches(cfg, store: Store, fingerprint: str, prompts_uri: str, skip_ids: pa.Array, carry=None) -> Iterator[pa.Table]:
    """Scored batches from one ModelWorker in this process; `carry`: trajectories it continues (the cascade,
    cxrmem/stages/continuation.py)."""
    prompts = store.read_table(prompts_uri, columns=["prompt_id", "prompt"])
    if len(skip_ids):
        prompts = prompts.filter(pc.invert(pc.is_in(prompts["prompt_id"], value_set=skip_ids)))
    worker = ModelWorker(cfg, store, fingerprint, carry=carry)
    for lo in range(0, prompts.num_rows, cfg.score.batch_size):
        yield worker(prompts.slice(lo, cfg.score.batch_size))


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


def run(
    cfg,
    store: Optional[Store] = None,
    fingerprint: Optional[str] = None,
    scored_batches: ScoredBatches = local_batches,
    prompts_uri: Optional[str] = None,
    what: str = "scored",
) -> dict:
    """Score the prompts of `prompts_uri` (default: the run's prompts.parquet) into the run's scores.parquet."""
    store = store or Store.from_config(cfg.storage)
    from cxrmem.models.loading import fingerprint_model

    layout = RunLayout(cfg.run.output)
    prompts_uri = prompts_uri or layout.prompts
    if not store.exists(prompts_uri):
        raise FileNotFoundError(f"{prompts_uri} does not exist; run `cxrmem prepare` for this run first")
    fingerprint = fingerprint or fingerprint_model(cfg.model, store)
    key = config_hash(cfg)
    with stage_writes(store, cfg.run, "score"):
        prompt_ids = store.read_table(prompts_uri, columns=["prompt_id"])["prompt_id"]
        done = score_parts.done_ids(store, score_parts.score_sources(store, layout), fingerprint, key)
        resumed = int(pc.sum(pc.is_in(prompt_ids, value_set=done)).as_py() or 0)
        progress = Progress(len(prompt_ids) - resumed, what, cfg.ray.progress_every_s, already_done=resumed)
        log.info("%s: %d prompts, %d already done", what, len(prompt_ids), resumed)
        note_scored(resumed, len(prompt_ids))
        parts_written = 0
        if progress.total > 0:
            batches = scored_batches(cfg, store, fingerprint, prompts_uri, done)
            parts_written = stream_to_parts(store, batches, layout, cfg.ray.checkpoint_every, progress)
        merged = score_parts.consolidate(store, layout, fingerprint, key)
    return {
        "scores": layout.scores,
        "total": len(prompt_ids),
        "computed": progress.done,
        "resumed": resumed,
        "parts_written": parts_written,
        "rows": merged["rows"],
        "duplicates_dropped": merged["duplicates"],
        **{name: value for name, value in progress.summary().items() if name not in ("prompts", "resumed")},
        "model_fingerprint": fingerprint,
        "config_hash": key,
    }
