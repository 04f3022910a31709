"""Statistics of the findings: pure functions, numpy arrays in, numbers out (no I/O, no pandas).

Choices that change numbers, written down once here:

- Memorized set (`top_percent_mask`): with n finite scores and share q percent, k = ceil(q/100 * n)
  (at least 1). The threshold is the k-th largest score and every score >= threshold is in the set,
  so ties at the threshold are all kept: the set has k members, more only when scores tie at the
  threshold. Non-finite scores never enter (callers drop them first and count them).
- Percentile rank of a score (`percentile_rank`): 100 * (share of scores <= it), so the largest
  score has rank 100.
- Percentiles (`percentiles`): numpy's default linear interpolation between order statistics.
- z-scores: (x - mean) / std with the sample std (ddof=1); all zeros when the std is 0.
- Odds ratio of a 2x2 table [[a, b], [c, d]] (`odds_ratio`): ad / bc with Woolf's 95% interval
  exp(log OR +- 1.96 sqrt(1/a + 1/b + 1/c + 1/d)). When a cell is 0, 0.5 is added to every cell
  (Haldane-Anscombe) for the estimate and interval, and `corrected` says so. When a whole row or
  column is 0 the table carries no information: estimate and interval are None.
  Fisher's exact p-value is two-sided, on the uncorrected table.
- Pooled over strata (`mantel_haenszel`): the Mantel-Haenszel odds ratio with the
  Robins-Breslow-Greenland variance of its log; strata without information (a zero margin) are
  skipped.
- ROC AUC: the Mann-Whitney probability that a positive outscores a negative, ties counting 1/2.
- TPR at a false-positive rate f: the operating point flags scores strictly above the
  (floor(f * n_neg) + 1)-th largest negative score, so at most f of the negatives are flagged;
  positives tied with that negative are not counted.
- Paired difference (`paired_difference_ci`): the mean of a - b over pairs with Student's t 95%
  interval (n - 1 degrees of freedom); no interval below two pairs.
- Miss rate of a screen (`miss_rate`): x misses in a simple random sample of n rejected prompts;
  the estimate x / n with the one-sided 95% Clopper-Pearson upper bound Beta(0.95; x + 1, n - x)
  (1 when x = n; no bound without a sample).
- Adjusted enrichment (`adjusted_logistic`, `adjusted_ols`): the exposure (marker) with covariates
  (log token count, log n_reports by default) in one model fitted by statsmodels: a logistic
  regression of a 0/1 outcome (memorized) with Wald 95% intervals, exp() of the exposure's
  coefficient being the adjusted odds ratio; and OLS of a continuous outcome (the d_mem
  percentile) with HC3 heteroskedasticity-robust standard errors, since a percentile is bounded
  and its variance is not constant. A covariate that is constant is dropped (it is the
  intercept) and named in `dropped`, as is one that separates a 0/1 outcome (its range among
  the memorized and the rest meet at most at one point, e.g. n_reports above 1 only among the
  memorized: an infinite coefficient that stops the fit). A degenerate design is refused, not fitted: `refused`
  gives the reason (`design_problem`), and the numbers are None.
- Paired sign test (`sign_test`): the exact binomial test of k successes in n discordant pairs
  against 1/2 (ties are not pairs), two-sided or one-sided ("greater": more successes than
  chance). Below `min_sign_test_pairs` pairs it cannot reach p < 0.05 whatever the data (one-
  sided: 5 pairs, 0.5**5 = 0.031; two-sided: 6).
- High-frequency share of an image (`high_frequency_share`): the share of its spectral power
  (mean removed) at frequencies above half the Nyquist limit in either axis. White noise puts
  0.75 of its power there; a radiograph, smooth at pixel scale, well under 0.1.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from scipy import stats as sps

Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval

DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def percentiles(values: np.ndarray, qs: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """{"p50": ..., "p99.9": ..., "max": ...} of finite `values` (linear interpolation)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {**{_pname(q): None for q in qs}, "max": None}
    out = {_pname(q): float(v) for q, v in zip(qs, np.percentile(values, qs))}
    out["max"] = float(values.max())
    return out


def _pname(q: float) -> str:
    return f"p{q:g}"


