"""What a report's text says is present: keyword rules over its sentences, negated sentences skipped.

`parse_findings(text)` gives a `Findings` record (cardiomegaly, pleural effusion, pneumothorax,
consolidation, nodules, pulmonary edema, atelectasis and lines and tubes: endotracheal tube,
central line, enteric tube). The testbed draws its phantoms from it (cxrmem/testbed/phantoms.py)
and the phantom findings reader of the fidelity measure (cxrmem/fidelity_reader.py) reads the
findings a prompt asks for with it, so both follow the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SIDES = ("right", "left")  # patient sides; right is drawn on the image's left
SEVERITY = {"trace": 0.4, "small": 0.6, "minimal": 0.5, "mild": 0.7, "moderate": 1.0, "large": 1.3, "severe": 1.4}
NEGATION = re.compile(r"\b(no|without|resolved|removed|negative for|free of)\b", re.IGNORECASE)


@dataclass
class Findings:
    """What the report says is present; sides are patient sides ("right", "left")."""

    cardiomegaly: float = 0.0  # 0: normal heart; else the severity (about 0.5 to 1.4)
    effusion: dict = field(default_factory=dict)  # side -> severity
    pneumothorax: dict = field(default_factory=dict)  # side -> severity
    consolidation: dict = field(default_factory=dict)  # side -> zone ("upper" | "middle" | "lower")
    atelectasis: dict = field(default_factory=dict)  # side -> severity
    nodules: list = field(default_factory=list)  # [(side, zone)]
    edema: float = 0.0
    et_tube: bool = False
    central_line: bool = False
    enteric_tube: bool = False


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.;:])\s+|\n+|\b\d+\.\s", text) if s and s.strip()]


def _severity(sentence: str) -> float:
    lowered = sentence.lower()
    found = [value for word, value in SEVERITY.items() if re.search(rf"\b{word}\b", lowered)]
    return max(found) if found else 0.8


def _sides(sentence: str) -> list[str]:
    lowered = sentence.lower()
    if re.search(r"\b(bilateral|bibasilar|bibasal|both)\b|effusions\b", lowered):
        return ["right", "left"]
    sides = [side for side in SIDES if re.search(rf"\b{side}\b", lowered)]
    return sides or ["right"]


def _zone(sentence: str) -> str:
    lowered = sentence.lower()
    if re.search(r"\b(upper|apical|apex)\b", lowered):
        return "upper"
    if re.search(r"\b(middle|lingula|lingular|perihilar)\b", lowered):
        return "middle"
    return "lower"


# Findings recorded per side: the Findings field, what names it in a sentence, the value kept.
SIDED_FINDINGS = (
    ("effusion", r"effusion", _severity),
    ("pneumothorax", r"pneumothorax", _severity),
    ("consolidation", r"consolidation|pneumonia|opacit", _zone),
    ("atelectasis", r"atelectasis", _severity),
)


def parse_findings(text: str) -> Findings:
    """Keyword rules, one sentence at a time; a sentence with a negation word adds nothing."""
    findings = Findings()
    for sentence in _sentences(text):
        if NEGATION.search(sentence):
            continue
        lowered = sentence.lower()
        if re.search(r"cardiomegaly|heart (size )?is enlarged|enlarged (cardiac|heart)", lowered):
            findings.cardiomegaly = max(findings.cardiomegaly, _severity(sentence))
        for name, pattern, value in SIDED_FINDINGS:
            if re.search(pattern, lowered):
                for side in _sides(sentence):
                    getattr(findings, name)[side] = value(sentence)
        if re.search(r"nodule|mass\b", lowered):
            findings.nodules.append((_sides(sentence)[0], _zone(sentence)))
        if "edema" in lowered:
            findings.edema = max(findings.edema, _severity(sentence))
        if re.search(r"endotracheal|\bet tube|\bett\b", lowered):
            findings.et_tube = True
        if re.search(r"central (venous )?line|picc|\bcvc\b|catheter", lowered):
            findings.central_line = True
        if re.search(r"enteric|nasogastric|\bng tube|\bog tube|feeding tube", lowered):
            findings.enteric_tube = True
    return findings
