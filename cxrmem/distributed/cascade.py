"""The cascade (cxrmem/stages/cascade.py) on Ray: the same stages, scored by the actor pool."""

from __future__ import annotations

from cxrmem.distributed.pipeline import scored_batches
from cxrmem.runfiles import Run
from cxrmem.stages import cascade, score


def run_cascade(cfg, out: Run, batches: score.ScoredBatches = scored_batches) -> dict:
    """The cascade on the run `out` (its model's fingerprint known) with Ray's actor pool as executor (needs a Ray
    session); the trajectories carried between stages stay on the driver and ride in the blocks
    (cxrmem/stages/continuation.py)."""
    return cascade.run_cascade(cfg, out, batches)
