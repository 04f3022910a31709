"""summary.json, typed: one dataclass per section, written once by the stage that owns it, read by field.

The file stays plain JSON, one top-level key per section, so MLflow, a notebook or `jq` read it
as they always did. In code a section is its dataclass: the stage builds it once and hands it to
`runfiles.write_sections`; the report gets a `RunSummary` and reads `summary.analysis.threshold`,
never a key it has to guess. The statistical results inside a section (an odds ratio with its
interval, a table of bins) stay dicts of numbers: their keys are documented where they are
computed (cxrmem/stats.py, cxrmem/analysis.py, cxrmem/attribution.py, cxrmem/judgement.py).

A section read from an older file lacks the fields added since: they read as their default.
Keys a newer writer added are ignored, so an old reader still reads a new run.

Durations are fields too: each section says which of its fields are wall seconds and which are
rates (`timings`), so the report's Run table lists them without looking at key names.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import ClassVar, Optional


@dataclass
class Record:
    """A dataclass written as one JSON object and read back by field: a summary.json section, a stage's result."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        """The record from its JSON; fields an older writer did not write take their default (None when required)."""
        values = {}
        for f in fields(cls):
            if f.name in data:
                values[f.name] = data[f.name]
            elif f.default is MISSING and f.default_factory is MISSING:
                values[f.name] = None
        return cls(**values)


@dataclass
class Section(Record):
    """One top-level section of summary.json; `name` is its key."""

    name: ClassVar[str]

    def timings(self) -> dict[str, float]:
        """`<label>: seconds` and `<label>: prompts/s` of this section, for the report's Run table."""
        return {}


@dataclass
class AnalysisSection(Section):
    """The analyze stage: the memorized set, the score distribution and the marker findings' numbers."""

    name: ClassVar[str] = "analysis"
    counts: dict  # prompts, scored, unscored, finite, nonfinite
    d_mem: dict  # mean, std, min of the finite scores
    percentiles: dict  # p50 ... p99.9, max
    top_percent: float
    threshold: Optional[float]  # the smallest d_mem in the memorized set
    memorized_count: int
    zscore_view: dict  # zscore, count, in_memorized_set
    marker_enrichment: dict  # crude odds ratio, CI, Fisher p, shares (stats.marker_enrichment)
    marker_enrichment_by_n_reports: dict  # per duplication bucket and Mantel-Haenszel
    marker_enrichment_adjusted: dict  # covariates, logistic, percentile (analysis.adjusted_enrichment)
    length: Optional[dict] = None  # Spearman with n_tokens, token means, bins (analysis.length_view)
    length_adjusted: Optional[dict] = None  # the length-adjusted set (analyze.length_adjusted)
    known_memorized: Optional[dict] = None  # detection against analyze.known_memorized
    model_fingerprints: list = field(default_factory=list)
    config_hashes: list = field(default_factory=list)
    config: Optional[dict] = None  # the public config of the scores (credentials never written)
    outputs: dict = field(default_factory=dict)
    memorized_by: str = "top_percent"  # what made the memorized set: the top share, or q-values (analyze.memorized_by)


@dataclass
class CalibrationSection(Section):
    """The analyze stage with a reference of non-members: p- and q-values per prompt (calibration.parquet),
    the calibrated memorized set and F0's global test (cxrmem/calibration.py)."""

    name: ClassVar[str] = "calibration"
    reference: dict  # source, prompts (scored, finite), dropped_in_corpus
    method: str  # how the p-values were made, in words
    fdr: float  # analyze.fdr
    discoveries: int  # prompts with q <= fdr: the calibrated memorized set
    discoveries_by_q: dict  # "0.05" / "0.1" -> count
    top_set_overlap: dict  # top_set (the top-percent set's size), both (in both sets)
    global_p: Optional[float]  # F0's p-value: corpus prompts above every reference prompt of their length (calibration.exceedance_test)
    smallest_plain_p: float  # the conformal floor 1 / (n_bin + 1) of the largest bin
    bins: list  # per length bin: upper edge of log tokens, reference and corpus prompts, median and spread of its reference
    spread: list = field(default_factory=lambda: [0.25, 0.75])  # analyze.reference_spread (runs before it: the IQR)
    tail: Optional[dict] = None  # the pooled standardized tail: threshold, exceedances, shape, scale, check_p, used
    beyond_reference: Optional[dict] = None  # F0's test: beyond, expected, p_value, per_bin (calibration.Exceedance)
    simes_p: Optional[float] = None  # Simes' test on the p-values (the smallest q-value), which rests on the fitted tail
    length_spearman: Optional[dict] = None  # Spearman(p-value, n_tokens) over the corpus: what conditioning left
    known_memorized: Optional[dict] = None  # recall of analyze.known_memorized at q <= fdr, and its discoveries' precision
    outputs: dict = field(default_factory=dict)


