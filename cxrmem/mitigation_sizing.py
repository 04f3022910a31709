"""How much mitigation runs: which memorized prompts, and when a strategy stops (pure: frames and numbers in).

Finding 3 is a paired test across prompts: a few dozen prompts give its interval, not the whole memorized set.

- The sample: a seeded sample of the memorized set stratified by marker presence (F3 is about the markers,
  and a rewrite of the markers changes only the prompts that have one), with proportional allocation by
  largest remainder; every prompt when there are no more than `size`. Within each stratum the order is random,
  and the strata are interleaved so that every prefix of the sample is stratified too: the sequential rule
  reads the sample in that order.
- The stopping rule: after every `look_every` prompts, a strategy whose paired d_mem change against `original`
  (F3's comparison: a Student t interval on the per-prompt differences over the prompts it changed,
  stats.paired_difference_ci) has an interval at `stop_level` that excludes 0 is decided and stops, once it has
  F3's minimum of paired prompts. The level is above F3's 95% because the rule looks more than once; and an
  interval at 99% that excludes 0 excludes it at 95% on the same prompts, so the verdict's interval agrees
  with the decision that stopped it. `original` runs as long as any strategy does: it is every pair's other half.
- The equivalence stop: a strategy whose interval at `stop_level` lies inside +-`equivalence_margin` x
  original's mean d_mem over the same prompts (two one-sided tests at that level) changes nothing that matters
  either way, and stops too. Without it a strategy with no effect (embedding noise, a delayed guidance) would
  run the whole sample; F3 reads such a strategy as not removing memorization, with or without the stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from cxrmem import stats
from cxrmem.corpus.text import compile_marker_regex
from cxrmem.findings import MIN_PAIRED_PROMPTS
from cxrmem.strategies import BASELINE

STRATA = ("marker", "no_marker")


def has_marker(prompts: Sequence[str], marker_regex: str) -> np.ndarray:
    pattern = compile_marker_regex(marker_regex)
    return np.array([bool(pattern.search(p)) for p in prompts], dtype=bool)


def allocation(counts: dict[str, int], size: int) -> dict[str, int]:
    """Prompts per stratum for a sample of `size` (< the total): proportional, the remainders to the largest fractions."""
    total = sum(counts.values())
    exact = {s: size * n / total for s, n in counts.items()}
    out = {s: int(np.floor(x)) for s, x in exact.items()}
    for s in sorted(counts, key=lambda s: out[s] - exact[s])[: size - sum(out.values())]:
        out[s] += 1
    return out


def stratified_sample(memorized: pd.DataFrame, marker_regex: str, size: Optional[int], seed: int) -> pd.DataFrame:
    """The memorized prompts mitigation runs on, in the order it runs them, with their `stratum` (module docstring)."""
    strata = np.where(has_marker(memorized["prompt"].tolist(), marker_regex), *STRATA)
    frame = memorized.assign(stratum=strata)
    counts = {s: int((strata == s).sum()) for s in STRATA if (strata == s).any()}
    take = counts if size is None or size >= len(frame) else allocation(counts, size)
    rng = np.random.default_rng([seed, len(frame)])
    parts, keys = [], []
    for stratum, n in take.items():
        rows = frame[frame["stratum"] == stratum]
        chosen = rows.iloc[rng.permutation(len(rows))[:n]]
        parts.append(chosen)
        keys.append((np.arange(n) + rng.uniform()) / max(n, 1))  # evenly spread through the order: every prefix stratified
    if not parts:
        return frame
    order = np.argsort(np.concatenate(keys), kind="stable")
    return pd.concat(parts).iloc[order]


def sample_record(memorized: pd.DataFrame, sample: pd.DataFrame, marker_regex: str, size: Optional[int], seed: int) -> dict:
    """summary.json's account of the sample: which prompts, and why these."""
    everyone = size is None or size >= len(memorized)
    why = ("every memorized prompt (mitigation.sample_size is null or not below the memorized count)" if everyone else
           f"a seeded sample of {len(sample)} of the {len(memorized)} memorized prompts, stratified by marker presence "
           f"with proportional allocation (mitigation.sample_size, mitigation.seed)")  # fmt: skip
    marked = has_marker(memorized["prompt"].tolist(), marker_regex)
    counts = {"marker": int(marked.sum()), "no_marker": int((~marked).sum())}
    sampled = sample["stratum"].value_counts()
    strata = {s: {"memorized": n, "sampled": int(sampled.get(s, 0))} for s, n in counts.items()}
    return {"why": why, "size": size, "seed": seed, "memorized": len(memorized), "sampled": len(sample),
            "strata": strata, "prompt_ids": sample["prompt_id"].tolist()}  # fmt: skip


