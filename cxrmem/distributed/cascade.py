"""The cascade (cxrmem/stages/cascade.py) on Ray: the same stages, scored by the actor pool."""

from __future__ import annotations

from cxrmem.distributed.pipeline import scored_batches
from cxrmem.stages import cascade, score
from cxrmem.storage import Store


def run_cascade(cfg, store: Store, fingerprint: str, batches: score.ScoredBatches = scored_batches) -> dict:
    """The cascade with Ray's actor pool as the executor (needs a Ray session). Every stage restarts its
    trajectories from x_T: the carried latents live in the driver's memory (cxrmem/stages/continuation.py),
    and the actors would need them shipped (256 KB per RadEdit survivor at G = 4) or written beside the
    stage's scores, which is not built."""
    return cascade.run_cascade(cfg, store, fingerprint, batches, carry_trajectories=False)
