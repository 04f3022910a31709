"""The mitigation's sample and its sequential stopping rule, on frames whose answer is known (no model)."""

import numpy as np
import pandas as pd
import pytest

from cxrmem.corpus.text import MARKER_REGEX
from cxrmem.mitigation_sizing import SequentialRule, allocation, paired_change, sample_record, stratified_sample


def memorized(marked: int, plain: int) -> pd.DataFrame:
    prompts = [f"Seen on ___ number {i}." for i in range(marked)] + [f"Clear lungs number {i}." for i in range(plain)]
    return pd.DataFrame({"prompt": prompts, "prompt_id": [f"{i:016x}" for i in range(marked + plain)]})


def test_allocation_is_proportional_with_the_remainders_to_the_largest_fractions():
    assert allocation({"marker": 30, "no_marker": 10}, 8) == {"marker": 6, "no_marker": 2}
    assert allocation({"marker": 7, "no_marker": 3}, 5) == {"marker": 4, "no_marker": 1}  # 3.5 / 1.5: a tie, first stays
    assert sum(allocation({"marker": 13, "no_marker": 29}, 11).values()) == 11


def test_the_sample_is_seeded_stratified_and_every_prefix_is_stratified_too():
    frame = memorized(30, 30)
    sample = stratified_sample(frame, MARKER_REGEX, 20, seed=1)
    assert len(sample) == 20 and sample["prompt_id"].is_unique
    assert sample["stratum"].value_counts().to_dict() == {"marker": 10, "no_marker": 10}
    assert sample["prompt_id"].tolist() == stratified_sample(frame, MARKER_REGEX, 20, seed=1)["prompt_id"].tolist()
    assert sample["prompt_id"].tolist() != stratified_sample(frame, MARKER_REGEX, 20, seed=2)["prompt_id"].tolist()
    for n in range(2, 21):  # a sequential stop after any look has run on a stratified prefix
        assert abs((sample["stratum"].iloc[:n] == "marker").sum() - n / 2) <= 1, n
    assert (sample["stratum"] == np.where(sample["prompt"].str.contains("___"), "marker", "no_marker")).all()


def test_every_prompt_when_there_are_fewer_than_the_size_and_the_record_says_why():
    frame = memorized(3, 5)
    for size in (None, 8, 40):
        sample = stratified_sample(frame, MARKER_REGEX, size, seed=0)
        assert sorted(sample["prompt_id"]) == sorted(frame["prompt_id"])
        record = sample_record(frame, sample, MARKER_REGEX, size, 0)
        assert record["sampled"] == record["memorized"] == 8 and record["why"].startswith("every memorized prompt")
    sample = stratified_sample(frame, MARKER_REGEX, 4, seed=0)
    record = sample_record(frame, sample, MARKER_REGEX, 4, 0)
    assert record["strata"] == {"marker": {"memorized": 3, "sampled": 2}, "no_marker": {"memorized": 5, "sampled": 2}}
    assert record["prompt_ids"] == sample["prompt_id"].tolist() and "stratified by marker presence" in record["why"]


def rows(changes: dict[str, float], prompts: range, noise: float = 0.01, unchanged=()) -> pd.DataFrame:
    """mitigation rows: original's d_mem 1 + noise, each strategy's shifted by its change (plus its own noise)."""
    rng, out = np.random.default_rng(0), []
    for i in prompts:
        pid, base = f"{i:016x}", 1.0 + noise * rng.standard_normal()
        out.append({"prompt_id": pid, "strategy": "original", "d_mem": base, "changed": False})
        for strategy, change in changes.items():
            out.append({"prompt_id": pid, "strategy": strategy, "d_mem": base + change + noise * rng.standard_normal(),
                        "changed": strategy not in unchanged or i % 2 == 0})  # fmt: skip
    return pd.DataFrame(out)


def test_a_decided_strategy_stops_and_an_undecided_one_runs_on():
    rule = SequentialRule(("original", "drops", "same"), level=0.99)
    assert rule.look(rows({"drops": -0.5, "same": 0.0}, range(4))) == []  # 4 pairs: fewer than F3 needs
    frame = rows({"drops": -0.5, "same": 0.0}, range(10))
    assert rule.look(frame) == ["drops"] and rule.active == ["original", "same"]
    record = rule.finish(frame)
    assert record["drops"]["pairs"] == 10 and record["drops"]["d_mem_change"]["ci_high"] < 0
    assert record["drops"]["stopped"].startswith("decided")
    assert record["same"]["stopped"] == "the sample ran out, undecided" and record["original"]["prompts"] == 10


def test_pairs_are_the_prompts_a_strategy_changed_and_original_stops_with_the_last():
    frame = rows({"rewrite": 0.3}, range(8), unchanged=("rewrite",))  # changed on the even prompts only: 4 pairs
    assert paired_change(frame, "rewrite", 0.99)["n"] == 4
    rule = SequentialRule(("original", "rewrite"), level=0.99)
    assert rule.look(frame) == [] and rule.look(rows({"rewrite": 0.3}, range(10), unchanged=("rewrite",))) == ["rewrite", "original"]
    assert rule.active == []


def test_the_sequential_rule_off_runs_everything_on_the_whole_sample():
    rule = SequentialRule(("original", "drops"), level=0.99, enabled=False)
    frame = rows({"drops": -0.5}, range(10))
    assert rule.look(frame) == []
    assert rule.finish(frame)["drops"]["stopped"].startswith("ran on the whole sample")


@pytest.mark.parametrize("level", [0.95, 0.99])
def test_a_stop_at_a_level_agrees_with_f3s_95_interval_on_the_same_prompts(level):
    frame = rows({"drops": -0.02}, range(12), noise=0.02)
    decided = SequentialRule(("original", "drops"), level=level).decided(frame, "drops")
    if decided:  # a 99% interval that excludes 0 implies the 95% one does too
        assert paired_change(frame, "drops", 0.95)["ci_high"] < 0


def test_a_strategy_that_changes_nothing_stops_for_equivalence_only_with_a_margin():
    frame = rows({"same": 0.0}, range(10))  # original's d_mem is about 1; noise 0.01
    rule = SequentialRule(("original", "same"), level=0.99, margin=0.1)
    assert rule.look(frame) == ["same", "original"]  # its interval lies within +-0.1, and original has no pair left
    assert "no practical change" in rule.stopped["same"]["stopped"]
    bound = 0.1 * rule.stopped["same"]["d_mem_change"]["baseline_mean"]
    assert -bound < rule.stopped["same"]["d_mem_change"]["ci_low"] and rule.stopped["same"]["d_mem_change"]["ci_high"] < bound
    without = SequentialRule(("original", "same"), level=0.99)  # margin 0: a null strategy runs on
    assert without.look(frame) == [] and without.active == ["original", "same"]
    wide = rows({"same": 0.0}, range(10), noise=0.3)  # an interval wider than the margin is not decided
    assert SequentialRule(("original", "same"), level=0.99, margin=0.1).decided(wide, "same") is None
