"""`cxrmem analyze`: the score distribution, the memorized set and marker enrichment of one run.

Reads scores.parquet and prompts.parquet and writes memorized_prompts.csv (the paper's released
list: column `prompt` first) and the "analysis" section of summary.json. Only small columns of
the whole corpus are read (ids, d_mem, flags, counts); prompt text only for the memorized rows.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from cxrmem import stats, storage
from cxrmem.analysis import (
    PROMPT_COLUMNS,
    RUN_ID_COLUMNS,
    SCORE_COLUMNS,
    AdjustSettings,
    analyze_tables,
    detector_agreement,
    known_memorized_ids,
)
from cxrmem.calibration import CalibrationSettings, calibrate, exceedance_test, global_null_p
from cxrmem.detectors import REGISTRY
from cxrmem.publish import stage_writes
from cxrmem.runfiles import Run, check_prompt_ids
from cxrmem.settings import PERCENT, POSITIVE, ConfigError, knob, public_config
from cxrmem.stages.prepare import read_prepare_summary
from cxrmem.stages.results import AnalyzeResult
from cxrmem.stages.score_parts import skipped_detectors
from cxrmem.storage import Store
from cxrmem.summary import CalibrationSection

log = logging.getLogger(__name__)

INCREASING_EDGES = (lambda v: len(v) > 0 and v[0] >= 1 and all(a < b for a, b in zip(v, v[1:])), "increasing positive lower edges")


class NothingScoredError(ValueError):
    """No prompt has a finite score: there is no distribution, no memorized set, nothing to report."""


def check_something_scored(counts: dict, scores_uri: str) -> None:
    """Refuse an analysis of a run that scored nothing (every score non-finite, or no rows), in one line."""
    if counts["finite"] > 0:
        return
    if counts["scored"] == 0:
        raise NothingScoredError(f"nothing was scored: {scores_uri} has no rows; run `cxrmem score` (or `cxrmem audit`) again")
    raise NothingScoredError(
        f"nothing was scored: all {counts['scored']} scores in {scores_uri} are non-finite (NaN or infinite noise norms), "
        "so there is no memorized set to report. The model's weights or its precision are broken (float16 overflows: "
        "try model.dtype=bfloat16 or float32): check the model, then audit again into a new run.output"
    )


def token_limit(cfg, out: Run) -> Optional[int]:
    """The model's prompt length in tokens (its tokenizer's model_max_length) that `truncated` is measured
    against: from prepare_summary.json, else from the model's tokenizer; None when neither can be read."""
    prepared = read_prepare_summary(out)
    if prepared is not None and isinstance(prepared.max_length, int):
        return prepared.max_length
    try:
        from cxrmem.models.loading import load_tokenizer

        return int(load_tokenizer(cfg.model, out.store).model_max_length)
    except Exception as err:  # the flag stays; only the number is missing
        log.warning("analyze: the model's token limit is unknown (%s: %s); truncated prompts are flagged without it", type(err).__name__, err)
        return None


def flag_truncated(cfg, out: Run, memorized: pd.DataFrame) -> pd.DataFrame:
    """memorized_prompts.csv's `truncated` (the prompt is longer than the model reads: its d_mem is that of its
    first `token_limit` tokens) and `token_limit`; unchanged for prompts.parquet written without the flag."""
    if "truncated" not in memorized.columns:
        return memorized
    memorized["truncated"] = memorized["truncated"].fillna(False).astype(bool)
    if memorized["truncated"].any():
        limit = token_limit(cfg, out)
        memorized["token_limit"] = pd.array([limit] * len(memorized), dtype="Int64")
        log.warning("analyze: %d of the %d memorized prompts are longer than the model's %s tokens and were scored truncated",
                    int(memorized["truncated"].sum()), len(memorized), limit if limit is not None else "(unknown)")  # fmt: skip
    return memorized


