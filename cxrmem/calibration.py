"""Calibrated memorization calls (pure math): a p-value per prompt against prompts the model never saw,
Benjamini-Hochberg q-values, and F0, the model-level test of "does this model memorize prompts of this corpus?".

The null model is a reference of non-members: prompts of the same kind that the model was not trained on,
scored with the same settings (docs/design.md, "Calibrated calls"). Choices, each written down here:

- **Length-conditional (Mondrian) conformal p-values.** d_mem grows with prompt length (Spearman 0.30 over
  the testbed's non-memorized prompts, 0.52 on IU X-ray), so a prompt is compared only with reference prompts
  of similar length: the reference's log token counts are cut at their quantiles into `bins` bins (each
  keeps at least `min_per_bin` reference prompts; bins are merged until it does), and a prompt in bin b gets
  p = (1 + #{reference in b with d_mem >= its d_mem}) / (n_b + 1). Under exchangeability of a non-member
  with the reference of its bin this p-value is valid (P(p <= a) <= a), whatever the score's distribution.
- **The floor and a fitted upper tail.** A plain conformal p-value is at least 1/(n_b + 1): with a reference
  of 400 prompts in 4 bins, no prompt reaches below 0.01, and BH over 512 prompts then makes no discovery
  at 0.05 even for 24 prompts far beyond every non-member (measured: bench/RESULTS.md, "Calibrated calls").
  Each bin's reference scores are standardized by the bin's median and spread (`reference_spread`: the
  distance from the median to the 0.9 quantile by default, the bin's upper half, which is what the pooled tail
  is fitted to; length moves the location and spread of d_mem), the standardized scores of all bins are pooled, and their
  exceedances beyond the pooled `reference_tail_quantile` (0.9 by default) are fitted with a generalized
  Pareto distribution (the peaks-over-threshold model of extreme-value theory; its shape is kept >= 0,
  since a fitted bounded tail would give p = 0 just past the reference's maximum). A prompt whose
  standardized score lies beyond that threshold gets p = ((k + 1) / (n + 1)) * GPD survival of its excess
  (k exceedances among n pooled reference prompts); below it, the plain conformal p-value of its bin.
  The fit is checked by a Kolmogorov-Smirnov test of the exceedances against it (`check_p`): a rejected
  fit falls back to the plain p-values and says so. The tail is a model, not a guarantee: it is reported
  as such.
- **Benjamini-Hochberg** on these p-values (statsmodels' `multipletests`), valid for conformal p-values,
  which are positively dependent (Bates et al., Ann. Stat. 2023).
- **F0** is the global null "no prompt of the corpus is memorized beyond the reference", tested without the
  tail model (`exceedance_test`): in each length bin, the number of corpus prompts scoring above every
  reference prompt of the bin. Under the null, corpus and reference prompts of a bin are exchangeable, so
  in the bin's scores sorted downward the corpus prompts before the first reference prompt follow the
  negative hypergeometric law (n corpus and m reference prompts: P(X >= k) = prod_{i<k} (n - i) / (n + m - i),
  expected n / (m + 1)); the bins' exact p-values are combined by Fisher's method (conservative for
  discrete p-values). The fitted tail made F0 too eager: on IU X-ray's held-out impressions split in halves
  (both non-members) Simes' test on the tail's p-values called F0 supported in 19% of splits at 273
  reference prompts (bench/RESULTS.md, "Calibrated calls: the reference size"). Simes' p-value (the smallest
  BH q-value: BH discovers exactly when it rejects) is still reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import stats as scipy_stats

from cxrmem.settings import POSITIVE, UNIT_OPEN, Rule, Settings, at_least, knob

SPREAD: Rule = (lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1, "two quantiles [lo, hi] with 0 <= lo < hi <= 1")


@dataclass(frozen=True)
class CalibrationSettings(Settings):
    """How p-values are computed against the reference (cut from the `analyze` config section)."""

    fdr: float = knob(0.05, UNIT_OPEN)  # calibrated memorized set: prompts with Benjamini-Hochberg q-value at most this
    reference_length_bins: int = knob(3, at_least(1))  # length-conditional (Mondrian) p-values: bins of log token count (1: none)
    reference_min_per_bin: int = knob(50, POSITIVE)  # fewest reference prompts per length bin (bins are merged below it)
    reference_tail: str = knob("gpd", choices=["gpd", "none"])  # gpd: a fitted upper tail (generalized Pareto) below the conformal floor 1/(n+1) | none
    reference_tail_quantile: float = knob(0.9, UNIT_OPEN)  # where the fitted tail starts, as a quantile of each bin's reference scores
    reference_spread: list = knob([0.5, 0.9], SPREAD)  # [lo, hi]: a bin's scores are standardized by its median and q_hi - q_lo ([0.25, 0.75]: the IQR)
    reference_min: int = knob(100, POSITIVE)  # fewer reference prompts: F0 is inconclusive


@dataclass(frozen=True)
class LengthBins:
    """Upper edges of the log-token bins (the last is +inf) and the reference's scores in each."""

    edges: np.ndarray  # [B] ascending upper edges, edges[-1] = inf
    reference: list[np.ndarray]  # per bin, the reference's sorted scores

    def of(self, log_tokens: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, log_tokens, side="left")