@dataclass
class SequentialRule:
    """Which strategies still run, and per strategy how many prompts it used and why it stopped."""

    strategies: Sequence[str]
    level: float  # mitigation.stop_level
    enabled: bool = True  # mitigation.sequential
    margin: float = 0.0  # mitigation.equivalence_margin (0: a strategy stops only when its change excludes 0)
    min_pairs: int = MIN_PAIRED_PROMPTS
    stopped: dict = field(default_factory=dict)  # strategy -> {prompts, pairs, d_mem_change, stopped}

    def __post_init__(self):
        self.active = list(self.strategies)

    def look(self, frame: pd.DataFrame) -> list[str]:
        """After a look at the rows so far: stop the decided strategies, and `original` when none is left to pair; the stopped."""
        if not self.enabled or BASELINE not in self.active:
            return []
        reasons = {s: self.decided(frame, s) for s in self.active if s != BASELINE}
        done = [s for s, why in reasons.items() if why]
        for strategy in done:
            self.stop(frame, strategy, reasons[strategy])
        if self.active == [BASELINE]:
            self.stop(frame, BASELINE, "no strategy left to pair with")
            done.append(BASELINE)
        return done

    def finish(self, frame: pd.DataFrame) -> dict:
        """Every strategy's record once the sample ran out (those still running: undecided)."""
        why = "the sample ran out, undecided" if self.enabled else "ran on the whole sample (mitigation.sequential=false)"
        for strategy in list(self.active):
            self.stop(frame, strategy, why)
        return {s: self.stopped[s] for s in self.strategies}

    def stop(self, frame: pd.DataFrame, strategy: str, why: str) -> None:
        change = paired_change(frame, strategy, self.level) if strategy != BASELINE else None
        used = int((frame["strategy"] == strategy).sum())
        self.stopped[strategy] = {"prompts": used, "pairs": change["n"] if change else None, "level": self.level,
                                  "d_mem_change": change, "stopped": why}  # fmt: skip
        self.active.remove(strategy)

    def decided(self, frame: pd.DataFrame, strategy: str) -> Optional[str]:
        """Why the strategy's paired d_mem change is decided, or None (`decision`: the margin is a share of original's
        mean d_mem over the same prompts)."""
        change = paired_change(frame, strategy, self.level)
        bound = self.margin * abs(change["baseline_mean"]) if change["baseline_mean"] is not None else 0.0
        return decision(change, self.level, bound, self.min_pairs, "the d_mem change", f"+-{self.margin:g} x original's d_mem")


def decision(change: dict, level: float, bound: float, min_pairs: int, what: str, margin: str) -> Optional[str]:
    """Why a paired change ({n, ci_low, ci_high} at `level`) is decided, or None: once it has `min_pairs` pairs, its
    interval excludes 0, or (an equivalence stop, as in two one-sided tests) lies strictly within +-`bound` (0: none)."""
    if change["n"] < min_pairs or change["ci_low"] is None:
        return None
    if change["ci_low"] > 0 or change["ci_high"] < 0:
        return f"decided: its {level:.0%} interval on {what} excludes 0"
    if -bound < change["ci_low"] and change["ci_high"] < bound:
        return f"decided: its {level:.0%} interval lies within {margin} (no practical change)"
    return None


def copy_rate_change(is_copy: pd.Series, base: pd.Series, level: float) -> dict:
    """The copy indicator (0/1 per prompt, indexed by prompt_id) under a strategy minus under `original`, paired."""
    pairs = pd.concat([is_copy.astype(float), base.astype(float)], axis=1, join="inner").dropna()
    return stats.paired_difference_ci(pairs.iloc[:, 0].to_numpy(), pairs.iloc[:, 1].to_numpy(), level)


def paired_change(frame: pd.DataFrame, strategy: str, level: float) -> dict:
    """d_mem under `strategy` minus under `original`, over the prompts the strategy changed: {n, mean, ci_low, ci_high}."""
    own = frame[(frame["strategy"] == strategy) & frame["changed"].astype(bool)].set_index("prompt_id")["d_mem"]
    base = frame[frame["strategy"] == BASELINE].set_index("prompt_id")["d_mem"]
    pairs = pd.concat([own, base], axis=1, join="inner").dropna()
    change = stats.paired_difference_ci(pairs.iloc[:, 0].to_numpy(), pairs.iloc[:, 1].to_numpy(), level)
    return change | {"baseline_mean": float(pairs.iloc[:, 1].mean()) if len(pairs) else None}