def read_known_memorized(store: Store, uri: str) -> set[str]:
    """prompt_ids of the prompts a CSV lists as memorized (column `prompt`; a `planted` column filters)."""
    if not store.exists(uri):
        raise FileNotFoundError(f"{uri} (analyze.known_memorized) does not exist; fix the path or set it to null")
    table = pd.read_csv(io.StringIO(store.read_text(uri)), keep_default_na=False)
    if "prompt" not in table:
        raise ValueError(f"{uri} (analyze.known_memorized) has no `prompt` column; its columns are {list(table.columns)}")
    return known_memorized_ids(table)


def read_columns(store: Store, uri: str, columns: list[str], missing_hint: str) -> pd.DataFrame:
    """The named columns of a run's Parquet file; a missing file or column says which stage to rerun."""
    if not store.exists(uri):
        raise FileNotFoundError(f"{uri} does not exist: {missing_hint}")
    missing = [c for c in columns if c not in store.parquet_schema(uri).names]
    if missing:
        raise ValueError(f"{uri} lacks the columns {missing}; rerun the stage that writes it")
    frame = store.read_table(uri, columns=columns).to_pandas()
    check_prompt_ids(frame["prompt_id"], uri)
    return frame


@dataclass(frozen=True)
class AnalyzeConfig(AdjustSettings, CalibrationSettings):
    """The `analyze` config section: the memorized set, its controls (AdjustSettings) and its calibration
    against a reference of non-members (CalibrationSettings)."""

    top_percent: float = knob(1.0, PERCENT)  # memorized set: prompts in the top q percent of d_mem (the paper: 1)
    zscore: float = knob(3.0, POSITIVE)  # second view: prompts with d_mem z-score above this
    n_reports_buckets: tuple[int, ...] = knob((1, 2, 5, 20, 100), INCREASING_EDGES)  # lower edges of duplication buckets
    known_memorized: Optional[str] = None  # CSV of prompts known to be memorized (column `prompt`; planted=false skipped): checks detection
    reference: Optional[str] = None  # table of prompts the model was NOT trained on: p-values, FDR, F0 (docs/design.md)
    reference_text_column: str = "prompt"  # the reference table's text column
    memorized_by: str = knob("top_percent", choices=["top_percent", "q_value"])  # the set later stages and F1-F3 read: top share | q <= fdr

    @staticmethod
    def check(section, key: str) -> None:
        AdjustSettings.check(section, key)
        if section.memorized_by == "q_value" and not section.reference:
            raise ConfigError(f"config key '{key}.memorized_by': q_value needs a reference of non-members ({key}.reference)")


def detector_names(store: Store, scores_uri: str) -> list[str]:
    """The REGISTRY detectors whose score column scores.parquet holds (score.detectors when it was scored)."""
    if not store.exists(scores_uri):
        return []
    columns = set(store.parquet_schema(scores_uri).names)
    return [name for name, spec in REGISTRY.items() if spec.columns[0] in columns]


