"""cxrmem.stats against cases computed by hand."""

import math

import numpy as np
import pytest

from cxrmem import stats


def test_odds_ratio_and_woolf_interval_on_a_hand_computed_table():
    # [[10, 20], [30, 40]]: OR = 10*40 / (20*30) = 2/3; SE(log OR) = sqrt(1/10 + 1/20 + 1/30 + 1/40)
    # = sqrt(0.208333) = 0.456435; 95% CI = exp(log(2/3) -+ 1.959964 * 0.456435) = (0.272515, 1.630900).
    result = stats.odds_ratio(10, 20, 30, 40)
    assert result["odds_ratio"] == pytest.approx(2 / 3)
    assert result["ci_low"] == pytest.approx(0.272515, abs=1e-6)
    assert result["ci_high"] == pytest.approx(1.630900, abs=1e-6)
    assert result["corrected"] is False


def test_zero_cell_gets_haldane_anscombe_correction():
    # [[0, 5], [5, 5]] + 0.5: OR = 0.5*5.5 / (5.5*5.5) = 1/11; SE = sqrt(1/0.5 + 3/5.5).
    result = stats.odds_ratio(0, 5, 5, 5)
    se = math.sqrt(1 / 0.5 + 3 / 5.5)
    assert result["corrected"] is True
    assert result["odds_ratio"] == pytest.approx(1 / 11)
    assert result["ci_high"] == pytest.approx(math.exp(math.log(1 / 11) + 1.959964 * se), rel=1e-5)


def test_zero_margin_has_no_odds_ratio():
    result = stats.odds_ratio(0, 0, 4, 6)  # nothing memorized: no information
    assert result["odds_ratio"] is None and result["ci_low"] is None
    assert result["fisher_p"] == pytest.approx(1.0)


def test_fisher_p_matches_the_tea_tasting_value():
    # Fisher's lady tasting tea, 3 of 4 right: two-sided p = (1 + 16 + 16 + 1) / 70.
    assert stats.odds_ratio(3, 1, 1, 3)["fisher_p"] == pytest.approx(34 / 70)


def test_mantel_haenszel_of_one_stratum_is_the_woolf_estimate():
    # With one stratum the Robins-Breslow-Greenland variance reduces to Woolf's.
    pooled = stats.mantel_haenszel([(10, 20, 30, 40), (0, 0, 3, 3)])  # the second stratum is uninformative
    plain = stats.odds_ratio(10, 20, 30, 40)
    assert pooled["strata"] == 1
    for key in ("odds_ratio", "ci_low", "ci_high"):
        assert pooled[key] == pytest.approx(plain[key])


def test_mantel_haenszel_pools_two_strata():
    # Strata (2, 1, 1, 2) n=6 and (4, 2, 2, 4) n=12: R = 4/6 + 16/12 = 2, S = 1/6 + 4/12 = 0.5, OR_MH = 4.
    assert stats.mantel_haenszel([(2, 1, 1, 2), (4, 2, 2, 4)])["odds_ratio"] == pytest.approx(4.0)


def test_top_percent_keeps_ties_at_the_threshold():
    values = np.array([5, 4, 4, 4, 3, 2, 1, 1, 0, 0], dtype=float)
    mask, threshold = stats.top_percent_mask(values, 20)  # k = 2: the 2nd largest is 4, shared by three
    assert threshold == 4.0
    assert mask.tolist() == [True, True, True, True] + [False] * 6
    mask, threshold = stats.top_percent_mask(values, 1)  # k = ceil(0.1) = 1
    assert threshold == 5.0 and mask.sum() == 1
    assert stats.top_k(300, 1.0) == 3 and stats.top_k(301, 1.0) == 4 and stats.top_k(0, 1.0) == 0


