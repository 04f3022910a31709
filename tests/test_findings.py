"""Findings that survive their controls: adjusted enrichment on planted synthetic corpora, the refusal
of degenerate designs, and the length view."""

import numpy as np
import pandas as pd
import pytest

from cxrmem import stats
from cxrmem.analysis import AdjustSettings, analyze_tables


def planted_corpus(marker_effect: float, n: int = 4000, seed: int = 0):
    """Scores and prompts where the marker makes prompts longer and d_mem grows with log length;
    `marker_effect` adds to the d_mem of marker prompts (0: the marker itself does nothing)."""
    rng = np.random.default_rng(seed)
    marker = rng.random(n) < 0.3
    n_tokens = np.round(np.exp(rng.normal(3.0 + 0.6 * marker, 0.35))).astype(int)
    n_reports = rng.geometric(0.6, n)
    d_mem = np.log(n_tokens) + 0.1 * np.log(n_reports) + marker_effect * marker + rng.normal(0, 0.25, n)
    ids = [f"{i:016x}" for i in range(n)]
    prompts = pd.DataFrame({"prompt_id": ids, "n_reports": n_reports, "has_marker": marker,
                            "n_markers": marker.astype(int), "n_tokens": n_tokens})  # fmt: skip
    scores = pd.DataFrame({"prompt_id": ids, "d_mem": d_mem, "nonfinite": False})
    return scores, prompts


def enrichment(marker_effect: float):
    scores, prompts = planted_corpus(marker_effect)
    _, analysis = analyze_tables(scores, prompts, 5.0, 3.0, [1, 2, 5], adjust=AdjustSettings())
    return analysis


def test_length_confound_crude_significant_adjusted_not():
    analysis = enrichment(0.0)
    crude, adjusted = analysis.marker_enrichment, analysis.marker_enrichment_adjusted
    assert crude["ci_low"] > 1  # longer prompts score higher and markers make prompts longer
    logistic = adjusted["logistic"]
    assert logistic["refused"] is None and logistic["covariates"] == ["log_n_tokens", "log_n_reports"]
    assert logistic["ci_low"] < 1 < logistic["ci_high"]
    # the percentile model (linear in log length, which the percentile is not quite) is left with a
    # shift of about one percentile point, against 9 with a real effect below
    assert abs(adjusted["percentile"]["estimate"]) < 3
    assert analysis.length["spearman"]["rho"] > 0.5


def test_real_marker_effect_survives_adjustment():
    analysis = enrichment(0.15)
    crude, logistic = analysis.marker_enrichment, analysis.marker_enrichment_adjusted["logistic"]
    assert crude["ci_low"] > 1 and logistic["ci_low"] > 1
    assert analysis.marker_enrichment_adjusted["percentile"]["ci_low"] > 5


def test_degenerate_designs_are_refused_with_the_reason():
    scores, prompts = planted_corpus(0.0, n=400)
    no_marker = prompts.assign(has_marker=False)
    _, analysis = analyze_tables(scores, no_marker, 5.0, 3.0, [1], adjust=AdjustSettings())
    assert analysis.marker_enrichment_adjusted["logistic"]["refused"] == "no prompt carries a marker"
    assert analysis.marker_enrichment_adjusted["logistic"]["estimate"] is None
    # every memorized prompt with a marker: separation, an infinite odds ratio is not printed
    top = scores["d_mem"].rank(ascending=False) <= 20
    separated = prompts.assign(has_marker=top.to_numpy() | prompts["has_marker"].to_numpy())
    _, analysis = analyze_tables(scores, separated, 5.0, 3.0, [1], adjust=AdjustSettings())
    assert "every memorized prompt carries a marker" in analysis.marker_enrichment_adjusted["logistic"]["refused"]
    # prompts without token counts (an old prompts.parquet): refused, naming the column
    _, analysis = analyze_tables(scores, prompts.drop(columns="n_tokens"), 5.0, 3.0, [1], adjust=AdjustSettings())
    assert "n_tokens" in analysis.marker_enrichment_adjusted["logistic"]["refused"]
    assert analysis.length is None


def test_constant_covariate_is_dropped_and_named():
    scores, prompts = planted_corpus(0.0, n=1000)
    _, analysis = analyze_tables(scores, prompts.assign(n_reports=1), 5.0, 3.0, [1], adjust=AdjustSettings())
    logistic = analysis.marker_enrichment_adjusted["logistic"]
    assert logistic["dropped"] == ["log_n_reports (constant)"] and logistic["covariates"] == ["log_n_tokens"]


