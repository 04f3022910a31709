"""Per-prompt evidence of copying, from the nearest training images of its N generations.

Inputs are the top-k search results of every generation: similarities and index rows, both
[P, N, k] (prompt, generation, neighbour; best neighbour first). Per prompt:

- `max_similarity`: the highest top-1 similarity over its generations (the closest any came);
- `mean_similarity`: the mean over its generations of their top-1 similarity;
- `copy_share`: the share of its generations whose top-1 similarity exceeds the copy threshold;
- `is_copy`: max_similarity above the threshold;
- re-identification: whether the nearest image of the best generation belongs to the prompt's
  own source report (`same_study`) or patient (`same_patient`).

The copy threshold is calibrated on control prompts (not memorized, sampled at random): the
`quantile` of their max similarities, an observed value, so that at most 1 - quantile of the
controls count as copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

COPIES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("group", pa.string()),  # memorized | control
        ("strategy", pa.string()),  # "none" for the prompt itself, else the mitigation strategy
        ("guidance", pa.float32()),
        ("n_generations", pa.int32()),
        ("max_similarity", pa.float32()),
        ("mean_similarity", pa.float32()),
        ("copy_share", pa.float32()),
        ("is_copy", pa.bool_()),
        ("threshold", pa.float32()),
        ("best_generation", pa.int32()),  # the generation that came closest
        ("nearest_image_id", pa.string()),
        ("nearest_path", pa.string()),
        ("nearest_source_id", pa.string()),
        ("nearest_subject_id", pa.string()),
        ("same_study", pa.bool_()),
        ("same_patient", pa.bool_()),
        ("neighbour_image_ids", pa.list_(pa.string())),  # top-k of the best generation, best first
        ("neighbour_similarities", pa.list_(pa.float32())),
        ("embedder", pa.string()),  # the embedder's fingerprint
        ("fidelity", pa.float32()),  # share of the generations showing the original prompt's findings (cxrmem/fidelity.py; NaN: none set)
    ]
)


@dataclass(frozen=True)
class Threshold:
    value: float
    quantile: float
    n_controls: int

    @property
    def rule(self) -> str:
        return (
            f"the {self.quantile:.0%} quantile (an observed value) of the per-prompt max similarity of "
            f"{self.n_controls} control prompts; a prompt is a copy when its max similarity exceeds it"
        )

    def summary(self) -> dict:
        return {"value": self.value, "quantile": self.quantile, "n_controls": self.n_controls, "rule": self.rule}


def calibrate_threshold(control_max: np.ndarray, quantile: float = 0.99) -> Threshold:
    """The copy threshold from the controls' max similarities (see the module docstring)."""
    values = np.asarray(control_max, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no control prompt with a finite similarity: cannot calibrate the copy threshold; add controls")
    if not 0.5 <= quantile < 1:
        raise ValueError(f"copy threshold quantile {quantile}: use a value in [0.5, 1)")
    return Threshold(float(np.quantile(values, quantile, method="higher")), quantile, int(values.size))


def pick_controls(prompt_ids: Sequence[str], memorized: set[str], n: int, seed: int) -> list[str]:
    """A seeded random sample of `n` prompt ids outside `memorized` (all of them if fewer), sorted."""
    candidates = sorted(set(prompt_ids) - set(memorized))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)
    return sorted(candidates[i] for i in chosen)


def similarity_stats(sims: np.ndarray, threshold: Optional[float] = None) -> dict[str, np.ndarray]:
    """max / mean top-1 similarity, best generation, and (with a threshold) copy share, per prompt; sims [P, N, k]."""
    top1 = np.asarray(sims, dtype=np.float32)[:, :, 0]
    stats = {
        "max_similarity": top1.max(axis=1),
        "mean_similarity": top1.mean(axis=1),
        "best_generation": top1.argmax(axis=1).astype(np.int32),
    }
    if threshold is not None:
        stats["copy_share"] = (top1 > threshold).mean(axis=1).astype(np.float32)
        stats["is_copy"] = stats["max_similarity"] > threshold
    return stats


def reidentify(nearest_keys: Sequence[Optional[str]], own_keys: Sequence[Sequence[Optional[str]]]) -> np.ndarray:
    """Per prompt: is its nearest image's key (source or subject id) among the prompt's own keys?

    A missing key (None) never matches: an image without ids re-identifies nobody.
    """
    if len(nearest_keys) != len(own_keys):
        raise ValueError(f"{len(nearest_keys)} nearest images for {len(own_keys)} prompts")
    # A list column read from parquet gives numpy arrays (or None for a null list).
    owned = [set() if own is None else {k for k in map(_key, own) if k is not None} for own in own_keys]
    return np.array([_key(key) is not None and _key(key) in keys for key, keys in zip(nearest_keys, owned)], dtype=bool)


def _key(value) -> Optional[str]:
    """An id as text; None for a missing one (pandas turns None in a text column into NaN)."""
    return value if isinstance(value, str) else None


def copies_table(
    prompts: pd.DataFrame,
    sims: np.ndarray,
    rows: np.ndarray,
    images: pd.DataFrame,
    threshold: Threshold,
    guidance: float,
    embedder: str,
    strategy: str = "none",
    fidelity: Optional[Sequence[float]] = None,
) -> pa.Table:
    """copies.parquet rows of P prompts.

    `prompts`: prompt_id, prompt, group, source_ids (list) and, where the corpus has them,
    subject_id (list), in the order of sims / rows [P, N, k]; `images`: the image table
    (image_id, path, source_id, subject_id) whose row numbers `rows` holds.
    """
    stats = similarity_stats(sims, threshold.value)
    best = stats["best_generation"]
    picked = np.asarray(rows)[np.arange(len(best)), best]  # [P, k] neighbours of the best generation
    nearest = images.iloc[picked[:, 0]].reset_index(drop=True)
    own_subjects = prompts["subject_id"] if "subject_id" in prompts.columns else [[]] * len(prompts)
    columns = {
        "prompt_id": prompts["prompt_id"].tolist(),
        "prompt": prompts["prompt"].tolist(),
        "group": prompts["group"].tolist(),
        "strategy": [strategy] * len(prompts),
        "guidance": [guidance] * len(prompts),
        "n_generations": [int(np.shape(sims)[1])] * len(prompts),
        **{name: stats[name] for name in ("max_similarity", "mean_similarity", "copy_share", "is_copy")},
        "threshold": [threshold.value] * len(prompts),
        "best_generation": best,
        **{f"nearest_{name}": [_key(v) for v in nearest[name]] for name in ("image_id", "path", "source_id", "subject_id")},
        "same_study": reidentify(list(nearest["source_id"]), list(prompts["source_ids"])),
        "same_patient": reidentify(list(nearest["subject_id"]), list(own_subjects)),
        "neighbour_image_ids": [images["image_id"].iloc[r].tolist() for r in picked],
        "neighbour_similarities": [np.asarray(sims)[p, best[p]].astype(np.float32).tolist() for p in range(len(best))],
        "embedder": [embedder] * len(prompts),
        "fidelity": list(fidelity) if fidelity is not None else [float("nan")] * len(prompts),
    }
    return pa.table({name: pa.array(columns[name], COPIES_SCHEMA.field(name).type) for name in COPIES_SCHEMA.names}, schema=COPIES_SCHEMA)
