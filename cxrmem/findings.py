"""One verdict per finding of the paper, by a rule written here and printed with it (pure: typed sections in).

Each finding is one row of FINDINGS: its claim, its rule, and `judge`, which reads the run's
sections (`FindingInputs`) and returns a Verdict with the numbers behind it and a one-line
account of them. The report's card, summary.md and metrics.json show every row; a new finding is
one row here and its test.

- F0, the model memorizes prompts of this corpus: judged on the count of corpus prompts above every prompt
  of a reference the model never saw, per length bin (calibration: global_p; cxrmem/calibration.py).
- F1, markers are over-represented among the memorized prompts: judged on the marker's odds
  ratio adjusted for length and duplication (analysis: marker_enrichment_adjusted), beside the crude one.
- F2, the marker is the token that contributes most: judged against the null model (attribution:
  null), since a many-piece marker ranks first on a model that learned nothing.
- F3, rewriting the marker does not remove memorization: judged on the copy rate where the copies
  stage ran (copies: the paired judgement per guidance, cxrmem/judgement.py), else on each marker
  rewrite's paired d_mem change against `original`.

Each verdict is "supported", "not supported" (F1 also "not supported after adjustment": the crude
interval excludes 1 and the adjusted one does not) or "inconclusive", with the numbers behind it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from cxrmem import stats
from cxrmem.formatting import fmt, percent
from cxrmem.judgement import StrategyJudgement, halves_copying
from cxrmem.strategies import marker_rewrites
from cxrmem.summary import AnalysisSection, AttributionSection, CalibrationSection, CopiesSection

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
NOT_AFTER_ADJUSTMENT = "not supported after adjustment"
ALPHA = 0.05
# The fewest paired prompts with which an exact one-sided sign test can reach p < 0.05 (5): below it
# neither a change nor its absence can be shown, so F2 and F3 are inconclusive.
MIN_PAIRED_PROMPTS = stats.min_sign_test_pairs("greater", ALPHA)
FIDELITY_POINTS = 0.10  # a rewrite that stops the copies by changing the image by more than this has not fixed anything

F0_RULE = ("Supported when more corpus prompts score above every reference prompt of their length bin than prompts the "
           "model never saw would, at p < 0.05 (exact per bin under exchangeability with the reference of non-members, "
           "bins combined by Fisher's method; no tail model); not supported when not; inconclusive without a reference "
           "(analyze.reference) or with fewer than {reference_min} scored reference prompts.")
F1_RULE = ("Supported when the marker's odds ratio adjusted for {covariates} has a 95% CI above 1 and the crude odds "
           "ratio is above 1 too; not supported after adjustment when the crude CI lies above 1 but the adjusted CI "
           "does not; not supported when neither does; inconclusive when the adjusted model cannot be fitted or the "
           "crude and adjusted ORs point in opposite directions.")
F2_RULE = ("Supported when, under the summed gradient, the marker is the top word in more marker-bearing memorized "
           "prompts on the audited model than on a re-initialised copy of it (same prompts and seeds), by a one-sided "
           "exact sign test over the paired prompts at p < 0.05; not supported when that test is not significant; "
           "inconclusive without the null model (attribution.null_model) or with fewer paired prompts than the test "
           "needs to reach 0.05 ({min_pairs}).")
F3_RULE = (f"Where the copies stage ran and the unmitigated memorized prompts copy at some guidance, a marker rewrite "
           f"removes memorization when, at such a guidance, its copy rate is at most half the unmitigated one, the "
           f"paired change's 95% CI lies below 0, and its fidelity stays within {100 * FIDELITY_POINTS:.0f} points of "
           f"the unmitigated images' (a rewrite that stops copying by changing the findings has not fixed the model). "
           f"Without copies: when its paired d_mem change has a 95% CI below 0 and its mean d_mem is below the "
           f"memorized threshold. Supported when no marker rewrite removes memorization; not supported when one "
           f"does; inconclusive when no marker rewrite was judged on at least {MIN_PAIRED_PROMPTS} prompts.")


@dataclass
class Verdict:
    """One finding's verdict: what is claimed, the outcome, the rule, why, the numbers and them in one line."""

    finding: str
    claim: str
    verdict: str
    rule: str
    reason: str
    numbers: dict = field(default_factory=dict)
    line: str = "–"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FindingInputs:
    """What the findings are judged on: the run's typed sections, and the mitigation rows the report computed."""

    analysis: Optional[AnalysisSection]
    attribution: Optional[AttributionSection] = None
    # Per strategy {strategy, d_mem_mean, d_mem_change: {n, mean, ci_low, ci_high}} (report.strategy_rows).
    mitigation_rows: Optional[list[dict]] = None
    copies: Optional[CopiesSection] = None
    calibration: Optional[CalibrationSection] = None
    reference_min: int = 100  # analyze.reference_min: the fewest reference prompts F0 is judged on


