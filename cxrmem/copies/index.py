"""The training-image index: embeddings of image files, as parts a resumable job writes and stacks.

A part is a table of `image_id` and `embedding` (fixed-size list of float32): one per batch of
the image table, so that a job that stops keeps its finished parts, and one that resumes embeds
only the missing ones. Unreadable files do not stop the job: they are left out of the part and
reported, each message naming the file.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from cxrmem.copies.images import ImageReadError, read_image


def embed_files(embedder, paths: Sequence[str], read: Callable[[str], bytes]) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(embeddings [n_read, D], mask [len(paths)] of the files read, a message per unreadable file).

    `read(path) -> bytes` is the caller's storage (a local open, or an s3:// get).
    """
    images, errors = [], []
    read_ok = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            images.append(read_image(read(path), path))
            read_ok[i] = True
        except (ImageReadError, OSError) as err:
            errors.append(str(err) if isinstance(err, ImageReadError) else f"{path}: cannot read ({err})")
    return embedder(images), read_ok, errors


def embedding_part(image_ids: Sequence[str], embeddings: torch.Tensor) -> pa.Table:
    """One stored part: image_id and its embedding (float32, fixed size)."""
    flat = pa.array(embeddings.float().numpy().reshape(-1), pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])
    return pa.table({"image_id": pa.array(list(image_ids), pa.string()), "embedding": vectors})


def stack_parts(parts: Sequence[pa.Table]) -> tuple[list[str], torch.Tensor]:
    """Image ids and the index [M, D] of stored parts, in the parts' order."""
    if not parts:
        raise ValueError("no embedding parts: the image index is empty; build it first")
    table = pa.concat_tables(parts)
    dim = table.schema.field("embedding").type.list_size
    values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("image_id").to_pylist(), torch.from_numpy(values.reshape(-1, dim).copy())


def embedded_rows(embedder, chunk: pd.DataFrame, read: Callable[[str], bytes]) -> pa.Table:
    """part, image_id, path, embedding and error (null when read) of each image of `chunk` (columns part,
    image_id, path): what an index job's executor returns; an unreadable file's embedding is zeros."""
    paths = chunk["path"].tolist()
    vectors, read_ok, errors = embed_files(embedder, paths, read)
    dim = int(vectors.shape[1]) if len(vectors) else int(getattr(embedder, "dim", 0))
    full = np.zeros((len(paths), dim), dtype=np.float32)
    full[read_ok] = vectors.float().numpy()
    messages = iter(errors)
    return pa.table(
        {
            "part": pa.array(chunk["part"].tolist(), pa.string()),
            "image_id": pa.array(chunk["image_id"].tolist(), pa.string()),
            "path": pa.array(paths, pa.string()),
            "embedding": pa.array(list(full), pa.list_(pa.float32())),
            "error": pa.array([None if ok else next(messages) for ok in read_ok], pa.string()),
        }
    )
