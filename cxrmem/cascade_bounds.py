"""What the cascade's audit can say about the memorized prompts its screens rejected (pure).

Three numbers, each with what it rests on:

- `missed_upper_95`: distribution-free. The audit fully scores a simple random sample of the
  rejected prompts; the Clopper-Pearson upper bound on the sample's miss share, times the rejected
  count, bounds the memorized prompts lost (`stats.miss_rate`). It needs no model, but a sample of
  n with no miss only bounds the share at about 3/n.
- `recall_lower_bound`: the memorized prompts the cascade kept, over those plus `missed_upper_95`:
  a 95% lower bound on the recall of the memorized set, on the same footing.
- `expected_missed`: under a noise model of the full score given each stage's screen score, fitted
  on every fully scored prompt (survivors and audited; for one an earlier stage rejected, a dmem
  screen is recomputed from its full score's step norms). Each rejected prompt adds its
  probability of reaching the memorized threshold under the model of the stage that rejected it (an
  audited one adds 1 if it reached it, else 0). It is as good as the models, so each is checked: on
  the fully scored prompts, the members it predicts against the members there are (a
  Poisson-binomial tail p-value each way).

The same models set the margins (`StageMargin.needed_keep`): the least share a stage must keep for
its rejected prompts to hold at most its part of `cascade.expected_missed_target` expected members.

The model: log full = a + b log screen + e, e ~ N(0, s^2), by weighted least squares: a survivor counts
once, an audited prompt as many times as the rejected prompts it was sampled to stand for (the inverse of
its chance of being fully scored). Memorized prompts lie above the bulk's line, and the survivors are rich
in them: unweighted, the fit followed them and expected several times the members truly lost (testbed/model,
20 audited: 25.7 expected, none lost; weighted 2.7). The survivors were also selected by the later stages'
screens, which the model does not see; the check, on the fully scored prompts (mostly survivors), shows how
far the memorized prompts lie above the model of the bulk.
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


def fit_screen_model(screen: np.ndarray, full: np.ndarray, weight: Optional[np.ndarray] = None) -> Optional[ScreenModel]:
    """The model from prompts with both scores (None with fewer than MIN_FIT usable ones), each weighted by the
    prompts it stands for (`weight`, default 1: see StageScores.fit_points)."""
    screen, full = np.asarray(screen, dtype=np.float64), np.asarray(full, dtype=np.float64)
    weight = np.ones(screen.shape) if weight is None else np.asarray(weight, dtype=np.float64)
    ok = np.isfinite(screen) & np.isfinite(full) & (screen > 0) & (full > 0)
    if ok.sum() < MIN_FIT or np.ptp(np.log(screen[ok])) == 0:
        return None
    x, y, w = np.log(screen[ok]), np.log(full[ok]), weight[ok]
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))  # polyfit weights the residuals, not their squares
    residuals = y - (intercept + slope * x)
    n = ok.sum()
    sigma = max(float(np.sqrt(np.sum(w * residuals**2) / np.sum(w) * n / max(n - 2, 1))), 1e-6)
    return ScreenModel(float(intercept), float(slope), sigma, int(n))


def poisson_binomial_tails(probabilities: np.ndarray, observed: int) -> tuple[float, float]:
    """(P(X >= observed), P(X <= observed)) for X a sum of independent Bernoullis (exact recursion)."""
    pmf = np.zeros(len(probabilities) + 1)
    pmf[0] = 1.0
    for p in probabilities:
        pmf[1:] = pmf[1:] * (1 - p) + pmf[:-1] * p
        pmf[0] *= 1 - p
    return float(pmf[observed:].sum()), float(pmf[: observed + 1].sum())


@dataclass(frozen=True)
class StageScores:
    """One stage's inputs as the audit sees them."""

    screen: np.ndarray  # [n] the stage's screen score of each input
    full: np.ndarray  # [n] the full d_mem of the fully scored inputs (survivors, audited), NaN elsewhere
    kept: np.ndarray  # [n] bool: the stage passed it on
    # (screen, full) of fully scored prompts the stage never screened (an earlier stage rejected them), their screen
    # recomputed from their full score's step norms: more points for the model, not inputs of the stage
    also: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))
    # the audit sample's share of the rejected prompts, and which inputs and `also` points it scored: an audited
    # prompt stands for 1 / share rejected ones in the model's fit (None: every point counts once)
    audit: Optional[tuple[float, np.ndarray, np.ndarray]] = None

    def fit_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(screen, full, weight) of every fully scored prompt the model is fitted and checked on.

        The survivors are all fully scored and the rejected only through the audit's random sample, so unweighted
        the fit sees the high-screen prompts, memorized ones above all, many times over their share: on
        testbed/model with a 20-prompt audit a third of its points were memorized. Weighted by the inverse of each
        point's chance to be fully scored (Horvitz-Thompson), the fit stands for every input of the stage."""
        scored = np.isfinite(self.full)
        screen = np.concatenate([self.screen[scored], self.also[0]])
        full = np.concatenate([self.full[scored], self.also[1]])
        if self.audit is None:
            return screen, full, np.ones(screen.shape)
        share, audited, also_audited = self.audit
        sampled = np.concatenate([audited[scored], also_audited])
        return screen, full, np.where(sampled, 1.0 / share, 1.0)


