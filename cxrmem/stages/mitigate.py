"""`cxrmem mitigate`: mitigation experiments on the memorized set: mitigation.parquet, image grids, summary["mitigation"]."""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from cxrmem.mitigation import MITIGATION_COLUMNS, mitigation_summary
from cxrmem.runfiles import RunLayout, write_sections
from cxrmem.stages.worker import LocalModel, MitigatePrompts, map_with_progress, memorized_stage, stamped
from cxrmem.storage import Store
from cxrmem.summary import MitigationSection

log = logging.getLogger(__name__)


def save_generation_grid(store: Store, layout: RunLayout, prompt_id: str, grids: dict[str, np.ndarray]) -> str:
    """figures/generations_<prompt_id>.npz: one float32 [k, H, W] array in [0, 1] per strategy."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **grids)
    uri = layout.figure(f"generations_{prompt_id}.npz")
    store.write_bytes(uri, buffer.getvalue())
    return uri


def run(cfg, store: Optional[Store] = None, models: Optional[LocalModel] = None) -> MitigationSection:
    """Mitigate the memorized set with `models` (default: a model with its VAE loaded in this process)."""
    store = store or Store.from_config(cfg.storage)
    with memorized_stage(cfg, store, "mitigate", cfg.mitigation.max_prompts, models, need_vae=True) as (layout, memorized, models, identity):
        # The memorized set is sorted by d_mem: the first `top_prompts` get image grids in the report.
        grid_ids = frozenset(memorized["prompt_id"].head(cfg.report.top_prompts))
        results, seconds = map_with_progress(models, MitigatePrompts(), memorized, "mitigated", cfg.ray.progress_every_s, grid_ids)
        frame = pd.concat([rows for rows, _ in results], ignore_index=True)
        grids = {pid: grid for _, chunk_grids in results for pid, grid in chunk_grids.items()}
        table = pa.Table.from_pandas(frame, schema=pa.schema(MITIGATION_COLUMNS), preserve_index=False)
        store.write_table(stamped(table, identity), layout.mitigation)
        figures = [save_generation_grid(store, layout, pid, grids[pid]) for pid in memorized["prompt_id"] if pid in grids]
        section = MitigationSection(
            strategies=mitigation_summary(frame),
            prompts=int(frame["prompt_id"].nunique()),
            n_generations=cfg.mitigation.n_generations,
            seconds=round(seconds, 2),
            mitigation=layout.mitigation,
            figures=figures,
            model=identity,
        )
        write_sections(store, layout, section)
    log.info("mitigation: %s", section.strategies)
    return section
