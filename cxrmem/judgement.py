"""Mitigation strategies judged by the harm and by what they cost the image: one row per strategy.

From copies.parquet (the memorized prompts' generations at one guidance, per strategy; `none` is
the prompt as it is) and mitigation.parquet (d_mem, fidelity, cost per prompt and strategy):

- copy rate: the share of the memorized prompts that still copy a training image under the
  strategy (is_copy, the copies stage's threshold), and its paired change against `original`
  over the same prompts with a 95% Student t interval on the per-prompt 0/1 differences
  (stats.paired_difference_ci; a normal-theory interval on binary differences is rough for a
  few dozen prompts: read it as a guide, and the counts beside it);
- similarity: the mean of each prompt's best generation's similarity to its nearest training image
  (max_similarity), and its paired change: how close the strategy still comes, below the threshold too;
- fidelity: the mean share of a prompt's generations (at that guidance, from copies.parquet)
  that show its findings (cxrmem/fidelity.py), and its paired change;
- d_mem change: paired against `original` from mitigation.parquet (the scoring guidance);
- evaluations: UNet evaluations per prompt (cxrmem/strategies.py), as mitigation.parquet records them.

Prompts a strategy left unchanged (`changed` false in mitigation.parquet: a rewrite or a
re-scaling without a marker) are left out of that strategy's row. The copies stage's copy-rate rule
checks a strategy on memorized prompts beyond mitigation's, and only those the strategy changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from cxrmem import stats


@dataclass
class StrategyJudgement:
    strategy: str
    prompts: int  # memorized prompts in the row (the strategy changed them and copies checked them)
    copies: Optional[int]  # of those, how many still copy
    copy_rate: Optional[float]
    copy_rate_change: Optional[dict]  # paired against original: mean, ci_low, ci_high, n
    similarity: Optional[float]  # mean over prompts of the best generation's similarity to its nearest training image
    similarity_change: Optional[dict]  # paired against original: the continuous view of the copy rate
    fidelity: Optional[float]  # None: no fidelity measure set
    fidelity_change: Optional[dict]
    d_mem_change: Optional[dict]
    evaluations: Optional[int]  # UNet evaluations per prompt

    def as_dict(self) -> dict:
        return asdict(self)


def _paired(own: pd.Series, base: pd.Series) -> Optional[dict]:
    pairs = pd.concat([own, base], axis=1, join="inner").dropna()
    if pairs.empty:
        return None
    return stats.paired_difference_ci(pairs.iloc[:, 0].to_numpy(np.float64), pairs.iloc[:, 1].to_numpy(np.float64))


def changed_prompts(mitigation: Optional[pd.DataFrame], strategy: str, changed: bool = True) -> Optional[set]:
    """The prompts a strategy changed (or with `changed` false, left unchanged) according to mitigation.parquet
    (None: not known, keep all)."""
    if mitigation is None or "changed" not in mitigation.columns or strategy == "original":
        return None
    own = mitigation[mitigation["strategy"] == strategy]
    return set(own.loc[own["changed"].astype(bool) == changed, "prompt_id"]) if len(own) else None


def judge_strategies(
    copies: Optional[pd.DataFrame], mitigation: Optional[pd.DataFrame], guidance: float, order: Sequence[str]
) -> list[StrategyJudgement]:
    """One StrategyJudgement per strategy of `order` (`original` first) at this copies guidance."""
    at = None
    if copies is not None:
        at = copies[(copies["group"] == "memorized") & np.isclose(copies["guidance"], guidance)]
        at = at.assign(strategy=at["strategy"].replace({"none": "original"}))
    per_strategy = {s: g.set_index("prompt_id") for s, g in (at.groupby("strategy") if at is not None else [])}
    mit = {s: g.set_index("prompt_id") for s, g in (mitigation.groupby("strategy") if mitigation is not None else [])}
    base, mit_base = per_strategy.get("original"), mit.get("original")
    rows = []
    for strategy in order:
        own, own_mit = per_strategy.get(strategy), mit.get(strategy)
        keep, unchanged = changed_prompts(mitigation, strategy), changed_prompts(mitigation, strategy, changed=False)
        if own is not None and unchanged is not None:  # the copy-rate rule's prompts beyond mitigation's were checked changed
            own = own[~own.index.isin(unchanged)]
        if own_mit is not None and keep is not None:
            own_mit = own_mit[own_mit.index.isin(keep)]
        rows.append(judge_one(strategy, own, base, own_mit, mit_base))
    return rows


def judge_one(strategy, own, base, own_mit, mit_base) -> StrategyJudgement:
    """The row of one strategy from its copies rows `own` and mitigation rows `own_mit` (indexed by prompt)."""
    copy = own["is_copy"].astype(float) if own is not None and len(own) else None
    faithful = own["fidelity"].astype(float) if copy is not None and "fidelity" in own.columns else None
    has_fidelity = faithful is not None and faithful.notna().any()
    compare = strategy != "original"
    evaluations = None
    if own_mit is not None and "evaluations" in own_mit.columns and len(own_mit):
        evaluations = int(own_mit["evaluations"].iloc[0])
    return StrategyJudgement(
        strategy=strategy,
        prompts=len(copy) if copy is not None else (len(own_mit) if own_mit is not None else 0),
        copies=int(copy.sum()) if copy is not None else None,
        copy_rate=float(copy.mean()) if copy is not None else None,
        copy_rate_change=_paired(copy, base["is_copy"].astype(float)) if compare and copy is not None and base is not None else None,
        similarity=float(own["max_similarity"].mean()) if copy is not None else None,
        similarity_change=_paired(own["max_similarity"], base["max_similarity"]) if compare and copy is not None and base is not None else None,
        fidelity=float(faithful.mean()) if has_fidelity else None,
        fidelity_change=_paired(faithful, base["fidelity"].astype(float)) if compare and has_fidelity and base is not None else None,
        d_mem_change=_paired(own_mit["d_mem"], mit_base["d_mem"]) if compare and own_mit is not None and mit_base is not None else None,
        evaluations=evaluations,
    )


def halves_copying(rows: Sequence[StrategyJudgement], fidelity_points: float = 0.10) -> list[str]:
    """Strategies whose copy rate is at most half of original's with fidelity within `fidelity_points` of it."""
    base = next((r for r in rows if r.strategy == "original"), None)
    if base is None or not base.copy_rate:
        return []
    out = []
    for r in rows:
        if r.strategy == "original" or r.copy_rate is None or r.copy_rate > base.copy_rate / 2:
            continue
        if base.fidelity is not None and (r.fidelity is None or r.fidelity < base.fidelity - fidelity_points):
            continue
        out.append(r.strategy)
    return out
