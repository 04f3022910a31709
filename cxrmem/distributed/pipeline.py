"""Ray Data scoring: prompts.parquet streams through an actor pool of model workers into part files.

    read_parquet(prompts) -> filter(prompt_id not in done set) -> map_batches(ModelWorker, actor pool)
        -> iter_batches on the driver -> part file every ray.checkpoint_every prompts
        -> consolidate into scores.parquet (sorted by prompt_id)

The driver holds at most one part's rows at a time, then the done set (ids) and the d_mem
column. Ray Data restarts a lost actor and retries its batch; only completed batches reach the
driver, which is what makes every prompt land in exactly one part.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import OmegaConf

from cxrmem import storage
from cxrmem.config import config_hash
from cxrmem.distributed import resume
from cxrmem.distributed.progress import Progress
from cxrmem.distributed.session import pool_size
from cxrmem.distributed.workers import ModelWorker

log = logging.getLogger(__name__)


def with_overrides(cfg, **dotted):
    """A read-only copy of `cfg` with dot-keys replaced (keyword `a__b` is the key `a.b`)."""
    items = [f"{key.replace('__', '.')}={value}" for key, value in dotted.items()]
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))
    OmegaConf.set_readonly(merged, True)
    return merged


def model_fingerprint(cfg) -> str:
    """The fingerprint of cfg.model, computed where the model lives: on a worker node."""
    import ray

    @ray.remote(num_cpus=1)
    def fingerprint(model_cfg, storage_cfg) -> str:
        from cxrmem.models.loading import load_components

        return load_components(model_cfg, storage_cfg).fingerprint

    return ray.get(fingerprint.remote(cfg.model, cfg.storage))


# ---------------------------------------------------------------- scoring


def scored_dataset(cfg, prompts_uri: str, skip_ids: pa.Array):
    """The lazy Ray dataset of scores.parquet rows for the prompts not in `skip_ids`."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    fs, path = storage.filesystem(prompts_uri, cfg.storage)
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["prompt_id", "prompt"])
    if len(skip_ids):
        ds = ds.filter(expr=col("prompt_id").not_in(skip_ids.to_pylist()))
    # Blocks of one batch (streamed, no shuffle): results then reach the driver and the part files
    # batch by batch, and a lost actor costs one batch, not a whole file.
    ds = ds.repartition(target_num_rows_per_block=cfg.ray.batch_size)
    actors, gpus = pool_size(cfg.ray)
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; Ray 2.60 flags every extra remote arg as deprecated.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ds.map_batches(
            ModelWorker,
            fn_constructor_kwargs={"cfg": cfg, "torch_threads": int(cfg.ray.num_cpus_per_worker)},
            batch_size=cfg.ray.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cfg.ray.num_cpus_per_worker,
            num_gpus=gpus or None,
            udf_modifying_row_count=False,
            max_restarts=cfg.ray.max_restarts,
        )


def stream_to_parts(ds, layout: storage.RunLayout, cfg, progress: Progress) -> int:
    """Pull scored batches to the driver and write a part file per ray.checkpoint_every rows."""
    pending: list[pa.Table] = []
    rows = parts = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        pending.append(batch)
        rows += batch.num_rows
        progress.update(batch.num_rows)
        if rows >= cfg.ray.checkpoint_every:
            resume.write_part(pa.concat_tables(pending), layout.score_parts, parts, cfg.storage)
            pending, rows, parts = [], 0, parts + 1
    if pending:
        resume.write_part(pa.concat_tables(pending), layout.score_parts, parts, cfg.storage)
        parts += 1
    return parts


def score_corpus(cfg, fingerprint: str, prompts_uri: Optional[str] = None, what: str = "scored") -> dict:
    """Score every prompt of `prompts_uri` (default: run.output's prompts.parquet) not yet scored
    under (fingerprint, config hash) into run.output's part files, then its scores.parquet.

    Needs a Ray session (see `ray_session`).
    """
    layout = storage.RunLayout(cfg.run.output)
    prompts_uri = prompts_uri or layout.prompts
    key = config_hash(cfg)
    prompt_ids = storage.read_table(prompts_uri, cfg.storage, columns=["prompt_id"])["prompt_id"]
    done = resume.done_ids(resume.score_sources(layout, cfg.storage), fingerprint, key, cfg.storage)
    resumed = int(pc.sum(pc.is_in(prompt_ids, value_set=done)).as_py() or 0)
    progress = Progress(len(prompt_ids) - resumed, what, cfg.ray.progress_every_s, already_done=resumed)
    actors, gpus = pool_size(cfg.ray)
    log.info("%s: %d prompts, %d already done; %d workers x %.2f GPU", what, len(prompt_ids), resumed, actors, gpus)
    parts_written = 0
    if progress.total > 0:
        parts_written = stream_to_parts(scored_dataset(cfg, prompts_uri, done), layout, cfg, progress)
    merged = resume.consolidate(layout, fingerprint, key, cfg.storage)
    return {
        "scores": layout.scores,
        "total": len(prompt_ids),
        "computed": progress.done,
        "resumed": resumed,
        "parts_written": parts_written,
        "rows": merged["rows"],
        "duplicates_dropped": merged["duplicates"],
        "workers": actors,
        "gpus_per_worker": gpus,
        **{key: value for key, value in progress.summary().items() if key not in ("prompts", "resumed")},
        "model_fingerprint": fingerprint,
        "config_hash": key,
    }
