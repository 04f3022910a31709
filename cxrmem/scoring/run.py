"""`cxrmem score`: score prompts.parquet into scores.parquet in one process (no Ray)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from cxrmem import storage
from cxrmem.config import config_hash
from cxrmem.scoring.scorer import ScoreBatch, Scorer

log = logging.getLogger(__name__)


def scores_table(
    prompt_ids, prompts, batch: ScoreBatch, model_fingerprint: str, cfg_hash: str
) -> pa.Table:
    """One scores.parquet row per prompt (docs/design.md, Outputs)."""
    n = len(prompt_ids)
    return pa.table(
        {
            "prompt_id": pa.array(list(prompt_ids), pa.string()),
            "prompt": pa.array(list(prompts), pa.string()),
            "d_mem": pa.array(batch.d_mem, pa.float32()),
            "step_norms": pa.array(batch.step_norms.tolist(), pa.list_(pa.list_(pa.float32()))),
            "nonfinite": pa.array(batch.nonfinite, pa.bool_()),
            "n_tokens": pa.array(batch.n_tokens, pa.int32()),
            "truncated": pa.array(batch.truncated, pa.bool_()),
            "model_fingerprint": pa.array([model_fingerprint] * n, pa.string()),
            "config_hash": pa.array([cfg_hash] * n, pa.string()),
        }
    )


def score_prompts(scorer: Scorer, prompt_ids, prompts, batch_size: int, model_fingerprint: str, cfg_hash: str):
    """Yield a scores table per batch of prompts, logging progress."""
    total, start = len(prompts), time.perf_counter()
    for lo in range(0, total, batch_size):
        ids, texts = prompt_ids[lo : lo + batch_size], prompts[lo : lo + batch_size]
        yield scores_table(ids, texts, scorer.score(texts, ids), model_fingerprint, cfg_hash)
        done = min(lo + batch_size, total)
        rate = done / (time.perf_counter() - start)
        log.info("scored %d/%d prompts, %.2f prompts/s, ETA %.0f s", done, total, rate, (total - done) / rate)


def score_prompts_file(cfg) -> dict:
    from cxrmem.models.loading import load_components

    layout = storage.RunLayout(cfg.run.output)
    prompts_table = storage.read_table(layout.prompts, cfg.storage, columns=["prompt_id", "prompt"])
    components = load_components(cfg.model, cfg.storage)
    scorer = Scorer(components, cfg.score, device=cfg.model.device)
    start = time.perf_counter()
    tables = list(
        score_prompts(
            scorer,
            prompts_table["prompt_id"].to_pylist(),
            prompts_table["prompt"].to_pylist(),
            cfg.score.batch_size,
            components.fingerprint,
            config_hash(cfg),
        )
    )
    seconds = time.perf_counter() - start
    table = pa.concat_tables(tables) if tables else scores_table([], [], _empty_batch(), "", "")
    storage.write_table(table, layout.scores, cfg.storage)
    nonfinite = int(np.sum(table["nonfinite"].to_numpy(zero_copy_only=False)))
    return {
        "scores": layout.scores,
        "prompts": table.num_rows,
        "nonfinite": nonfinite,
        "seconds": round(seconds, 2),
        "prompts_per_s": round(table.num_rows / seconds, 3) if seconds else None,
        "model_fingerprint": components.fingerprint,
    }


def _empty_batch() -> ScoreBatch:
    return ScoreBatch(
        np.zeros(0, np.float32), np.zeros((0, 0, 0), np.float32), np.zeros(0, bool), np.zeros(0, int), np.zeros(0, bool)
    )
