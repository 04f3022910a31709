"""The findings of one run as pure table math: score distribution, the memorized set, marker enrichment,
the check against known memorized prompts, and the difference between two runs' scores.

DataFrames in, DataFrames and dicts out; the `analyze` stage (cxrmem/stages/analyze.py) reads and
writes the files. The statistics themselves live in cxrmem/stats.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from cxrmem import stats
from cxrmem.corpus.text import normalise_whitespace, prompt_id
from cxrmem.detectors import REGISTRY, oriented, screen_recall
from cxrmem.settings import Settings, at_least, check_names, knob
from cxrmem.summary import AnalysisSection, DetectorsSection

SCORE_COLUMNS = ["prompt_id", "d_mem", "nonfinite"]
RUN_ID_COLUMNS = ["model_fingerprint", "config_hash"]
PROMPT_COLUMNS = ["prompt_id", "n_reports", "has_marker", "n_markers", "n_tokens"]
MEMORIZED_COLUMNS = [
    "prompt", "d_mem", "percentile", "n_reports", "has_marker", "prompt_id", "n_markers", "n_tokens", "zscore",
    "known_memorized", "length_percentile",
]

# Covariates of the adjusted enrichment (analyze.covariates): name -> (prompts column, transform).
# Logs because both effects are multiplicative: one more token matters less in a long prompt.
COVARIATES = {
    "log_n_tokens": ("n_tokens", lambda v: np.log(np.maximum(v, 1))),
    "log_n_reports": ("n_reports", lambda v: np.log(np.maximum(v, 1))),
    "n_tokens": ("n_tokens", lambda v: v),
    "n_reports": ("n_reports", lambda v: v),
    "n_markers": ("n_markers", lambda v: v),
}


@dataclass(frozen=True)
class AdjustSettings(Settings):
    """How the findings are controlled (config section `analyze`)."""

    covariates: tuple[str, ...] = ("log_n_tokens", "log_n_reports")  # adjusted enrichment: what the marker's effect is adjusted for (COVARIATES)
    length_bins: int = knob(10, at_least(1))  # token-count quantile bins of the length view (figure) and the length-adjusted score
    length_adjusted: bool = False  # also rank by d_mem's percentile within its token-count bin (its own top share; raw d_mem stays the definition)

    @staticmethod
    def check(section, key: str) -> None:
        check_names(f"{key}.covariates", section.covariates, COVARIATES, "covariate")


def joined_scores(scores_df: pd.DataFrame, prompts_df: pd.DataFrame) -> pd.DataFrame:
    """Scores joined to their prompts' columns; duplicate or unknown prompt ids are an error."""
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
    return table.drop(columns="_merge")


def distribution(d_mem: np.ndarray) -> dict:
    """Mean, std, min and percentiles of the finite scores."""
    return {
        "d_mem": {
            "mean": float(d_mem.mean()) if d_mem.size else None,
            "std": float(d_mem.std(ddof=1)) if d_mem.size > 1 else None,
            "min": float(d_mem.min()) if d_mem.size else None,
        },
        "percentiles": stats.percentiles(d_mem),
    }


