"""The `analyze` stage: score distribution, the memorized set and marker enrichment.

Reads scores.parquet and prompts.parquet of one run and writes memorized_prompts.csv (the
paper's released list: column `prompt` first) and the "analysis" key of summary.json. The
driver reads only small columns of the whole corpus (ids, d_mem, flags, counts); prompt text is
read only for the memorized rows. The statistics themselves live in cxrmem/stats.py.
"""

from __future__ import annotations

import io
import logging
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from omegaconf import DictConfig

from cxrmem import stats, storage
from cxrmem.corpus.text import normalise_whitespace, prompt_id
from cxrmem.storage import RunLayout

log = logging.getLogger(__name__)

SCORE_COLUMNS = ["prompt_id", "d_mem", "nonfinite"]
RUN_ID_COLUMNS = ["model_fingerprint", "config_hash"]
PROMPT_COLUMNS = ["prompt_id", "n_reports", "has_marker", "n_markers"]
MEMORIZED_COLUMNS = [
    "prompt", "d_mem", "percentile", "n_reports", "has_marker", "prompt_id", "n_markers", "zscore", "known_memorized",
]


def analyze_tables(
    scores_df: pd.DataFrame,
    prompts_df: pd.DataFrame,
    top_percent: float,
    zscore: float,
    buckets: Sequence[int],
    known_ids: Optional[set[str]] = None,
) -> tuple[pd.DataFrame, dict]:
    """The memorized set (sorted by d_mem, descending) and the analysis numbers of one run.

    scores_df: prompt_id, d_mem, nonfinite. prompts_df: prompt_id, n_reports, has_marker, and
    optionally n_markers and prompt. Non-finite scores are counted and left out of everything else.
    known_ids: prompt_ids known to be memorized; when given, detection is checked against them.
    """
    duplicated = scores_df["prompt_id"].duplicated()
    if duplicated.any():
        raise ValueError(
            f"scores has {int(duplicated.sum())} duplicate prompt_id rows (first: "
            f"{scores_df['prompt_id'][duplicated].iloc[0]}); rescore the run or remove the duplicates"
        )
    table = scores_df.merge(prompts_df, on="prompt_id", how="left", indicator=True)
    missing = table["_merge"] == "left_only"
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} scored prompt_id values are not in prompts (first: "
            f"{table['prompt_id'][missing].iloc[0]}); scores and prompts come from different runs"
        )
    table = table.drop(columns="_merge")

    d_mem = table["d_mem"].to_numpy(dtype=np.float64)
    finite = np.isfinite(d_mem) & ~table["nonfinite"].fillna(False).to_numpy(dtype=bool)
    table = table[finite].reset_index(drop=True)
    d_mem = d_mem[finite]

    memorized, threshold = stats.top_percent_mask(d_mem, top_percent)
    z = stats.zscores(d_mem)
    outliers = z > zscore
    has_marker = table["has_marker"].to_numpy(dtype=bool)

    table["percentile"] = stats.percentile_rank(d_mem)
    table["zscore"] = z
    if known_ids is not None:
        table["known_memorized"] = table["prompt_id"].isin(known_ids)
    columns = [c for c in MEMORIZED_COLUMNS if c in table]
    memorized_df = table.loc[memorized, columns].sort_values("d_mem", ascending=False, kind="stable")

    analysis = {
        "counts": {
            "prompts": int(len(prompts_df)),
            "scored": int(len(scores_df)),
            "unscored": int(len(prompts_df) - len(scores_df)),
            "finite": int(finite.sum()),
            "nonfinite": int((~finite).sum()),
        },
        "d_mem": {
            "mean": float(d_mem.mean()) if d_mem.size else None,
            "std": float(d_mem.std(ddof=1)) if d_mem.size > 1 else None,
            "min": float(d_mem.min()) if d_mem.size else None,
        },
        "percentiles": stats.percentiles(d_mem),
        "top_percent": float(top_percent),
        "threshold": threshold,
        "memorized_count": int(memorized.sum()),
        "zscore_view": {
            "zscore": float(zscore),
            "count": int(outliers.sum()),
            "in_memorized_set": int((outliers & memorized).sum()),
        },
        "marker_enrichment": stats.marker_enrichment(memorized, has_marker),
        "marker_enrichment_by_n_reports": stats.enrichment_by_bucket(
            memorized, has_marker, table["n_reports"].to_numpy(), buckets
        ),
    }
    if known_ids is not None:
        known = table["known_memorized"].to_numpy(dtype=bool)
        analysis["known_memorized"] = {
            "listed": len(known_ids),
            **known_memorized_check(d_mem, memorized, known),
        }
    return memorized_df.reset_index(drop=True), analysis


