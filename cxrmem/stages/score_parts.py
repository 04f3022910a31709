"""Durable score part files, the done set of a resumed run, and their consolidation into scores.parquet.

While scoring streams (in one process or on Ray), the writer of the run writes every `ray.checkpoint_every` scored prompts as one part
file under `RunLayout.score_parts`, sorted by prompt_id and written atomically (a local file is
renamed into place; an S3 object appears only once its upload completes). A part is the unit
of resume: a rerun reads the (prompt_id, model_fingerprint, config_hash) columns of the parts
and of an existing scores.parquet, and scores only prompts missing for the current key.

Every part carries the sha256 of its bytes in its name (`part-<time>-<seq>-<id>-<digest>.parquet`:
written with the part, in one atomic write). Nothing is read unchecked: before a resume counts a
part as done, and before consolidation merges it, its bytes are hashed against its name. A part
that fails (an edited or truncated file), or that carries no digest (written by an older
version), is set aside, moved to `RunLayout.set_aside` (renamed, never deleted, for whoever
wants to look at it), with one log line, and its prompts are scored again.

Consolidation merges the sorted sources (k-way, a few rows of each in memory at a time) into
one scores.parquet sorted by prompt_id, keeping the first row of each prompt_id, checks that the
file holds as many rows as the sources hold distinct prompts of the key, and then removes the
parts it merged and their folder (`_parts/` too when nothing else is in it).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import json
import logging
import re
import time
import uuid
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cxrmem import storage
from cxrmem.runfiles import RunLayout
from cxrmem.storage import Store

log = logging.getLogger(__name__)

KEY_COLUMNS = ["prompt_id", "model_fingerprint", "config_hash"]
MERGE_READ_ROWS = 256  # rows read at a time from each merged source
MERGE_WRITE_ROWS = 4096  # rows per row group of the consolidated file


# scores.parquet's schema metadata: {detector: why} of the score.detectors this model's denoiser cannot run (their
# columns are NaN; cxrmem/capabilities.py). Parts carry it and consolidation keeps the first source's schema with it.
SKIPPED_DETECTORS = b"cxrmem.skipped_detectors"


def with_skipped_detectors(table: pa.Table, skipped: dict) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SKIPPED_DETECTORS: json.dumps(skipped, sort_keys=True)})


def skipped_detectors(schema: pa.Schema) -> dict:
    """{detector: why it was skipped} that the scores' writer recorded ({} in files written before it recorded any)."""
    return json.loads((schema.metadata or {}).get(SKIPPED_DETECTORS, b"{}"))


DIGEST_HEX = 32  # hex digits of the part's sha256 kept in its name (128 bits: no corruption matches by chance)
PART_DIGEST = re.compile(rf"-([0-9a-f]{{{DIGEST_HEX}}})\.parquet$")


def part_name(sequence: int, digest: str) -> str:
    """Unique per driver and per part; sorts by creation time; ends with the sha256 of the part's bytes."""
    return f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{sequence:05d}-{uuid.uuid4().hex[:8]}-{digest[:DIGEST_HEX]}.parquet"


def write_part(store: Store, table: pa.Table, parts_dir: str, sequence: int) -> str:
    buffer = io.BytesIO()
    pq.write_table(table.sort_by("prompt_id"), buffer)
    data = buffer.getvalue()
    uri = storage.join(parts_dir, part_name(sequence, hashlib.sha256(data).hexdigest()))
    store.write_bytes(uri, data)
    return uri


def part_problem(store: Store, uri: str) -> Optional[str]:
    """Why the part at `uri` must not be trusted, or None when its bytes match the digest in its name."""
    match = PART_DIGEST.search(uri)
    if match is None:
        return "no checksum in its name (written by an older cxrmem)"
    try:
        size, digest = store.sha256(uri)
    except FileNotFoundError:
        return "gone while being checked"
    if digest[:DIGEST_HEX] != match.group(1):
        return f"its sha256 is {digest[:12]}..., its name says {match.group(1)[:12]}... ({size} bytes: edited or truncated)"
    return None


def set_aside(store: Store, layout: RunLayout, uri: str) -> str:
    """Move a part out of the parts folder (copy, then delete: S3 has no rename); where it went."""
    target = storage.join(layout.set_aside, uri.rsplit("/", 1)[-1])
    store.copy_within(uri, target)
    store.delete(uri)
    return target


def checked_parts(store: Store, layout: RunLayout) -> list[str]:
    """The part files whose bytes match their checksum; the others are set aside (module doc), in one log line."""
    parts = store.list_files(layout.score_parts, suffix=".parquet")
    problems = store.parallel(lambda uri: part_problem(store, uri), parts)
    bad = [(uri, problem) for uri, problem in zip(parts, problems) if problem is not None]
    for uri, _ in bad:
        set_aside(store, layout, uri)
    if bad:
        log.warning(
            "score parts: set aside %d of %d parts that fail their check, moved to %s (%s); their prompts are scored again",
            len(bad), len(parts), layout.set_aside, "; ".join(f"{uri.rsplit('/', 1)[-1]}: {problem}" for uri, problem in bad[:3]),
        )  # fmt: skip
    return [uri for uri, problem in zip(parts, problems) if problem is None]