def analyze_tables(
    scores_df: pd.DataFrame,
    prompts_df: pd.DataFrame,
    top_percent: float,
    zscore: float,
    buckets: Sequence[int],
    known_ids: Optional[set[str]] = None,
    adjust: AdjustSettings = AdjustSettings(),
    called: Optional[set[str]] = None,
) -> tuple[pd.DataFrame, AnalysisSection]:
    """The memorized set (sorted by d_mem, descending) and the analysis numbers of one run.

    scores_df: prompt_id, d_mem, nonfinite. prompts_df: prompt_id, n_reports, has_marker, and
    optionally n_markers and prompt. Non-finite scores are counted and left out of everything else.
    known_ids: prompt_ids known to be memorized; when given, detection is checked against them.
    called: the memorized set's prompt_ids when it is not the top share (the calibrated calls, q <= fdr).
    """
    table = joined_scores(scores_df, prompts_df)
    d_mem = table["d_mem"].to_numpy(dtype=np.float64)
    finite = np.isfinite(d_mem) & ~table["nonfinite"].fillna(False).to_numpy(dtype=bool)
    table, d_mem = table[finite].reset_index(drop=True), d_mem[finite]

    if called is None:
        memorized, threshold = stats.top_percent_mask(d_mem, top_percent)
    else:
        memorized = table["prompt_id"].isin(called).to_numpy(dtype=bool)
        threshold = float(d_mem[memorized].min()) if memorized.any() else None
    z = stats.zscores(d_mem)
    outliers = z > zscore
    has_marker = table["has_marker"].to_numpy(dtype=bool)

    table["percentile"] = stats.percentile_rank(d_mem)
    table["zscore"] = z
    if known_ids is not None:
        table["known_memorized"] = table["prompt_id"].isin(known_ids)
    known = table["known_memorized"].to_numpy(dtype=bool) if known_ids is not None else None
    length = length_sections(table, d_mem, memorized, known, top_percent, adjust)
    columns = [c for c in MEMORIZED_COLUMNS if c in table]
    memorized_df = table.loc[memorized, columns].sort_values("d_mem", ascending=False, kind="stable")

    n_prompts, n_scored, n_finite = len(prompts_df), len(scores_df), int(finite.sum())
    analysis = AnalysisSection(
        counts={"prompts": n_prompts, "scored": n_scored, "unscored": n_prompts - n_scored, "finite": n_finite, "nonfinite": n_scored - n_finite},
        **distribution(d_mem),
        top_percent=float(top_percent),
        threshold=threshold,
        memorized_count=int(memorized.sum()),
        zscore_view={"zscore": float(zscore), "count": int(outliers.sum()), "in_memorized_set": int((outliers & memorized).sum())},
        marker_enrichment=stats.marker_enrichment(memorized, has_marker),
        marker_enrichment_by_n_reports=stats.enrichment_by_bucket(memorized, has_marker, table["n_reports"].to_numpy(), buckets),
        marker_enrichment_adjusted=adjusted_enrichment(table, memorized, adjust.covariates, table["percentile"].to_numpy()),
        **length,
        memorized_by="top_percent" if called is None else "q_value",
        known_memorized={"listed": len(known_ids), **known_memorized_check(d_mem, memorized, known)} if known is not None else None,
    )
    return memorized_df.reset_index(drop=True), analysis


def covariate_values(table: pd.DataFrame, names: Sequence[str]) -> tuple[dict[str, np.ndarray], Optional[str]]:
    """The named COVARIATES of each row, or a reason they cannot be had (a column the table lacks)."""
    missing = sorted({COVARIATES[n][0] for n in names} - set(table.columns))
    if missing:
        return {}, f"the prompts lack the columns {missing}; rerun `cxrmem prepare`"
    return {n: COVARIATES[n][1](table[COVARIATES[n][0]].to_numpy(dtype=np.float64)) for n in names}, None


def adjusted_enrichment(table: pd.DataFrame, memorized: np.ndarray, covariates: Sequence[str], percentile=None) -> dict:
    """The marker's effect adjusted for `covariates`: odds ratio of being memorized (logistic) and, given
    the d_mem percentile, its shift in percentile points (OLS). A design that cannot be fitted is refused."""
    values, problem = covariate_values(table, covariates)
    has_marker = table["has_marker"].to_numpy(dtype=bool)
    if problem:
        refused = {"estimate": None, "ci_low": None, "ci_high": None, "p": None, "refused": problem, "covariates": list(covariates)}
        return {"covariates": list(covariates), "logistic": refused, "percentile": refused if percentile is not None else None}
    return {
        "covariates": list(covariates),
        "logistic": stats.adjusted_logistic(np.asarray(memorized, dtype=np.float64), has_marker, values),
        "percentile": stats.adjusted_ols(percentile, has_marker, values) if percentile is not None else None,
    }