def calibrate_run(cfg, out: Run, scores: pd.DataFrame, prompts: pd.DataFrame, top_set: set,
                  known: Optional[set]) -> CalibrationSection:  # fmt: skip
    """calibration.parquet (p- and q-values of every scored prompt against the reference) and its section."""
    store, layout = out.store, out.layout
    ref = layout.reference
    ref_scores = read_columns(store, ref.scores, SCORE_COLUMNS, "run `cxrmem reference` (analyze.reference is set)")
    ref_prompts = read_columns(store, ref.prompts, ["prompt_id", "n_tokens"], "run `cxrmem reference` (analyze.reference is set)")
    ref_frame = ref_scores.merge(ref_prompts, on="prompt_id")
    ref_frame = ref_frame[np.isfinite(ref_frame["d_mem"]) & ~ref_frame["nonfinite"]]
    frame = scores.merge(prompts[["prompt_id", "n_tokens"]], on="prompt_id", how="left")
    settings = CalibrationSettings.of(cfg.analyze)
    d_mem = np.where(frame["nonfinite"], np.nan, frame["d_mem"].to_numpy(np.float64))
    result = calibrate(d_mem, np.log(frame["n_tokens"].to_numpy(np.float64)), ref_frame["d_mem"].to_numpy(np.float64),
                       np.log(ref_frame["n_tokens"].to_numpy(np.float64)), settings)  # fmt: skip
    table = pa.table({"prompt_id": frame["prompt_id"].to_numpy(), "p_value": result.p_value, "q_value": result.q_value,
                      "length_bin": result.length_bin.astype(np.int32)})  # fmt: skip
    store.write_table(table, layout.calibration)
    called = result.q_value <= settings.fdr
    beyond = exceedance_test(d_mem, result.length_bin, result.bins)
    ids = frame["prompt_id"].to_numpy()
    finite = np.isfinite(result.p_value)
    info = store.read_json(storage.join(ref.prefix, "reference.json"))
    bins = [{"log_tokens_upper": float(edge), "reference": int(len(r)), "corpus": int((result.length_bin == b).sum()),
             "median": result.scales[b][0], "spread": result.scales[b][1]}
            for b, (edge, r) in enumerate(zip(result.bins.edges, result.bins.reference))]  # fmt: skip
    known_check = None
    if known is not None:
        is_known = np.isin(ids, list(known))
        known_check = {"listed": int(is_known.sum()), "recall": float(called[is_known].mean()) if is_known.any() else None,
                       "precision": float(is_known[called].mean()) if called.any() else None}  # fmt: skip
    return CalibrationSection(
        reference={"source": info["source"], "prompts": int(len(ref_frame)), "dropped_in_corpus": info["dropped_in_corpus"]},
        method=(f"conformal p-values against the reference, conditional on length ({len(bins)} bins of log token count)"
                + (", a generalized Pareto upper tail of the bins' standardized scores beyond the conformal floor"
                   if settings.reference_tail == "gpd" else "")
                + "; Benjamini-Hochberg q-values"),
        fdr=settings.fdr, discoveries=int(called.sum()),
        discoveries_by_q={str(q): int((result.q_value <= q).sum()) for q in (0.05, 0.1)},
        top_set_overlap={"top_set": len(top_set), "both": int(np.isin(ids[called], list(top_set)).sum())},
        global_p=beyond.p_value, beyond_reference=asdict(beyond), simes_p=global_null_p(result.q_value),
        smallest_plain_p=result.smallest_plain_p, bins=bins, spread=list(settings.reference_spread),
        tail=asdict(result.tail) if result.tail else None,
        length_spearman=stats.spearman(result.p_value[finite], frame["n_tokens"].to_numpy(np.float64)[finite]) if finite.sum() > 2 else None,
        known_memorized=known_check, outputs={"calibration": layout.calibration},
    )  # fmt: skip


def top_share_ids(scores: pd.DataFrame, top_percent: float) -> set:
    """The prompt_ids of the top share of the finite scores (the paper's memorized set)."""
    finite = scores[np.isfinite(scores["d_mem"]) & ~scores["nonfinite"].fillna(False).astype(bool)]
    mask, _ = stats.top_percent_mask(finite["d_mem"].to_numpy(np.float64), top_percent)
    return set(finite["prompt_id"][mask])


def called_ids(out: Run, fdr: float) -> set:
    """The calibrated calls: prompt_ids with q-value at most `fdr` (calibration.parquet)."""
    table = out.store.read_table(out.layout.calibration, columns=["prompt_id", "q_value"]).to_pandas()
    return set(table["prompt_id"][table["q_value"] <= fdr])


def adjust_settings(cfg) -> AdjustSettings:
    return AdjustSettings.of(cfg.analyze)