def score_sources(store: Store, layout: RunLayout) -> list[str]:
    """scores.parquet (if present) first, then the part files that pass their check: the order consolidation prefers."""
    scores = [layout.scores] if store.exists(layout.scores) else []
    return scores + checked_parts(store, layout)


def key_filter(model_fingerprint: str, config_hash: str) -> pc.Expression:
    return (pc.field("model_fingerprint") == model_fingerprint) & (pc.field("config_hash") == config_hash)


def done_ids(store: Store, sources: list[str], model_fingerprint: str, config_hash: str) -> pa.Array:
    """Distinct prompt_ids already scored under this key (ids only: small enough for the driver)."""
    if not sources:
        return pa.array([], pa.string())
    fs, _ = store.filesystem(sources[0])
    paths = [store.filesystem(uri)[1] for uri in sources]
    dataset = pads.dataset(paths, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=["prompt_id"], filter=key_filter(model_fingerprint, config_hash))
    return pc.unique(table["prompt_id"].combine_chunks())


def _rows(store: Store, uri: str, rank: int, keep: pc.Expression) -> Iterator[tuple[str, int, pa.RecordBatch, int]]:
    """(prompt_id, source rank, batch, row) for the rows of one sorted source that match `keep`."""
    fs, path = store.filesystem(uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    # No read-ahead: a merge holds every source open at once, so the driver keeps one batch of each.
    batches = dataset.to_batches(filter=keep, batch_size=MERGE_READ_ROWS, batch_readahead=0, fragment_readahead=0, use_threads=False)
    for batch in batches:
        for row, pid in enumerate(batch.column("prompt_id").to_pylist()):
            yield pid, rank, batch, row


def mixed_columns(uri: str, columns: list[str], expected: list[str], layout: RunLayout) -> str:
    return (
        f"{uri} holds rows of this run's model and config hash with the columns {columns}, other sources "
        f"{expected}: parts written by another cxrmem version; remove {layout.score_parts} and {layout.scores} "
        "(or use a new run.output) and score again"
    )


def consolidate(store: Store, layout: RunLayout, model_fingerprint: str, config_hash: str) -> dict:
    """Merge scores.parquet and the part files (rows of the current key) into scores.parquet.

    Returns counts: rows written, duplicate rows dropped, parts merged.
    """
    sources = score_sources(store, layout)
    parts = [uri for uri in sources if uri != layout.scores]
    if not sources:
        raise FileNotFoundError(f"nothing to consolidate: no {layout.scores} and no part files in {layout.score_parts}")
    if not parts:
        remove_parts_folder(store, layout)
        return {"rows": store.parquet_rows(layout.scores), "duplicates": 0, "parts": 0}
    keep = key_filter(model_fingerprint, config_hash)
    expected = len(done_ids(store, sources, model_fingerprint, config_hash))  # distinct prompts of the key: the rows to write
    merged = heapq.merge(*(_rows(store, uri, rank, keep) for rank, uri in enumerate(sources)), key=lambda r: (r[0], r[1]))
    first = next(merged, None)
    # The columns of the key's rows (score.detectors add some); a source of the same key with others is an error.
    schema = first[2].schema if first else store.parquet_schema(parts[0])
    rows = duplicates = 0
    with store.open_atomic(layout.scores) as stream, pq.ParquetWriter(stream, schema) as writer:
        pending: list[pa.RecordBatch] = []  # one-row slices, coalesced per output row group
        last_id: Optional[str] = None
        for pid, rank, batch, row in itertools.chain([first] if first else [], merged):
            if batch.schema.names != schema.names:
                raise ValueError(mixed_columns(sources[rank], batch.schema.names, schema.names, layout))
            if pid == last_id:
                duplicates += 1
                continue
            last_id = pid
            pending.append(batch.slice(row, 1))
            if len(pending) >= MERGE_WRITE_ROWS:
                writer.write_table(pa.Table.from_batches(pending, schema).combine_chunks())
                rows += len(pending)
                pending = []
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema).combine_chunks())
            rows += len(pending)
    check_merged(store, layout, rows, expected)
    for uri in parts:
        store.delete(uri)
    remove_parts_folder(store, layout)
    if duplicates:
        log.warning("consolidation dropped %d duplicate rows (same prompt_id in several parts)", duplicates)
    return {"rows": rows, "duplicates": duplicates, "parts": len(parts)}


def check_merged(store: Store, layout: RunLayout, written: int, expected: int) -> None:
    """Raise, keeping the parts, unless scores.parquet holds one row per distinct prompt of its sources."""
    stored = store.parquet_rows(layout.scores)
    if not written == stored == expected:
        raise ValueError(
            f"{layout.scores} holds {stored} rows after merging ({written} written), but its sources hold {expected} distinct "
            f"prompts of this run's key; the parts under {layout.score_parts} are kept: delete {layout.scores} and rerun "
            "to merge them again"
        )


def remove_parts_folder(store: Store, layout: RunLayout) -> None:
    """Once merged, nothing of the score parts stays: their folder (on S3 the folder marker that deleting
    the last part leaves), and `_parts/` itself unless the image index still lives there."""
    store.delete_tree(layout.score_parts)
    if not store.list_files(layout.parts):
        store.delete_tree(layout.parts)
