"""One verdict per finding of the paper, by a rule written here and printed with it (pure: dicts in).

- F1, markers are over-represented among the memorized prompts: judged on the marker's odds
  ratio adjusted for length and duplication (analysis: marker_enrichment_adjusted), beside the crude one.
- F2, the marker is the token that contributes most: judged against the null model (attribution:
  null), since a many-piece marker ranks first on a model that learned nothing.
- F3, rewriting the marker does not remove memorization: judged on each marker rewrite's paired
  d_mem change against `original` and, where the copies stage ran, on its copy count.

Each verdict is "supported", "not supported" (F1 also "not supported after adjustment": the crude
interval excludes 1 and the adjusted one does not) or "inconclusive", with the numbers behind it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from cxrmem.mitigation import MARKER_STRATEGIES

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
NOT_AFTER_ADJUSTMENT = "not supported after adjustment"
ALPHA = 0.05

F1_RULE = ("Supported when the marker's odds ratio adjusted for {covariates} has a 95% CI above 1 and the crude odds "
           "ratio is above 1 too; not supported after adjustment when the crude CI lies above 1 but the adjusted CI "
           "does not; not supported when neither does; inconclusive when the adjusted model cannot be fitted or the "
           "crude and adjusted ORs point in opposite directions.")
F2_RULE = ("Supported when, under the summed gradient, the marker is the top word in more marker-bearing memorized "
           "prompts on the audited model than on a re-initialised copy of it (same prompts and seeds), by a one-sided "
           "exact sign test over the paired prompts at p < 0.05; not supported when that test is not significant; "
           "inconclusive without the null model (attribution.null_model) or with fewer paired prompts than the test "
           "needs to reach 0.05 ({min_pairs}).")
F3_RULE = ("A marker rewrite removes memorization when its paired d_mem change against the unmitigated prompt has a 95% "
           "CI below 0 and its mean d_mem is below the memorized threshold, or, where the copies stage ran, when none "
           "of its rewritten memorized prompts copies a training image at a guidance where the unmitigated ones did. "
           "Supported when no marker rewrite removes memorization; not supported when one does; inconclusive when no "
           "marker rewrite changed at least 2 prompts.")


@dataclass
class Verdict:
    """One finding's verdict: what is claimed, the outcome, the rule, why, and the numbers behind it."""

    finding: str
    claim: str
    verdict: str
    rule: str
    reason: str
    numbers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _above(result: Optional[dict], key: str = "ci_low", level: float = 1.0) -> bool:
    return bool(result) and result.get(key) is not None and result[key] > level


def _below(result: Optional[dict], key: str = "ci_high", level: float = 1.0) -> bool:
    return bool(result) and result.get(key) is not None and result[key] < level


def f1_enrichment(analysis: dict) -> Verdict:
    crude = analysis.get("marker_enrichment") or {}
    adjusted = (analysis.get("marker_enrichment_adjusted") or {})
    logistic = adjusted.get("logistic") or {}
    covariates = ", ".join(adjusted.get("covariates") or []) or "nothing"
    numbers = {"crude_or": crude.get("odds_ratio"), "crude_ci_low": crude.get("ci_low"), "crude_ci_high": crude.get("ci_high"),
               "crude_p": crude.get("fisher_p"), "adjusted_or": logistic.get("estimate"), "adjusted_ci_low": logistic.get("ci_low"),
               "adjusted_ci_high": logistic.get("ci_high"), "adjusted_p": logistic.get("p"),
               "covariates": logistic.get("covariates", adjusted.get("covariates"))}  # fmt: skip
    claim, rule = "Markers are over-represented among the memorized prompts.", F1_RULE.format(covariates=covariates)
    if not adjusted or logistic.get("refused") or logistic.get("estimate") is None:
        why = logistic.get("refused") or "no adjusted model in the analysis (rerun `cxrmem analyze`)"
        return Verdict("F1", claim, INCONCLUSIVE, rule, f"the adjusted model was not fitted: {why}", numbers)
    crude_up, crude_down = _above(crude), _below(crude)
    adjusted_up, adjusted_down = _above(logistic), _below(logistic)
    if (adjusted_up and crude_down) or (adjusted_down and crude_up):
        return Verdict("F1", claim, INCONCLUSIVE, rule, "the crude and adjusted odds ratios point in opposite directions", numbers)
    if adjusted_up and (crude.get("odds_ratio") or 0) > 1:
        return Verdict("F1", claim, SUPPORTED, rule, "the adjusted 95% CI lies above 1", numbers)
    if crude_up:
        return Verdict("F1", claim, NOT_AFTER_ADJUSTMENT, rule, f"the crude CI lies above 1, the CI adjusted for {covariates} does not", numbers)
    return Verdict("F1", claim, NOT_SUPPORTED, rule, "neither the crude nor the adjusted 95% CI lies above 1", numbers)


