"""`cxrmem attribute`: which words drive each memorized prompt's d_mem: tokens.parquet and summary["attribution"]."""

from __future__ import annotations

import logging
from typing import Optional

import pandas as pd
import pyarrow as pa

from cxrmem.attribution import NULL_COLUMNS, TOKEN_COLUMNS, attribution_summary, early_steps, with_null
from cxrmem.runfiles import Run
from cxrmem.stages.worker import AttributePrompts, LocalModel, map_with_progress, memorized_stage, stamped
from cxrmem.summary import AttributionSection

log = logging.getLogger(__name__)


def run(cfg, out: Optional[Run] = None, models: Optional[LocalModel] = None) -> AttributionSection:
    """Attribute the memorized set of the run `out` (default: at run.output) with `models` (default: a model
    loaded in this process)."""
    out = out or Run.of(cfg)
    layout = out.layout
    c = cfg.attribution
    with memorized_stage(cfg, out, "attribute", c.max_prompts, models) as (memorized, models, identity):
        # The memorized set comes most memorized first: leave-one-out describes the top of it.
        loo_ids = frozenset(memorized["prompt_id"].head(c.leave_one_out_prompts)) if c.leave_one_out_prompts is not None else None
        frames, seconds = map_with_progress(models, AttributePrompts(), memorized, "attributed", cfg.ray.progress_every_s, loo_ids)
        tokens, columns, null_timing = pd.concat(frames, ignore_index=True), dict(TOKEN_COLUMNS), {}
        if c.null_model:
            # The same prompts and seeds on a re-initialised copy: what the ranks look like with nothing learned.
            null_loo = loo_ids if c.null_leave_one_out else frozenset()
            null, null_seconds = map_with_progress(models, AttributePrompts(null=True), memorized, "attributed on the null model",
                                                   cfg.ray.progress_every_s, null_loo)  # fmt: skip
            tokens, columns = with_null(tokens, pd.concat(null, ignore_index=True)), columns | NULL_COLUMNS
            null_timing = {"null_seconds": round(null_seconds, 2), "null_seed": cfg.attribution.null_seed}
        table = pa.Table.from_pandas(tokens[list(columns)], schema=pa.schema(columns), preserve_index=False)
        out.store.write_table(stamped(table, identity), layout.tokens)
        steps = early_steps(c, cfg.score.steps)
        section = AttributionSection(**attribution_summary(tokens), seconds=round(seconds, 2), tokens=layout.tokens, model=identity, steps=steps,
                                     **null_timing)  # fmt: skip
        out.write_sections(section)
    log.info("attribution: %s", section)
    return section
