"""`cxrmem deid-rewrite`: the curator tool that replaces uniform de-identification markers.

Reads a table (CSV, Parquet or JSON Lines; local or s3://), replaces every marker in the text
column with a realistic surrogate chosen by context (see `surrogates.py`), and writes the table
in the format its output name says. Every other column and every cell without a marker is
written back unchanged.

Surrogates are drawn from a generator seeded by (mitigation.seed, row number): the same input
and seed always give the same output, and two copies of a duplicated report get different
surrogates, which is the point (duplicates are what the model memorizes).
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from typing import Optional

import numpy as np
import pandas as pd

from cxrmem.corpus.surrogates import SURROGATE_TYPES, replace_with_surrogates
from cxrmem.corpus.text import MARKER_REGEX, compile_marker_regex
from cxrmem.storage import Store

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def table_format(path: str) -> str:
    for suffix, fmt in FORMATS.items():
        if str(path).lower().endswith(suffix):
            return fmt
    raise ValueError(f"{path}: unknown table format; name it with one of {sorted(FORMATS)}")


def read_table(path: str, store: Optional[Store] = None) -> pd.DataFrame:
    store = store or Store()
    fmt = table_format(path)
    data = io.BytesIO(store.read_bytes(path))
    if fmt == "csv":
        # Every cell as text, "NA" and empty cells kept as written: the rewrite must not retype ids.
        return pd.read_csv(data, dtype=str, keep_default_na=False)
    if fmt == "parquet":
        return pd.read_parquet(data)
    return pd.read_json(data, lines=True, dtype=False)


def write_table(frame: pd.DataFrame, path: str, store: Optional[Store] = None) -> None:
    store = store or Store()
    fmt = table_format(path)
    buffer = io.BytesIO()
    if fmt == "csv":
        frame.to_csv(buffer, index=False)
    elif fmt == "parquet":
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_json(buffer, orient="records", lines=True, force_ascii=False)
    store.write_bytes(path, buffer.getvalue())


def rewrite_corpus(
    input_path: str,
    output_path: str,
    text_column: str = "text",
    marker_regex: str = MARKER_REGEX,
    seed: int = 1234,
    store: Optional[Store] = None,
) -> dict:
    """Rewrite `text_column` of the table at `input_path` into `output_path`; counts by surrogate type.

    Row r's surrogates are drawn from seed [seed, r]: the same input gives the same output.
    """
    table_format(output_path)  # fail before reading a large input
    store = store or Store()
    frame = read_table(input_path, store)
    if text_column not in frame.columns:
        raise ValueError(
            f"{input_path}: no column {text_column!r}; the columns are {list(frame.columns)}. "
            "Pass the report text column with --text-column."
        )
    pattern = compile_marker_regex(marker_regex)
    counts: Counter = Counter()
    rewritten, rows_touched = [], 0
    for row, text in enumerate(frame[text_column].tolist()):
        if not isinstance(text, str):
            rewritten.append(text)
            continue
        new_text, row_counts = replace_with_surrogates(text, pattern, np.random.default_rng([seed, row]))
        rows_touched += bool(row_counts)
        counts.update(row_counts)
        rewritten.append(new_text)
    frame[text_column] = rewritten
    write_table(frame, output_path, store)
    report = {
        "input": input_path,
        "output": output_path,
        "rows": len(frame),
        "rows_touched": rows_touched,
        "markers_replaced": sum(counts.values()),
        "by_type": {kind: counts.get(kind, 0) for kind in SURROGATE_TYPES},
        "seed": seed,
    }
    log.info("deid-rewrite: %s", report)
    return report
