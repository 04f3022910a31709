"""Settings of the stages that are not one domain's: the `cascade` section (cxrmem/stages/cascade.py runs it).
Light on purpose (no torch): loading a configuration imports this module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from cxrmem import detectors
from cxrmem.settings import NON_NEGATIVE, OPTIONAL_POSITIVE, PERCENT, POSITIVE, ConfigError, Settings, check_names, knob


@dataclass(frozen=True)
class CascadeStage(Settings):
    """One screen of `cascade.stages`."""

    screen: str = "dmem"  # the stage's detector (REGISTRY name)
    keep_percent: float = knob(10.0, PERCENT)  # share of this stage's input (by its screen) that goes on to the next stage
    steps: int = knob(1, POSITIVE)  # k: DDIM steps of a dmem / latent_update screen (below score.steps)
    generations: Optional[int] = knob(None, OPTIONAL_POSITIVE)  # G of the screen (None: score.generations, so the full score can share its noises)

    @staticmethod
    def check(section, key: str) -> None:
        check_names(f"{key}.screen", [section.screen], detectors.REGISTRY, "detector")


# The cheapest cascade that held the whole top 1% on both committed testbeds at G=4, T=50 (bench/RESULTS.md,
# "Cascade frontier"): one noise's first step, then the full G's trajectories continued and pruned at steps 2, 10, 30.
DEFAULT_STAGES = (CascadeStage("dmem", 10.0, 1, 1), CascadeStage("dmem", 25.0, 2), CascadeStage("dmem", 80.0, 10), CascadeStage("dmem", 70.0, 30))


@dataclass(frozen=True)
class CascadeConfig(Settings):
    """The `cascade` config section."""

    enabled: bool = False  # screen every prompt through cascade.stages, then fully score only the last stage's survivors
    stages: List[CascadeStage] = knob(list(DEFAULT_STAGES))  # screens in order, each scoring the previous one's survivors (default: measured at T=50, G=4)
    audit_sample: int = knob(200, NON_NEGATIVE)  # rejected prompts fully scored to check the cascade (seeded sample; 0: no check)
    audit_seed: int = knob(0, NON_NEGATIVE)  # seed of the audit sample
    widen_factor: float = knob(2.0, (lambda v: v > 1, "above 1"))  # a stage that lost a memorized prompt keeps this many times its share on the rescreen
    # Margins from the run's own data: after a round, each stage's screen model (cxrmem/cascade_bounds.py) sets the
    # least share it must keep for its rejected prompts to hold at most target / len(stages) expected memorized ones;
    # a stage below that widens to it and the round reruns. keep_percent is then the first round's (least) share.
    # Off by default: on 320 prompts of testbed/random_markers it cost 119-229 evaluations per prompt against the fixed
    # shares' 10-68 (bench/RESULTS.md, "Cascade margins"); 0.5 is the measured setting. Not yet measured at scale.
    expected_missed_target: Optional[float] = knob(None, OPTIONAL_POSITIVE)  # expected memorized prompts the stages may lose in all (None: fixed keep_percent)
    # The fixed shares acting on their own self-check: a stage whose screen model expects more than this many
    # memorized prompts among its rejected widens by widen_factor, as on an audit miss. With the audit's default 200
    # prompts it costs nothing where nothing is lost (testbed/model 9.55 and IU X-ray 9.56 evaluations per prompt,
    # as without) and recovers one of testbed/dit's two lost members (35.2 -> 69.7); with a 20-prompt audit it
    # recovers testbed/no_markers' lost member (33.6 -> 147.8) and five of testbed/dit's seven, and costs testbed/model
    # 9.55 -> 20.1 for nothing. bench/RESULTS.md, "Cascade margins" (the screen models' weighted fit).
    widen_above_expected_missed: Optional[float] = knob(1.0, OPTIONAL_POSITIVE)  # per stage (None: only an audit miss widens)
    max_rounds: int = knob(4, POSITIVE)  # screen-check-widen rounds at most (the last one's result stands, its misses reported)
    continue_trajectories: bool = True  # a later stage continues an earlier one's trajectories of the full score's seeds and schedule (in process and on Ray)

    @staticmethod
    def check(section, key: str) -> None:
        if section.enabled and not section.stages:
            raise ConfigError(f"config key '{key}.stages' is empty: list at least one screen, or set {key}.enabled=false")
