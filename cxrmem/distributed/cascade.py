"""Cascade scoring: screen every prompt with the first k steps, fully score only the top q%.

Stage 1 scores the whole corpus with `score.screening_steps = cascade.screening_steps` into
`<output>/_cascade/screening/` (its own parts and scores.parquet, resumable like any scoring).
The driver takes the top `cascade.top_percent` of the screening d_mem (the d_mem column only)
and stage 2 scores those prompts with the full T steps into the run's scores.parquet.

scores.parquet then holds only the fully scored share q of the corpus. The audit therefore
analyses it with `analyze.top_percent * 100 / q`, so that the memorized set is still the top
`analyze.top_percent` of the whole corpus (exactly so whenever that set lies inside the
screened share, which `cascade_recall` measures on a model with a known answer).

Compute is counted in UNet sample evaluations (a batch of B latents = B evaluations):
2 G per prompt and step (conditional and unconditional halves).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.compute as pc

from cxrmem import stats, storage
from cxrmem.distributed.pipeline import scored_batches, with_overrides
from cxrmem.runfiles import RunLayout
from cxrmem.stages import score
from cxrmem.storage import Store

log = logging.getLogger(__name__)

CASCADE_DIR = "_cascade"


def unet_evaluations(n_prompts: int, steps: int, generations: int) -> int:
    """UNet sample evaluations of scoring n prompts for `steps` steps (both guidance halves)."""
    return 2 * generations * steps * n_prompts


def cascade_cost(n_prompts: int, n_selected: int, screening_steps: int, steps: int, generations: int) -> dict:
    """UNet evaluations of the cascade against the full score of every prompt."""
    full = unet_evaluations(n_prompts, steps, generations)
    cascade = unet_evaluations(n_prompts, screening_steps, generations) + unet_evaluations(n_selected, steps, generations)
    return {"unet_evaluations_full": full, "unet_evaluations_cascade": cascade, "compute_saved": 1.0 - cascade / full}


def screened_ids(prompt_ids: np.ndarray, screening_d_mem: np.ndarray, top_percent: float) -> np.ndarray:
    """Ids of the top `top_percent` by screening score (non-finite screening scores are never selected)."""
    finite = np.isfinite(screening_d_mem)
    mask, _ = stats.top_percent_mask(screening_d_mem[finite], top_percent)
    return prompt_ids[finite][mask]


def cascade_recall(full_d_mem: np.ndarray, screening_d_mem: np.ndarray, top_percent: float, screen_percent: float) -> float:
    """Share of the full score's top `top_percent` that the screen's top `screen_percent` keeps."""
    ids = np.arange(len(full_d_mem))
    target = set(screened_ids(ids, full_d_mem, top_percent))
    kept = set(screened_ids(ids, screening_d_mem, screen_percent))
    return len(target & kept) / len(target) if target else float("nan")


def analysis_top_percent(cfg) -> float:
    """analyze.top_percent of the corpus, expressed as a share of the fully scored prompts."""
    return min(100.0, cfg.analyze.top_percent * 100.0 / cfg.cascade.top_percent)


def run_cascade(cfg, store: Store, fingerprint: str) -> dict:
    """Screen, select, fully score the selection. Needs a Ray session."""
    layout = RunLayout(cfg.run.output)
    screen_dir = storage.join(layout.prefix, CASCADE_DIR, "screening")
    selected_uri = storage.join(layout.prefix, CASCADE_DIR, "selected_prompts.parquet")
    screen_cfg = with_overrides(cfg, run__output=screen_dir, score__screening_steps=cfg.cascade.screening_steps)
    screening = score.run(screen_cfg, store, fingerprint, scored_batches, prompts_uri=layout.prompts, what="screened")

    screen = store.read_table(RunLayout(screen_dir).scores, columns=["prompt_id", "d_mem"])
    chosen = screened_ids(
        screen["prompt_id"].to_numpy(zero_copy_only=False),
        screen["d_mem"].to_numpy(zero_copy_only=False).astype(np.float64),
        cfg.cascade.top_percent,
    )
    selected = store.read_table(layout.prompts, columns=["prompt_id", "prompt"], filters=pc.field("prompt_id").isin(chosen.tolist()))
    store.write_table(selected, selected_uri)
    log.info("cascade: %d of %d prompts pass the %d-step screen", selected.num_rows, screen.num_rows, cfg.cascade.screening_steps)

    full = score.run(cfg, store, fingerprint, scored_batches, prompts_uri=selected_uri, what="fully scored")
    cost = cascade_cost(screen.num_rows, selected.num_rows, cfg.cascade.screening_steps, cfg.score.steps, cfg.score.generations)
    return {**full, "screening": screening, "selected": selected.num_rows, **cost}
