"""One guidance of the copies check: generate, embed, search, and the copies.parquet rows.

What a `copies` stage calls per guidance (and per mitigation strategy, with the threshold of
the prompts themselves at that guidance): the domain pieces in order, on one model replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from cxrmem.copies.evidence import Threshold, calibrate_threshold, copies_table
from cxrmem.copies.generation import generate
from cxrmem.copies.search import top_k
from cxrmem.copies.settings import CopiesSettings

SEARCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Copies:
    table: pa.Table  # copies.parquet rows, schema evidence.COPIES_SCHEMA
    threshold: Threshold  # the copy threshold used, with its rule (for summary.json)
    best_images: torch.Tensor  # [P, C, H, W] each prompt's closest generation, for the figures


def search(queries: torch.Tensor, index: torch.Tensor, settings: CopiesSettings, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(similarities, index rows), both [P, N, k], of generation embeddings [P, N, D] against the index [M, D]."""
    n_prompts, n_generations = queries.shape[:2]
    sims, rows = top_k(
        queries.flatten(0, 1),
        index,
        settings.top_k,
        device=device,
        query_chunk=settings.query_chunk,
        index_chunk=settings.index_chunk,
        dtype=SEARCH_DTYPES[settings.search_dtype],
    )
    return sims.reshape(n_prompts, n_generations, -1).numpy(), rows.reshape(n_prompts, n_generations, -1).numpy()


def embedded_generations(
    scorer, embedder, prompts: list[str], prompt_ids: list[str], settings: CopiesSettings, guidance: float, plan=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [P, N, D], decoded generations [P, N, C, H, W]) of N generations per prompt at `guidance`
    (`plan`: see generation.generate)."""
    generations = generate(scorer, prompts, prompt_ids, settings.generations, guidance, settings.batch_size, plan)
    return embedder(generations.flatten(0, 1)).reshape(*generations.shape[:2], -1), generations


def nearest_images(
    embedder, generations: torch.Tensor, index: torch.Tensor, settings: CopiesSettings, device="cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, index rows), both [P, N, k], of generations [P, N, C, H, W] against the index [M, D]."""
    queries = embedder(generations.flatten(0, 1))
    return search(queries.reshape(*generations.shape[:2], -1), index, settings, device)


def evidence(
    prompts: pd.DataFrame,
    sims: np.ndarray,
    rows: np.ndarray,
    images: pd.DataFrame,
    settings: CopiesSettings,
    guidance: float,
    embedder: str,
    threshold: Optional[Threshold] = None,
    strategy: str = "none",
    fidelity=None,
) -> tuple[pa.Table, Threshold]:
    """copies.parquet rows of searched prompts, and the threshold used (calibrated on the control rows
    of `prompts` when not given); `fidelity`: per prompt, of its generations (NaN when not given)."""
    if threshold is None:
        controls = (prompts.group == "control").to_numpy()
        threshold = calibrate_threshold(sims[controls, :, 0].max(axis=1), settings.threshold_quantile)
    return copies_table(prompts, sims, rows, images, threshold, guidance, embedder, strategy, fidelity), threshold


def find_copies(
    scorer,
    embedder,
    prompts: pd.DataFrame,
    index: torch.Tensor,
    images: pd.DataFrame,
    settings: CopiesSettings,
    guidance: float,
    threshold: Optional[Threshold] = None,
    strategy: str = "none",
) -> Copies:
    """copies.parquet rows of `prompts` at one guidance, the copy threshold used, the closest generations.

    `prompts`: prompt_id, prompt (the text generated from: a mitigated text for a strategy),
    group (memorized | control), source_ids and optionally subject_id (lists); `index`: the
    embeddings [M, D] of the image table `images`, in its row order. Without `threshold` it is
    calibrated on this call's control rows.
    """
    queries, generations = embedded_generations(scorer, embedder, prompts.prompt.tolist(), prompts.prompt_id.tolist(), settings, guidance)
    sims, rows = search(queries, index, settings, device=getattr(scorer, "device", "cpu"))
    table, threshold = evidence(prompts, sims, rows, images, settings, guidance, embedder.fingerprint, threshold, strategy)
    best = table.column("best_generation").to_numpy()
    return Copies(table, threshold, generations[torch.arange(len(best)), torch.from_numpy(best.astype(np.int64))])
