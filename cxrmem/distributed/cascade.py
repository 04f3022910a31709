"""Cascade scoring: screen every prompt with a cheap detector, fully score only the top q%.

Stage 1 scores the whole corpus into `<output>/_cascade/screening/` (its own parts and
scores.parquet, resumable like any scoring) with the `cascade.screen` detector:

- `dmem` (the default): the first `cascade.screening_steps` steps of d_mem (score.screening_steps),
  read from the d_mem column;
- any other REGISTRY detector: its column (score.detectors = [screen], settings from `detect`),
  beside a first-step d_mem with detect.generations noises that the score stage always writes
  (the model worker scores d_mem; one step is its cheapest form, and it is counted in the cost).

The driver takes the top `cascade.top_percent` of the screen (`detectors.screen_top`, the detector's
direction applied) and stage 2 scores those prompts with the full T steps into the run's scores.parquet.

scores.parquet then holds only the fully scored share q of the corpus. The audit therefore
analyses it with `analyze.top_percent * 100 / q`, so that the memorized set is still the top
`analyze.top_percent` of the whole corpus (exactly so whenever that set lies inside the
screened share, which `detectors.screen_recall` measures on a model with a known answer).

Compute is counted in UNet sample evaluations as cxrmem/detectors.py declares them (REGISTRY
costs: shared unconditional passes once per batch of score.batch_size), and JVPs apart.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow.compute as pc

from cxrmem import storage
from cxrmem.detectors import REGISTRY, Cost, screen_top
from cxrmem.distributed.pipeline import scored_batches, with_overrides
from cxrmem.runfiles import RunLayout
from cxrmem.stages import score
from cxrmem.storage import Store

log = logging.getLogger(__name__)

CASCADE_DIR = "_cascade"


def screening_config(cfg, output: str):
    """Stage 1's config: where it writes, and what it scores (see the module notes)."""
    if cfg.cascade.screen == "dmem":
        return with_overrides(cfg, run__output=output, score__screening_steps=cfg.cascade.screening_steps, score__detectors=[])
    return with_overrides(
        cfg, run__output=output, score__screening_steps=1, score__generations=cfg.detect.generations,
        score__detectors=[cfg.cascade.screen],
    )


def screening_column(cfg) -> str:
    """The scores.parquet column stage 1 selects on."""
    return "d_mem" if cfg.cascade.screen == "dmem" else REGISTRY[cfg.cascade.screen].columns[0]


def dmem_cost(score_cfg, steps: int) -> Cost:
    return REGISTRY["dmem"].cost(score_cfg.generations, steps, score_cfg.seed_mode == "shared")


def screening_cost(screen_cfg) -> Cost:
    """UNet work of stage 1 per batch: its d_mem over score.screening_steps plus its detectors."""
    shared = screen_cfg.score.seed_mode == "shared"
    cost = dmem_cost(screen_cfg.score, screen_cfg.score.screening_steps)
    for name in screen_cfg.score.detectors:
        spec = REGISTRY[name]
        cost = cost + spec.cost_of(screen_cfg.detect.generations, screen_cfg.detect.steps, shared, screen_cfg.score.steps)
    return cost


def cascade_cost(n_prompts: int, n_selected: int, screen: Cost, full: Cost, batch_size: int) -> dict:
    """UNet evaluations (and JVPs) of the cascade against the full score of every prompt."""
    def evaluations(cost: Cost, n: int) -> int:
        return n * cost.per_prompt + math.ceil(n / batch_size) * cost.per_batch

    everything = evaluations(full, n_prompts)
    cascade = evaluations(screen, n_prompts) + evaluations(full, n_selected)
    return {
        "unet_evaluations_full": everything,
        "unet_evaluations_cascade": cascade,
        "jvps_cascade": screen.jvps(n_prompts),
        "vjps_cascade": screen.vjps(n_prompts),
        "compute_saved": 1.0 - cascade / everything if everything else 0.0,
    }


def analysis_top_percent(cfg) -> float:
    """analyze.top_percent of the corpus, expressed as a share of the fully scored prompts."""
    return min(100.0, cfg.analyze.top_percent * 100.0 / cfg.cascade.top_percent)


def run_cascade(cfg, store: Store, fingerprint: str, batches: score.ScoredBatches = scored_batches) -> dict:
    """Screen, select, fully score the selection. The default executor needs a Ray session (tests pass
    `score.local_batches`)."""
    layout = RunLayout(cfg.run.output)
    screen_dir = storage.join(layout.prefix, CASCADE_DIR, "screening")
    selected_uri = storage.join(layout.prefix, CASCADE_DIR, "selected_prompts.parquet")
    screen_cfg = screening_config(cfg, screen_dir)
    screening = score.run(screen_cfg, store, fingerprint, batches, prompts_uri=layout.prompts, what="screened")

    column = screening_column(cfg)
    screen = store.read_table(RunLayout(screen_dir).scores, columns=["prompt_id", column])
    chosen = screen_top(
        screen["prompt_id"].to_numpy(zero_copy_only=False),
        screen[column].to_numpy(zero_copy_only=False).astype(np.float64),
        cfg.cascade.top_percent,
        cfg.cascade.screen,
    )
    selected = store.read_table(layout.prompts, columns=["prompt_id", "prompt"], filters=pc.field("prompt_id").isin(chosen.tolist()))
    store.write_table(selected, selected_uri)
    log.info("cascade: %d of %d prompts pass the %s screen", selected.num_rows, screen.num_rows, cfg.cascade.screen)

    full = score.run(cfg, store, fingerprint, batches, prompts_uri=selected_uri, what="fully scored")
    cost = cascade_cost(
        screen.num_rows, selected.num_rows, screening_cost(screen_cfg), dmem_cost(cfg.score, cfg.score.steps), cfg.score.batch_size
    )
    return {**full, "screening": screening, "screen": cfg.cascade.screen, "selected": selected.num_rows, **cost}
