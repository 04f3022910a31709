"""`cxrmem mitigate`: mitigation experiments on the memorized set: mitigation.parquet, image grids, summary["mitigation"]."""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from cxrmem.mitigation import MITIGATION_COLUMNS, mitigation_summary
from cxrmem.mitigation_sizing import SequentialRule, sample_record, stratified_sample
from cxrmem.runfiles import Run
from cxrmem.stages import copies_reuse
from cxrmem.stages.worker import LocalModel, MitigatePrompts, map_with_progress, memorized_stage, stamped
from cxrmem.summary import MitigationSection

log = logging.getLogger(__name__)


def save_generation_grid(out: Run, prompt_id: str, grids: dict[str, np.ndarray]) -> str:
    """figures/generations_<prompt_id>.npz: one float32 [k, H, W] array in [0, 1] per strategy."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **grids)
    uri = out.layout.figure(f"generations_{prompt_id}.npz")
    out.store.write_bytes(uri, buffer.getvalue())
    return uri


def run(cfg, out: Optional[Run] = None, models: Optional[LocalModel] = None) -> MitigationSection:
    """Mitigate a stratified sample of the run's memorized set, strategy by strategy until each is decided, with
    `models` (default: a model with its VAE loaded in this process)."""
    out = out or Run.of(cfg)
    layout = out.layout
    with memorized_stage(cfg, out, "mitigate", None, models, need_vae=True) as (memorized, models, identity):
        c = cfg.mitigation
        sample = stratified_sample(memorized, cfg.corpus.marker_regex, c.sample_size, c.seed)
        # The memorized set is sorted by d_mem: its first `top_prompts` in the sample get image grids in the report.
        grid_ids = frozenset(memorized["prompt_id"][memorized["prompt_id"].isin(sample["prompt_id"])].head(cfg.report.top_prompts))
        stamp = copies_reuse.stamp_for_copies(cfg, identity)  # None: the copies stage will not take the generations
        results, stopping, seconds = mitigate_sequentially(models, sample, cfg, grid_ids, stamp is not None)
        frame = pd.concat([rows for rows, _, _ in results], ignore_index=True)
        copies_reuse.save(out, frame, stamp)
        grids: dict = {}
        for _, chunk_grids, _ in results:
            for pid, grid in chunk_grids.items():
                grids.setdefault(pid, {}).update(grid)
        # Every chunk ran on the same model and skipped the same strategies; chunks of later looks ask fewer.
        skipped = {strategy: why for _, _, chunk_skipped in results for strategy, why in chunk_skipped.items()}
        table = pa.Table.from_pandas(frame[list(MITIGATION_COLUMNS)], schema=pa.schema(MITIGATION_COLUMNS), preserve_index=False)
        out.store.write_table(stamped(table, identity), layout.mitigation)
        figures = [save_generation_grid(out, pid, grids[pid]) for pid in memorized["prompt_id"] if pid in grids]
        section = MitigationSection(
            strategies=mitigation_summary(frame),
            prompts=int(frame["prompt_id"].nunique()),
            n_generations=c.n_generations,
            seconds=round(seconds, 2),
            mitigation=layout.mitigation,
            figures=figures,
            sample=sample_record(memorized, sample, cfg.corpus.marker_regex, c.sample_size, c.seed),
            stopping=stopping,
            model=identity,
            skipped=skipped,
        )
        out.write_sections(section)
    log.info("mitigation: %s", section.strategies)
    return section


def mitigate_sequentially(models, sample: pd.DataFrame, cfg, grid_ids: frozenset, embed: bool = False) -> tuple[list, dict, float]:
    """The sample in looks of `look_every` prompts, each under the strategies still undecided (SequentialRule):
    the results per chunk, the rule's record per strategy and the seconds; `embed`: MitigatePrompts's."""
    c = cfg.mitigation
    rule = SequentialRule(tuple(c.strategies), c.stop_level, c.sequential, c.equivalence_margin)
    results, seconds = [], 0.0
    for lo in range(0, max(len(sample), 1), c.look_every):
        if not rule.active:
            break
        look = sample.iloc[lo : lo + c.look_every][["prompt_id", "prompt"]]
        done, spent = map_with_progress(models, MitigatePrompts(), look, "mitigated", cfg.ray.progress_every_s, grid_ids, tuple(rule.active), embed)
        results += done
        seconds += spent
        frame = pd.concat([rows for rows, _, _ in results], ignore_index=True)
        stopped = rule.look(frame)
        if stopped:
            log.info("mitigation: %s stopped after %d prompts", ", ".join(stopped), lo + len(look))
    return results, rule.finish(frame), seconds
