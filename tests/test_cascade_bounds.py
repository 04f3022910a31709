"""The cascade's audit bounds on score pairs whose truth is known: a screen that loses memorized
prompts is caught by the model and the bounds, a good screen is not, and the sizes the card quotes."""

import numpy as np
import pytest

from cxrmem.cascade_bounds import audit_bounds, audit_needed, fit_screen_model, poisson_binomial_tails

N, TOP = 20000, 200  # a corpus and its memorized set (top 1%)


def screened(noise: float, keep: int, sample: int, seed: int = 0):
    """A first screen with log-normal noise around the full score; the top `keep` by screen are fully
    scored, and a random `sample` of the rest is audited. Returns what the cascade would know, and the truth."""
    rng = np.random.default_rng(seed)
    full = np.exp(rng.normal(0.0, 1.0, N))
    screen = full * np.exp(rng.normal(0.0, noise, N))
    threshold = np.sort(full)[::-1][TOP - 1]
    members = full >= threshold
    order = np.argsort(-screen)
    kept, rejected = order[:keep], order[keep:]
    audited = rng.choice(rejected, size=sample, replace=False)
    unaudited = np.setdiff1d(rejected, audited)
    fitted = np.concatenate([kept, audited])
    misses = int(members[audited].sum())
    bounds = audit_bounds(len(rejected), sample, misses, int(members[kept].sum()), (screen[fitted], full[fitted]),
                          screen[unaudited], threshold, full_per_prompt=396.0)  # fmt: skip
    return bounds, int(members[rejected].sum())


def test_a_screen_that_loses_members_is_caught_and_a_good_one_is_not():
    lossy, lost = screened(noise=1.0, keep=1000, sample=200)
    assert lost > 20  # the truth: a noisy screen keeping 5% loses many of the top 1%
    assert lossy.expected_missed == pytest.approx(lost, rel=0.35)  # the model sees the loss without the truth
    assert lossy.model_check["p_more"] > 0.01 and lossy.model_check["p_fewer"] > 0.01  # and its check passes
    good, lost_good = screened(noise=0.05, keep=1000, sample=200)
    assert lost_good == 0 and good.expected_missed < 0.5 and good.kept_members == TOP


def test_recall_lower_bound_holds_and_the_card_says_when_the_audit_is_too_small():
    bounds, lost = screened(noise=0.05, keep=1000, sample=200)
    true_recall = TOP / (TOP + lost) if lost else 1.0
    assert bounds.recall_lower_bound <= true_recall
    # 200 audited of 19,000 rejected with no miss bound the loss at about 285 prompts: uninformative
    assert bounds.missed_upper_95 == pytest.approx(19000 * (1 - 0.05 ** (1 / 200)), rel=1e-6)
    assert not bounds.informative and bounds.recall_lower_bound < 0.5
    assert bounds.audit_needed == audit_needed(19000, TOP, 0.9) and f"{bounds.audit_needed} prompts" in bounds.note
    big, _ = screened(noise=0.05, keep=1000, sample=bounds.audit_needed)
    assert big.informative and big.recall_lower_bound >= 0.9 and "at least" in big.note


def test_audit_needed_is_the_smallest_sample_that_bounds_the_recall():
    n = audit_needed(99000, 1000, 0.9)
    allowed = 1000 * (1 / 0.9 - 1)
    assert 99000 * (1 - 0.05 ** (1 / n)) <= allowed < 99000 * (1 - 0.05 ** (1 / (n - 1)))
    assert audit_needed(100, 1000, 0.9) == 0 and audit_needed(1000, 0, 0.9) is None


def test_poisson_binomial_tails_match_the_binomial_when_probabilities_are_equal():
    from scipy.stats import binom

    above, below = poisson_binomial_tails(np.full(30, 0.2), 8)
    assert above == pytest.approx(binom.sf(7, 30, 0.2), rel=1e-9) and below == pytest.approx(binom.cdf(8, 30, 0.2), rel=1e-9)


def test_the_model_recovers_a_known_line_and_needs_enough_points():
    rng = np.random.default_rng(1)
    screen = np.exp(rng.normal(0, 1, 5000))
    full = np.exp(0.5 + 0.8 * np.log(screen) + rng.normal(0, 0.3, 5000))
    model = fit_screen_model(screen, full)
    assert model.slope == pytest.approx(0.8, abs=0.02) and model.intercept == pytest.approx(0.5, abs=0.02)
    assert model.sigma == pytest.approx(0.3, abs=0.01)
    assert fit_screen_model(screen[:5], full[:5]) is None