def length_bins(ref_scores: np.ndarray, ref_log_tokens: np.ndarray, n_bins: int, min_per_bin: int) -> LengthBins:
    """Quantile bins of the reference's log token counts, merged from the top until each holds min_per_bin."""
    inner = np.unique(np.quantile(ref_log_tokens, np.linspace(0, 1, n_bins + 1)[1:-1])) if n_bins > 1 else np.array([])
    edges = list(inner) + [np.inf]
    while len(edges) > 1:
        counts = np.bincount(np.searchsorted(edges, ref_log_tokens, side="left"), minlength=len(edges))
        small = np.flatnonzero(counts < min_per_bin)
        if not len(small):
            break
        b = small[0]
        edges.pop(b if b < len(edges) - 1 else b - 1)  # merge the bin with its upper neighbour (the last: its lower)
    edges = np.asarray(edges, dtype=np.float64)
    which = np.searchsorted(edges, ref_log_tokens, side="left")
    return LengthBins(edges, [np.sort(ref_scores[which == b]) for b in range(len(edges))])


@dataclass(frozen=True)
class TailFit:
    threshold: float  # the (standardized) reference score at reference_tail_quantile
    exceedances: int  # reference scores above it
    shape: float  # GPD xi
    scale: float  # GPD sigma
    check_p: float  # KS p-value of the exceedances against the fit
    used: bool  # the check passed (p >= 0.05) and the tail replaces the plain p-value beyond the threshold


def fit_tail(sorted_ref: np.ndarray, quantile: float, min_exceedances: int = 20) -> Optional[TailFit]:
    """A generalized Pareto fit of the reference's exceedances over its `quantile`; None with too few."""
    threshold = float(np.quantile(sorted_ref, quantile))
    excess = sorted_ref[sorted_ref > threshold] - threshold
    if len(excess) < min_exceedances:
        return None
    shape, _, scale = scipy_stats.genpareto.fit(excess, floc=0.0)
    if shape < 0:  # a bounded tail would call any score just past the reference's maximum impossible (p = 0):
        shape, scale = 0.0, float(excess.mean())  # the exponential tail instead, heavier and so conservative there
    check = float(scipy_stats.kstest(excess, "genpareto", args=(shape, 0.0, scale)).pvalue)
    return TailFit(threshold, int(len(excess)), float(shape), float(scale), check, check >= 0.05)


