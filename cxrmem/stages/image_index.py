"""The training-image index of the copies stage: each image embedded once, stored in resumable parts.

    images.source -> image table (path, ids) -> paths not yet in a stored part
        -> embedded rows from an executor -> <images.index>/<embedder fingerprint>/part-NNNNN.parquet
        -> stacked index [M, D] aligned with the image table

The embedded rows come from an executor: `local_rows` embeds in this process;
cxrmem/distributed/image_index.py embeds on a Ray Data actor pool. A part holds image_id, path and
embedding; a rerun embeds only the paths no part holds (new images, and files that could not be
read last time), so a stopped job loses at most its unfinished parts. Unreadable files are
reported by name and counted, never stored.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cxrmem.copies.embedders import make_embedder
from cxrmem.copies.images import IMAGE_COLUMNS, folder_table, read_table_file, table_images
from cxrmem.copies.index import embedded_rows, embedding_part, stack_parts
from cxrmem.runfiles import RunLayout
from cxrmem.scoring.device import resolve_device
from cxrmem.stages.worker import embedder_settings
from cxrmem.storage import Store, join

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet")
# (cfg, store, chunks of the image table with a `part` column) -> embedded rows (index.embedded_rows)
EmbedRows = Callable[[object, Store, list], Iterator[pa.Table]]


def image_table(cfg, store: Store) -> pd.DataFrame:
    """The image table of images.source: a table file, or the listing of a folder / prefix."""
    images = cfg.images
    source = images.source
    if source.lower().endswith(TABLE_SUFFIXES):
        raw = read_table_file(source, store.read_bytes(source))
        return table_images(raw, source, images.path_column, images.study_column, images.subject_column, images.id_format, images.root)
    listing = store.list_files(source)
    if not listing:
        raise FileNotFoundError(f"images.source {source} has no files; point it at a folder of PNG/JPG/DICOM files or a table")
    return folder_table(listing, images.layout)


def index_prefix(cfg, fingerprint: str) -> str:
    return join(cfg.images.index or RunLayout(cfg.run.output).image_index, fingerprint)


def local_rows(cfg, store: Store, chunks: list) -> Iterator[pa.Table]:
    """Embedded rows of each chunk, by one embedder loaded in this process."""
    embedder = make_embedder(embedder_settings(cfg), resolve_device(cfg.model.device))
    for chunk in chunks:
        yield embedded_rows(embedder, chunk, store.read_bytes)


def _write_part(store: Store, prefix: str, name: str, rows: pa.Table) -> list[str]:
    """Store the readable rows of one part; the messages of its unreadable files."""
    ok = rows.filter(pc.is_null(rows["error"]))
    if ok.num_rows:
        vectors = torch.from_numpy(np.stack(ok.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32))
        part = embedding_part(ok.column("image_id").to_pylist(), vectors).append_column("path", ok.column("path"))
        store.write_table(part, join(prefix, f"{name}.parquet"))
    return [e for e in rows.column("error").to_pylist() if e is not None]


def embed_missing(cfg, store: Store, table: pd.DataFrame, prefix: str, embed_rows: EmbedRows) -> dict:
    """Embed the images of `table` that no stored part under `prefix` holds; counts and unreadable files."""
    stored = store.list_files(prefix, suffix=".parquet")
    done = set()
    for uri in stored:
        done.update(store.read_table(uri, columns=["path"]).column("path").to_pylist())
    missing = table[~table["path"].isin(done)].drop_duplicates("path")
    first = 1 + max((int(u.rsplit("part-", 1)[-1].split(".")[0]) for u in stored), default=-1)
    size = cfg.images.part_size
    chunks = [
        missing.iloc[lo : lo + size].assign(part=f"part-{first + i:05d}") for i, lo in enumerate(range(0, len(missing), size))
    ]
    expected = {c["part"].iloc[0]: len(c) for c in chunks}
    pending: dict[str, list[pa.Table]] = {}
    unreadable: list[str] = []
    for rows in embed_rows(cfg, store, chunks) if chunks else []:
        for name in set(rows.column("part").to_pylist()):
            pending.setdefault(name, []).append(rows.filter(pc.equal(rows["part"], name)))
            if sum(t.num_rows for t in pending[name]) == expected[name]:  # the part is complete: store it
                unreadable += _write_part(store, prefix, name, pa.concat_tables(pending.pop(name)))
    for message in unreadable:
        log.warning("image index: %s", message)
    return {"already_stored": len(done), "embedded": len(missing) - len(unreadable), "unreadable": len(unreadable),
            "unreadable_files": unreadable[:20]}


def load_index(store: Store, prefix: str, table: pd.DataFrame) -> tuple[pd.DataFrame, torch.Tensor]:
    """The image table rows and their embeddings [M, D], in the same order; stored images not in `table` left out."""
    parts = [store.read_table(uri) for uri in store.list_files(prefix, suffix=".parquet")]
    _, index = stack_parts(parts)
    paths = pa.concat_tables(parts).column("path").to_pylist()
    by_path = table.drop_duplicates("path").set_index("path")
    keep = np.array([p in by_path.index for p in paths], dtype=bool)
    if not keep.any():
        raise ValueError(f"no image of images.source is in the index {prefix}; rerun the copies stage to build it")
    images = by_path.loc[[p for p, k in zip(paths, keep) if k]].reset_index()[IMAGE_COLUMNS]
    return images, index[torch.from_numpy(keep)]


def build_index(cfg, store: Store, fingerprint: str, embed_rows: EmbedRows = local_rows) -> tuple[pd.DataFrame, torch.Tensor, dict]:
    """(image table, index [M, D], what the job did) for images.source under the embedder `fingerprint`."""
    started = time.perf_counter()
    table = image_table(cfg, store)
    prefix = index_prefix(cfg, fingerprint)
    info = embed_missing(cfg, store, table, prefix, embed_rows)
    images, index = load_index(store, prefix, table)
    info.update(images=len(table), indexed=len(images), prefix=prefix, fingerprint=fingerprint,
                seconds=round(time.perf_counter() - started, 2))
    log.info("image index: %s", info)
    return images, index, info
