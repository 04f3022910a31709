"""`cxrmem prepare`: read the corpus, extract prompts, deduplicate them globally.

Writes `prompts.parquet` and `prepare_summary.json` under run.output. Nothing is dropped
silently: every report that gives no prompt (unreadable file, invalid UTF-8, no section, empty
text, bad row) is counted by reason in the summary, with its first messages, and logged.
Prompts longer than the tokenizer allows are kept and flagged `truncated`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator, Optional

from omegaconf import OmegaConf

from cxrmem.corpus.prompts import build_prompts_table
from cxrmem.corpus.synthetic import SyntheticCorpusConfig
from cxrmem.corpus.text import MARKER_REGEX, SourceText
from cxrmem.publish import stage_writes
from cxrmem.runfiles import Run
from cxrmem.settings import OPTIONAL_POSITIVE, POSITIVE, ConfigError, Settings, check_names, check_regex, knob
from cxrmem.stages.results import PrepareSummary
from cxrmem.storage import Store

SECTIONS = ("IMPRESSION", "FINDINGS", "LAST_PARAGRAPH")  # the report sections a prompt can be read from


def _synthetic_records(cfg, store: Store) -> Iterator[SourceText]:
    from cxrmem.corpus.mimic import report_to_source
    from cxrmem.corpus.synthetic import iter_reports

    synthetic, order = cfg.corpus.synthetic, list(cfg.corpus.sections)
    n = synthetic.n_reports if cfg.corpus.max_reports is None else min(synthetic.n_reports, cfg.corpus.max_reports)
    for report in iter_reports(n, synthetic.seed, synthetic.marker_rate, synthetic.normal_share):
        ids = {"subject_id": report["subject_id"], "study": report["study"]}
        yield report_to_source(report["report_id"], report["text"], order, ids, f"synthetic report {report['report_id']}")


def _mimic_records(cfg, store: Store) -> Iterator[SourceText]:
    from cxrmem.corpus.mimic import iter_mimic_reports

    corpus = cfg.corpus
    return iter_mimic_reports(corpus.path, list(corpus.sections), store, workers=corpus.read_workers, limit=corpus.max_reports)


def _iuxray_records(cfg, store: Store) -> Iterator[SourceText]:
    from cxrmem.corpus.iuxray import iter_iuxray_reports

    return iter_iuxray_reports(cfg.corpus.path, list(cfg.corpus.sections), store, limit=cfg.corpus.max_reports)


def _table_records(cfg, store: Store) -> Iterator[SourceText]:
    from cxrmem.corpus.tables import iter_tables

    corpus = cfg.corpus
    return islice(iter_tables(corpus.path, corpus.text_column, list(corpus.id_columns), store), corpus.max_reports)


# corpus.source -> its reader: (cfg, store) -> the corpus's records, at most corpus.max_reports. A source is one entry here.
CORPUS_SOURCES: dict[str, Callable[..., Iterator[SourceText]]] = {
    "synthetic": _synthetic_records, "mimic_reports": _mimic_records, "table": _table_records, "iuxray": _iuxray_records,
}
NEEDS_PATH = ("mimic_reports", "table")  # the sources without a built-in default location


@dataclass(frozen=True)
class CorpusConfig(Settings):
    """The `corpus` config section: which reports, and how prompts are read from them."""

    source: str = "synthetic"  # a CORPUS_SOURCES name: synthetic | mimic_reports | table | iuxray
    path: Optional[str] = None  # folder, file or s3:// URI of the corpus (unused for synthetic, optional for iuxray)
    text_column: str = "text"  # text column of a table source
    id_columns: tuple[str, ...] = ("path", "subject_id", "study")  # source id columns kept if present
    sections: tuple[str, ...] = SECTIONS  # report sections to use, in order of preference
    marker_regex: str = MARKER_REGEX  # de-identification markers: MIMIC-CXR `___` and IU X-ray `XXXX` runs
    max_reports: Optional[int] = knob(None, OPTIONAL_POSITIVE)  # read at most this many reports (None: all)
    progress_every: int = knob(100000, POSITIVE)  # reports between progress lines while reading
    read_workers: int = knob(16, POSITIVE)  # threads reading report files in parallel (S3 reads are latency-bound)
    synthetic: SyntheticCorpusConfig = knob(SyntheticCorpusConfig())

    @staticmethod
    def check(section, key: str) -> None:
        for name in section.sections:
            if name not in SECTIONS:
                raise ConfigError(f"config key '{key}.sections': {name!r} is not one of {list(SECTIONS)}")
        check_regex(f"{key}.marker_regex", section.marker_regex)
        check_names(f"{key}.source", [section.source], CORPUS_SOURCES, "corpus source")  # read now: a registered source counts
        if section.source in NEEDS_PATH and not section.path:
            raise ConfigError(f"config key '{key}.path' is required when {key}.source={section.source}")

log = logging.getLogger(__name__)


def iter_records(cfg, store: Store) -> Iterator[SourceText]:
    """The records of the corpus that corpus.source names (at most corpus.max_reports)."""
    return CORPUS_SOURCES[cfg.corpus.source](cfg, store)


def corpus_settings(cfg) -> dict:
    """The corpus keys that decide which prompts a run holds (a resumed run must not mix two corpora)."""
    settings = json.loads(json.dumps(OmegaConf.to_container(cfg.corpus, resolve=True)))  # as prepare_summary.json holds them
    for key in ("progress_every", "read_workers"):  # how it is read, not what
        settings.pop(key)
    return settings


def read_prepare_summary(out: Run) -> Optional[PrepareSummary]:
    """The run's prepare_summary.json; None where prompts.parquet was given by hand (no summary)."""
    if not out.exists(out.layout.prepare_summary):
        return None
    return PrepareSummary.from_json(out.store.read_json(out.layout.prepare_summary))