def test_length_view_and_length_adjusted_set():
    scores, prompts = planted_corpus(0.0, n=1000)
    memorized, analysis = analyze_tables(scores, prompts, 2.0, 3.0, [1], adjust=AdjustSettings(length_bins=5, length_adjusted=True))
    bins = analysis.length["bins"]
    assert sum(b["prompts"] for b in bins) == 1000 and sum(b["memorized"] for b in bins) == len(memorized)
    assert [b["median"] for b in bins] == sorted(b["median"] for b in bins)  # d_mem grows with length here
    assert all(b["q1"] <= b["median"] <= b["q3"] for b in bins)
    adjusted = analysis.length_adjusted
    # raw top 2% are the longest prompts; within-bin ranking spreads the set over every bin
    assert adjusted["memorized_count"] >= len(bins) and adjusted["overlap"] < len(memorized)
    assert "length_percentile" in memorized and "n_tokens" in memorized


def test_sign_test_and_spearman():
    assert stats.sign_test(6, 6) == pytest.approx(2 * 0.5**6)
    assert stats.sign_test(5, 5, "greater") == pytest.approx(0.5**5)
    assert stats.sign_test(0, 5, "greater") == 1.0
    assert stats.min_sign_test_pairs() == 6 and stats.min_sign_test_pairs("greater") == 5
    assert stats.sign_test(0, 0) is None
    assert stats.spearman(np.arange(5), np.ones(5))["rho"] is None
    assert stats.spearman(np.arange(5), np.arange(5) ** 2)["rho"] == pytest.approx(1.0)


def write_planted_run(out, marker_effect: float):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrmem.runfiles import RunLayout

    scores, prompts = planted_corpus(marker_effect, n=3000)
    prompts = prompts.assign(prompt=[f"Finding {i}." for i in range(len(prompts))])
    layout = RunLayout(str(out))
    pq.write_table(pa.Table.from_pandas(prompts, preserve_index=False), layout.prompts)
    run_ids = {"model_fingerprint": "fp-test", "config_hash": "hash-test"}
    pq.write_table(pa.Table.from_pandas(scores.assign(**run_ids), preserve_index=False), layout.scores)
    return layout


@pytest.mark.parametrize("effect, verdict, code", [(0.0, "not supported after adjustment", 0), (0.3, "supported", 1)])
def test_card_summary_md_and_metrics_carry_the_f1_verdict(tmp_path, effect, verdict, code):
    """The wrong reading of a length confound (crude significant, adjusted not) is named on the card."""
    import json

    from cxrmem.config import load_config
    from cxrmem.stages import analyze, report

    layout = write_planted_run(tmp_path, effect)
    cfg = load_config(None, [f"run.output={tmp_path}", "analyze.top_percent=5", "report.figures=false"])
    analyze.run(cfg)
    report.run(cfg)
    html = open(layout.report, encoding="utf-8").read()
    card = html[html.index('<section id="summary"') : html.index("</section>")]
    assert f"<b>F1 · {verdict}</b>" in card
    assert card.index("F1 ·") < card.index("F2 ·") < card.index("F3 ·") < card.index("<dl>")  # verdicts first
    assert "F2 · inconclusive" in card and "F3 · inconclusive" in card  # no attribution, no mitigation
    assert "Supported when the marker&#39;s odds ratio adjusted for log_n_tokens, log_n_reports" in card  # the rule
    summary_md = open(layout.summary_md, encoding="utf-8").read()
    assert f"**F1: {verdict}.**" in summary_md
    metrics = json.loads(open(layout.metrics).read())
    assert metrics["finding.F1"] == code and metrics["finding.F2"] == -1
    assert metrics["finding.F1.after_adjustment"] == (1 if code == 0 else 0)
    assert metrics["finding.F1.crude_ci_low"] > 1 and metrics["length.spearman_d_mem_n_tokens"] > 0.5


def _null(pairs, observed, null, p):
    from cxrmem.findings import FindingInputs
    from cxrmem.summary import AttributionSection

    attribution = AttributionSection.from_json({"gradient": {"marker_top1": observed}, "null": {"min_pairs": 5, "gradient": {
        "pairs": pairs, "observed_top1": observed, "null_top1": null, "top1_p": p,
        "observed_mean_rank": 1.0, "null_mean_rank": 2.0, "rank_p": p}}})
    return FindingInputs(None, attribution)


def test_f2_rule():
    from cxrmem.findings import FindingInputs, f2_marker_top
    from cxrmem.summary import AttributionSection

    assert f2_marker_top(FindingInputs(None)).verdict == "inconclusive"
    no_null = FindingInputs(None, AttributionSection.from_json({"gradient": {"marker_top1": 1.0}}))
    assert "null_model=false" in f2_marker_top(no_null).reason
    assert f2_marker_top(_null(4, 1.0, 0.0, 0.0625)).verdict == "inconclusive"  # too few pairs for the test
    assert f2_marker_top(_null(8, 1.0, 0.0, 0.0039)).verdict == "supported"
    assert f2_marker_top(_null(8, 1.0, 1.0, None)).verdict == "not supported"  # the null ranks it first too
    assert "vs 0.0% on the null model" in f2_marker_top(_null(8, 1.0, 0.0, 0.0039)).line


def _analysis(threshold):
    from cxrmem.summary import AnalysisSection

    return AnalysisSection.from_json({"threshold": threshold})