@dataclass(frozen=True)
class StageMargin:
    """What one stage's screen model says about the prompts the stage rejected."""

    model: Optional[dict]  # intercept, slope, sigma, n (None: too few fully scored inputs, or no screen model)
    model_check: Optional[dict]  # predicted vs actual members among its fully scored inputs, the two tail p-values
    expected_missed: Optional[float]  # members among its rejected: audited ones counted, the model's expectation for the rest
    needed_keep: Optional[int]  # the fewest inputs to keep (top by screen) for its rejected to hold at most the allowed members


def member_weights(scores: StageScores, model: ScreenModel, threshold: float) -> np.ndarray:
    """[n] each input's chance of being memorized: 1 or 0 where fully scored, the model's probability elsewhere."""
    scored = np.isfinite(scores.full)
    return np.where(scored, scored & (np.nan_to_num(scores.full, nan=-np.inf) >= threshold),
                    model.member_probability(scores.screen, threshold))  # fmt: skip


def keep_needed(screen: np.ndarray, weights: np.ndarray, allowed: float) -> int:
    """The fewest prompts to keep, top by screen, so that the weights of the rest sum to at most `allowed`."""
    order = np.argsort(-np.nan_to_num(np.asarray(screen, dtype=np.float64), nan=-np.inf), kind="stable")
    tail = np.cumsum(weights[order][::-1])[::-1]  # tail[m]: the weight of every prompt ranked m or lower
    over = np.flatnonzero(tail > allowed)
    return 0 if over.size == 0 else int(over[-1]) + 1


def model_check(model: ScreenModel, screen: np.ndarray, full: np.ndarray, threshold: float) -> dict:
    """The members the model predicts among prompts with a full score against those there are."""
    scored = np.isfinite(full)
    p = model.member_probability(screen[scored], threshold)
    actual = int(np.sum(full[scored] >= threshold))
    above, below = poisson_binomial_tails(p, actual)
    return {"predicted_members": float(p.sum()), "actual_members": actual, "p_more": above, "p_fewer": below}


def stage_margin(scores: StageScores, threshold: Optional[float], allowed: Optional[float]) -> StageMargin:
    """A stage's model, its check, the members expected among its rejected, and (with `allowed`, the expected
    members its rejected may hold) the share it needs to keep."""
    screen, full, weight = scores.fit_points()
    model = fit_screen_model(screen, full, weight) if threshold is not None and threshold > 0 else None
    if model is None:
        return StageMargin(None, None, None, None)
    weights = member_weights(scores, model, threshold)
    needed = None if allowed is None else keep_needed(scores.screen, weights, allowed)
    return StageMargin(asdict(model), model_check(model, screen, full, threshold), float(weights[~scores.kept].sum()), needed)


@dataclass(frozen=True)
class AuditBounds:
    """summary.json["cascade"]["bounds"]: what the audit says about the lost memorized prompts."""

    kept_members: int  # memorized prompts among the fully scored survivors
    missed_upper_95: Optional[float]  # distribution-free bound on memorized prompts among the rejected
    recall_lower_bound: Optional[float]  # kept / (kept + missed_upper_95)
    expected_missed: Optional[float]  # summed over the stages' models (None: a stage has no model)
    stages: list  # StageMargin of each stage, in order
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
    rejected: int, sample: int, misses: int, kept_members: int, stages: list[Optional[StageScores]],
    threshold: Optional[float], full_per_prompt: float, allowed: Optional[float] = None, target_recall: float = 0.9,
) -> AuditBounds:  # fmt: skip
    """The bounds of one audited round. `stages`: each stage's inputs (None: a screen whose higher scores do not
    mean memorized, no model); `allowed`: the expected members each stage's rejected may hold (None: no margins);
    `full_per_prompt` the denoiser evaluations of one full score (what a larger audit would cost)."""
    rate = stats.miss_rate(misses, sample, LEVEL)
    upper = None if rate["upper"] is None else rate["upper"] * rejected
    recall = None if upper is None or kept_members + upper == 0 else kept_members / (kept_members + upper)
    none = StageMargin(None, None, None, None)
    margins = [none if scores is None else stage_margin(scores, threshold, allowed) for scores in stages]
    expected = None if any(m.expected_missed is None for m in margins) else sum(m.expected_missed for m in margins)
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
    return AuditBounds(kept_members, upper, recall, expected, [asdict(m) for m in margins],
                       informative, None if informative else needed, note)  # fmt: skip