def check_same_corpus(cfg, out: Run) -> None:
    """Raise if the run already holds prompts prepared from other corpus settings."""
    recorded = read_prepare_summary(out)
    if recorded is None:
        return  # prompts.parquet given by hand: nothing recorded to compare with
    recorded = recorded.corpus
    if recorded is None:
        return  # prepared before the settings were recorded
    current = corpus_settings(cfg)
    changed = sorted(k for k in current if recorded.get(k) != current[k])
    if changed:
        raise ValueError(
            f"{out.layout.prefix} holds an unfinished run prepared with other corpus settings "
            + ", ".join(f"corpus.{k}: {recorded.get(k)!r} then, {current[k]!r} now" for k in changed)
            + "; resume it with the same settings, or delete that folder (or choose another run.output) to start over"
        )


def run(cfg, out: Optional[Run] = None, tokenizer=None) -> PrepareSummary:
    """Write prompts.parquet and prepare_summary.json of the run (default: at run.output); returns the summary.

    `tokenizer` defaults to the model's (`load_tokenizer(cfg.model)`); its `model_max_length`
    is the length beyond which a prompt counts as truncated.
    """
    out = out or Run.of(cfg)
    store, layout = out.store, out.layout
    try:
        re.compile(cfg.corpus.marker_regex)
    except re.error as err:
        raise ConfigError(f"config key 'corpus.marker_regex': {cfg.corpus.marker_regex!r} is not a valid regular expression ({err})") from None
    with stage_writes(store, cfg.run, "prepare"):
        if tokenizer is None:
            from cxrmem.models.loading import load_tokenizer

            tokenizer = load_tokenizer(cfg.model, store)
        where = cfg.corpus.path or ("built-in" if cfg.corpus.source != "iuxray" else "torchxrayvision package")
        log.info("preparing prompts from %s corpus at %s into %s", cfg.corpus.source, where, layout.prompts)
        start = time.perf_counter()
        table, counts = build_prompts_table(
            iter_records(cfg, store), cfg.corpus.marker_regex, tokenizer, int(tokenizer.model_max_length), cfg.corpus.progress_every
        )
        if table.num_rows == 0:
            raise ValueError(
                f"no prompts in the {cfg.corpus.source} corpus at {where}: {counts['reports_read']} reports read, "
                f"skipped {counts['skipped']}; first problems: {counts['skipped_examples']}"
            )
        store.write_table(table, layout.prompts)
        seconds = time.perf_counter() - start
        summary = PrepareSummary(**{
            **counts,
            "source": cfg.corpus.source,
            "path": where,
            "corpus": corpus_settings(cfg),
            "prompts_file": layout.prompts,
            "seconds": {**counts["seconds"], "total": round(seconds, 3)},
            "reports_per_s": round(counts["reports_read"] / seconds, 1),
        })
        store.write_json(layout.prepare_summary, summary.to_json())
    log.info(
        "%d reports -> %d unique prompts (%.1f%% with markers, %d truncated, %d skipped) in %.1f s",
        summary.reports_read, summary.prompts_unique, 100 * summary.marker_share_unique,
        summary.truncated_unique, summary.skipped_total, seconds,
    )  # fmt: skip
    return summary