def run(cfg, out: Optional[Run] = None, top_percent: Optional[float] = None) -> AnalyzeResult:
    """Write memorized_prompts.csv and summary.json["analysis"]; `top_percent` overrides analyze.top_percent
    (the cascade's scores hold only the screened share of the corpus)."""
    out = out or Run.of(cfg)
    store, layout = out.store, out.layout
    if top_percent is None and cfg.cascade.enabled:  # a cascade's scores hold its fully scored share only
        cascade = out.read_summary().cascade
        top_percent = cascade.analysis_top_percent if cascade else None
    top_percent = cfg.analyze.top_percent if top_percent is None else top_percent
    with stage_writes(store, cfg.run, "analyze"):
        names = detector_names(store, layout.scores)
        extra = [REGISTRY[name].columns[0] for name in names]
        scores = read_columns(store, layout.scores, SCORE_COLUMNS + RUN_ID_COLUMNS + extra, "run `cxrmem score` (or `cxrmem audit`) first")
        prompts = read_columns(store, layout.prompts, PROMPT_COLUMNS, "run `cxrmem prepare` first")
        known = read_known_memorized(store, cfg.analyze.known_memorized) if cfg.analyze.known_memorized else None
        calibrated = calibrate_run(cfg, out, scores, prompts, top_share_ids(scores, top_percent), known) if cfg.analyze.reference else None
        called = called_ids(out, cfg.analyze.fdr) if cfg.analyze.memorized_by == "q_value" else None
        memorized, analysis = analyze_tables(
            scores[SCORE_COLUMNS], prompts, top_percent, cfg.analyze.zscore, list(cfg.analyze.n_reports_buckets), known,
            adjust_settings(cfg), called,
        )
        check_something_scored(analysis.counts, layout.scores)
        # A filtered scan: the corpus text is never held whole. ([""] keeps the filter valid for an empty set.)
        ids = memorized["prompt_id"].tolist() or [""]
        flags = ["truncated"] if "truncated" in store.parquet_schema(layout.prompts).names else []
        texts = store.read_table(layout.prompts, columns=["prompt_id", "prompt", *flags], filters=[("prompt_id", "in", ids)])
        memorized = memorized.merge(texts.to_pandas(), on="prompt_id", how="left")
        memorized = memorized[["prompt", *[c for c in memorized.columns if c != "prompt"]]]
        memorized = flag_truncated(cfg, out, memorized)
        analysis = replace(
            analysis,
            model_fingerprints=sorted(scores["model_fingerprint"].dropna().unique().tolist()),
            config_hashes=sorted(scores["config_hash"].dropna().unique().tolist()),
            config=public_config(cfg),  # credentials never reach outputs
            outputs={"memorized": layout.memorized, "summary": layout.summary},
        )
        if calibrated is not None:
            memorized = memorized.merge(store.read_table(layout.calibration, columns=["prompt_id", "p_value", "q_value"]).to_pandas(),
                                        on="prompt_id", how="left")  # fmt: skip
        out.write_memorized(memorized)
        out.write_sections(*([calibrated] if calibrated else []), clear=() if calibrated else ("calibration",))
        if calibrated is None and store.exists(layout.calibration):  # an earlier analysis against a reference
            store.delete(layout.calibration)
        if names:
            skipped = skipped_detectors(store.parquet_schema(layout.scores))
            out.write_sections(analysis, detector_agreement(scores, names, top_percent, known, skipped=skipped))
        else:  # no detector columns: the detectors section an earlier analysis of other scores left goes
            out.write_sections(analysis, clear=("detectors",))
    adjusted = analysis.marker_enrichment_adjusted["logistic"]
    log.info(
        "analyze: %d finite scores (%d non-finite), threshold %.6g, %d memorized, marker OR %s, adjusted %s",
        analysis.counts["finite"],
        analysis.counts["nonfinite"],
        analysis.threshold if analysis.threshold is not None else float("nan"),
        analysis.memorized_count,
        analysis.marker_enrichment["odds_ratio"],
        adjusted["estimate"] if adjusted["refused"] is None else f"refused ({adjusted['refused']})",
    )
    return AnalyzeResult(
        memorized=layout.memorized,
        summary=layout.summary,
        memorized_count=analysis.memorized_count,
        threshold=analysis.threshold,
        marker_odds_ratio=analysis.marker_enrichment["odds_ratio"],
        calibrated_count=calibrated.discoveries if calibrated else None,
        global_p=calibrated.global_p if calibrated else None,
    )