def top_k(n: int, top_percent: float) -> int:
    """How many of n scores make the top `top_percent` percent: ceil(q/100 * n), at least 1 (0 if n == 0)."""
    if n == 0:
        return 0
    # The small slack keeps 1% of 300 at 3 despite 1/100 * 300 = 3.0000000000000004.
    return max(1, math.ceil(top_percent / 100.0 * n - 1e-9))


def top_percent_threshold(values: np.ndarray, top_percent: float) -> Optional[float]:
    """The k-th largest value (k = top_k), or None for an empty array."""
    values = np.asarray(values, dtype=np.float64)
    k = top_k(values.size, top_percent)
    if k == 0:
        return None
    return float(np.partition(values, values.size - k)[values.size - k])


def top_percent_mask(values: np.ndarray, top_percent: float) -> tuple[np.ndarray, Optional[float]]:
    """(mask of values >= threshold, threshold): the top `top_percent` percent, ties at the threshold kept."""
    values = np.asarray(values, dtype=np.float64)
    threshold = top_percent_threshold(values, top_percent)
    if threshold is None:
        return np.zeros(0, dtype=bool), None
    return values >= threshold, threshold


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """100 * share of `values` that are <= each value (the largest has 100)."""
    values = np.asarray(values, dtype=np.float64)
    ordered = np.sort(values)
    return 100.0 * np.searchsorted(ordered, values, side="right") / max(values.size, 1)


