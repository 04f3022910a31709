"""The prompts table: a corpus's records deduplicated globally into one row per unique prompt.

`build_prompts_table` takes records and a tokenizer and gives a table and counts, with no I/O;
the `prepare` stage (cxrmem/stages/prepare.py) picks the reader for corpus.source and writes
`prompts.parquet` and `prepare_summary.json`.

Nothing is dropped silently: every report that gives no prompt (unreadable file, invalid UTF-8,
no section, empty text, bad row) is counted by reason in the summary, with its first messages,
and logged. Prompts longer than the tokenizer allows are kept and flagged `truncated`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Iterable

import numpy as np
import pyarrow as pa

from cxrmem.corpus.text import SourceText, count_markers, normalise_whitespace, prompt_id, skipped

logger = logging.getLogger(__name__)

TOKENIZER_BATCH = 4096  # prompts per fast-tokenizer call
TOKENIZER_PROGRESS = 100_000  # prompts between progress lines while counting tokens
LOGGED_PER_REASON = 20  # skip messages logged per reason; the rest are counted
EXAMPLES_PER_REASON = 5  # skip messages kept per reason in the summary
TOP_DUPLICATED = 5


def token_counts(tokenizer, prompts: list[str], batch_size: int = TOKENIZER_BATCH) -> np.ndarray:
    """Tokens per prompt with special tokens and without truncation (what the encoder would have to cut);
    without a tokenizer (None) whitespace-separated words, the length unit of a list checked with no model."""
    if tokenizer is None:
        return np.array([len(p.split()) for p in prompts], dtype=np.int32)
    counts = np.zeros(len(prompts), dtype=np.int32)
    for lo in range(0, len(prompts), batch_size):
        encoded = tokenizer(
            prompts[lo : lo + batch_size],
            add_special_tokens=True,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        counts[lo : lo + batch_size] = [len(ids) for ids in encoded["input_ids"]]
        done = min(lo + batch_size, len(prompts))
        if done % TOKENIZER_PROGRESS < batch_size and done < len(prompts):
            logger.info("counted tokens of %d/%d unique prompts", done, len(prompts))
    return counts


class _SkipLog:
    """Counts skipped reports by reason, logs the first few of each and keeps examples for the summary."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, record: SourceText) -> None:
        self.counts[record.skip] += 1
        n = self.counts[record.skip]
        if n <= LOGGED_PER_REASON:
            logger.warning("skipped (%s): %s", record.skip, record.message)
        if n <= EXAMPLES_PER_REASON:
            self.examples[record.skip].append(record.message)

    def finish(self) -> None:
        for reason, n in sorted(self.counts.items()):
            if n > LOGGED_PER_REASON:
                logger.warning("skipped (%s): %d more reports not logged; prepare_summary.json counts them", reason, n - LOGGED_PER_REASON)


class UniquePrompts:
    """Normalised prompts in first-seen order, with the reports behind each and the reasons reports gave none."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # normalised prompt -> row
        self.prompts: list[str] = []
        self.source_ids: list[list[str]] = []
        self.id_lists: dict[str, list[list]] = {}  # further id column -> per prompt, parallel to source_ids
        self.sections: Counter = Counter()
        self.skips = _SkipLog()
        self.n_read = 0

    def add(self, record: SourceText) -> None:
        self.n_read += 1
        if record.skip is not None:
            self.skips.add(record)
            return
        prompt = normalise_whitespace(record.text)
        if not prompt:
            what = f"the {record.section} section" if record.section else "the text"
            self.skips.add(skipped(record.source_id, "empty", f"{record.source_id}: {what} is empty or only whitespace; nothing to score"))
            return
        self.sections[record.section or "TEXT"] += 1
        row = self.index.get(prompt)
        if row is None:
            row = self.index[prompt] = len(self.prompts)
            self.prompts.append(prompt)
            self.source_ids.append([])
            for column in self.id_lists.values():
                column.append([])
        self.source_ids[row].append(record.source_id)
        if record.ids or self.id_lists:
            ids = record.ids or {}
            for name in [name for name in ids if name not in self.id_lists]:
                # A column first seen now: None for every earlier report (this one is appended below).
                self.id_lists[name] = [[None] * len(s) for s in self.source_ids]
                self.id_lists[name][row].pop()
            for name, column in self.id_lists.items():
                column[row].append(ids.get(name))


def collect_prompts(records: Iterable[SourceText], progress_every: int) -> UniquePrompts:
    unique, start = UniquePrompts(), time.perf_counter()
    for record in records:
        unique.add(record)
        if progress_every and unique.n_read % progress_every == 0:
            n, seconds = unique.n_read, time.perf_counter() - start
            logger.info("read %d reports (%.0f/s): %d unique prompts, %d skipped", n, n / seconds, len(unique.prompts), sum(unique.skips.counts.values()))
    unique.skips.finish()
    return unique


def prompt_ids(prompts: list[str]) -> list[str]:
    """The prompts' ids; two prompts with one id (a sha256 prefix collision) are an error."""
    ids = [prompt_id(p) for p in prompts]
    if len(set(ids)) != len(ids):
        by_id: dict[str, str] = {}
        for pid, prompt in zip(ids, prompts):
            if pid in by_id:
                raise ValueError(f"prompt_id collision {pid}: {by_id[pid]!r} and {prompt!r}; report this corpus")
            by_id[pid] = prompt
    return ids