def test_percentiles_and_percentile_rank():
    values = np.arange(1, 101, dtype=float)  # 1..100
    result = stats.percentiles(values)
    assert result["p50"] == pytest.approx(50.5)
    assert result["p99"] == pytest.approx(99.01)
    assert result["max"] == 100.0
    assert stats.percentile_rank(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [100.0, 25.0, 75.0, 75.0]


def test_zscore_outliers():
    values = np.array([0.0] * 9 + [10.0])
    # mean 1, sample std sqrt(90/9) = sqrt(10): z(10) = 9 / 3.1623 = 2.846
    assert stats.zscores(values)[-1] == pytest.approx(9 / math.sqrt(10))
    assert stats.zscore_mask(values, 2.5).tolist() == [False] * 9 + [True]
    assert not stats.zscore_mask(values, 3.0).any()
    assert not stats.zscore_mask(np.ones(5), 0.1).any()  # constant scores: no outliers, no division by 0


def test_marker_enrichment_counts_and_shares():
    memorized = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    has_marker = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    result = stats.marker_enrichment(memorized, has_marker)
    assert result["table"] == [[2, 1], [1, 6]]
    assert result["memorized_marker_share"] == pytest.approx(2 / 3)
    assert result["base_marker_share"] == pytest.approx(0.3)
    assert result["odds_ratio"] == pytest.approx(12.0)


def test_bucket_split_by_n_reports():
    edges = [1, 2, 5, 20, 100]
    assert stats.bucket_labels(edges) == ["1", "2-4", "5-19", "20-99", "100+"]
    n_reports = np.array([1, 1, 2, 4, 5, 19, 20, 150])
    assert stats.bucket_index(n_reports, edges).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    memorized = np.array([1, 0, 1, 0, 0, 1, 0, 1], dtype=bool)
    has_marker = np.array([1, 0, 1, 1, 0, 1, 0, 0], dtype=bool)
    result = stats.enrichment_by_bucket(memorized, has_marker, n_reports, edges)
    by_label = {b["bucket"]: b for b in result["buckets"]}
    assert by_label["1"]["table"] == [[1, 0], [0, 1]]
    assert by_label["2-4"]["table"] == [[1, 0], [1, 0]]
    assert by_label["100+"]["n_prompts"] == 1 and by_label["100+"]["n_memorized"] == 1
    assert result["below_first_edge"] == 0
    assert [b["n_prompts"] for b in result["buckets"]] == [2, 2, 2, 1, 1]


def test_roc_auc_and_tpr_at_fpr():
    assert stats.roc_auc([3, 4], [1, 2]) == 1.0
    # positives 2 and 4, negatives 1 and 2: pairs win 1 + 0.5 (tie) + 1 + 1 of 4.
    assert stats.roc_auc([2, 4], [1, 2]) == pytest.approx(0.875)
    assert stats.roc_auc([1, 2], []) is None
    negatives = np.arange(100, dtype=float)  # 0..99
    positives = np.array([98.5, 99.5, 50.0])
    # 1% of 100 negatives: one may be flagged, so the cut is above the 2nd largest negative (98).
    assert stats.tpr_at_fpr(positives, negatives, 0.01) == pytest.approx(2 / 3)
    assert stats.tpr_at_fpr(positives, negatives, 0.0) == pytest.approx(1 / 3)
    assert stats.tpr_at_fpr(positives, negatives, 1.0) == 1.0


def test_roc_auc_single_pairs_and_ties():
    assert stats.roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert stats.roc_auc(np.array([1.0]), np.array([2.0])) == 0.0
    # pairs: (2>1) yes, (2 vs 3) no, (2 vs 2) tie -> (1 + 0.5) / 3
    assert stats.roc_auc(np.array([2.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)


def test_tpr_at_fpr_threshold_counts():
    negatives = np.arange(200, dtype=float)  # 1% of 200: two negatives may exceed the threshold (197)
    assert stats.tpr_at_fpr(np.array([198.0, 199.5, 197.0, 10.0]), negatives) == 0.5
    assert stats.tpr_at_fpr(np.array([5.0]), np.arange(50, dtype=float)) == 0.0  # 1% of 50 allows none: threshold 49
