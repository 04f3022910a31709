"""Prompt text primitives: whitespace normalisation, stable prompt ids, de-identification markers.

These fix the semantics in docs/design.md (Prompts): every stage that names a prompt by id or
counts its markers goes through these three functions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

# De-identification markers: MIMIC-CXR `___` and IU X-ray `XXXX` runs (the default of corpus.marker_regex).
MARKER_REGEX = "_{2,}|X{4,}"

_WHITESPACE = re.compile(r"\s+")
# Characters that print nothing: whitespace, C0/C1 controls (NUL included), soft hyphen,
# zero-width and directional marks, word joiners, the BOM. A text made only of them is empty.
_INVISIBLE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]*")


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines and tabs included) to one space and strip; case and punctuation stay.

    A text with no visible character (only NUL, controls or zero-width marks) normalises to "".
    """
    if _INVISIBLE.fullmatch(text):
        return ""
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


@dataclass(frozen=True)
class SourceText:
    """One report as a corpus reader hands it to `build_prompts_table`.

    `text` is the extracted prompt before normalisation; a report that could not give one has
    `skip` (a reason key counted in the summary) and a `message` naming the file, row and fix.
    """

    source_id: str
    text: Optional[str]
    section: Optional[str] = None  # IMPRESSION | FINDINGS | LAST_PARAGRAPH (None: taken as is, e.g. a table cell)
    ids: Optional[dict] = None  # further source ids kept per prompt (e.g. subject_id, study)
    skip: Optional[str] = None
    message: str = ""


def skipped(source_id: str, reason: str, message: str) -> SourceText:
    return SourceText(source_id, None, skip=reason, message=message)


def pick_section(sections: dict, last_paragraph: str, order) -> tuple[Optional[str], str]:
    """The first non-blank section in `order` (names from config SECTIONS); (None, "") if none has text."""
    for name in order:
        text = last_paragraph if name == "LAST_PARAGRAPH" else sections.get(name)
        if text and text.strip():
            return name, text
    return None, ""


def decode_utf8(data: bytes, where: str, file_offset: int = 0) -> tuple[Optional[str], str]:
    """Decoded text, or None and a message naming `where` and the file byte offset of the first bad byte.

    `file_offset` is where `data` starts in its file (a cell or line of a larger file).
    """
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 4]
        return None, f"{where}: invalid UTF-8 at byte offset {file_offset + err.start} ({bad!r}); re-encode the file as UTF-8"


_CLOSING = ",.;:!?)]"
_JOINERS = ",;:-"


def delete_span(text: str, start: int, end: int) -> str:
    """`text` without text[start:end], tidied only where the cut was.

    No double spaces, no space before closing punctuation, no doubled separator (", ," or "--"),
    no empty parentheses, no separator left at the start, and a hyphen glued to the cut word goes
    with it ("a ___-year-old" -> "a year-old").
    """
    left, right = text[:start].rstrip(), text[end:].lstrip()
    if right.startswith("-") and (start == 0 or text[start - 1].isspace()):
        right = right[1:].lstrip()
    if left.endswith("(") and right.startswith(")"):
        left, right = left[:-1].rstrip(), right[1:].lstrip()
    if left and left[-1] in _JOINERS and right[:1] and right[0] in _JOINERS + _CLOSING:
        left = left[:-1].rstrip()
    if not left:
        right = right.lstrip(_JOINERS + _CLOSING + " ")
    glue = "" if not left or not right or right[0] in _CLOSING or left[-1] in "([" else " "
    return left + glue + right


def delete_markers(text: str, pattern: re.Pattern) -> str:
    """Every match of `pattern` deleted with delete_span (right to left, so earlier spans stay valid)."""
    for match in reversed(list(pattern.finditer(text))):
        text = delete_span(text, match.start(), match.end())
    return text
