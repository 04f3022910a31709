"""What each stage's `run` returns, typed: one dataclass per stage, read by field.

The stages that write a summary.json section return that section (cxrmem/summary.py: AttributionSection,
MitigationSection, CopiesSection); the others return a result here. `to_json()` is what the CLI prints.
This module imports no stage, so the stage table (table.py) names result types without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cxrmem.summary import Record


@dataclass
class Skipped(Record):
    """A stage its settings turn off: nothing run, nothing written."""

    stage: str
    reason: str  # the setting that turns it off, e.g. "attribution.enabled=false"


@dataclass
class PrepareSummary(Record):
    """prepare_summary.json: what `cxrmem prepare` read (cxrmem/corpus/prompts.py prompts_counts) and wrote."""

    source: str  # corpus.source
    path: str  # corpus.path, or where a built-in corpus comes from
    corpus: dict  # the corpus settings that decide the prompts (prepare.corpus_settings): a resume must match them
    prompts_file: str  # prompts.parquet
    reports_read: int
    reports_with_prompt: int
    prompts_unique: int
    prompts_single_report: int
    skipped: dict  # reason -> reports
    skipped_total: int
    skipped_examples: dict  # reason -> its first messages
    sections: dict  # report section -> prompts read from it
    marker_share_unique: float
    marker_share_reports: float
    max_length: int  # the tokenizer's model_max_length: a longer prompt is `truncated`
    truncated_unique: int
    n_tokens_max: int
    top_duplicated: list  # prompt_id, prompt, n_reports of the most duplicated prompts
    seconds: dict  # read, tokenize, total
    reports_per_s: float


@dataclass
class ScoreResult(Record):
    """`cxrmem score`: scores.parquet and what this run computed, resumed and merged."""

    scores: str  # scores.parquet
    total: int  # prompts to score
    computed: int  # scored by this run
    resumed: int  # found in part files of an earlier run
    parts_written: int
    rows: int  # rows of scores.parquet
    duplicates_dropped: int
    seconds: float
    prompts_per_s: float
    startup_s: Optional[float]
    prompts_per_s_after_startup: Optional[float]
    model_fingerprint: str
    config_hash: str
    work: dict = field(default_factory=dict)  # the model work counted (cxrmem/scoring/scorer.py UNetWork)


@dataclass
class CascadeResult(ScoreResult):
    """`cxrmem score` with cascade.enabled: the full score of the survivors, and the screens before it."""

    screen: str = ""  # the first screen's detector
    screening: dict = field(default_factory=dict)  # scores: the first screen's scores.parquet
    selected: int = 0  # the survivors of the last screen
    unet_evaluations_full: int = 0  # a full score of the whole corpus would cost
    unet_evaluations_cascade: int = 0  # the screens and the full score of the survivors cost
    analysis_top_percent: float = 0.0  # the top share of the fully scored prompts that is the corpus's top_percent
    cascade: dict = field(default_factory=dict)  # summary.json["cascade"]


@dataclass
class ReferenceResult(Record):
    """`cxrmem reference`: the reference's prompts (reference/reference.json) and its scores."""

    source: str  # analyze.reference
    prompts: int  # kept: not in the audited corpus
    dropped_in_corpus: int
    scores: str  # reference/scores.parquet
    computed: int
    resumed: int
    work: dict = field(default_factory=dict)  # the model work counted, recorded as the corpus run's `reference` cost


@dataclass
class AnalyzeResult(Record):
    """`cxrmem analyze`: the memorized set's size and where it is written (summary.json["analysis"] holds the rest)."""

    memorized: str  # memorized_prompts.csv
    summary: str  # summary.json
    memorized_count: int
    threshold: Optional[float]  # the smallest d_mem in the memorized set
    marker_odds_ratio: Optional[float]
    calibrated_count: Optional[int] = None  # with analyze.reference: prompts with q <= analyze.fdr
    global_p: Optional[float] = None  # with analyze.reference: F0's global p-value


@dataclass
class ReportResult(Record):
    """`cxrmem report`: the files written."""

    report: str  # report.html
    metrics: str  # metrics.json
    summary_md: str
    figures: list  # figures/*.png drawn
    sections: dict  # section key -> "rendered", or which input is absent