def conformal_p(scores: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    """(1 + #{ref >= s}) / (n + 1) for each score s: higher scores are more surprising."""
    at_least = len(sorted_ref) - np.searchsorted(sorted_ref, scores, side="left")
    return (1.0 + at_least) / (len(sorted_ref) + 1.0)


@dataclass(frozen=True)
class Calibrated:
    p_value: np.ndarray  # [N] per corpus prompt (NaN where its score is not finite)
    q_value: np.ndarray  # [N] Benjamini-Hochberg over the finite p-values
    length_bin: np.ndarray  # [N] the Mondrian bin of each prompt
    bins: LengthBins
    scales: list[tuple[float, float]]  # per bin, the (median, spread) that standardizes its scores
    tail: Optional[TailFit]  # the pooled standardized tail (None: plain p-values everywhere)
    smallest_plain_p: float  # 1 / (n_b + 1) of the largest bin: the conformal floor


def bin_scale(sorted_ref: np.ndarray, spread: tuple[float, float]) -> tuple[float, float]:
    """(median, q_hi - q_lo) of a bin's reference scores, quantiles rather than moments since the tail is what is tested.

    [0.5, 0.9] (the default) matches the bins' upper halves, which is what the pooled tail is fitted to; the
    interquartile range [0.25, 0.75] matches their middles. On IU X-ray's held-out impressions the shortest bin's upper
    half is long for its IQR: standardized by the IQR, its few high prompts alone made the pooled tail heavy and no
    planted prompt reached q <= 0.05 (bench/RESULTS.md, "Calibration settings: the bins' upper spread")."""
    lo, median, hi = np.quantile(sorted_ref, [spread[0], 0.5, spread[1]])
    return float(median), float(hi - lo) if hi > lo else 1.0


def calibrate(scores: np.ndarray, log_tokens: np.ndarray, ref_scores: np.ndarray, ref_log_tokens: np.ndarray,
              settings: CalibrationSettings) -> Calibrated:  # fmt: skip
    """p- and q-values of the corpus's scores against the reference's (non-finite scores get NaN)."""
    from statsmodels.stats.multitest import multipletests

    keep = np.isfinite(ref_scores)
    bins = length_bins(ref_scores[keep], ref_log_tokens[keep], settings.reference_length_bins, settings.reference_min_per_bin)
    which = bins.of(log_tokens)
    scales = [bin_scale(ref, settings.reference_spread) for ref in bins.reference]
    standard = lambda values, b: (values - scales[b][0]) / scales[b][1]  # noqa: E731
    tail = None
    if settings.reference_tail == "gpd":
        pooled = np.sort(np.concatenate([standard(ref, b) for b, ref in enumerate(bins.reference)]))
        tail = fit_tail(pooled, settings.reference_tail_quantile)
    p = np.full(len(scores), np.nan)
    for b, ref in enumerate(bins.reference):
        rows = (which == b) & np.isfinite(scores)
        p[rows] = conformal_p(scores[rows], ref)
        if tail is not None and tail.used:
            z = standard(scores[rows], b)
            beyond = z > tail.threshold
            survival = scipy_stats.genpareto.sf(z[beyond] - tail.threshold, tail.shape, loc=0.0, scale=tail.scale)
            modelled = (tail.exceedances + 1.0) / (len(pooled) + 1.0) * survival
            p[np.flatnonzero(rows)[beyond]] = np.maximum(modelled, np.finfo(np.float64).tiny)
    q = np.full(len(scores), np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = multipletests(p[finite], method="fdr_bh")[1]
    floor = 1.0 / (max(len(ref) for ref in bins.reference) + 1.0)
    return Calibrated(p, q, which, bins, scales, tail, floor)


@dataclass(frozen=True)
class Exceedance:
    """F0's test: corpus prompts above every reference prompt of their length bin, against chance."""

    beyond: int  # corpus prompts scoring above every reference prompt of their length bin
    expected: float  # their expected number if no corpus prompt were memorized: sum over bins of n_b / (m_b + 1)
    p_value: float  # P(at least this many) under exchangeability within each bin: exact per bin, Fisher across bins
    per_bin: list[int]  # `beyond` in each bin


def exceedance_test(scores: np.ndarray, which: np.ndarray, bins: LengthBins) -> Exceedance:
    """F0's p-value (module notes): per bin the count above the bin's reference maximum, its exact negative
    hypergeometric tail, the bins combined by Fisher's method. Non-finite scores take no part."""
    counts, p_values, expected = [], [], 0.0
    for b, ref in enumerate(bins.reference):
        corpus = scores[(which == b) & np.isfinite(scores)]
        beyond = int((corpus > ref[-1]).sum()) if len(ref) else 0
        counts.append(beyond)
        expected += len(corpus) / (len(ref) + 1.0)
        # scipy's nhypergeom(M, n, r): red balls (corpus, n of M) drawn before the r-th blue one (a reference prompt)
        p_values.append(float(scipy_stats.nhypergeom.sf(beyond - 1, len(corpus) + len(ref), len(corpus), 1)) if len(corpus) else 1.0)
    combined = float(scipy_stats.combine_pvalues(p_values, method="fisher").pvalue) if p_values else 1.0
    return Exceedance(int(sum(counts)), float(expected), min(1.0, combined), counts)


def global_null_p(q_values: np.ndarray) -> Optional[float]:
    """Simes' p-value of "no prompt is memorized beyond the reference": the smallest BH q-value."""
    finite = q_values[np.isfinite(q_values)]
    return float(finite.min()) if len(finite) else None