def _above(result: Optional[dict], key: str = "ci_low", level: float = 1.0) -> bool:
    return bool(result) and result.get(key) is not None and result[key] > level


def _below(result: Optional[dict], key: str = "ci_high", level: float = 1.0) -> bool:
    return bool(result) and result.get(key) is not None and result[key] < level


# -- F0 ---------------------------------------------------------------------------------------------
def f0_memorizes(inputs: FindingInputs) -> Verdict:
    claim = "The model memorizes prompts of this corpus: some score beyond what prompts it never saw reach."
    calibration = inputs.calibration
    rule = F0_RULE.format(reference_min=inputs.reference_min)
    if calibration is None:
        return Verdict("F0", claim, INCONCLUSIVE, rule, "no reference of non-members (set analyze.reference)")
    n_ref = (calibration.reference or {}).get("prompts") or 0
    beyond = calibration.beyond_reference or {}
    numbers = {"global_p": calibration.global_p, "beyond": beyond.get("beyond"), "expected": beyond.get("expected"),
               "simes_p": calibration.simes_p, "discoveries": calibration.discoveries, "fdr": calibration.fdr,
               "reference_prompts": n_ref, "top_set": calibration.top_set_overlap.get("top_set"),
               "in_both": calibration.top_set_overlap.get("both")}  # fmt: skip
    line = (f"{fmt(numbers['beyond'])} prompts beyond every reference prompt of their length ({fmt(numbers['expected'])} expected "
            f"by chance), p {fmt(calibration.global_p)}; {calibration.discoveries} prompts at q <= {fmt(calibration.fdr)} "
            f"({numbers['in_both']} of them in the top set of {numbers['top_set']}), against {n_ref} reference prompts")

    def verdict(outcome: str, reason: str) -> Verdict:
        return Verdict("F0", claim, outcome, rule, reason, numbers, line)

    if n_ref < inputs.reference_min:
        return verdict(INCONCLUSIVE, f"{n_ref} scored reference prompts, fewer than the {inputs.reference_min} it is judged on")
    if calibration.global_p is not None and calibration.global_p < ALPHA:
        return verdict(SUPPORTED, "more prompts score beyond every non-member of their length than chance gives")
    return verdict(NOT_SUPPORTED, "no more prompts score beyond every non-member of their length than chance gives")


# -- F1 ---------------------------------------------------------------------------------------------
def f1_enrichment(inputs: FindingInputs) -> Verdict:
    claim = "Markers are over-represented among the memorized prompts."
    analysis = inputs.analysis
    crude = (analysis.marker_enrichment if analysis else None) or {}
    adjusted = (analysis.marker_enrichment_adjusted if analysis else None) or {}
    logistic = adjusted.get("logistic") or {}
    covariates = ", ".join(adjusted.get("covariates") or []) or "nothing"
    numbers = {"crude_or": crude.get("odds_ratio"), "crude_ci_low": crude.get("ci_low"), "crude_ci_high": crude.get("ci_high"),
               "crude_p": crude.get("fisher_p"), "adjusted_or": logistic.get("estimate"), "adjusted_ci_low": logistic.get("ci_low"),
               "adjusted_ci_high": logistic.get("ci_high"), "adjusted_p": logistic.get("p"),
               "covariates": logistic.get("covariates", adjusted.get("covariates"))}  # fmt: skip
    rule = F1_RULE.format(covariates=covariates)
    line = (f"crude OR {fmt(numbers['crude_or'])} [{fmt(numbers['crude_ci_low'])}, {fmt(numbers['crude_ci_high'])}], "
            f"adjusted OR {fmt(numbers['adjusted_or'])} [{fmt(numbers['adjusted_ci_low'])}, {fmt(numbers['adjusted_ci_high'])}] "
            f"p {fmt(numbers['adjusted_p'])} (adjusted for {', '.join(numbers['covariates'] or []) or '–'})")

    def verdict(outcome: str, reason: str) -> Verdict:
        return Verdict("F1", claim, outcome, rule, reason, numbers, line)

    if not adjusted or logistic.get("refused") or logistic.get("estimate") is None:
        why = logistic.get("refused") or "no adjusted model in the analysis (rerun `cxrmem analyze`)"
        return verdict(INCONCLUSIVE, f"the adjusted model was not fitted: {why}")
    crude_up, crude_down = _above(crude), _below(crude)
    adjusted_up, adjusted_down = _above(logistic), _below(logistic)
    if (adjusted_up and crude_down) or (adjusted_down and crude_up):
        return verdict(INCONCLUSIVE, "the crude and adjusted odds ratios point in opposite directions")
    if adjusted_up and (crude.get("odds_ratio") or 0) > 1:
        return verdict(SUPPORTED, "the adjusted 95% CI lies above 1")
    if crude_up:
        return verdict(NOT_AFTER_ADJUSTMENT, f"the crude CI lies above 1, the CI adjusted for {covariates} does not")
    return verdict(NOT_SUPPORTED, "neither the crude nor the adjusted 95% CI lies above 1")


