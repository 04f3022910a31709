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

from cxrmem.settings import Settings, check_names


@dataclass(frozen=True)
class FidelitySettings(Settings):
    """The `fidelity` config section."""

    measure: str = "none"  # what a generation is read with for its prompt's findings (MEASURES): none | phantom_reader (the testbed's)
    reader: str = "testbed/reader"  # phantom_reader: folder of reader.safetensors + reader.json (`cxrmem testbed reader` trains one)

    @staticmethod
    def check(section, key: str) -> None:
        check_names(f"{key}.measure", [section.measure], MEASURES, "measure")


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


# name -> the measure's class, loaded once per worker from (settings, device); `none` measures nothing.
MEASURES = {"none": None, "phantom_reader": PhantomFidelity}


def make_fidelity(settings: FidelitySettings, device="cpu") -> Optional[PhantomFidelity]:
    """The configured measure, or None for `none`."""
    if settings.measure not in MEASURES:
        raise ValueError(f"unknown fidelity measure {settings.measure!r}: choose from {', '.join(MEASURES)}")
    measure = MEASURES[settings.measure]
    return measure(settings, device) if measure is not None else None
