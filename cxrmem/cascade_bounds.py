"""What the cascade's audit can say about the memorized prompts its screens rejected (pure).

Three numbers, each with what it rests on:

- `missed_upper_95`: distribution-free. The audit fully scores a simple random sample of the
  rejected prompts; the Clopper-Pearson upper bound on the sample's miss share, times the rejected
  count, bounds the memorized prompts lost (`stats.miss_rate`). It needs no model, but a sample of
  n with no miss only bounds the share at about 3/n.
- `recall_lower_bound`: the memorized prompts the cascade kept, over those plus `missed_upper_95`:
  a 95% lower bound on the recall of the memorized set, on the same footing.
- `expected_missed`: under a noise model of the full score given the first screen's score, fitted
  on every fully scored prompt (survivors and audit sample). Each rejected prompt adds its
  probability of reaching the memorized threshold. It is as good as the model, so the model is
  checked: on the fully scored prompts, the members it predicts against the members there are
  (a Poisson-binomial tail p-value each way).

The model: log full = a + b log screen + e, e ~ N(0, s^2), by least squares. Selection on the
screen score does not bias a regression of the full score on it, so the survivors (selected by
the screens) and the random audit sample fit it together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from scipy.stats import norm

from cxrmem import stats

LEVEL = 0.95
MIN_FIT = 10  # fewer fully scored prompts with a finite screen score: no model


@dataclass(frozen=True)
class ScreenModel:
    """log full = intercept + slope * log screen + N(0, sigma^2), fitted on `n` prompts."""

    intercept: float
    slope: float
    sigma: float
    n: int

    def member_probability(self, screen: np.ndarray, threshold: float) -> np.ndarray:
        """[N] P(full >= threshold | screen) for positive screen scores (0 where the screen is not)."""
        screen = np.asarray(screen, dtype=np.float64)
        out = np.zeros(screen.shape)
        ok = np.isfinite(screen) & (screen > 0)
        mean = self.intercept + self.slope * np.log(screen[ok])
        out[ok] = norm.sf((np.log(threshold) - mean) / self.sigma)
        return out


def fit_screen_model(screen: np.ndarray, full: np.ndarray) -> Optional[ScreenModel]:
    """The model from prompts with both scores (None with fewer than MIN_FIT usable ones)."""
    screen, full = np.asarray(screen, dtype=np.float64), np.asarray(full, dtype=np.float64)
    ok = np.isfinite(screen) & np.isfinite(full) & (screen > 0) & (full > 0)
    if ok.sum() < MIN_FIT or np.ptp(np.log(screen[ok])) == 0:
        return None
    x, y = np.log(screen[ok]), np.log(full[ok])
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (intercept + slope * x)
    sigma = max(float(np.sqrt(np.sum(residuals**2) / max(ok.sum() - 2, 1))), 1e-6)
    return ScreenModel(float(intercept), float(slope), sigma, int(ok.sum()))


def poisson_binomial_tails(probabilities: np.ndarray, observed: int) -> tuple[float, float]:
    """(P(X >= observed), P(X <= observed)) for X a sum of independent Bernoullis (exact recursion)."""
    pmf = np.zeros(len(probabilities) + 1)
    pmf[0] = 1.0
    for p in probabilities:
        pmf[1:] = pmf[1:] * (1 - p) + pmf[:-1] * p
        pmf[0] *= 1 - p
    return float(pmf[observed:].sum()), float(pmf[: observed + 1].sum())


@dataclass(frozen=True)
class AuditBounds:
    """summary.json["cascade"]["bounds"]: what the audit says about the lost memorized prompts."""

    kept_members: int  # memorized prompts among the fully scored survivors
    missed_upper_95: Optional[float]  # distribution-free bound on memorized prompts among the rejected
    recall_lower_bound: Optional[float]  # kept / (kept + missed_upper_95)
    expected_missed: Optional[float]  # under the screen model (None: no model)
    model: Optional[dict]  # intercept, slope, sigma, n
    model_check: Optional[dict]  # predicted vs actual members among the fully scored, and the two tail p-values
    informative: bool  # the bound keeps the recall at or above `target_recall`
    audit_needed: Optional[int]  # the audit sample that would make it so at zero misses (None: it is)
    note: str  # one line for the card


def audit_needed(rejected: int, kept_members: int, target_recall: float, level: float = LEVEL) -> Optional[int]:
    """The fewest audited prompts with which zero misses bound the recall at `target_recall` or above."""
    allowed = kept_members * (1 / target_recall - 1)  # missed prompts the target tolerates
    if rejected == 0 or allowed >= rejected:
        return 0
    if allowed <= 0:
        return None  # nothing kept: no audit size can bound the recall away from 0
    share = allowed / rejected
    return min(rejected, int(np.ceil(np.log(1 - level) / np.log1p(-share))))


def audit_bounds(
    rejected: int, sample: int, misses: int, kept_members: int, fit: tuple[np.ndarray, np.ndarray],
    rejected_screens: np.ndarray, threshold: Optional[float], full_per_prompt: float, target_recall: float = 0.9,
) -> AuditBounds:  # fmt: skip
    """The bounds of one audited round. `fit` is (screen, full) of every fully scored prompt;
    `rejected_screens` the first screen's score of the rejected prompts that were not audited;
    `full_per_prompt` the denoiser evaluations of one full score (what a larger audit would cost)."""
    rate = stats.miss_rate(misses, sample, LEVEL)
    upper = None if rate["upper"] is None else rate["upper"] * rejected
    recall = None if upper is None or kept_members + upper == 0 else kept_members / (kept_members + upper)
    model = fit_screen_model(*fit) if threshold is not None and threshold > 0 else None
    expected, check = None, None
    if model is not None:
        expected = misses + float(model.member_probability(rejected_screens, threshold).sum())
        screen, full = (np.asarray(a, dtype=np.float64) for a in fit)
        p = model.member_probability(screen, threshold)
        actual = int(np.sum(np.isfinite(full) & (full >= threshold)))
        above, below = poisson_binomial_tails(p, actual)
        check = {"predicted_members": float(p.sum()), "actual_members": actual, "p_more": above, "p_fewer": below}
    needed = audit_needed(rejected, kept_members, target_recall)
    informative = recall is not None and recall >= target_recall
    if informative:
        note = f"recall of the memorized set at least {recall:.1%} (95% bound from {sample} audited prompts)"
    elif needed is None:
        note = "no memorized prompt was kept: the audit cannot bound the recall"
    else:
        shown = "no" if recall is None else f"only a {recall:.0%}"
        note = (f"the audit of {sample} prompts gives {shown} lower bound on recall; bounding it at "
                f"{target_recall:.0%} takes an audit of {needed} prompts "
                f"(cascade.audit_sample; {needed * full_per_prompt:,.0f} denoiser evaluations)")
    return AuditBounds(kept_members, upper, recall, expected, None if model is None else asdict(model), check,
                       informative, None if informative else needed, note)  # fmt: skip