# -- F2 ---------------------------------------------------------------------------------------------
def f2_marker_top(inputs: FindingInputs) -> Verdict:
    claim = "The marker is the word that contributes most to a memorized prompt's d_mem."
    attribution = inputs.attribution
    null = attribution.null if attribution else None
    min_pairs = (null or {}).get("min_pairs", MIN_PAIRED_PROMPTS)
    rule = F2_RULE.format(min_pairs=min_pairs)
    if not attribution:
        return Verdict("F2", claim, INCONCLUSIVE, rule, "no attribution (run `cxrmem attribute`)")
    if not null or not null.get("gradient"):
        observed = (attribution.gradient or {}).get("marker_top1")
        return Verdict("F2", claim, INCONCLUSIVE, rule, "no null model was run (attribution.null_model=false)",
                       {"observed_top1": observed},
                       f"marker first in {percent(observed)} of marker-bearing prompts (summed gradient), no null")
    test = null["gradient"]
    numbers = {k: test.get(k) for k in ("pairs", "observed_top1", "null_top1", "top1_p", "observed_mean_rank", "null_mean_rank", "rank_p")}
    numbers["other_methods"] = {m: {k: (null.get(m) or {}).get(k) for k in ("observed_top1", "null_top1", "top1_p")}
                                for m in ("gradient_per_piece_mean", "leave_one_out") if null.get(m)}  # fmt: skip
    line = (f"summed gradient: marker first in {percent(numbers['observed_top1'])} of {fmt(numbers['pairs'])} prompts vs "
            f"{percent(numbers['null_top1'])} on the null model (sign test p {fmt(numbers['top1_p'])}); mean best rank "
            f"{fmt(numbers['observed_mean_rank'])} vs {fmt(numbers['null_mean_rank'])} (p {fmt(numbers['rank_p'])})")

    def verdict(outcome: str, reason: str) -> Verdict:
        return Verdict("F2", claim, outcome, rule, reason, numbers, line)

    if test["pairs"] < min_pairs:
        return verdict(INCONCLUSIVE, f"{test['pairs']} marker-bearing prompts attributed; the test needs {min_pairs}")
    if test["top1_p"] is not None and test["top1_p"] < ALPHA and test["observed_top1"] > test["null_top1"]:
        return verdict(SUPPORTED, "the marker is first more often than on the null model")
    return verdict(NOT_SUPPORTED, "the marker is not first significantly more often than on the null model")


# -- F3 ---------------------------------------------------------------------------------------------
def _copy_judgements(copies: Optional[CopiesSection]) -> dict[str, list[StrategyJudgement]]:
    """w=<g> -> the judgement rows of the guidances at which the unmitigated memorized prompts copy."""
    out = {}
    for name, rows in (copies.judgements() if copies else {}).items():
        judged = [StrategyJudgement(**row) for row in rows]
        base = next((r for r in judged if r.strategy == "original"), None)
        if base is not None and base.copy_rate:
            out[name] = judged
    return out


def _removes_by_copies(judged: dict[str, list[StrategyJudgement]]) -> dict[str, list[str]]:
    """marker rewrite -> the guidances at which it halves the copy rate (CI below 0) keeping the fidelity."""
    out: dict[str, list[str]] = {}
    for name, rows in judged.items():
        halved = set(halves_copying(rows, FIDELITY_POINTS))
        for r in rows:
            if r.strategy in marker_rewrites() and r.strategy in halved and _below(r.copy_rate_change, "ci_high", 0.0):
                out.setdefault(r.strategy, []).append(name)
    return out