@dataclass
class DetectorsSection(Section):
    """The analyze stage: every other detector's agreement with d_mem (analysis.detector_agreement)."""

    name: ClassVar[str] = "detectors"
    reference: str
    top_percent: float
    fpr: Optional[float]  # None without known memorized prompts
    detectors: dict  # name -> column, paper, finite, spearman, top_overlap, auc, tpr_at_fpr
    skipped: dict = field(default_factory=dict)  # name -> why the model's denoiser cannot run it (cxrmem/capabilities.py): its column is NaN


@dataclass
class AttributionSection(Section):
    """The attribute stage: the marker's rank among each memorized prompt's words, observed and on the null model."""

    name: ClassVar[str] = "attribution"
    prompts: int
    prompts_with_marker: int
    mean_units_per_prompt: Optional[float]
    gradient: Optional[dict]  # attribution.marker_rank_stats under the summed gradient
    gradient_per_piece_mean: Optional[dict]
    leave_one_out: Optional[dict]  # None with attribution.leave_one_out off
    seconds: float
    tokens: str  # tokens.parquet
    null: Optional[dict] = None  # attribution.null_comparison; None without attribution.null_model
    null_seconds: Optional[float] = None
    null_seed: Optional[int] = None
    model: Optional[dict] = None  # the scores' model_fingerprint and config_hash: the model these rows came from
    steps: Optional[int] = None  # k: the gradient and leave-one-out ran the first k steps of the T-step schedule

    def timings(self) -> dict[str, float]:
        return _present({"attribute: seconds": self.seconds, "attribute, null model: seconds": self.null_seconds})


@dataclass
class MitigationSection(Section):
    """The mitigate stage: per strategy the mean d_mem and distance (mitigation.mitigation_summary)."""

    name: ClassVar[str] = "mitigation"
    strategies: dict
    prompts: int
    n_generations: int
    seconds: float
    mitigation: str  # mitigation.parquet
    figures: list = field(default_factory=list)
    sample: Optional[dict] = None  # which memorized prompts were mitigated and why (mitigation_sizing.sample_record)
    stopping: Optional[dict] = None  # per strategy: prompts used, paired d_mem change and why it stopped (SequentialRule)
    model: Optional[dict] = None  # the scores' model_fingerprint and config_hash: the model these rows came from
    skipped: dict = field(default_factory=dict)  # strategy -> why the model's denoiser cannot run it (cxrmem/capabilities.py): no rows

    def timings(self) -> dict[str, float]:
        return {"mitigate: seconds": self.seconds}


@dataclass
class CopiesSection(Section):
    """The copies stage: per guidance `w=<g>` the copy counts, AUC and the strategies' judgement (cxrmem/judgement.py)."""

    name: ClassVar[str] = "copies"
    headline: dict  # w=<g> -> one line
    prompts: int
    guidances: dict  # w=<g> -> copies.guidance_summary, with `judgement`
    rule: str  # the copy threshold's rule
    threshold_quantile: float
    generations: int
    top_k: int
    embedder: str
    strategies_checked: list
    index: dict  # what the image index job did (stages/image_index.build_index)
    copies: str  # copies.parquet
    figures: list = field(default_factory=list)
    model: Optional[dict] = None  # the scores' model_fingerprint and config_hash: the model these rows came from
    sample: Optional[dict] = None  # the memorized prompts checked: mitigation's stratified sample (mitigation_sizing.sample_record)
    reuse: Optional[dict] = None  # per guidance w=<g>: prompt-strategy pairs taken from mitigation's generations vs generated; why
    skipped: dict = field(default_factory=dict)  # strategy -> why the model's denoiser cannot run it: not checked

    def timings(self) -> dict[str, float]:
        return _present({"image index: seconds": (self.index or {}).get("seconds")})

    def judgements(self) -> dict[str, list[dict]]:
        """w=<g> -> the StrategyJudgement rows (as dicts) of that guidance; empty where none was judged."""
        return {name: ((g.get("judgement") or {}).get("strategies") or []) for name, g in (self.guidances or {}).items()}


@dataclass
class CascadeSection(Section):
    """The cascade (cxrmem/stages/cascade.py): its stages, rounds, compute and the self-check."""

    name: ClassVar[str] = "cascade"
    stages: list
    rounds: list
    widened: bool
    corpus: int
    fully_scored: int
    analysis_top_percent: float  # the top share of the fully scored prompts that is the corpus's top_percent
    evaluations: dict  # screens, full, audit, total, per_prompt, audit_per_prompt, full_score_per_prompt
    audit: dict  # threshold, rejected, sample, misses, estimate, upper, missed_prompts_upper, evaluations
    verdict: str
    continuation: dict = field(default_factory=dict)  # enabled, off_because, continued, evaluations_saved (cxrmem/stages/continuation.py)
    bounds: dict = field(default_factory=dict)  # cxrmem/cascade_bounds.py AuditBounds: recall_lower_bound, expected_missed, ...