def known_memorized_check(d_mem: np.ndarray, memorized: np.ndarray, known: np.ndarray, fpr: float = 0.01) -> dict:
    """How well the scores find prompts known to be memorized (planted in a testbed, or a released list).

    d_mem, memorized, known: aligned per scored prompt. AUC and TPR at `fpr` take the known prompts
    as positives and every other scored prompt as a negative.
    """
    found = int((memorized & known).sum())
    return {
        "known_scored": int(known.sum()),
        "memorized": int(memorized.sum()),
        "known_in_memorized": found,
        "precision": found / int(memorized.sum()) if memorized.any() else None,
        "recall": found / int(known.sum()) if known.any() else None,
        "auc": stats.roc_auc(d_mem[known], d_mem[~known]),
        "tpr_at_fpr": stats.tpr_at_fpr(d_mem[known], d_mem[~known], fpr),
        "fpr": fpr,
    }


def read_known_memorized(uri: str, storage_cfg=None) -> set[str]:
    """prompt_ids of the prompts a CSV lists as memorized (column `prompt`; a `planted` column filters)."""
    if not storage.exists(uri, storage_cfg):
        raise FileNotFoundError(f"{uri} (analyze.known_memorized) does not exist; fix the path or set it to null")
    table = pd.read_csv(io.StringIO(storage.read_text(uri, storage_cfg)))
    if "prompt" not in table:
        raise ValueError(f"{uri} (analyze.known_memorized) has no `prompt` column; its columns are {list(table.columns)}")
    if "planted" in table:
        table = table[table["planted"].astype(str).str.lower().isin(["true", "1"])]
    return {prompt_id(normalise_whitespace(str(p))) for p in table["prompt"]}


def read_prompt_texts(uri: str, prompt_ids: Sequence[str], storage_cfg=None) -> pd.DataFrame:
    """prompt_id, prompt of only the given ids (a filtered scan: the corpus text is never held whole)."""
    if len(prompt_ids) == 0:
        return pd.DataFrame({"prompt_id": pd.Series(dtype=str), "prompt": pd.Series(dtype=str)})
    fs, path = storage.filesystem(uri, storage_cfg)
    table = pq.read_table(
        path, filesystem=fs, columns=["prompt_id", "prompt"], filters=[("prompt_id", "in", list(prompt_ids))]
    )
    return table.to_pandas()


def _require(uri: str, what: str, storage_cfg) -> None:
    if not storage.exists(uri, storage_cfg):
        raise FileNotFoundError(f"{uri} does not exist: {what}")


def _read_columns(uri: str, columns: list[str], storage_cfg) -> pd.DataFrame:
    fs, path = storage.filesystem(uri, storage_cfg)
    missing = [c for c in columns if c not in pq.read_schema(path, filesystem=fs).names]
    if missing:
        raise ValueError(f"{uri} lacks the columns {missing}; rerun the stage that writes it")
    return storage.read_table(uri, storage_cfg, columns=columns).to_pandas()


def analyze(cfg: DictConfig) -> dict:
    """Write memorized_prompts.csv and summary.json["analysis"] for the run at cfg.run.output."""
    layout = RunLayout(cfg.run.output)
    _require(layout.scores, "run `cxrmem score` (or `cxrmem audit`) first", cfg.storage)
    _require(layout.prompts, "run `cxrmem prepare` first", cfg.storage)

    scores = _read_columns(layout.scores, SCORE_COLUMNS + RUN_ID_COLUMNS, cfg.storage)
    prompts = _read_columns(layout.prompts, PROMPT_COLUMNS, cfg.storage)

    memorized, analysis = analyze_tables(
        scores[SCORE_COLUMNS],
        prompts,
        top_percent=cfg.analyze.top_percent,
        zscore=cfg.analyze.zscore,
        buckets=list(cfg.analyze.n_reports_buckets),
        known_ids=read_known_memorized(cfg.analyze.known_memorized, cfg.storage) if cfg.analyze.known_memorized else None,
    )
    texts = read_prompt_texts(layout.prompts, memorized["prompt_id"].tolist(), cfg.storage)
    memorized = memorized.merge(texts, on="prompt_id", how="left")
    memorized = memorized[["prompt", *[c for c in memorized.columns if c != "prompt"]]]

    analysis["model_fingerprints"] = sorted(scores["model_fingerprint"].dropna().unique().tolist())
    analysis["config_hashes"] = sorted(scores["config_hash"].dropna().unique().tolist())
    analysis["config"] = storage.public_config(cfg)  # credentials never reach outputs
    analysis["outputs"] = {"memorized": layout.memorized, "summary": layout.summary}

    storage.write_text(layout.memorized, memorized.to_csv(index=False), cfg.storage)
    summary = storage.read_json(layout.summary, cfg.storage) if storage.exists(layout.summary, cfg.storage) else {}
    summary["analysis"] = analysis
    storage.write_json(layout.summary, summary, cfg.storage)
    log.info(
        "analyze: %d finite scores (%d non-finite), threshold %.6g, %d memorized, marker OR %s",
        analysis["counts"]["finite"],
        analysis["counts"]["nonfinite"],
        analysis["threshold"] if analysis["threshold"] is not None else float("nan"),
        analysis["memorized_count"],
        analysis["marker_enrichment"]["odds_ratio"],
    )
    return {
        "memorized": layout.memorized,
        "summary": layout.summary,
        "memorized_count": analysis["memorized_count"],
        "threshold": analysis["threshold"],
        "marker_odds_ratio": analysis["marker_enrichment"]["odds_ratio"],
    }