def zscores(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return np.zeros_like(values)
    std = values.std(ddof=1)
    if std == 0:
        return np.zeros_like(values)
    return (values - values.mean()) / std


def zscore_mask(values: np.ndarray, threshold: float) -> np.ndarray:
    """Outliers: z-score strictly above `threshold`."""
    return zscores(values) > threshold


def odds_ratio(a: int, b: int, c: int, d: int) -> dict:
    """Odds ratio of [[a, b], [c, d]] with Woolf's 95% interval and Fisher's exact two-sided p.

    Rows: exposed / not exposed (here: memorized / not); columns: outcome yes / no (has marker / not).
    """
    table = [[int(a), int(b)], [int(c), int(d)]]
    p_value = float(sps.fisher_exact(table, alternative="two-sided")[1])
    if min(a + b, c + d, a + c, b + d) == 0:
        return {"odds_ratio": None, "ci_low": None, "ci_high": None, "corrected": False, "fisher_p": p_value}
    corrected = min(a, b, c, d) == 0
    if corrected:
        a, b, c, d = (x + 0.5 for x in (a, b, c, d))
    log_or = math.log(a * d / (b * c))
    half_width = Z_95 * math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    return {
        "odds_ratio": math.exp(log_or),
        "ci_low": math.exp(log_or - half_width),
        "ci_high": math.exp(log_or + half_width),
        "corrected": corrected,
        "fisher_p": p_value,
    }


def mantel_haenszel(tables: Sequence[Sequence[int]]) -> dict:
    """Pooled odds ratio over strata [(a, b, c, d), ...] with the Robins-Breslow-Greenland 95% interval."""
    informative = [t for t in tables if min(t[0] + t[1], t[2] + t[3], t[0] + t[2], t[1] + t[3]) > 0]
    r_sum = s_sum = pr = ps_qr = qs = 0.0
    for a, b, c, d in informative:
        n = a + b + c + d
        p, q, r, s = (a + d) / n, (b + c) / n, a * d / n, b * c / n
        r_sum, s_sum = r_sum + r, s_sum + s
        pr, ps_qr, qs = pr + p * r, ps_qr + p * s + q * r, qs + q * s
    if r_sum == 0 or s_sum == 0:
        return {"odds_ratio": None, "ci_low": None, "ci_high": None, "strata": len(informative)}
    log_or = math.log(r_sum / s_sum)
    variance = pr / (2 * r_sum**2) + ps_qr / (2 * r_sum * s_sum) + qs / (2 * s_sum**2)
    half_width = Z_95 * math.sqrt(variance)
    return {
        "odds_ratio": math.exp(log_or),
        "ci_low": math.exp(log_or - half_width),
        "ci_high": math.exp(log_or + half_width),
        "strata": len(informative),
    }


def enrichment_table(memorized: np.ndarray, has_marker: np.ndarray) -> tuple[int, int, int, int]:
    """(a, b, c, d): memorized with / without marker, not memorized with / without marker."""
    memorized = np.asarray(memorized, dtype=bool)
    has_marker = np.asarray(has_marker, dtype=bool)
    a = int(np.sum(memorized & has_marker))
    b = int(np.sum(memorized & ~has_marker))
    c = int(np.sum(~memorized & has_marker))
    d = int(np.sum(~memorized & ~has_marker))
    return a, b, c, d


def marker_enrichment(memorized: np.ndarray, has_marker: np.ndarray) -> dict:
    """Share of memorized prompts with markers against the base rate, with odds ratio and Fisher p."""
    a, b, c, d = enrichment_table(memorized, has_marker)
    n = a + b + c + d
    return {
        "n_prompts": n,
        "n_memorized": a + b,
        "n_memorized_with_marker": a,
        "n_with_marker": a + c,
        "memorized_marker_share": a / (a + b) if a + b else None,
        "base_marker_share": (a + c) / n if n else None,
        "rest_marker_share": c / (c + d) if c + d else None,
        "table": [[a, b], [c, d]],
        **odds_ratio(a, b, c, d),
    }


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """Labels of the buckets whose lower edges are `edges`: [1, 2, 5] -> ["1", "2-4", "5+"]."""
    labels = []
    for low, high in zip(edges, [*edges[1:], None]):
        if high is None:
            labels.append(f"{low}+")
        elif high - low == 1:
            labels.append(f"{low}")
        else:
            labels.append(f"{low}-{high - 1}")
    return labels


def bucket_index(values: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """Index of the bucket each value falls in (lower edges inclusive); -1 below the first edge."""
    return np.searchsorted(np.asarray(edges), np.asarray(values), side="right") - 1


def enrichment_by_bucket(
    memorized: np.ndarray, has_marker: np.ndarray, n_reports: np.ndarray, edges: Sequence[int]
) -> dict:
    """Marker enrichment within each n_reports bucket, and the Mantel-Haenszel odds ratio pooled over them.

    Duplication is the other known cause of memorization; the pooled odds ratio says whether the
    marker effect survives once prompts are compared only with prompts duplicated as often.
    """
    edges = sorted(int(e) for e in edges)
    memorized = np.asarray(memorized, dtype=bool)
    has_marker = np.asarray(has_marker, dtype=bool)
    index = bucket_index(n_reports, edges)
    buckets, tables = [], []
    for i, label in enumerate(bucket_labels(edges)):
        inside = index == i
        result = marker_enrichment(memorized[inside], has_marker[inside])
        buckets.append({"bucket": label, "min_reports": edges[i], **result})
        tables.append(enrichment_table(memorized[inside], has_marker[inside]))
    return {"buckets": buckets, "below_first_edge": int(np.sum(index < 0)), "mantel_haenszel": mantel_haenszel(tables)}


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> Optional[float]:
    """Probability that a random positive scores above a random negative (ties 1/2); None if a class is empty."""
    positives = np.asarray(positives, dtype=np.float64)
    negatives = np.asarray(negatives, dtype=np.float64)
    if positives.size == 0 or negatives.size == 0:
        return None
    ranks = sps.rankdata(np.concatenate([positives, negatives]))  # average ranks count ties 1/2
    u = ranks[: positives.size].sum() - positives.size * (positives.size + 1) / 2
    return float(u / (positives.size * negatives.size))


def tpr_at_fpr(positives: np.ndarray, negatives: np.ndarray, fpr: float = 0.01) -> Optional[float]:
    """Share of positives flagged when at most `fpr` of the negatives are (see the module notes)."""
    positives = np.asarray(positives, dtype=np.float64)
    negatives = np.sort(np.asarray(negatives, dtype=np.float64))[::-1]
    if positives.size == 0 or negatives.size == 0:
        return None
    allowed = math.floor(fpr * negatives.size + 1e-9)
    threshold = negatives[allowed] if allowed < negatives.size else -np.inf
    return float(np.mean(positives > threshold))


def paired_difference_ci(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict:
    """Mean of a - b over aligned pairs with a t interval: {n, mean, ci_low, ci_high} (None where undefined)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    out = {"n": int(diff.size), "mean": float(diff.mean()) if diff.size else None, "ci_low": None, "ci_high": None}
    if diff.size >= 2:
        half = sps.t.ppf(0.5 + level / 2, diff.size - 1) * diff.std(ddof=1) / math.sqrt(diff.size)
        out["ci_low"], out["ci_high"] = out["mean"] - float(half), out["mean"] + float(half)
    return out


def high_frequency_share(images: np.ndarray) -> np.ndarray:
    """Per image of [N, H, W] (or [N, H, W, C], channels averaged): share of power above half Nyquist."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4:
        images = images.mean(axis=-1)
    centred = images - images.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(centred)) ** 2
    fy, fx = np.fft.fftfreq(images.shape[1]), np.fft.fftfreq(images.shape[2])
    high = np.maximum(np.abs(fy)[:, None], np.abs(fx)[None, :]) > 0.25
    total = power.sum(axis=(1, 2))
    return np.where(total > 0, power[:, high].sum(axis=1) / np.where(total > 0, total, 1.0), 0.0)


def miss_rate(misses: int, sample: int, level: float = 0.95) -> dict:
    """The share of misses in a random sample and its one-sided Clopper-Pearson upper bound at `level`."""
    if sample == 0:
        return {"misses": 0, "sample": 0, "estimate": None, "upper": None, "level": level}
    from scipy.stats import beta

    upper = 1.0 if misses >= sample else float(beta.ppf(level, misses + 1, sample - misses))
    return {"misses": int(misses), "sample": int(sample), "estimate": misses / sample, "upper": upper, "level": level}


def sign_test(successes: int, trials: int, alternative: str = "two-sided") -> Optional[float]:
    """Exact binomial p of `successes` in `trials` discordant pairs against 1/2; None without pairs."""
    if trials <= 0:
        return None
    return float(sps.binomtest(int(successes), int(trials), 0.5, alternative=alternative).pvalue)


def min_sign_test_pairs(alternative: str = "two-sided", alpha: float = 0.05) -> int:
    """The fewest pairs with which the exact sign test can reach p < alpha (all pairs one way)."""
    n = 1
    while sign_test(n, n, alternative) >= alpha:
        n += 1
    return n


def design_problem(outcome: np.ndarray, exposure: np.ndarray, binary: bool, n_covariates: int) -> Optional[str]:
    """Why the exposure's effect on the outcome cannot be estimated from these rows, or None.

    A binary outcome needs every cell of the outcome x exposure table filled: an empty cell is
    (quasi-)separation, whose maximum-likelihood odds ratio is infinite or zero.
    """
    outcome, exposure = np.asarray(outcome, dtype=np.float64), np.asarray(exposure, dtype=bool)
    n = outcome.size
    if n < n_covariates + 3:
        return f"{n} rows for {n_covariates + 2} coefficients"
    if not exposure.any():
        return "no prompt carries a marker"
    if exposure.all():
        return "every prompt carries a marker"
    if np.ptp(outcome) == 0:
        return "the outcome is the same for every prompt"
    if binary:
        a, b, c, d = enrichment_table(outcome > 0, exposure)
        if a == 0:
            return "no memorized prompt carries a marker (separation: the odds ratio is 0)"
        if b == 0:
            return "every memorized prompt carries a marker (separation: the odds ratio is infinite)"
        if c == 0 or d == 0:
            return "the prompts outside the memorized set all have, or all lack, a marker (separation)"
    return None


def _separates(values: np.ndarray, outcome: Optional[np.ndarray]) -> bool:
    """Whether a covariate (quasi-)separates a 0/1 outcome: the classes' ranges meet at most at one point, so
    its maximum-likelihood coefficient is infinite (e.g. n_reports above 1 only among the memorized)."""
    if outcome is None:
        return False
    yes, no = values[outcome > 0], values[outcome <= 0]
    return bool(yes.min() >= no.max() or yes.max() <= no.min())


def _design(exposure: np.ndarray, covariates: dict[str, np.ndarray], outcome: Optional[np.ndarray] = None):
    """[1, exposure, covariates...] without the covariates that are constant or (given a 0/1 `outcome`)
    separate it; (matrix, kept names, dropped names with the reason)."""
    kept, dropped, columns = [], [], [np.ones(len(exposure)), np.asarray(exposure, dtype=np.float64)]
    for name, values in covariates.items():
        values = np.asarray(values, dtype=np.float64)
        if np.ptp(values) == 0:
            dropped.append(f"{name} (constant)")
        elif _separates(values, outcome):
            dropped.append(f"{name} (separates the outcome)")
        else:
            kept.append(name)
            columns.append(values)
    return np.column_stack(columns), kept, dropped


def _refused(reason: str, covariates: dict, **extra) -> dict:
    return {"estimate": None, "ci_low": None, "ci_high": None, "p": None, "refused": reason,
            "covariates": list(covariates), "dropped": [], "n": None, **extra}


def adjusted_logistic(outcome: np.ndarray, exposure: np.ndarray, covariates: dict[str, np.ndarray]) -> dict:
    """The exposure's odds ratio for a 0/1 outcome adjusted for `covariates`: {estimate, ci_low, ci_high, p, ...}."""
    import statsmodels.api as sm

    outcome = np.asarray(outcome, dtype=np.float64)
    problem = design_problem(outcome, exposure, True, len(covariates))
    if problem:
        return _refused(problem, covariates, model="logistic")
    matrix, kept, dropped = _design(exposure, covariates, outcome)
    try:
        # Non-convergence is checked below and refused with a reason; statsmodels' warning would only repeat it.
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = sm.Logit(outcome, matrix).fit(disp=0, maxiter=200)
    except Exception as err:  # statsmodels raises PerfectSeparationError, LinAlgError, ...
        return _refused(f"the fit failed ({type(err).__name__}: {err})", covariates, model="logistic")
    beta, se = float(fit.params[1]), float(fit.bse[1])
    if not fit.mle_retvals.get("converged", False) or not np.isfinite(se):
        return _refused("the fit did not converge (near-separation by the covariates)", covariates, model="logistic")
    return {
        "model": "logistic", "estimate": math.exp(beta), "ci_low": math.exp(beta - Z_95 * se),
        "ci_high": math.exp(beta + Z_95 * se), "p": float(fit.pvalues[1]), "refused": None,
        "covariates": kept, "dropped": dropped, "n": int(outcome.size), "events": int(outcome.sum()),
        "covariate_odds_ratios": {name: math.exp(float(fit.params[2 + i])) for i, name in enumerate(kept)},
    }


def adjusted_ols(outcome: np.ndarray, exposure: np.ndarray, covariates: dict[str, np.ndarray]) -> dict:
    """The exposure's coefficient on a continuous outcome adjusted for `covariates` (OLS, HC3 95% interval)."""
    import statsmodels.api as sm

    outcome = np.asarray(outcome, dtype=np.float64)
    problem = design_problem(outcome, exposure, False, len(covariates))
    if problem:
        return _refused(problem, covariates, model="ols")
    matrix, kept, dropped = _design(exposure, covariates)
    fit = sm.OLS(outcome, matrix).fit(cov_type="HC3")
    beta, se = float(fit.params[1]), float(fit.bse[1])
    return {
        "model": "ols", "estimate": beta, "ci_low": beta - Z_95 * se, "ci_high": beta + Z_95 * se,
        "p": float(fit.pvalues[1]), "refused": None, "covariates": kept, "dropped": dropped, "n": int(outcome.size),
    }


def spearman(x: np.ndarray, y: np.ndarray) -> dict:
    """Spearman's rho with its p-value over the pairs where both are finite; None values below 3 pairs or for a constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return {"rho": None, "p": None, "n": int(keep.sum())}
    result = sps.spearmanr(x[keep], y[keep])
    return {"rho": float(result.statistic), "p": float(result.pvalue), "n": int(keep.sum())}


def quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index (0..) of each value in up to `n_bins` quantile bins; tied edges merge, so bins may be fewer."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")


def percentile_within(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """`percentile_rank` of each value among the values of its own group."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    out = np.zeros_like(values)
    for group in np.unique(groups):
        inside = groups == group
        out[inside] = percentile_rank(values[inside])
    return out