def list_enrichment(prompts: pd.DataFrame, memorized: np.ndarray, buckets: Sequence[int], covariates: Sequence[str]) -> dict:
    """Crude, duplication-stratified (Mantel-Haenszel) and adjusted marker enrichment of a released list:
    `prompts` (one row per unique prompt: has_marker, n_reports, n_tokens) with `memorized` against the
    rest as controls; and how well length alone separates the two (AUC of n_tokens)."""
    has_marker = prompts["has_marker"].to_numpy(dtype=bool)
    n_tokens = prompts["n_tokens"].to_numpy(dtype=np.float64)
    return {
        "crude": stats.marker_enrichment(memorized, has_marker),
        "by_n_reports": stats.enrichment_by_bucket(memorized, has_marker, prompts["n_reports"].to_numpy(), buckets),
        "adjusted": adjusted_enrichment(prompts, memorized, covariates),
        "length": {
            "median_memorized": float(np.median(n_tokens[memorized])) if memorized.any() else None,
            "median_controls": float(np.median(n_tokens[~memorized])) if (~memorized).any() else None,
            "auc_memorized_vs_controls": stats.roc_auc(n_tokens[memorized], n_tokens[~memorized]),
        },
    }


def length_sections(table, d_mem, memorized, known, top_percent: float, adjust: AdjustSettings) -> dict:
    """{"length": ...} (and {"length_adjusted": ...} when on); empty when the prompts have no n_tokens."""
    if "n_tokens" not in table:
        return {}
    n_tokens = table["n_tokens"].to_numpy(dtype=np.float64)
    bins = stats.quantile_bins(n_tokens, adjust.length_bins)
    out = {"length": length_view(d_mem, n_tokens, memorized, table["has_marker"].to_numpy(dtype=bool), bins, known)}
    if adjust.length_adjusted:
        table["length_percentile"] = stats.percentile_within(d_mem, bins)
        out["length_adjusted"] = length_adjusted(table["length_percentile"].to_numpy(), memorized, top_percent, known)
    return out


def length_view(d_mem, n_tokens, memorized, has_marker, bins, known=None) -> dict:
    """How d_mem goes with prompt length: Spearman (all prompts, and without the known memorized ones),
    mean token counts with and without a marker, and d_mem's median and IQR per token-count bin."""
    rows = []
    for b in np.unique(bins):
        inside = bins == b
        q1, median, q3 = np.percentile(d_mem[inside], [25, 50, 75])
        rows.append({"min_tokens": int(n_tokens[inside].min()), "max_tokens": int(n_tokens[inside].max()),
                     "prompts": int(inside.sum()), "memorized": int((inside & memorized).sum()),
                     "median": float(median), "q1": float(q1), "q3": float(q3)})  # fmt: skip
    view = {
        "spearman": stats.spearman(d_mem, n_tokens),
        "mean_tokens_marker": float(n_tokens[has_marker].mean()) if has_marker.any() else None,
        "mean_tokens_no_marker": float(n_tokens[~has_marker].mean()) if (~has_marker).any() else None,
        "mean_tokens_memorized": float(n_tokens[memorized].mean()) if memorized.any() else None,
        "bins": rows,
    }
    if known is not None:
        view["spearman_not_known"] = stats.spearman(d_mem[~known], n_tokens[~known])
    return view


def length_adjusted(length_percentile, memorized, top_percent: float, known=None) -> dict:
    """The top `top_percent` by d_mem's percentile within its token-count bin, against the raw memorized set.

    Every bin's largest score has percentile 100, so the set holds at least one prompt per bin
    (ties at the threshold are kept, as for the raw set)."""
    adjusted, threshold = stats.top_percent_mask(length_percentile, top_percent)
    both = int((adjusted & memorized).sum())
    out = {"memorized_count": int(adjusted.sum()), "threshold_percentile": threshold, "overlap": both,
           "overlap_share_of_raw": both / int(memorized.sum()) if memorized.any() else None}
    if known is not None:
        out["known_in_memorized"] = int((adjusted & known).sum())
    return out


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