@dataclass
class CostSection(Section):
    """The model work of each stage, counted where it happens (cxrmem/scoring/scorer.py `UNetWork`) and brought back with
    its results: `score` (the cascade's screens, full score and audit sample included), `reference`, `attribute`,
    `mitigate`, `copies`, each the work of its last run (a resumed scoring counts the prompts it computed)."""

    name: ClassVar[str] = "cost"
    corpus_prompts: int
    stages: dict  # stage -> UNetWork.to_json(): unet_samples, backward_samples, vae_decodes, evaluations
    total: dict  # the same, summed over the stages
    evaluations_per_prompt: Optional[float]  # total evaluations per corpus prompt (None without prompts)

    @classmethod
    def with_stage(cls, before: Optional["CostSection"], corpus_prompts: int, stage: str, work: dict) -> "CostSection":
        """`before` (None: no stage recorded yet) with `stage`'s work in place of its last record."""
        stages = {**(before.stages if before else {}), stage: work}
        total = {key: sum(w[key] for w in stages.values()) for key in work}
        per_prompt = total["evaluations"] / corpus_prompts if corpus_prompts else None
        return cls(corpus_prompts=corpus_prompts, stages=stages, total=total, evaluations_per_prompt=per_prompt)


@dataclass
class AuditSection(Section):
    """`cxrmem audit`: the scoring result and the wall seconds of every stage."""

    name: ClassVar[str] = "audit"
    output: str
    scoring: dict  # the score stage's (or the cascade's) result
    memorized_count: int
    threshold: Optional[float]
    timings_s: dict  # stage -> wall seconds, in run order
    model_loads: dict = field(default_factory=dict)  # actor pid -> models it loaded: 1 each, one pool for every stage

    def timings(self) -> dict[str, float]:
        scoring = self.scoring or {}
        out = {f"{stage}: seconds": s for stage, s in (self.timings_s or {}).items()}
        return out | _present({"score: prompts/s": scoring.get("prompts_per_s"),
                               "score: prompts/s after start-up": scoring.get("prompts_per_s_after_startup"),
                               "score: start-up seconds": scoring.get("startup_s")})


@dataclass
class RescoreSection(Section):
    """`cxrmem rescore`: why this run was scored and how its memorized set moved against the previous run."""

    name: ClassVar[str] = "rescore"
    status: str
    reason: str
    previous: Optional[str]
    previous_model_fingerprint: Optional[str]
    run: str
    model_fingerprint: str
    memorized_count: int
    # Against the previous run (analysis.score_diff); None on a first run.
    diff: Optional[str] = None  # the per-prompt diff file
    prompts: Optional[int] = None  # in either run's memorized set
    compared: Optional[int] = None  # of those, scored in both runs
    entered: Optional[int] = None
    left: Optional[int] = None
    stayed: Optional[int] = None
    mean_abs_d_mem_change: Optional[float] = None
    max_abs_d_mem_change: Optional[float] = None


SECTIONS: tuple[type[Section], ...] = (AnalysisSection, CalibrationSection, DetectorsSection, AttributionSection, MitigationSection,
                                       CopiesSection, CascadeSection, CostSection, AuditSection, RescoreSection)
BY_NAME = {s.name: s for s in SECTIONS}


@dataclass
class RunSummary:
    """Every section of one run's summary.json; a stage that has not run leaves its section None."""

    analysis: Optional[AnalysisSection] = None
    calibration: Optional[CalibrationSection] = None
    detectors: Optional[DetectorsSection] = None
    attribution: Optional[AttributionSection] = None
    mitigation: Optional[MitigationSection] = None
    copies: Optional[CopiesSection] = None
    cascade: Optional[CascadeSection] = None
    cost: Optional[CostSection] = None
    audit: Optional[AuditSection] = None
    rescore: Optional[RescoreSection] = None

    @classmethod
    def from_json(cls, data: dict) -> "RunSummary":
        return cls(**{name: kind.from_json(data[name]) for name, kind in BY_NAME.items() if isinstance(data.get(name), dict)})

    def present(self) -> list[Section]:
        return [s for s in (getattr(self, name) for name in BY_NAME) if s is not None]

    def timings(self) -> dict[str, float]:
        """Every section's durations and rates, labelled by stage (the audit's per-stage seconds first)."""
        out: dict[str, float] = {}
        for section in sorted(self.present(), key=lambda s: s.name != "audit"):
            out |= {k: v for k, v in section.timings().items() if k not in out}
        return out


def _present(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}
