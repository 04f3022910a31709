"""The `score` config section and the settings a d_mem score depends on (the Scorer's; no torch here, so that
loading a configuration stays light)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cxrmem import detectors
from cxrmem.settings import NON_NEGATIVE, OPTIONAL_POSITIVE, POSITIVE, ConfigError, Settings, check_names, knob


@dataclass(frozen=True)
class ScoreSettings(Settings):
    """What a d_mem score depends on (docs/design.md, Score); cut from the `score` config section."""

    generations: int = knob(4, POSITIVE)  # G: initial noises per prompt
    steps: int = knob(50, POSITIVE)  # T: DDIM steps
    guidance_scale: float = knob(7.5, NON_NEGATIVE)  # w: classifier-free guidance that drives the trajectory
    seed: int = knob(0, NON_NEGATIVE)  # base seed of the initial latents
    seed_mode: str = knob("shared", choices=["shared", "per_prompt"])  # shared (every prompt sees the same G noises) | per_prompt
    screening_steps: Optional[int] = knob(None, OPTIONAL_POSITIVE)  # score only the first k steps (None: all T)
    use_attention_mask: bool = False  # pass the tokenizer's attention mask to the text encoder (RadEdit does not)
    cpu_half: bool = False  # keep a bfloat16/float16 model in that precision on the CPU (precision checks; else float32)

    @property
    def scored_steps(self) -> int:
        """The steps a scoring under these settings runs: screening_steps, else all T."""
        return self.screening_steps or self.steps


@dataclass(frozen=True)
class ScoreConfig(ScoreSettings):
    """The `score` config section: what a score depends on, and how the scoring runs."""

    batch_size: int = knob(8, POSITIVE)  # prompts per UNet call (each call runs batch_size x G x 2 samples)
    detectors: tuple[str, ...] = ()  # extra detectors (cxrmem/detectors.py REGISTRY) whose columns scores.parquet gets beside d_mem

    @staticmethod
    def check(section, key: str) -> None:
        if section.screening_steps is not None and section.screening_steps > section.steps:
            raise ConfigError(f"config key '{key}.screening_steps' must not exceed {key}.steps")
        check_names(f"{key}.detectors", section.detectors, detectors.REGISTRY, "detector")