def f2_marker_top(attribution: Optional[dict]) -> Verdict:
    claim = "The marker is the word that contributes most to a memorized prompt's d_mem."
    null = (attribution or {}).get("null")
    min_pairs = (null or {}).get("min_pairs", 5)
    rule = F2_RULE.format(min_pairs=min_pairs)
    if not attribution:
        return Verdict("F2", claim, INCONCLUSIVE, rule, "no attribution (run `cxrmem attribute`)")
    if not null or not null.get("gradient"):
        return Verdict("F2", claim, INCONCLUSIVE, rule, "no null model was run (attribution.null_model=false)",
                       {"observed_top1": (attribution.get("gradient") or {}).get("marker_top1")})
    test = null["gradient"]
    numbers = {k: test.get(k) for k in ("pairs", "observed_top1", "null_top1", "top1_p", "observed_mean_rank", "null_mean_rank", "rank_p")}
    numbers["other_methods"] = {m: {k: (null.get(m) or {}).get(k) for k in ("observed_top1", "null_top1", "top1_p")}
                                for m in ("gradient_per_piece_mean", "leave_one_out") if null.get(m)}  # fmt: skip
    if test["pairs"] < min_pairs:
        return Verdict("F2", claim, INCONCLUSIVE, rule, f"{test['pairs']} marker-bearing prompts attributed; the test needs {min_pairs}", numbers)
    if test["top1_p"] is not None and test["top1_p"] < ALPHA and test["observed_top1"] > test["null_top1"]:
        return Verdict("F2", claim, SUPPORTED, rule, "the marker is first more often than on the null model", numbers)
    return Verdict("F2", claim, NOT_SUPPORTED, rule, "the marker is not first significantly more often than on the null model", numbers)


def _removes_by_copies(strategy: str, copies: Optional[dict]) -> list[str]:
    """The guidances at which the unmitigated memorized prompts copy and none rewritten by `strategy` does."""
    out = []
    for name, g in ((copies or {}).get("guidances") or {}).items():
        checked = (g.get("strategies") or {}).get(strategy)
        if checked is not None and g.get("memorized_copies", 0) > 0 and checked.get("copies", 1) == 0:
            out.append(name)
    return out


def f3_rewrites(mitigation_rows: Optional[list[dict]], threshold: Optional[float], copies: Optional[dict]) -> Verdict:
    """mitigation_rows: per strategy {strategy, prompts, d_mem_mean, d_mem_change: {n, mean, ci_low, ci_high}}."""
    claim = "Rewriting the de-identification markers does not remove memorization."
    rows = [r for r in (mitigation_rows or []) if r["strategy"] in MARKER_STRATEGIES]
    numbers: dict = {"threshold": threshold, "strategies": {}}
    removes = []
    for row in rows:
        change = row.get("d_mem_change") or {}
        by_copies = _removes_by_copies(row["strategy"], copies)
        by_d_mem = _below(change, "ci_high", 0.0) and threshold is not None and (row.get("d_mem_mean") or float("inf")) < threshold
        numbers["strategies"][row["strategy"]] = {"prompts": change.get("n"), "d_mem_change": change.get("mean"),
                                                  "ci_low": change.get("ci_low"), "ci_high": change.get("ci_high"),
                                                  "d_mem_mean": row.get("d_mem_mean"), "removes_copies_at": by_copies}  # fmt: skip
        if by_d_mem or by_copies:
            removes.append(row["strategy"] + (" (d_mem)" if by_d_mem else "") + (f" (copies at {', '.join(by_copies)})" if by_copies else ""))
    if mitigation_rows is None:
        return Verdict("F3", claim, INCONCLUSIVE, F3_RULE, "no mitigation experiments (run `cxrmem mitigate`)", numbers)
    if not any((r.get("d_mem_change") or {}).get("n", 0) >= 2 for r in rows):
        return Verdict("F3", claim, INCONCLUSIVE, F3_RULE, "no marker rewrite changed at least 2 prompts", numbers)
    if removes:
        return Verdict("F3", claim, NOT_SUPPORTED, F3_RULE, "removed by " + "; ".join(removes), numbers)
    return Verdict("F3", claim, SUPPORTED, F3_RULE, "no marker rewrite brought d_mem below the threshold or stopped the copies", numbers)


def verdicts(analysis: dict, attribution: Optional[dict], mitigation_rows: Optional[list[dict]], copies: Optional[dict]) -> list[Verdict]:
    """F1, F2, F3 of one run."""
    copies = copies if isinstance(copies, dict) and "guidances" in copies else None
    return [f1_enrichment(analysis), f2_marker_top(attribution), f3_rewrites(mitigation_rows, analysis.get("threshold"), copies)]
