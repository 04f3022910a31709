"""The image index job on Ray: the stage's chunks of images embedded by a Ray Data actor pool.

    from_pandas(one block per part) -> map_batches(IndexWorker, actor pool) -> iter_batches on the driver

`ray_rows` is the copies stage's index executor on Ray (cxrmem/stages/image_index.py has the one in
this process, and writes the parts either way). Each actor loads the embedder once.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterator, Optional

import pandas as pd
import pyarrow as pa

from cxrmem.distributed.session import pool_size
from cxrmem.storage import Store

log = logging.getLogger(__name__)


class IndexWorker:
    """One embedder, loaded once; maps a batch of image rows (part, image_id, path) to embedded rows."""

    def __init__(self, cfg, store: Store, torch_threads: Optional[int] = None):
        import torch

        from cxrmem.copies.embedders import make_embedder
        from cxrmem.scoring.device import resolve_device
        from cxrmem.stages.worker import embedder_settings

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.store = store
        self.embedder = make_embedder(embedder_settings(cfg), resolve_device(cfg.model.device))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cxrmem.copies.index import embedded_rows

        return embedded_rows(self.embedder, batch.to_pandas(), self.store.read_bytes)


def ray_rows(cfg, store: Store, chunks: list[pd.DataFrame]) -> Iterator[pa.Table]:
    """Embedded rows of the chunks (one per part), streamed from an actor pool. Needs a Ray session."""
    import ray
    from ray.data import ActorPoolStrategy

    actors, gpus = pool_size(cfg.ray, cfg.model.device)
    log.info("image index: %d parts on %d workers", len(chunks), actors)
    ds = ray.data.from_pandas([c[["part", "image_id", "path"]] for c in chunks])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")  # as in pipeline.py
        ds = ds.map_batches(
            IndexWorker,
            fn_constructor_kwargs={"cfg": cfg, "store": store, "torch_threads": int(cfg.ray.num_cpus_per_worker)},
            batch_size=cfg.images.part_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=max(1, min(actors, len(chunks)))),
            num_cpus=cfg.ray.num_cpus_per_worker,
            num_gpus=gpus or None,
            max_restarts=cfg.ray.max_restarts,
        )
    return ds.iter_batches(batch_format="pyarrow", batch_size=None)
