"""The cascade (cxrmem/stages/cascade.py) on Ray: the same stages, scored by the actor pool."""

from __future__ import annotations

from cxrmem.distributed.pipeline import scored_batches
from cxrmem.stages import score
from cxrmem.stages.cascade import (  # noqa: F401  (the names callers of the Ray path use)
    CASCADE_DIR,
    cascade_cost,
    dmem_cost,
    plan,
    screening_cost,
    stage_column,
    stage_config,
)
from cxrmem.stages.cascade import run_cascade as _run_cascade
from cxrmem.storage import Store


def screening_config(cfg, output: str):
    """The first stage's config (see cxrmem/stages/cascade.py)."""
    return stage_config(cfg, output, plan(cfg)[0])


def screening_column(cfg) -> str:
    """The scores.parquet column the first stage selects on."""
    return stage_column(plan(cfg)[0].screen)


def run_cascade(cfg, store: Store, fingerprint: str, batches: score.ScoredBatches = scored_batches) -> dict:
    """The cascade with Ray's actor pool as the executor (needs a Ray session); tests pass `score.local_batches`."""
    return _run_cascade(cfg, store, fingerprint, batches)
