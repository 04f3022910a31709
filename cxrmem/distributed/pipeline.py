"""Ray Data scoring: prompts.parquet streams through an actor pool of model workers to the driver.

    read_parquet(prompts) -> filter(prompt_id not in done set) -> map_batches(ModelWorker, actor pool)
        -> iter_batches on the driver -> the score stage's part files -> scores.parquet

`scored_batches` is the score stage's executor on Ray (cxrmem/stages/score.py has the one in
this process). The driver holds at most one part's rows at a time. Ray Data restarts a lost
actor and retries its batch; only completed batches reach the driver, which is what makes every
prompt land in exactly one part.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterator

import pyarrow as pa

from cxrmem.config import with_overrides  # noqa: F401  (re-exported: the distributed modules import it from here)
from cxrmem.distributed.session import pool_size
from cxrmem.stages.worker import ModelWorker
from cxrmem.storage import Store

log = logging.getLogger(__name__)


def scored_batches(
    cfg, store: Store, fingerprint: str, prompts_uri: str, skip_ids: pa.Array, worker: type = ModelWorker
) -> Iterator[pa.Table]:
    """scores.parquet rows of the prompts not in `skip_ids`, streamed from the actor pool. Needs a Ray session.

    `worker` is the actor class (bench/scale.py measures the pipeline's own ceiling with one that scores nothing)."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    fs, path = store.filesystem(prompts_uri)
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["prompt_id", "prompt"])
    if len(skip_ids):
        ds = ds.filter(expr=col("prompt_id").not_in(skip_ids.to_pylist()))
    # Blocks of one batch (streamed, no shuffle): results then reach the driver and the part files
    # batch by batch, and a lost actor costs one batch, not a whole file.
    ds = ds.repartition(target_num_rows_per_block=cfg.ray.batch_size)
    actors, gpus = pool_size(cfg.ray)
    log.info("scoring on %d workers x %.2f GPU", actors, gpus)
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; Ray 2.60 flags every extra remote arg as deprecated.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(
            worker,
            fn_constructor_kwargs={
                "cfg": cfg,
                "store": store,
                "fingerprint": fingerprint,
                "torch_threads": int(cfg.ray.num_cpus_per_worker),
            },
            batch_size=cfg.ray.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cfg.ray.num_cpus_per_worker,
            num_gpus=gpus or None,
            udf_modifying_row_count=False,
            max_restarts=cfg.ray.max_restarts,
        )
    return ds.iter_batches(batch_format="pyarrow", batch_size=None)
