"""Realistic surrogates for de-identification markers, chosen by the words around each marker.

The paper's curator recommendation: a uniform marker (`___`) is one distinctive token shared by
tens of thousands of prompts, which the model can latch onto; a varied, realistic surrogate
(a date after "compared to", a name after "Dr.", a time before "a.m.", an age before
"-year-old") carries no such shared key. Every draw comes from the `rng` passed in, so a
rewrite is reproducible from its seed.

The types are recognised from the marker's context only (the MIMIC-CXR impression idioms):

- age:  the marker is followed by "-year-old", "year old", "yo" or "y/o";
- time: followed by "a.m." / "p.m.", or preceded by "at";
- name: preceded by a title ("Dr.", "Mr.", ...) or a notification verb ("notified", "paged",
  "discussed with", "communicated to", ...);
- date: preceded by a comparison or date phrase ("compared to", "on", "dated", "since", "from",
  "study of", "most recent", ...);
- generic: anything else. Its surrogate is a date or a name at random: an unknown context most
  often hides one of the two in radiology reports, and either breaks the shared marker token.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

SURROGATE_TYPES = ("date", "time", "name", "age", "generic")

_AGE_AFTER = re.compile(r"^\s*-?\s*(year|yr|yo\b|y/o|y\.o\.)", re.IGNORECASE)
_MERIDIEM_AFTER = re.compile(r"^\s*(a\.?m\.?|p\.?m\.?)(?![a-z])", re.IGNORECASE)
_TIME_BEFORE = re.compile(r"\b(at|approximately|around)\s*$", re.IGNORECASE)
_TITLE_BEFORE = re.compile(r"\b(dr|mr|mrs|ms|miss|prof|doctor)\.?\s*$", re.IGNORECASE)
_NAME_BEFORE = re.compile(
    r"\b(notified|paged|informed|called|contacted|telephoned|discussed with|communicated to|"
    r"conveyed to|reported to|relayed to|by)\s*$",
    re.IGNORECASE,
)
_DATE_BEFORE = re.compile(
    r"\b(compared to|compared with|comparison to|comparison with|comparison|on|dated|since|from|"
    r"of|prior|prior to|previous|most recent|through|until|as of)\s*:?\s*$",
    re.IGNORECASE,
)
_CONTEXT_CHARS = 40

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_FIRST_NAMES = (
    "James", "Maria", "Robert", "Linda", "Michael", "Patricia", "David", "Susan", "Daniel", "Karen",
    "Wei", "Priya", "Ahmed", "Sofia", "Kenji", "Fatima", "Lucas", "Amara", "Mateo", "Ingrid",
)  # fmt: skip
_SURNAMES = (
    "Smith", "Johnson", "Garcia", "Nguyen", "Patel", "Kim", "Okafor", "Rossi", "Schmidt", "Cohen",
    "Brown", "Martinez", "Chen", "Silva", "Kowalski", "Murphy", "Haddad", "Tanaka", "Novak", "Larsen",
    "Alvarez", "Singh", "Dubois", "Ivanova", "Mensah", "Fischer", "Lopez", "Walsh", "Yilmaz", "Park",
)  # fmt: skip


def marker_type(text: str, start: int, end: int) -> str:
    """The surrogate type of the marker at text[start:end], from the words around it."""
    before = text[max(0, start - _CONTEXT_CHARS) : start]
    after = text[end : end + _CONTEXT_CHARS]
    if _AGE_AFTER.match(after):
        return "age"
    if _MERIDIEM_AFTER.match(after) or _TIME_BEFORE.search(before):
        return "time"
    if _TITLE_BEFORE.search(before) or _NAME_BEFORE.search(before):
        return "name"
    if _DATE_BEFORE.search(before):
        return "date"
    return "generic"


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def random_date(rng: np.random.Generator) -> str:
    year, month, day = int(rng.integers(2008, 2020)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    formats = (
        f"{month}/{day}/{year}",
        f"{month:02d}/{day:02d}/{year}",
        f"{year}-{month:02d}-{day:02d}",
        f"{_MONTHS[month - 1]} {day}, {year}",
        f"{_MONTHS[month - 1][:3]} {day}",
    )
    return _pick(rng, formats)


def random_time(rng: np.random.Generator, meridiem_follows: bool) -> str:
    hour, minute = int(rng.integers(1, 13)), int(rng.integers(0, 60))
    if meridiem_follows:
        return f"{hour}:{minute:02d}"
    return f"{hour}:{minute:02d} {_pick(rng, ('a.m.', 'p.m.'))}"


def random_name(rng: np.random.Generator, title_before: bool) -> str:
    if title_before:
        return _pick(rng, _SURNAMES)
    return f"{_pick(rng, _FIRST_NAMES)} {_pick(rng, _SURNAMES)}"


def surrogate(text: str, start: int, end: int, rng: np.random.Generator) -> tuple[str, str]:
    """(type, surrogate text) for the marker at text[start:end]."""
    kind = marker_type(text, start, end)
    drawn = kind if kind != "generic" else _pick(rng, ("date", "name"))
    if drawn == "age":
        return kind, str(int(rng.integers(18, 96)))
    if drawn == "time":
        return kind, random_time(rng, bool(_MERIDIEM_AFTER.match(text[end : end + _CONTEXT_CHARS])))
    if drawn == "name":
        return kind, random_name(rng, bool(_TITLE_BEFORE.search(text[max(0, start - _CONTEXT_CHARS) : start])))
    return kind, random_date(rng)


def replace_with_surrogates(text: str, pattern: re.Pattern, rng: np.random.Generator) -> tuple[str, Counter]:
    """`text` with every marker replaced by a surrogate for its context, and the count per type.

    Contexts are read from the original text, so a replacement never changes how a later marker
    is classified.
    """
    counts: Counter = Counter()
    pieces, last = [], 0
    for match in pattern.finditer(text):
        kind, replacement = surrogate(text, match.start(), match.end(), rng)
        counts[kind] += 1
        pieces += [text[last : match.start()], replacement]
        last = match.end()
    pieces.append(text[last:])
    return "".join(pieces), counts