def build_prompts_table(
    records: Iterable[SourceText],
    marker_regex: str,
    tokenizer,
    max_length: int,
    progress_every: int = 100_000,
) -> tuple[pa.Table, dict]:
    """Deduplicate the records' prompts globally; the prompts table (sorted by prompt_id) and its counts.

    Columns: prompt_id, prompt, n_reports, source_ids (list<string>), has_marker, n_markers,
    n_tokens, truncated, and one list<string> column per further source id (e.g. subject_id,
    study), parallel to source_ids.
    """
    start = time.perf_counter()
    unique = collect_prompts(records, progress_every)
    read_seconds = time.perf_counter() - start
    prompts, ids = unique.prompts, prompt_ids(unique.prompts)
    n_markers = np.array([count_markers(p, marker_regex) for p in prompts], dtype=np.int32)
    token_start = time.perf_counter()
    n_tokens = token_counts(tokenizer, prompts)
    token_seconds = time.perf_counter() - token_start
    n_reports = np.array([len(s) for s in unique.source_ids], dtype=np.int64)

    order = np.argsort(np.array(ids, dtype=object), kind="stable") if ids else np.zeros(0, dtype=np.int64)
    pick = order.tolist()
    columns = {
        "prompt_id": pa.array([ids[i] for i in pick], pa.string()),
        "prompt": pa.array([prompts[i] for i in pick], pa.string()),
        "n_reports": pa.array(n_reports[order], pa.int64()),
        "source_ids": pa.array([unique.source_ids[i] for i in pick], pa.list_(pa.string())),
        "has_marker": pa.array(n_markers[order] > 0, pa.bool_()),
        "n_markers": pa.array(n_markers[order], pa.int32()),
        "n_tokens": pa.array(n_tokens[order], pa.int32()),
        "truncated": pa.array(n_tokens[order] > max_length, pa.bool_()),
    }
    for name, values in unique.id_lists.items():
        columns[name] = pa.array([values[i] for i in pick], pa.list_(pa.string()))
    counts = prompts_counts(unique, ids, n_reports, n_markers, n_tokens, max_length)
    counts["seconds"] = {"read": round(read_seconds, 3), "tokenize": round(token_seconds, 3)}
    return pa.table(columns), counts


def prompts_counts(unique: UniquePrompts, ids: list[str], n_reports, n_markers, n_tokens, max_length: int) -> dict:
    """What prepare_summary.json records of a prompts table: reads, skips, markers, truncation, top duplicates."""
    prompts, skips = unique.prompts, unique.skips
    n_used = int(n_reports.sum())
    top = np.argsort(-n_reports, kind="stable")[:TOP_DUPLICATED]
    return {
        "reports_read": unique.n_read,
        "reports_with_prompt": n_used,
        "prompts_unique": len(prompts),
        "prompts_single_report": int((n_reports == 1).sum()),
        "skipped": dict(sorted(skips.counts.items())),
        "skipped_total": int(sum(skips.counts.values())),
        "skipped_examples": dict(skips.examples),
        "sections": dict(unique.sections.most_common()),
        "marker_share_unique": round(float((n_markers > 0).mean()), 6) if prompts else 0.0,
        "marker_share_reports": round(float(n_reports[n_markers > 0].sum() / n_used), 6) if n_used else 0.0,
        "max_length": int(max_length),
        "truncated_unique": int((n_tokens > max_length).sum()),
        "n_tokens_max": int(n_tokens.max()) if prompts else 0,
        "top_duplicated": [
            {"prompt_id": ids[i], "prompt": prompts[i], "n_reports": int(n_reports[i])} for i in top.tolist()
        ],
    }
