"""`cxrmem prepare`: read a corpus, extract prompts, deduplicate them globally, write prompts.parquet.

`build_prompts_table` is the core (records and a tokenizer in, a table and counts out, no I/O);
`prepare(cfg)` is the I/O edge: it picks the reader for corpus.source, loads the model's tokenizer
and writes `prompts.parquet` and `prepare_summary.json` under run.output.

Nothing is dropped silently: every report that gives no prompt (unreadable file, invalid UTF-8,
no section, empty text, bad row) is counted by reason in the summary, with its first messages,
and logged. Prompts longer than the tokenizer allows are kept and flagged `truncated`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, defaultdict
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
from omegaconf import OmegaConf

from cxrmem import storage
from cxrmem.config import ConfigError
from cxrmem.corpus.text import SourceText, count_markers, normalise_whitespace, prompt_id, skipped

logger = logging.getLogger(__name__)

SUMMARY_FILE = "prepare_summary.json"
TOKENIZER_BATCH = 4096  # prompts per fast-tokenizer call
TOKENIZER_PROGRESS = 100_000  # prompts between progress lines while counting tokens
LOGGED_PER_REASON = 20  # skip messages logged per reason; the rest are counted
EXAMPLES_PER_REASON = 5  # skip messages kept per reason in the summary
TOP_DUPLICATED = 5


def token_counts(tokenizer, prompts: list[str], batch_size: int = TOKENIZER_BATCH) -> np.ndarray:
    """Tokens per prompt with special tokens and without truncation (what the encoder would have to cut)."""
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
    index: dict[str, int] = {}  # normalised prompt -> row
    prompts: list[str] = []
    source_ids: list[list[str]] = []
    id_lists: dict[str, list[list]] = {}  # further id column -> per prompt, parallel to source_ids
    sections: Counter = Counter()
    skips = _SkipLog()
    n_read, start = 0, time.perf_counter()
    for record in records:
        n_read += 1
        if progress_every and n_read % progress_every == 0:
            seconds = time.perf_counter() - start
            logger.info("read %d reports (%.0f/s): %d unique prompts, %d skipped", n_read, n_read / seconds, len(prompts), sum(skips.counts.values()))
        if record.skip is not None:
            skips.add(record)
            continue
        prompt = normalise_whitespace(record.text)
        if not prompt:
            what = f"the {record.section} section" if record.section else "the text"
            skips.add(skipped(record.source_id, "empty", f"{record.source_id}: {what} is empty or only whitespace; nothing to score"))
            continue
        sections[record.section or "TEXT"] += 1
        row = index.get(prompt)
        if row is None:
            row = index[prompt] = len(prompts)
            prompts.append(prompt)
            source_ids.append([])
            for column in id_lists.values():
                column.append([])
        source_ids[row].append(record.source_id)
        if record.ids or id_lists:
            ids = record.ids or {}
            for name in [name for name in ids if name not in id_lists]:
                # A column first seen now: None for every earlier report (this one is appended below).
                id_lists[name] = [[None] * len(s) for s in source_ids]
                id_lists[name][row].pop()
            for name, column in id_lists.items():
                column[row].append(ids.get(name))
    skips.finish()
    read_seconds = time.perf_counter() - start

    ids = [prompt_id(p) for p in prompts]
    if len(set(ids)) != len(ids):
        by_id: dict[str, str] = {}
        for pid, prompt in zip(ids, prompts):
            if pid in by_id:
                raise ValueError(f"prompt_id collision {pid}: {by_id[pid]!r} and {prompt!r}; report this corpus")
            by_id[pid] = prompt
    n_markers = np.array([count_markers(p, marker_regex) for p in prompts], dtype=np.int32)
    token_start = time.perf_counter()
    n_tokens = token_counts(tokenizer, prompts)
    token_seconds = time.perf_counter() - token_start
    n_reports = np.array([len(s) for s in source_ids], dtype=np.int64)

    order = np.argsort(np.array(ids, dtype=object), kind="stable") if ids else np.zeros(0, dtype=np.int64)
    pick = order.tolist()
    columns = {
        "prompt_id": pa.array([ids[i] for i in pick], pa.string()),
        "prompt": pa.array([prompts[i] for i in pick], pa.string()),
        "n_reports": pa.array(n_reports[order], pa.int64()),
        "source_ids": pa.array([source_ids[i] for i in pick], pa.list_(pa.string())),
        "has_marker": pa.array(n_markers[order] > 0, pa.bool_()),
        "n_markers": pa.array(n_markers[order], pa.int32()),
        "n_tokens": pa.array(n_tokens[order], pa.int32()),
        "truncated": pa.array(n_tokens[order] > max_length, pa.bool_()),
    }
    for name, values in id_lists.items():
        columns[name] = pa.array([values[i] for i in pick], pa.list_(pa.string()))
    table = pa.table(columns)

    n_used = int(n_reports.sum())
    top = np.argsort(-n_reports, kind="stable")[:TOP_DUPLICATED]
    counts = {
        "reports_read": n_read,
        "reports_with_prompt": n_used,
        "prompts_unique": len(prompts),
        "prompts_single_report": int((n_reports == 1).sum()),
        "skipped": dict(sorted(skips.counts.items())),
        "skipped_total": int(sum(skips.counts.values())),
        "skipped_examples": dict(skips.examples),
        "sections": dict(sections.most_common()),
        "marker_share_unique": round(float((n_markers > 0).mean()), 6) if prompts else 0.0,
        "marker_share_reports": round(float(n_reports[n_markers > 0].sum() / n_used), 6) if n_used else 0.0,
        "max_length": int(max_length),
        "truncated_unique": int((n_tokens > max_length).sum()),
        "n_tokens_max": int(n_tokens.max()) if prompts else 0,
        "top_duplicated": [
            {"prompt_id": ids[i], "prompt": prompts[i], "n_reports": int(n_reports[i])} for i in top.tolist()
        ],
        "seconds": {"read": round(read_seconds, 3), "tokenize": round(token_seconds, 3)},
    }
    return table, counts


def _synthetic_records(cfg, order) -> Iterator[SourceText]:
    from cxrmem.corpus.mimic import report_to_source
    from cxrmem.corpus.synthetic import iter_reports

    synthetic = cfg.corpus.synthetic
    n = synthetic.n_reports if cfg.corpus.max_reports is None else min(synthetic.n_reports, cfg.corpus.max_reports)
    for report in iter_reports(n, synthetic.seed, synthetic.marker_rate, synthetic.normal_share):
        ids = {"subject_id": report["subject_id"], "study": report["study"]}
        yield report_to_source(report["report_id"], report["text"], order, ids, f"synthetic report {report['report_id']}")


def iter_records(cfg) -> Iterator[SourceText]:
    """The records of the corpus that corpus.source names (at most corpus.max_reports)."""
    corpus, order, limit = cfg.corpus, list(cfg.corpus.sections), cfg.corpus.max_reports
    if corpus.source == "synthetic":
        return _synthetic_records(cfg, order)
    if corpus.source == "mimic_reports":
        from cxrmem.corpus.mimic import iter_mimic_reports

        return iter_mimic_reports(corpus.path, order, cfg.storage, workers=corpus.read_workers, limit=limit)
    if corpus.source == "iuxray":
        from cxrmem.corpus.iuxray import iter_iuxray_reports

        return iter_iuxray_reports(corpus.path, order, cfg.storage, limit=limit)
    from cxrmem.corpus.tables import iter_tables

    return islice(iter_tables(corpus.path, corpus.text_column, list(corpus.id_columns), cfg.storage), limit)


def corpus_settings(cfg) -> dict:
    """The corpus keys that decide which prompts a run holds (a resumed run must not mix two corpora)."""
    settings = OmegaConf.to_container(cfg.corpus, resolve=True)
    for key in ("progress_every", "read_workers"):  # how it is read, not what
        settings.pop(key)
    return settings


def check_same_corpus(cfg) -> None:
    """Raise if run.output already holds prompts prepared from other corpus settings."""
    summary_uri = storage.RunLayout(cfg.run.output).path(SUMMARY_FILE)
    if not storage.exists(summary_uri, cfg.storage):
        return  # prompts.parquet given by hand: nothing recorded to compare with
    recorded = storage.read_json(summary_uri, cfg.storage).get("corpus")
    if recorded is None:
        return  # prepared before the settings were recorded
    current = corpus_settings(cfg)
    changed = sorted(k for k in current if recorded.get(k) != current[k])
    if changed:
        raise ValueError(
            f"{cfg.run.output} holds an unfinished run prepared with other corpus settings "
            + ", ".join(f"corpus.{k}: {recorded.get(k)!r} then, {current[k]!r} now" for k in changed)
            + "; resume it with the same settings, or delete that folder (or choose another run.output) to start over"
        )


def prepare(cfg, tokenizer=None) -> dict:
    """Write prompts.parquet and prepare_summary.json under run.output; returns the summary.

    `tokenizer` defaults to the model's (`load_tokenizer(cfg.model)`); its `model_max_length`
    is the length beyond which a prompt counts as truncated.
    """
    from cxrmem.publish import RunExistsError, is_published

    try:
        re.compile(cfg.corpus.marker_regex)
    except re.error as err:
        raise ConfigError(f"config key 'corpus.marker_regex': {cfg.corpus.marker_regex!r} is not a valid regular expression ({err})") from None
    layout = storage.RunLayout(cfg.run.output)
    if not cfg.run.overwrite and is_published(cfg.run.output, cfg.storage):
        raise RunExistsError(f"{cfg.run.output} holds a published run; set run.overwrite=true or choose another run.output")
    if tokenizer is None:
        from cxrmem.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, cfg.storage)
    max_length = int(tokenizer.model_max_length)

    where = cfg.corpus.path or ("built-in" if cfg.corpus.source != "iuxray" else "torchxrayvision package")
    logger.info("preparing prompts from %s corpus at %s into %s", cfg.corpus.source, where, layout.prompts)
    start = time.perf_counter()
    table, counts = build_prompts_table(
        iter_records(cfg), cfg.corpus.marker_regex, tokenizer, max_length, cfg.corpus.progress_every
    )
    if table.num_rows == 0:
        raise ValueError(
            f"no prompts in the {cfg.corpus.source} corpus at {where}: {counts['reports_read']} reports read, "
            f"skipped {counts['skipped']}; first problems: {counts['skipped_examples']}"
        )
    storage.write_table(table, layout.prompts, cfg.storage)
    seconds = time.perf_counter() - start
    summary = {
        "source": cfg.corpus.source,
        "path": where,
        "corpus": corpus_settings(cfg),
        "prompts_file": layout.prompts,
        **counts,
        "seconds": {**counts["seconds"], "total": round(seconds, 3)},
        "reports_per_s": round(counts["reports_read"] / seconds, 1),
    }
    storage.write_json(layout.path(SUMMARY_FILE), summary, cfg.storage)
    logger.info(
        "%d reports -> %d unique prompts (%.1f%% with markers, %d truncated, %d skipped) in %.1f s",
        summary["reports_read"], summary["prompts_unique"], 100 * summary["marker_share_unique"],
        summary["truncated_unique"], summary["skipped_total"], seconds,
    )  # fmt: skip
    return summary