def detector_agreement(
    scores_df: pd.DataFrame, names: Sequence[str], top_percent: float, known_ids: Optional[set[str]] = None, fpr: float = 0.01,
    skipped: Optional[dict] = None,
) -> DetectorsSection:
    """Each detector of `names` as a second opinion on d_mem, over the prompts with a finite d_mem; those in `skipped`
    (name -> why the model's denoiser cannot run it: its column is NaN) are recorded with their reason instead.

    scores_df: prompt_id, d_mem, nonfinite and each detector's score column (its first REGISTRY
    column). Per detector: the Spearman correlation with d_mem (scores turned so that larger means
    memorized), the share of d_mem's top `top_percent` inside the detector's top `top_percent`
    (`detectors.screen_recall`), and, given known memorized prompt_ids, AUC and TPR at `fpr`.
    """
    d_mem = scores_df["d_mem"].to_numpy(dtype=np.float64)
    keep = np.isfinite(d_mem) & ~scores_df["nonfinite"].fillna(False).to_numpy(dtype=bool)
    d_mem = d_mem[keep]
    known = scores_df["prompt_id"][keep].isin(known_ids).to_numpy() if known_ids is not None else None
    rows, skipped = {}, {name: why for name, why in (skipped or {}).items() if name in names}
    for name in (name for name in names if name not in skipped):
        column = REGISTRY[name].columns[0]
        scores = oriented(scores_df[column].to_numpy(dtype=np.float64)[keep], name)
        finite = np.isfinite(scores)
        rho = spearmanr(d_mem[finite], scores[finite]).statistic if finite.sum() > 2 else float("nan")
        row = {
            "column": column,
            "paper": REGISTRY[name].paper,
            "finite": int(finite.sum()),
            "spearman": float(rho) if np.isfinite(rho) else None,
            "top_overlap": screen_recall(d_mem, scores, name, top_percent, top_percent),
        }
        if known is not None:
            positives, negatives = scores[finite & known], scores[finite & ~known]
            row |= {"auc": stats.roc_auc(positives, negatives), "tpr_at_fpr": stats.tpr_at_fpr(positives, negatives, fpr)}
        rows[name] = row
    return DetectorsSection(reference="d_mem", top_percent=float(top_percent), fpr=fpr if known is not None else None, detectors=rows,
                            skipped=skipped)


def known_memorized_ids(table: pd.DataFrame) -> set[str]:
    """prompt_ids of a known-memorized list (column `prompt`; a `planted` column keeps only its true rows)."""
    if "planted" in table:
        table = table[table["planted"].astype(str).str.lower().isin(["true", "1"])]
    return {prompt_id(normalise_whitespace(str(p))) for p in table["prompt"]}


def score_diff(old: pd.DataFrame, new: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per prompt of two runs (prompt_id, d_mem, memorized): d_mem before/after, the change, and movement
    in or out of the memorized set; with counts."""
    diff = old.merge(new, on="prompt_id", how="outer", suffixes=("_old", "_new"))
    diff["memorized_old"] = diff["memorized_old"].fillna(False).astype(bool)
    diff["memorized_new"] = diff["memorized_new"].fillna(False).astype(bool)
    diff["d_mem_change"] = diff["d_mem_new"] - diff["d_mem_old"]
    diff["change"] = np.select(
        [
            diff["memorized_new"] & ~diff["memorized_old"],
            diff["memorized_old"] & ~diff["memorized_new"],
            diff["memorized_old"] & diff["memorized_new"],
        ],
        ["entered", "left", "stayed"],
        default="",
    )
    diff = diff.sort_values("prompt_id", ignore_index=True)
    change = diff["d_mem_change"].abs()
    counts = {
        "prompts": int(len(diff)),
        "compared": int(change.notna().sum()),
        "entered": int((diff["change"] == "entered").sum()),
        "left": int((diff["change"] == "left").sum()),
        "stayed": int((diff["change"] == "stayed").sum()),
        "mean_abs_d_mem_change": float(change.mean()) if change.notna().any() else None,
        "max_abs_d_mem_change": float(change.max()) if change.notna().any() else None,
    }
    return diff, counts
