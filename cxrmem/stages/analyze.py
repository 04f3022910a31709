"""`cxrmem analyze`: the score distribution, the memorized set and marker enrichment of one run.

Reads scores.parquet and prompts.parquet and writes memorized_prompts.csv (the paper's released
list: column `prompt` first) and the "analysis" section of summary.json. Only small columns of
the whole corpus are read (ids, d_mem, flags, counts); prompt text only for the memorized rows.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import pandas as pd

from cxrmem.analysis import (
    PROMPT_COLUMNS,
    AdjustSettings,
    RUN_ID_COLUMNS,
    SCORE_COLUMNS,
    analyze_tables,
    detector_agreement,
)
from cxrmem.config import public_config
from cxrmem.detectors import REGISTRY
from cxrmem.publish import stage_writes
from cxrmem.runfiles import (
    RunLayout,
    check_prompt_ids,
    read_known_memorized,
    read_summary,
    write_memorized,
    write_sections,
)
from cxrmem.storage import Store

log = logging.getLogger(__name__)


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


def detector_names(store: Store, scores_uri: str) -> list[str]:
    """The REGISTRY detectors whose score column scores.parquet holds (score.detectors when it was scored)."""
    if not store.exists(scores_uri):
        return []
    columns = set(store.parquet_schema(scores_uri).names)
    return [name for name, spec in REGISTRY.items() if spec.columns[0] in columns]


def adjust_settings(cfg) -> AdjustSettings:
    a = cfg.analyze
    return AdjustSettings(covariates=tuple(a.covariates), length_bins=int(a.length_bins), length_adjusted=bool(a.length_adjusted))


def run(cfg, store: Optional[Store] = None, top_percent: Optional[float] = None) -> dict:
    """Write memorized_prompts.csv and summary.json["analysis"]; `top_percent` overrides analyze.top_percent
    (the cascade's scores hold only the screened share of the corpus)."""
    store = store or Store.from_config(cfg.storage)
    layout = RunLayout(cfg.run.output)
    if top_percent is None and cfg.cascade.enabled:  # a cascade's scores hold its fully scored share only
        cascade = read_summary(store, layout).cascade
        top_percent = cascade.analysis_top_percent if cascade else None
    top_percent = cfg.analyze.top_percent if top_percent is None else top_percent
    with stage_writes(store, cfg.run, "analyze"):
        names = detector_names(store, layout.scores)
        extra = [REGISTRY[name].columns[0] for name in names]
        scores = read_columns(store, layout.scores, SCORE_COLUMNS + RUN_ID_COLUMNS + extra, "run `cxrmem score` (or `cxrmem audit`) first")
        prompts = read_columns(store, layout.prompts, PROMPT_COLUMNS, "run `cxrmem prepare` first")
        known = read_known_memorized(store, cfg.analyze.known_memorized) if cfg.analyze.known_memorized else None
        memorized, analysis = analyze_tables(
            scores[SCORE_COLUMNS], prompts, top_percent, cfg.analyze.zscore, list(cfg.analyze.n_reports_buckets), known,
            adjust_settings(cfg),
        )
        # A filtered scan: the corpus text is never held whole. ([""] keeps the filter valid for an empty set.)
        ids = memorized["prompt_id"].tolist() or [""]
        texts = store.read_table(layout.prompts, columns=["prompt_id", "prompt"], filters=[("prompt_id", "in", ids)])
        memorized = memorized.merge(texts.to_pandas(), on="prompt_id", how="left")
        memorized = memorized[["prompt", *[c for c in memorized.columns if c != "prompt"]]]
        analysis = replace(
            analysis,
            model_fingerprints=sorted(scores["model_fingerprint"].dropna().unique().tolist()),
            config_hashes=sorted(scores["config_hash"].dropna().unique().tolist()),
            config=public_config(cfg),  # credentials never reach outputs
            outputs={"memorized": layout.memorized, "summary": layout.summary},
        )
        write_memorized(store, layout, memorized)
        if names:
            write_sections(store, layout, analysis, detector_agreement(scores, names, top_percent, known))
        else:  # no detector columns: the detectors section an earlier analysis of other scores left goes
            write_sections(store, layout, analysis, clear=("detectors",))
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
    return {
        "memorized": layout.memorized,
        "summary": layout.summary,
        "memorized_count": analysis.memorized_count,
        "threshold": analysis.threshold,
        "marker_odds_ratio": analysis.marker_enrichment["odds_ratio"],
    }
