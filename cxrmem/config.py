"""The run's configuration: the settings classes of each domain, composed, loaded from YAML and validated.

Each section is a frozen settings dataclass defined beside the code it configures (cxrmem/settings.py says
how a field declares its default and its rule); this module only composes them, merges OmegaConf YAML
from conf/ and command-line key=value overrides onto them, and checks what spans sections. Every knob has
a default and a one-line comment in its class (`cxrmem config` lists them). Unknown keys, wrong types and
out-of-range values fail fast with a `ConfigError` that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cxrmem.attribution import AttributionConfig
from cxrmem.copies.images import ImagesConfig
from cxrmem.copies.settings import CopiesConfig
from cxrmem.detectors import DetectorSettings
from cxrmem.distributed.session import RayConfig
from cxrmem.fidelity import FidelitySettings
from cxrmem.models.settings import ModelConfig
from cxrmem.publish import RunConfig
from cxrmem.report import ReportConfig
from cxrmem.scoring.settings import ScoreConfig
from cxrmem.settings import ConfigError, check_section
from cxrmem.stages.analyze import AnalyzeConfig
from cxrmem.stages.prepare import CorpusConfig
from cxrmem.stages.settings import CascadeConfig
from cxrmem.storage import StorageConfig
from cxrmem.strategies import MitigationConfig
from cxrmem.testbed.dataset import TestbedConfig

__all__ = ["ConfigError", "CxrmemConfig", "default_config", "load_config"]


@dataclass
class CxrmemConfig:
    run: RunConfig = field(default_factory=RunConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    detect: DetectorSettings = field(default_factory=DetectorSettings)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    copies: CopiesConfig = field(default_factory=CopiesConfig)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)


def default_config() -> DictConfig:
    cfg = OmegaConf.structured(CxrmemConfig)
    OmegaConf.set_readonly(cfg, False)  # the sections are frozen dataclasses; a loaded config is made read-only whole
    return cfg


def _key_error(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    message = str(getattr(err, "msg", None) or err).splitlines()[0]  # OmegaConf appends its own key dump
    return ConfigError(f"config key {key!r} {origin}: {message}")


def _read_yaml(path: Path) -> DictConfig:
    """The YAML file as a config; a syntax error names the file and the line it is on."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped ones are in conf/")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context_mark", None)
        if context is not None and mark is not None and context.line != mark.line:
            problem += f", {getattr(err, 'context', None) or 'opened'} at line {context.line + 1}"
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the syntax there") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the file must be a mapping of sections (run:, score:, ...), not a {type(loaded).__name__}")
    return loaded


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, then validation."""
    cfg = default_config()
    if path is not None:
        path = Path(path)
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(path))
        except OmegaConfBaseException as err:
            raise _key_error(err, f"in {path}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (example: score.steps=10)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _key_error(err, f"in override {item!r}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Each section against its class's declarations, then what spans sections."""
    check_section(cfg, CxrmemConfig)
    steps = cfg.score.steps
    if cfg.detect.steps > steps:
        raise ConfigError("config key 'detect.steps' must not exceed score.steps (the detectors share its schedule)")
    for i, stage in enumerate(cfg.cascade.stages):
        if cfg.cascade.enabled and stage.steps >= steps:  # the defaults are for T=50: a shorter schedule sets its own stages
            key = f"cascade.stages[{i}].steps"
            raise ConfigError(f"config key '{key}': {stage.steps!r} must be below score.steps ({steps}); set cascade.stages for this schedule")
