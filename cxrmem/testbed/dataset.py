"""Training pairs of the testbed, with planted memorized prompts.

Prompts are the impressions of synthetic MIMIC-style reports (`cxrmem.corpus.synthetic`),
whitespace-normalised and deduplicated. Two kinds of prompt:

- unique: `n_unique` prompts, each seen once per epoch with its own patient's phantom;
- planted: for every duplication level n in `duplication_levels` and for each marker
  condition (with `___` de-identification markers, without), `planted_per_level` prompts
  repeated n times with ONE fixed patient image, which is how a duplicated study gets
  memorized. Planted prompts are drawn from impressions that occur once in the generated
  reports and so are strings that appear nowhere else in the training set.

`manifest.csv` lists every training prompt with `prompt,n_copies,planted`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrmem.corpus.synthetic import generate_reports
from cxrmem.corpus.text import count_markers, normalise_whitespace
from cxrmem.testbed.phantoms import phantoms

MANIFEST = "manifest.csv"


@dataclass
class TrainingSet:
    prompts: list[str]  # one entry per distinct training prompt
    images: np.ndarray  # [P, 1, H, W] float32 in [0, 1]: the one image each prompt is trained with
    n_copies: np.ndarray  # [P] int: times the (prompt, image) pair appears per epoch
    planted: np.ndarray  # [P] bool

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        """One shuffled epoch: prompt i appears n_copies[i] times."""
        return rng.permutation(np.repeat(np.arange(len(self.prompts)), self.n_copies))

    def manifest(self) -> pd.DataFrame:
        return pd.DataFrame({"prompt": self.prompts, "n_copies": self.n_copies, "planted": self.planted})


def patient_seed(seed: int, index: int) -> int:
    """A distinct, reproducible patient per training prompt."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def candidate_impressions(n_reports: int, seed: int) -> tuple[list[str], set[str]]:
    """Distinct normalised impressions in first-seen order, and those seen exactly once."""
    counts = Counter(normalise_whitespace(r["impression"]) for r in generate_reports(n_reports, seed=seed))
    counts.pop("", None)
    return list(counts), {text for text, n in counts.items() if n == 1}


def choose_prompts(tb_cfg, marker_regex: str) -> tuple[list[str], list[int], list[bool]]:
    """Planted prompts (marker condition x level x planted_per_level) first, then the unique ones.

    Returns the prompts, their copies per epoch and whether each is planted.
    """
    per_condition = tb_cfg.planted_per_level * len(tb_cfg.duplication_levels)
    needed = tb_cfg.n_unique + 2 * per_condition
    distinct, singletons = candidate_impressions(4 * needed, tb_cfg.seed)
    rng = np.random.default_rng(tb_cfg.seed)
    order = [distinct[i] for i in rng.permutation(len(distinct))]
    specific = [p for p in order if p in singletons]
    with_marker = [p for p in specific if count_markers(p, marker_regex) > 0][:per_condition]
    without_marker = [p for p in specific if count_markers(p, marker_regex) == 0][:per_condition]
    if len(with_marker) < per_condition or len(without_marker) < per_condition:
        raise ValueError(
            f"the synthetic corpus gave {len(with_marker)} marked and {len(without_marker)} unmarked specific "
            f"impressions, fewer than the {per_condition} per condition that testbed.planted_per_level x "
            "testbed.duplication_levels ask for; lower testbed.planted_per_level"
        )
    planted = set(with_marker) | set(without_marker)
    unique = [p for p in order if p not in planted][: tb_cfg.n_unique]
    if len(unique) < tb_cfg.n_unique:
        raise ValueError(f"only {len(unique)} distinct impressions for testbed.n_unique={tb_cfg.n_unique}; lower it")
    prompts, copies = [], []
    for condition in (with_marker, without_marker):
        for level_index, level in enumerate(tb_cfg.duplication_levels):
            chunk = condition[level_index * tb_cfg.planted_per_level : (level_index + 1) * tb_cfg.planted_per_level]
            prompts += chunk
            copies += [level] * len(chunk)
    return prompts + unique, copies + [1] * len(unique), [True] * len(prompts) + [False] * len(unique)


def build_training_set(tb_cfg, marker_regex: str) -> TrainingSet:
    prompts, copies, planted = choose_prompts(tb_cfg, marker_regex)
    seeds = [patient_seed(tb_cfg.seed, i) for i in range(len(prompts))]
    images = phantoms(prompts, seeds, tb_cfg.image_size)
    return TrainingSet(prompts, images, np.asarray(copies, dtype=np.int64), np.asarray(planted, dtype=bool))
