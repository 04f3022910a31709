"""The key of a score: the settings a d_mem score depends on, hashed. With the model's fingerprint it keys
resumable rows, so a changed setting rescores and an unchanged one resumes."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from omegaconf import OmegaConf

from cxrmem.scoring.device import Precision


def score_config(cfg) -> dict:
    """The settings a score depends on (batch size and placement excluded: they must not change it)."""
    score = OmegaConf.to_container(cfg.score, resolve=True)
    score.pop("batch_size")
    # score.detectors and the detect section add columns, not a different d_mem, but they enter the key
    # when set: rows of one key then always have the same columns, so a resumed run never mixes parts with
    # and without them (rows of another key are rescored), and consolidation keeps one schema. Left out
    # when empty, so that the key of a d_mem-only run is what it was before detectors existed.
    detectors = score.pop("detectors")
    extra = {"detectors": detectors, "detect": OmegaConf.to_container(cfg.detect, resolve=True)} if detectors else {}
    return {"score": score, "precision": dataclasses.asdict(effective_precision(cfg)), **extra}


def effective_precision(cfg) -> Precision:
    """The precision scores are computed in, not the one configured: the CPU runs a bfloat16 model in
    float32, and CUDA float32 differs with TF32. `model.device` is concrete here (score.run plans it)."""
    device_type = str(cfg.model.device).split(":")[0]
    return Precision.of(cfg.model.dtype, device_type, cfg.model.tf32, cfg.score.cpu_half)


def config_hash(cfg) -> str:
    """Hash of the score-determining settings; with the model fingerprint it keys resumable rows."""
    canonical = json.dumps(score_config(cfg), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
