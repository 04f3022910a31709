"""Fidelity: does a generation still show what its prompt asks for? What a mitigation costs the image.

A strategy that returns noise "removes" memorization trivially, so every generation the
mitigate and copies stages draw is also read for the findings of the ORIGINAL prompt (a rewrite
must not change what the image should show). Per prompt, fidelity is the share of its
generations whose read findings equal the prompt's on every label (present and absent alike).

Measures (`fidelity.measure`):

- `none`: nothing is read; the report says that no fidelity measure is set.
- `phantom_reader`: the phantom findings reader (cxrmem/fidelity_reader.py) from
  `fidelity.reader`, trained on the phantoms the testbed renders from report text
  (cxrmem/testbed/reader.py). Its labels are the phantom findings visible at 32 pixels; its
  held-out exact-match rate (reader.json) is the ceiling a perfect generator would reach.

A classifier for real radiographs (an image classifier from the Hugging Face cache with a
mapping from its labels to report findings) is not implemented: on RadEdit set `none`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from cxrmem.settings import Settings

MEASURES = ("none", "phantom_reader")


@dataclass(frozen=True)
class FidelitySettings(Settings):
    measure: str = "none"  # none | phantom_reader
    reader: str = "testbed/reader"  # phantom_reader: the folder holding reader.safetensors and reader.json


class PhantomFidelity:
    """The phantom reader, loaded once per worker."""

    def __init__(self, settings: FidelitySettings, device="cpu"):
        from cxrmem.fidelity_reader import load_reader

        self.reader = load_reader(settings.reader, device)

    def __call__(self, generations, prompts: Sequence[str]) -> np.ndarray:
        """[P] float: per prompt, the share of its generations [P, N, C, H, W] that show exactly its findings."""
        from cxrmem.fidelity_reader import text_labels

        wanted = text_labels(list(prompts))  # [P, K]
        read = self.reader.read(generations.flatten(0, 1)).reshape(*generations.shape[:2], -1)  # [P, N, K]
        return (read == wanted[:, None, :]).all(axis=2).mean(axis=1).astype(np.float64)


def make_fidelity(settings: FidelitySettings, device="cpu") -> Optional[PhantomFidelity]:
    """The configured measure, or None for `none`."""
    if settings.measure == "none":
        return None
    if settings.measure == "phantom_reader":
        return PhantomFidelity(settings, device)
    raise ValueError(f"unknown fidelity measure {settings.measure!r}: choose from {', '.join(MEASURES)}")
