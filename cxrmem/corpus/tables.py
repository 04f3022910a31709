"""Tables of prompts: CSV, Parquet or JSONL files (or a folder of them), local or s3://.

The text column (corpus.text_column) is the prompt as is, since a prepared split already holds
the impression. Id columns (corpus.id_columns) are kept when present: the first present one is
the row's source id, the others travel with it; without any, the source id is `file:row`.
Rows are decoded one by one, so one bad row is skipped and counted, not the whole file.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cxrmem.corpus.files import corpus_files
from cxrmem.corpus.text import SourceText, decode_utf8, skipped
from cxrmem.storage import Store

logger = logging.getLogger(__name__)

SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary(), pa.null())  # null: an all-empty column


class TextColumnError(ValueError):
    """The text column is missing or holds no text. The hint names the setting that picks the column:
    corpus.text_column for a corpus; a command with its own flag (`enrich --text-column`) renames it."""

    def __init__(self, where: str, problem: str, key: str = "corpus.text_column"):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}; set {key} to the column holding the prompt")

    def naming(self, key: str) -> "TextColumnError":
        return TextColumnError(self.where, self.problem, key)


def _missing_column(uri: str, column: str, present: list[str]) -> TextColumnError:
    return TextColumnError(uri, f"no text column {column!r}; the columns are {present}")


def _strings(column: pa.ChunkedArray) -> list[Optional[str]]:
    """An id column as strings (ints are common; stray bytes are escaped, never fatal for an id)."""
    if pa.types.is_binary(column.type):
        return [None if v is None else v.decode("utf-8", "backslashreplace") for v in column.to_pylist()]
    return column.cast(pa.string()).to_pylist()


def arrow_input(data: bytes) -> pa.BufferReader:
    """The file's bytes as a stream that Arrow owns, for its threaded readers.

    Not io.BytesIO, nor a buffer over the Python bytes: Arrow's threaded CSV reader reads ahead in
    its own pool, and a pool thread can drop the last reference to the stream after read_csv has
    returned. Releasing a Python object there needs the GIL; when the process is exiting (an error
    line printed right after the read, as `cxrmem enrich` does on a missing column), the interpreter
    ends that thread instead, and the C++ runtime aborts the process ("terminate called without an
    active exception", exit 134). One copy into Arrow's memory makes that release plain C++.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    return pa.BufferReader(sink.getvalue())


def _columnar_rows(uri: str, data: bytes, text_column: str, id_columns: list[str]) -> tuple[list, dict[str, list]]:
    """The text column (bytes or None per row) and the present id columns of a CSV or Parquet file."""
    if uri.endswith(".parquet"):
        names = pq.read_schema(arrow_input(data)).names
        columns = [c for c in [text_column, *id_columns] if c in names]
        table = pq.read_table(arrow_input(data), columns=columns)
    else:
        # Text and ids as bytes, so that invalid UTF-8 fails one row, with its offset, not the whole file.
        types = {c: pa.binary() for c in [text_column, *id_columns]}
        table = pacsv.read_csv(arrow_input(data), convert_options=pacsv.ConvertOptions(column_types=types))
        names = table.column_names
    if text_column not in names:
        raise _missing_column(uri, text_column, names)
    text = table.column(text_column)
    if text.type not in TEXT_TYPES:
        raise TextColumnError(uri, f"text column {text_column!r} holds {text.type}, not text")
    if not pa.types.is_binary(text.type):
        text = text.cast(pa.binary())
    return text.to_pylist(), {c: _strings(table.column(c)) for c in id_columns if c in names}


def _source(uri: str, row: int, text, ids: dict, where: str) -> SourceText:
    """A table row as a SourceText; the first present id column names it, else `file:row`."""
    source_id, rest = f"{os.path.basename(uri)}:{row}", None
    if ids:
        first = next(iter(ids))
        source_id = ids[first] if ids[first] is not None else source_id
        rest = {c: v for c, v in ids.items() if c != first} or None
    if text is None:
        return skipped(source_id, "empty", f"{where}: the text is empty (null); fill it or drop the row")
    if not isinstance(text, str):
        return skipped(source_id, "invalid_row", f"{where}: the text is a {type(text).__name__}, not a string")
    return SourceText(source_id, text, ids=rest)


def _jsonl_rows(uri: str, data: bytes, text_column: str, id_columns: list[str]) -> Iterator[SourceText]:
    """One record per line (numbered from 1); each line decodes and parses on its own."""
    offset = 0
    for row, line in enumerate(data.split(b"\n"), 1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        where, name = f"{uri} line {row}", f"{os.path.basename(uri)}:{row}"
        decoded, message = decode_utf8(line, where, start)
        if decoded is None:
            yield skipped(name, "invalid_utf8", message)
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as err:
            yield skipped(name, "invalid_row", f"{where}: not valid JSON ({err.msg}); fix or remove the line")
            continue
        if not isinstance(record, dict) or text_column not in record:
            present = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise _missing_column(where, text_column, present)
        ids = {c: None if record[c] is None else str(record[c]) for c in id_columns if c in record}
        yield _source(uri, row, record[text_column], ids, where)


def iter_table_rows(uri: str, text_column: str, id_columns, store: Optional[Store] = None) -> Iterator[SourceText]:
    """Rows of one CSV / Parquet / JSONL file as SourceText records (data rows and lines count from 1)."""
    store = store or Store()
    try:
        data = store.read_bytes(uri)
    except OSError as err:
        yield skipped(uri, "unreadable", f"{uri}: cannot read ({err}); check the path and permissions")
        return
    id_columns = list(id_columns)
    if uri.endswith((".jsonl", ".ndjson")):
        yield from _jsonl_rows(uri, data, text_column, id_columns)
        return
    try:
        texts, id_values = _columnar_rows(uri, data, text_column, id_columns)
    except (pa.ArrowInvalid, OSError) as err:
        # Truncation is ArrowInvalid; a corrupt page (bad compression, bad page header) is an OSError.
        yield skipped(uri, "unreadable", f"{uri}: not a valid {uri.rsplit('.', 1)[-1]} file ({err}); replace or remove it")
        return
    for row, raw in enumerate(texts, 1):
        where = f"{uri} row {row}"
        # The raw cell bytes locate the bad byte in the file (unless CSV quoting changed them).
        text, message = (None, "") if raw is None else decode_utf8(raw, where, max(data.find(raw), 0))
        if message:
            yield skipped(f"{os.path.basename(uri)}:{row}", "invalid_utf8", message)
        else:
            yield _source(uri, row, text, {c: values[row - 1] for c, values in id_values.items()}, where)


def table_files(path: str, store: Optional[Store] = None) -> tuple[list[str], list[SourceText]]:
    """(the table file at `path`, or every CSV / Parquet / JSONL file under the folder `path`;
    skip records of links leading outside the folder)."""
    store = store or Store()
    if path.endswith(SUFFIXES):
        if not store.exists(path):
            raise FileNotFoundError(f"corpus.path {path} does not exist")
        return [path], []
    files, outside = corpus_files(path, SUFFIXES, store)
    if not files:
        raise FileNotFoundError(f"no {', '.join(SUFFIXES)} files at corpus.path {path}")
    return files, outside


def iter_tables(path: str, text_column: str, id_columns, store: Optional[Store] = None) -> Iterator[SourceText]:
    store = store or Store()
    files, outside = table_files(path, store)
    yield from outside
    for uri in files:
        logger.info("reading table %s", uri)
        yield from iter_table_rows(uri, text_column, id_columns, store)