def test_f3_rule_by_d_mem():
    from cxrmem.findings import FindingInputs, f3_rewrites

    def row(strategy, mean, high, d_mem_mean, n=6):
        change = {"n": n, "mean": mean, "ci_low": None if mean is None else mean - 1, "ci_high": high}
        return {"strategy": strategy, "d_mem_mean": d_mem_mean, "d_mem_change": change}

    rows = [row("original", None, None, 3.0), row("remove_marker", -0.1, -0.05, 2.9), row("random_insertion", -2.0, -1.0, 0.5)]
    kept = f3_rewrites(FindingInputs(_analysis(2.0), mitigation_rows=rows))
    assert kept.verdict == "supported" and "random_insertion" not in kept.numbers["strategies"]  # not a marker rewrite
    assert kept.numbers["judged_by"] == "d_mem"
    removed = f3_rewrites(FindingInputs(_analysis(2.0), mitigation_rows=[*rows, row("surrogate", -1.5, -1.0, 1.5)]))
    assert removed.verdict == "not supported" and "surrogate (d_mem)" in removed.reason
    assert f3_rewrites(FindingInputs(_analysis(2.0))).verdict == "inconclusive"  # no mitigation
    # 4 prompts cannot show an absence: the one-sided sign test needs 5
    few = f3_rewrites(FindingInputs(_analysis(2.0), mitigation_rows=[row("remove_marker", -0.1, -0.05, 2.9, n=4)]))
    assert few.verdict == "inconclusive" and "at most 4" in few.reason


def _judged(strategy_rows, guidance=1.0):
    """A copies section whose judgement at `guidance` holds these StrategyJudgement rows."""
    from cxrmem.judgement import StrategyJudgement
    from cxrmem.summary import CopiesSection

    def judgement(strategy, prompts, copies, change=None, fidelity=0.8, fidelity_change=None):
        return StrategyJudgement(strategy, prompts, copies, copies / prompts, change, None, None, fidelity, fidelity_change, None, 20).as_dict()

    rows = [judgement(*r) for r in strategy_rows]
    return CopiesSection.from_json({"guidances": {f"w={guidance:g}": {"judgement": {"guidance": guidance, "strategies": rows}}}})


def test_f3_is_read_from_the_paired_copy_rate_where_copies_ran():
    from cxrmem.findings import FindingInputs, f3_rewrites

    d_mem_says_removed = [{"strategy": "surrogate", "d_mem_mean": 0.5, "d_mem_change": {"n": 8, "mean": -2.0, "ci_low": -3.0, "ci_high": -1.0}}]
    significant = {"mean": -0.75, "ci_low": -1.0, "ci_high": -0.5}
    # halves the copy rate, CI below 0, fidelity kept: removed, whatever d_mem says
    halved = _judged([("original", 8, 8), ("remove_marker", 8, 2, significant, 0.78, {"mean": -0.02})])
    verdict = f3_rewrites(FindingInputs(_analysis(2.0), mitigation_rows=[], copies=halved))
    assert verdict.verdict == "not supported" and "remove_marker (copies at w=1)" in verdict.reason
    assert verdict.numbers["judged_by"] == "copies"
    # the same halving by changing the image (fidelity 0.8 -> 0.3) fixes nothing
    blurred = _judged([("original", 8, 8), ("remove_marker", 8, 2, significant, 0.3, {"mean": -0.5})])
    assert f3_rewrites(FindingInputs(_analysis(2.0), copies=blurred)).verdict == "supported"
    # the copies judge, not d_mem: a d_mem drop with the copies in place is not a removal
    kept = _judged([("original", 8, 8), ("surrogate", 8, 7, {"mean": -0.125, "ci_low": -0.4, "ci_high": 0.15})])
    verdict = f3_rewrites(FindingInputs(_analysis(2.0), mitigation_rows=d_mem_says_removed, copies=kept))
    assert verdict.verdict == "supported" and "surrogate at w=1: copy rate 87.5% vs 100.0%" in verdict.line
    # too few prompts to show anything
    few = _judged([("original", 3, 3), ("surrogate", 3, 3, {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0})])
    assert f3_rewrites(FindingInputs(_analysis(2.0), copies=few)).verdict == "inconclusive"
    # nothing copied unmitigated: the copies cannot judge, d_mem does
    none_copy = _judged([("original", 8, 0), ("surrogate", 8, 0)])
    assert f3_rewrites(FindingInputs(_analysis(2.0), mitigation_rows=d_mem_says_removed, copies=none_copy)).numbers["judged_by"] == "d_mem"


@pytest.mark.parametrize("override, message", [
    ("analyze.covariates=[log_n_tokens,age]", "'age' is not one of"),
    ("analyze.covariates=[log_n_tokens,log_n_tokens]", "names a covariate twice"),
    ("analyze.length_bins=0", "analyze.length_bins"),
])
def test_bad_adjustment_settings_fail_naming_the_key(override, message):
    from cxrmem.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
