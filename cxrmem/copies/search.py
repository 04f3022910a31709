"""Exact cosine top-k of query embeddings against a stored index, in bounded memory.

Both sides are L2-normalised rows (the embedders' output), so cosine similarity is a dot
product. Queries go in chunks of `query_chunk` rows and the index in chunks of `index_chunk`
rows: each step multiplies one query chunk by one index chunk on `device` and merges its top-k
into the running top-k of that query chunk. Peak extra memory is one
query_chunk x index_chunk similarity block plus one index chunk on the device, whatever the
index size; the index itself may stay on the CPU (or be memory-mapped).
"""

from __future__ import annotations

from typing import Optional

import torch


def top_k(
    queries: torch.Tensor,
    index: torch.Tensor,
    k: int,
    device: torch.device | str = "cpu",
    query_chunk: int = 1024,
    index_chunk: int = 65536,
    dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [Q, k] float32, index rows [Q, k] int64) on the CPU, best first.

    `dtype` is the matmul precision on the device (default: the index's); k is capped at the
    index size.
    """
    if queries.dim() != 2 or index.dim() != 2 or queries.shape[1] != index.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and index {tuple(index.shape)} must be [Q, D] and [N, D]")
    device = torch.device(device)
    dtype = dtype or index.dtype
    k = min(k, index.shape[0])
    sims_out, rows_out = [], []
    for q_start in range(0, queries.shape[0], query_chunk):
        q = queries[q_start : q_start + query_chunk].to(device, dtype)
        best_sims = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_rows = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=device)
        for i_start in range(0, index.shape[0], index_chunk):
            block = (q @ index[i_start : i_start + index_chunk].to(device, dtype).T).float()
            sims, rows = block.topk(min(k, block.shape[1]), dim=1)
            merged = torch.cat([best_sims, sims], dim=1)
            merged_rows = torch.cat([best_rows, rows + i_start], dim=1)
            best_sims, pick = merged.topk(min(k, merged.shape[1]), dim=1)
            best_rows = merged_rows.gather(1, pick)
        sims_out.append(best_sims.cpu())
        rows_out.append(best_rows.cpu())
    if not sims_out:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return torch.cat(sims_out), torch.cat(rows_out)
