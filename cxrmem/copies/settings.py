"""The `copies` config section: how generations are searched against the training images (no torch here, so
that loading a configuration stays light; cxrmem/copies/find.py and embedders.py use it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cxrmem.settings import NON_NEGATIVE, OPTIONAL_NON_NEGATIVE, OPTIONAL_POSITIVE, POSITIVE, Settings, at_least, knob

RAD_DINO_REPO = "microsoft/rad-dino"
# name -> its embedder class in cxrmem/copies/embedders.py (built from settings and a device, with a
# `fingerprint_of(settings)`), as "module:Class", imported when used: copies.embedder's choices are checked
# without importing torch when a configuration loads.
EMBEDDERS = {
    "pixel": "cxrmem.copies.embedders:PixelEmbedder",
    "rad_dino": "cxrmem.copies.embedders:TransformersEmbedder",  # microsoft/rad-dino
    "hf": "cxrmem.copies.embedders:TransformersEmbedder",  # any transformers vision model in the cache
}


@dataclass(frozen=True)
class CopiesSettings(Settings):
    """What finding copies varies (cut from the `copies` config section)."""

    generations: int = knob(8, POSITIVE)  # decoded generations per prompt and guidance
    top_k: int = knob(5, POSITIVE)  # nearest training images kept per generation
    threshold_quantile: float = knob(0.99, (lambda v: 0.5 <= v < 1, "in [0.5, 1)"))  # copy threshold: this quantile of the controls' max similarity
    batch_size: int = knob(16, POSITIVE)  # prompts per sampling run (each with its generations), and images per embedder pass
    query_chunk: int = knob(1024, POSITIVE)  # search: generation embeddings per matrix product
    index_chunk: int = knob(65536, POSITIVE)  # search: stored embeddings per matrix product (bounds memory)
    search_dtype: str = knob("float32", choices=["float32", "float16", "bfloat16"])  # float32 | float16 (GPU) | bfloat16 (CPUs with AVX512-BF16)


@dataclass(frozen=True)
class CopiesConfig(CopiesSettings):
    """The `copies` config section: the settings above, the embedder, and the generations' guidances and controls."""

    embedder: str = knob("pixel", choices=tuple(EMBEDDERS))  # pixel | rad_dino (microsoft/rad-dino) | hf (any transformers vision model in the cache)
    pixel_size: int = knob(64, at_least(4))  # pixel embedder: side of the resized image
    embedder_repo: str = RAD_DINO_REPO  # hf embedder: the model's repo id in the cache
    embedder_cache: str = ""  # rad_dino / hf: the Hugging Face hub cache root (loaded offline)
    embedder_revision: Optional[str] = None  # rad_dino / hf: snapshot commit or ref (None: refs/main)
    guidance: Optional[float] = knob(None, OPTIONAL_NON_NEGATIVE)  # first guidance (None: score.guidance_scale)
    second_guidance: Optional[float] = knob(1.0, OPTIONAL_NON_NEGATIVE)  # second guidance, where a model may reproduce its images (None: skip)
    n_controls: int = knob(200, at_least(2, "the copy threshold is calibrated on them"))  # random non-memorized prompts that calibrate the copy threshold
    seed: int = knob(0, NON_NEGATIVE)  # seed of the control sample
    strategies: bool = True  # also check the memorized prompts rewritten by each text strategy of mitigation.strategies
    # continue a strategy whose paired copy-rate change is undecided where mitigation's rule stopped it, over the rest of the
    # memorized set in its stratified order, until decided at mitigation.stop_level (cxrmem/stages/copies.py)
    sequential: bool = True
    equivalence_margin: float = knob(0.1, NON_NEGATIVE)  # ...or until its interval lies within +- this copy rate (no practical change)
    max_prompts: Optional[int] = knob(80, OPTIONAL_POSITIVE)  # most memorized prompts a strategy's copies are checked on (None: all)


def guidances(cfg) -> list[float]:
    """The guidances the copies check generates at: copies.guidance (None: score.guidance_scale), then
    copies.second_guidance unless it is None or the same."""
    first = cfg.copies.guidance if cfg.copies.guidance is not None else cfg.score.guidance_scale
    second = cfg.copies.second_guidance
    return [float(first)] + ([float(second)] if second is not None and float(second) != float(first) else [])
