"""The cascade's audit bounds on score pairs whose truth is known: a screen that loses memorized
prompts is caught by the model and the bounds, a good screen is not, and the sizes the card quotes."""

import numpy as np
import pytest

from cxrmem.cascade_bounds import StageScores, audit_bounds, audit_needed, fit_screen_model, keep_needed, poisson_binomial_tails

N, TOP = 20000, 200  # a corpus and its memorized set (top 1%)


def screened(noise: float, keep: int, sample: int, seed: int = 0, allowed: float | None = None):
    """A one-stage screen with log-normal noise around the full score; the top `keep` by screen are fully
    scored, and a random `sample` of the rest is audited. Returns what the cascade would know (its margin with
    `allowed` expected members among the rejected), the members it lost, and the truth (screen, members)."""
    rng = np.random.default_rng(seed)
    full = np.exp(rng.normal(0.0, 1.0, N))
    screen = full * np.exp(rng.normal(0.0, noise, N))
    threshold = np.sort(full)[::-1][TOP - 1]
    members = full >= threshold
    order = np.argsort(-screen)
    kept, rejected = order[:keep], order[keep:]
    audited = rng.choice(rejected, size=sample, replace=False)
    known = np.full(N, np.nan)
    known[kept], known[audited] = full[kept], full[audited]
    passed = np.zeros(N, dtype=bool)
    passed[kept] = True
    misses = int(members[audited].sum())
    bounds = audit_bounds(len(rejected), sample, misses, int(members[kept].sum()), [StageScores(screen, known, passed)],
                          threshold, full_per_prompt=396.0, allowed=allowed)  # fmt: skip
    return bounds, int(members[rejected].sum()), (screen, members)


def test_a_screen_that_loses_members_is_caught_and_a_good_one_is_not():
    lossy, lost, _ = screened(noise=1.0, keep=1000, sample=200)
    assert lost > 20  # the truth: a noisy screen keeping 5% loses many of the top 1%
    assert lossy.expected_missed == pytest.approx(lost, rel=0.35)  # the model sees the loss without the truth
    check = lossy.stages[0]["model_check"]
    assert check["p_more"] > 0.01 and check["p_fewer"] > 0.01  # and its check passes
    good, lost_good, _ = screened(noise=0.05, keep=1000, sample=200)
    assert lost_good == 0 and good.expected_missed < 0.5 and good.kept_members == TOP


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_margin_widens_a_screen_that_loses_members_and_not_a_good_one(seed):
    """With 0.5 expected members allowed among the rejected, the model's margin keeps enough of a lossy screen
    that the members lost drop from dozens to about that, and asks nothing more of a screen that loses none."""
    lossy, lost, (screen, members) = screened(noise=0.3, keep=300, sample=200, seed=seed, allowed=0.5)
    needed = lossy.stages[0]["needed_keep"]
    assert lost > 10 and needed > 300  # the truth: keeping 1.5% loses many; the margin widens
    order = np.argsort(-screen)
    assert members[order[needed:]].sum() <= 3  # kept that wide, it loses about the allowed 0.5 (truth, not the model)
    assert needed < N // 4  # and it does not keep everything
    good, lost_good, _ = screened(noise=0.05, keep=1000, sample=200, seed=seed, allowed=0.5)
    assert lost_good == 0 and good.stages[0]["needed_keep"] <= 1000  # a screen that loses nothing is not widened


def test_keep_needed_keeps_down_to_the_allowed_tail():
    screen = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    weights = np.array([1.0, 1.0, 0.3, 0.2, 0.1])
    assert keep_needed(screen, weights, 0.35) == 3  # the tail below rank 3 holds 0.3
    assert keep_needed(screen, weights, 0.65) == 2 and keep_needed(screen, weights, 5.0) == 0
    assert keep_needed(screen[::-1], weights[::-1], 0.35) == 3  # by screen order, not input order
    assert keep_needed(screen, np.array([0, 0, 0, 0, 1.0]), 0.5) == 5  # an audited miss at the bottom keeps it all


def test_recall_lower_bound_holds_and_the_card_says_when_the_audit_is_too_small():
    bounds, lost, _ = screened(noise=0.05, keep=1000, sample=200)
    true_recall = TOP / (TOP + lost) if lost else 1.0
    assert bounds.recall_lower_bound <= true_recall
    # 200 audited of 19,000 rejected with no miss bound the loss at about 285 prompts: uninformative
    assert bounds.missed_upper_95 == pytest.approx(19000 * (1 - 0.05 ** (1 / 200)), rel=1e-6)
    assert not bounds.informative and bounds.recall_lower_bound < 0.5
    assert bounds.audit_needed == audit_needed(19000, TOP, 0.9) and f"{bounds.audit_needed} prompts" in bounds.note
    big, _, _ = screened(noise=0.05, keep=1000, sample=bounds.audit_needed)
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


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_audited_prompts_weighted_by_the_rejected_they_stand_for_keep_the_fit_off_the_survivors_members(seed):
    """Memorized prompts a population apart, far above the bulk: the survivors, all fully scored, are rich in them,
    and the rejected are known only through the audit's random sample. Unweighted, the fit follows the survivors and
    expects two to three times the members truly lost; each audited prompt weighted by the rejected prompts it stands
    for (StageScores.audit), it expects about what was lost."""
    rng = np.random.default_rng(seed)
    full = np.exp(rng.normal(0, 0.5, N))
    planted = rng.choice(N, 150, replace=False)
    full[planted] *= np.exp(rng.uniform(1.0, 2.0, 150))
    screen = full * np.exp(rng.normal(0, 0.3, N))
    threshold = np.sort(full)[::-1][TOP - 1]
    members = full >= threshold
    order = np.argsort(-screen)
    kept, rejected = order[:600], order[600:]
    audited = rng.choice(rejected, size=200, replace=False)
    known = np.full(N, np.nan)
    known[kept], known[audited] = full[kept], full[audited]
    passed = np.isin(np.arange(N), kept)
    lost = int(members[rejected].sum())

    def expected(audit):
        scores = StageScores(screen, known, passed, audit=audit)
        return audit_bounds(len(rejected), 200, int(members[audited].sum()), int(members[kept].sum()), [scores], threshold, 396.0).expected_missed

    weighted = expected((200 / len(rejected), np.isin(np.arange(N), audited), np.zeros(0, dtype=bool)))
    assert lost > 15 and weighted == pytest.approx(lost, rel=0.5) and expected(None) > 1.8 * lost
