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
    crude, adjusted = analysis["marker_enrichment"], analysis["marker_enrichment_adjusted"]
    assert crude["ci_low"] > 1  # longer prompts score higher and markers make prompts longer
    logistic = adjusted["logistic"]
    assert logistic["refused"] is None and logistic["covariates"] == ["log_n_tokens", "log_n_reports"]
    assert logistic["ci_low"] < 1 < logistic["ci_high"]
    # the percentile model (linear in log length, which the percentile is not quite) is left with a
    # shift of about one percentile point, against 9 with a real effect below
    assert abs(adjusted["percentile"]["estimate"]) < 3
    assert analysis["length"]["spearman"]["rho"] > 0.5


def test_real_marker_effect_survives_adjustment():
    analysis = enrichment(0.15)
    crude, logistic = analysis["marker_enrichment"], analysis["marker_enrichment_adjusted"]["logistic"]
    assert crude["ci_low"] > 1 and logistic["ci_low"] > 1
    assert analysis["marker_enrichment_adjusted"]["percentile"]["ci_low"] > 5


def test_degenerate_designs_are_refused_with_the_reason():
    scores, prompts = planted_corpus(0.0, n=400)
    no_marker = prompts.assign(has_marker=False)
    _, analysis = analyze_tables(scores, no_marker, 5.0, 3.0, [1], adjust=AdjustSettings())
    assert analysis["marker_enrichment_adjusted"]["logistic"]["refused"] == "no prompt carries a marker"
    assert analysis["marker_enrichment_adjusted"]["logistic"]["estimate"] is None
    # every memorized prompt with a marker: separation, an infinite odds ratio is not printed
    top = scores["d_mem"].rank(ascending=False) <= 20
    separated = prompts.assign(has_marker=top.to_numpy() | prompts["has_marker"].to_numpy())
    _, analysis = analyze_tables(scores, separated, 5.0, 3.0, [1], adjust=AdjustSettings())
    assert "every memorized prompt carries a marker" in analysis["marker_enrichment_adjusted"]["logistic"]["refused"]
    # prompts without token counts (an old prompts.parquet): refused, naming the column
    _, analysis = analyze_tables(scores, prompts.drop(columns="n_tokens"), 5.0, 3.0, [1], adjust=AdjustSettings())
    assert "n_tokens" in analysis["marker_enrichment_adjusted"]["logistic"]["refused"]
    assert "length" not in analysis


def test_constant_covariate_is_dropped_and_named():
    scores, prompts = planted_corpus(0.0, n=1000)
    _, analysis = analyze_tables(scores, prompts.assign(n_reports=1), 5.0, 3.0, [1], adjust=AdjustSettings())
    logistic = analysis["marker_enrichment_adjusted"]["logistic"]
    assert logistic["dropped"] == ["log_n_reports"] and logistic["covariates"] == ["log_n_tokens"]


def test_length_view_and_length_adjusted_set():
    scores, prompts = planted_corpus(0.0, n=1000)
    memorized, analysis = analyze_tables(scores, prompts, 2.0, 3.0, [1], adjust=AdjustSettings(length_bins=5, length_adjusted=True))
    bins = analysis["length"]["bins"]
    assert sum(b["prompts"] for b in bins) == 1000 and sum(b["memorized"] for b in bins) == len(memorized)
    assert [b["median"] for b in bins] == sorted(b["median"] for b in bins)  # d_mem grows with length here
    assert all(b["q1"] <= b["median"] <= b["q3"] for b in bins)
    adjusted = analysis["length_adjusted"]
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