def _f3_by_copies(judged: dict[str, list[StrategyJudgement]]) -> tuple[dict, list[str], int, str]:
    """numbers per strategy and guidance, the rewrites that remove memorization, the most prompts judged, the line."""
    removes = _removes_by_copies(judged)
    numbers, parts, most = {}, [], 0
    for name, rows in judged.items():
        base = next(r for r in rows if r.strategy == "original")
        for r in rows:
            if r.strategy not in marker_rewrites() or r.copy_rate is None:
                continue
            change = r.copy_rate_change or {}
            most = max(most, r.prompts)
            numbers.setdefault(r.strategy, {})[name] = {
                "prompts": r.prompts, "copy_rate": r.copy_rate, "original_copy_rate": base.copy_rate,
                "copy_rate_change": change.get("mean"), "ci_low": change.get("ci_low"), "ci_high": change.get("ci_high"),
                "fidelity_change": (r.fidelity_change or {}).get("mean")}  # fmt: skip
            parts.append(f"{r.strategy} at {name}: copy rate {percent(r.copy_rate)} vs {percent(base.copy_rate)} "
                         f"(change {fmt(change.get('mean'))} [{fmt(change.get('ci_low'))}, {fmt(change.get('ci_high'))}], "
                         f"{r.prompts} prompts, fidelity change {fmt((r.fidelity_change or {}).get('mean'))})")
    removed = [f"{s} (copies at {', '.join(at)})" for s, at in removes.items()]
    return numbers, removed, most, "; ".join(parts) or "–"


def _f3_by_d_mem(rows: list[dict], threshold: Optional[float]) -> tuple[dict, list[str], int, str]:
    numbers, removed, parts, most = {}, [], [], 0
    for row in rows:
        change = row.get("d_mem_change") or {}
        most = max(most, change.get("n") or 0)
        numbers[row["strategy"]] = {"prompts": change.get("n"), "d_mem_change": change.get("mean"), "ci_low": change.get("ci_low"),
                                    "ci_high": change.get("ci_high"), "d_mem_mean": row.get("d_mem_mean")}  # fmt: skip
        parts.append(f"{row['strategy']}: d_mem change {fmt(change.get('mean'))} [{fmt(change.get('ci_low'))}, "
                     f"{fmt(change.get('ci_high'))}] over {fmt(change.get('n'))} prompts")
        below = threshold is not None and (row.get("d_mem_mean") if row.get("d_mem_mean") is not None else float("inf")) < threshold
        if _below(change, "ci_high", 0.0) and below:
            removed.append(f"{row['strategy']} (d_mem)")
    line = "; ".join(parts) + f" (threshold {fmt(threshold)})" if parts else "–"
    return numbers, removed, most, line


def f3_rewrites(inputs: FindingInputs) -> Verdict:
    claim = "Rewriting the de-identification markers does not remove memorization."
    threshold = inputs.analysis.threshold if inputs.analysis else None
    judged = _copy_judgements(inputs.copies)
    if judged:
        by, (strategies, removed, most, line) = "copies", _f3_by_copies(judged)
    else:
        rows = [r for r in (inputs.mitigation_rows or []) if r["strategy"] in marker_rewrites()]
        by, (strategies, removed, most, line) = "d_mem", _f3_by_d_mem(rows, threshold)
    numbers = {"judged_by": by, "threshold": threshold, "min_prompts": MIN_PAIRED_PROMPTS, "strategies": strategies}

    def verdict(outcome: str, reason: str) -> Verdict:
        return Verdict("F3", claim, outcome, F3_RULE, reason, numbers, line)

    if inputs.mitigation_rows is None and not judged:
        return verdict(INCONCLUSIVE, "no mitigation experiments (run `cxrmem mitigate`)")
    if removed:
        return verdict(NOT_SUPPORTED, "removed by " + "; ".join(removed))
    if most < MIN_PAIRED_PROMPTS:
        return verdict(INCONCLUSIVE, f"no marker rewrite was judged on {MIN_PAIRED_PROMPTS} prompts or more (at most {most})")
    if by == "copies":
        return verdict(SUPPORTED, "no marker rewrite halved the copy rate with its fidelity kept")
    return verdict(SUPPORTED, "no marker rewrite brought d_mem below the threshold (the copies stage did not run or nothing copied)")


@dataclass(frozen=True)
class Finding:
    """One of the paper's findings as the report states it: the id on the card and the rule that judges it."""

    key: str
    judge: Callable[[FindingInputs], Verdict]


FINDINGS = (Finding("F0", f0_memorizes), Finding("F1", f1_enrichment), Finding("F2", f2_marker_top), Finding("F3", f3_rewrites))


def verdicts(inputs: FindingInputs) -> list[Verdict]:
    """Every finding's verdict for one run, in FINDINGS order."""
    return [finding.judge(inputs) for finding in FINDINGS]
