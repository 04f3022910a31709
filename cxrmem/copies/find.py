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

SEARCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Copies:
    table: pa.Table  # copies.parquet rows, schema evidence.COPIES_SCHEMA
    threshold: Threshold  # the copy threshold used, with its rule (for summary.json)
    best_images: torch.Tensor  # [P, C, H, W] each prompt's closest generation, for the figures


@dataclass(frozen=True)
class CopiesSettings:
    generations: int = 8  # decoded generations per prompt and guidance
    top_k: int = 5  # nearest training images kept per generation
    threshold_quantile: float = 0.99  # copy threshold: this quantile of the controls' max similarity
    batch_size: int = 16  # prompts per sampling run (each with its generations)
    query_chunk: int = 1024  # search: generation embeddings per matrix product
    index_chunk: int = 65536  # search: stored embeddings per matrix product (bounds memory)
    search_dtype: str = "float32"  # float32 | float16 (GPU) | bfloat16 (CPUs with AVX512-BF16)


def nearest_images(
    embedder, generations: torch.Tensor, index: torch.Tensor, settings: CopiesSettings, device="cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, index rows), both [P, N, k], of generations [P, N, C, H, W] against the index [M, D]."""
    n_prompts, n_generations = generations.shape[:2]
    queries = embedder(generations.flatten(0, 1))
    sims, rows = top_k(
        queries,
        index,
        settings.top_k,
        device=device,
        query_chunk=settings.query_chunk,
        index_chunk=settings.index_chunk,
        dtype=SEARCH_DTYPES[settings.search_dtype],
    )
    return sims.reshape(n_prompts, n_generations, -1).numpy(), rows.reshape(n_prompts, n_generations, -1).numpy()


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
    generations = generate(
        scorer, prompts.prompt.tolist(), prompts.prompt_id.tolist(), settings.generations, guidance, settings.batch_size
    )
    sims, rows = nearest_images(embedder, generations, index, settings, device=getattr(scorer, "device", "cpu"))
    if threshold is None:
        controls = (prompts.group == "control").to_numpy()
        threshold = calibrate_threshold(sims[controls, :, 0].max(axis=1), settings.threshold_quantile)
    table = copies_table(prompts, sims, rows, images, threshold, guidance, embedder.fingerprint, strategy)
    best = table.column("best_generation").to_numpy()
    return Copies(table, threshold, generations[torch.arange(len(best)), torch.from_numpy(best.astype(np.int64))])
