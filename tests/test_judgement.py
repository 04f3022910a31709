"""Mitigation strategies judged by copy rate, fidelity, d_mem change and cost: the per-strategy rows."""

import pandas as pd
import pytest

from cxrmem.judgement import halves_copying, judge_strategies

IDS = ["a", "b", "c", "d"]


def copies_rows(strategy, is_copy, fidelity, guidance=1.0, ids=IDS):
    return pd.DataFrame({"prompt_id": ids, "group": "memorized", "strategy": strategy, "guidance": guidance,
                         "is_copy": is_copy, "fidelity": fidelity,
                         "max_similarity": [0.9 + 0.05 * c for c in is_copy]})  # fmt: skip


def mitigation_rows(strategy, d_mem, changed, evaluations):
    return pd.DataFrame({"prompt_id": IDS, "strategy": strategy, "d_mem": d_mem, "changed": changed, "evaluations": evaluations})


@pytest.fixture
def frames():
    copies = pd.concat([
        copies_rows("none", [True, True, True, False], [1.0, 1.0, 0.5, 0.5]),
        copies_rows("delayed_guidance", [False, True, False, False], [0.5, 1.0, 0.5, 0.5]),
        copies_rows("remove_marker", [False, False, True, False], [1.0, 1.0, 1.0, 1.0]),
        copies_rows("none", [False] * 4, [0.0] * 4, guidance=7.5),  # another guidance: not in the w=1 rows
        copies_rows("none", [True], [1.0], ids=["z"]).assign(group="control"),  # a control: never judged
    ])  # fmt: skip
    mitigation = pd.concat([
        mitigation_rows("original", [10.0, 10.0, 10.0, 10.0], [False] * 4, 40),
        mitigation_rows("delayed_guidance", [9.0, 8.0, 7.0, 6.0], [True] * 4, 40),
        # remove_marker left prompt d as it was (no marker): d is out of its row.
        mitigation_rows("remove_marker", [5.0, 5.0, 5.0, 10.0], [True, True, True, False], 40),
    ])  # fmt: skip
    return copies, mitigation


def test_rows_pair_each_strategy_with_original_on_its_own_prompts(frames):
    rows = {r.strategy: r for r in judge_strategies(*frames, 1.0, ["original", "delayed_guidance", "remove_marker"])}
    base, delayed, removed = rows["original"], rows["delayed_guidance"], rows["remove_marker"]
    assert (base.prompts, base.copies, base.copy_rate, base.fidelity) == (4, 3, 0.75, 0.75)
    assert base.copy_rate_change is None and base.d_mem_change is None
    assert (delayed.copies, delayed.copy_rate) == (1, 0.25) and delayed.similarity_change["mean"] == pytest.approx(-0.025)
    assert delayed.copy_rate_change["mean"] == pytest.approx(-0.5) and delayed.copy_rate_change["n"] == 4
    assert delayed.fidelity == pytest.approx(0.625) and delayed.fidelity_change["mean"] == pytest.approx(-0.125)
    assert delayed.d_mem_change["mean"] == pytest.approx(-2.5) and delayed.evaluations == 40
    # Prompt d is left out of remove_marker's row: 1 copy of 3 changed prompts, against original's 3 of those 3.
    assert (removed.prompts, removed.copies) == (3, 1)
    assert removed.copy_rate_change["mean"] == pytest.approx(-2 / 3) and removed.d_mem_change["mean"] == pytest.approx(-5.0)
    assert removed.fidelity_change["mean"] == pytest.approx((0 + 0 + 0.5) / 3)


def test_halving_needs_half_the_copy_rate_and_fidelity_within_ten_points(frames):
    rows = judge_strategies(*frames, 1.0, ["original", "delayed_guidance", "remove_marker"])
    # delayed: 0.25 <= 0.375 but fidelity 0.625 < 0.75 - 0.10; remove_marker: 1/3 <= 0.375 and fidelity 1.0.
    assert halves_copying(rows) == ["remove_marker"]
    assert halves_copying(rows, fidelity_points=0.2) == ["delayed_guidance", "remove_marker"]


def test_without_fidelity_or_mitigation_the_rows_say_none(frames):
    copies, _ = frames
    rows = judge_strategies(copies.assign(fidelity=float("nan")), None, 1.0, ["original", "delayed_guidance"])
    assert rows[1].fidelity is None and rows[1].d_mem_change is None and rows[1].evaluations is None
    assert rows[1].copy_rate_change["mean"] == pytest.approx(-0.5)
