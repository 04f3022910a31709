"""Prompt text primitives: whitespace normalisation, stable prompt ids, de-identification markers.

These fix the semantics in DESIGN.md (Prompts): every stage that names a prompt by id or
counts its markers goes through these three functions.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

from cxrmem.config import CorpusConfig

# MIMIC-CXR `___` and IU X-ray `XXXX` runs (config: corpus.marker_regex).
MARKER_REGEX = CorpusConfig.marker_regex

_WHITESPACE = re.compile(r"\s+")


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines and tabs included) to one space and strip; case and punctuation stay."""
    return _WHITESPACE.sub(" ", text).strip()


def prompt_id(text: str) -> str:
    """First 16 hex characters of the sha256 of the UTF-8 text (pass it normalised)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@lru_cache(maxsize=16)
def compile_marker_regex(regex: str = MARKER_REGEX) -> re.Pattern:
    return re.compile(regex)


def count_markers(text: str, regex: str = MARKER_REGEX) -> int:
    """Number of non-overlapping de-identification marker runs in `text`."""
    return sum(1 for _ in compile_marker_regex(regex).finditer(text))
