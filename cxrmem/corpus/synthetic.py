"""A seeded synthetic MIMIC-CXR-style report corpus (no real patient text exists on dev machines).

Each report is a full free-text report as MIMIC-CXR distributes it (FINAL REPORT, EXAMINATION,
INDICATION, TECHNIQUE, COMPARISON, FINDINGS, IMPRESSION; lines wrapped with a leading space),
with `___` de-identification markers where MIMIC-CXR has them: ages in the indication, dates in
the comparison, and, in a share `marker_rate` of the abnormal impressions, comparison dates,
physician names and notification times.

The duplicate structure is heavy-tailed like the real corpus: a share `normal_share` of the
reports draws from a handful of normal impressions with Zipf weights (the top one is shared by
thousands of reports at 10K+), while abnormal impressions combine findings with sides, sizes,
measurements and change phrases, so that most of them are unique.

A corpus's phrasing grows with it, as a hospital's does over the years its reports span (more
radiologists, more house styles): the first `STYLED_FROM_BLOCK` blocks are written in one style,
and each later block brings `STYLES_PER_BLOCK` more (a lead-in and a closing sentence, up to
`len(_LEADS) * len(_CLOSES)` styles), each abnormal report drawing its style uniformly from the
styles its block has. Without this the single-finding impressions (a few thousand phrasings) are
exhausted near 100K reports and the unique prompts saturate (246,000 reports gave 79,542); with it
the reports per unique prompt stay near 2.5 up to 330K reports (`REPORTS_PER_UNIQUE`), with the
same head and tail shares as at 32K (tests/test_corpus_text.py). Normal impressions
never take a style, so the Zipf head is the same at every size; corpora of up to
`STYLED_FROM_BLOCK * BLOCK` reports are exactly what they were before styles existed.

Finding keywords appear only affirmatively, never negated, so that a phantom renderer can key on
them: see `FINDING_KEYWORDS`.

All random draws are vectorised per block of `BLOCK` reports with a numpy Generator seeded by
(seed, block index); a report depends only on (seed, its index), so a corpus of n reports is
the prefix of any longer corpus with the same seed, and `iter_reports` streams 1M reports in
constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from cxrmem.settings import NON_NEGATIVE, POSITIVE, UNIT_CLOSED, UNIT_HALF_OPEN, Settings, knob


@dataclass(frozen=True)
class SyntheticCorpusConfig(Settings):
    """The `corpus.synthetic` config section."""

    n_reports: int = knob(20000, POSITIVE)  # number of synthetic MIMIC-style reports to generate
    seed: int = knob(0, NON_NEGATIVE)  # generator seed: the same seed gives the same corpus
    marker_rate: float = knob(0.3, UNIT_CLOSED)  # share of abnormal reports that carry `___` de-identification markers
    normal_share: float = knob(0.35, UNIT_HALF_OPEN)  # share of reports drawn from the few shared normal impressions

BLOCK = 16384
STYLED_FROM_BLOCK = 4  # blocks in the house style only: corpora up to 65,536 reports are unchanged
STYLES_PER_BLOCK = 1  # styles each later block adds: 1 keeps reports per unique prompt near 2.46 (2 gave 2.27 at 330K)
# Reports per unique prompt at the default rates, seed 0: 2.46 at 32K, 2.67 at 65K (the house style's
# impressions spent, styles not yet grown), 2.54 at 131K, 2.47 at 250K, 2.45 at 330K; 2.5 asks enough from 250K on.
REPORTS_PER_UNIQUE = 2.5

NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "No acute intrathoracic process.",
    "No evidence of acute cardiopulmonary disease.",
    "Normal chest radiograph.",
    "No acute cardiopulmonary process. No radiographic evidence of pneumonia.",
    "Lungs are clear. No acute cardiopulmonary process.",
    "No acute findings in the chest.",
    "No significant interval change. No acute cardiopulmonary process.",
    "Clear lungs without evidence of acute disease.",
)
# Zipf weights: the first normal impression dominates, the last ones are rarer.
_NORMAL_WEIGHTS = 1.0 / np.arange(1, len(NORMAL_IMPRESSIONS) + 1) ** 1.1
_NORMAL_WEIGHTS /= _NORMAL_WEIGHTS.sum()

FINDING_KEYWORDS = (
    "cardiomegaly",
    "pleural effusion",
    "pneumothorax",
    "consolidation",
    "nodule",
    "endotracheal tube",
    "central line",
    "pulmonary edema",
    "atelectasis",
    "enteric tube",
)

_SEVERITY = ("Mild", "Moderate", "Severe", "Borderline")
_SIZE = ("Small", "Moderate", "Large", "Trace")
_SIDE = ("left", "right", "bilateral")
_LOBE = ("right lower lobe", "left lower lobe", "right middle lobe", "left upper lobe", "right upper lobe", "lingular")
_CHANGE = (
    "",
    ", unchanged",
    ", increased since the prior study",
    ", slightly decreased",
    ", new since the prior exam",
    ", not significantly changed",
)
_LINE_TIP = ("mid SVC", "low SVC", "cavoatrial junction", "right atrium", "upper SVC")
_LINE_ACCESS = ("Right internal jugular", "Left internal jugular", "Right subclavian", "Left subclavian", "Right PICC")


# One phrase per finding kind; `r` is a random integer that picks the variant by mixed radix.
def _cardiomegaly(r: int) -> str:
    return f"{_SEVERITY[r % 4]} cardiomegaly{_CHANGE[r // 4 % 6]}."


def _pleural_effusion(r: int) -> str:
    side = _SIDE[r % 3]
    noun = "pleural effusions" if side == "bilateral" else "pleural effusion"
    return f"{_SIZE[r // 3 % 4]} {side} {noun}{_CHANGE[r // 12 % 6]}."


def _pneumothorax(r: int) -> str:
    size = ("Small", "Tiny", "Moderate", "Large")[r % 4]
    return f"{size} {_SIDE[r // 4 % 2]} apical pneumothorax{_CHANGE[r // 8 % 6]}."


def _consolidation(r: int) -> str:
    lobe = _LOBE[r % 6]
    tail = (", concerning for pneumonia", ", which may reflect aspiration or pneumonia", "")[r // 6 % 3]
    return f"{('Patchy', 'Focal', 'Dense')[r // 18 % 3]} {lobe} consolidation{tail}."


def _nodule(r: int) -> str:
    size = 4 + r % 22
    return f"{size} mm nodule in the {_LOBE[r // 22 % 6]}. Recommend chest CT for further evaluation."


def _endotracheal_tube(r: int) -> str:
    cm = 1.5 + (r % 56) / 10
    return f"Endotracheal tube terminates {cm:.1f} cm above the carina."


def _central_line(r: int) -> str:
    return f"{_LINE_ACCESS[r % 5]} central line with tip in the {_LINE_TIP[r // 5 % 5]}."


def _pulmonary_edema(r: int) -> str:
    return f"{_SEVERITY[r % 3]} pulmonary edema{_CHANGE[r // 3 % 6]}."


def _atelectasis(r: int) -> str:
    where = ("Left basilar", "Right basilar", "Bibasilar", "Minimal bibasilar", "Left retrocardiac")[r % 5]
    return f"{where} atelectasis{_CHANGE[r // 5 % 6]}."


def _enteric_tube(r: int) -> str:
    tip = ("in the stomach", "in the distal esophagus", "beyond the field of view", "in the gastric fundus")[r % 4]
    return f"Enteric tube courses below the diaphragm with tip {tip}."


_FINDINGS = (
    _cardiomegaly,
    _pleural_effusion,
    _pneumothorax,
    _consolidation,
    _nodule,
    _endotracheal_tube,
    _central_line,
    _pulmonary_edema,
    _atelectasis,
    _enteric_tube,
)
_DEVICES = {5, 6, 9}  # tubes and lines: the study is a portable AP film
_FINDING_WEIGHTS = np.array([14, 16, 6, 12, 6, 8, 8, 12, 14, 4], dtype=float)
_FINDING_WEIGHTS /= _FINDING_WEIGHTS.sum()
_N_FINDINGS_P = (0.55, 0.3, 0.15)

# Where MIMIC-CXR impressions carry `___`: comparison dates, physician names, times.
_MARKER_PREFIXES = (
    "Compared to ___: ",
    "AP chest compared to ___: ",
    "In comparison with the study of ___: ",
    "As compared to the previous radiograph from ___: ",
)
_MARKER_SUFFIXES = (
    " Dr. ___ was notified of the findings by telephone at ___ a.m. on ___.",
    " Findings were discussed with Dr. ___ at ___ p.m. on the day of the study.",
    " These findings were communicated to Dr. ___ by Dr. ___ at ___ on ___ by telephone.",
    " Change since ___ is minimal.",
)
# House styles: style s = (_LEADS[s % 8], _CLOSES[s // 8]); style 0 is the original phrasing.
_LEADS = (
    "",
    "There is ",
    "Again noted is ",
    "Redemonstrated ",
    "Radiographic findings of ",
    "Chest radiograph shows ",
    "Frontal and lateral views show ",
    "Single view shows ",
)
_CLOSES = (
    "",
    " Clinical correlation is recommended.",
    " Recommend follow-up radiograph after treatment.",
    " Findings are similar to the outside study.",
    " Please correlate clinically.",
    " Consider repeat imaging if symptoms persist.",
    " Assessment is limited by patient rotation.",
    " Assessment is limited by low lung volumes.",
)
_TAILS = ("", "", " Otherwise, no acute cardiopulmonary process.", " No other acute abnormality.")

_INDICATIONS = (
    "with cough and fever, eval for pneumonia",
    "with shortness of breath",
    "with chest pain",
    "status post intubation, evaluate tube placement",
    "with new central line, eval line placement",
    "with CHF exacerbation, eval for edema",
    "with hypoxia",
    "pre-operative evaluation",
    "with history of lung nodule, follow-up",
    "with fall, eval for rib fracture",
)
_EXAMS = ("CHEST (PA AND LAT)", "CHEST (PORTABLE AP)", "CHEST (PRE-OP PA AND LAT)")
_TECHNIQUES = ("Chest PA and lateral", "Portable AP upright chest radiograph", "Chest PA and lateral")
_COMPARISONS = ("___", "Chest radiograph from ___.", "None.", "Multiple prior chest radiographs, most recent ___.")
_NORMAL_FINDINGS = (
    "The lungs are clear. The cardiomediastinal silhouette and hilar contours are normal.",
    "Heart size is normal. Mediastinal and hilar contours are unremarkable. Lungs are clear.",
    "Lungs are well expanded and clear. Cardiac and mediastinal silhouettes are within normal limits.",
)


def _wrap(text: str, width: int = 76) -> str:
    """Break at spaces into lines of at most `width` characters, each with MIMIC's leading space."""
    lines = []
    while len(text) > width:
        cut = text.rfind(" ", 0, width)
        cut = cut if cut > 0 else width
        lines.append(text[:cut])
        text = text[cut + 1 :]
    lines.append(text)
    return " " + "\n ".join(lines)


def n_styles(block: int) -> int:
    """House styles a block's abnormal reports draw from: 1 at first, then `STYLES_PER_BLOCK` more per block."""
    return min(len(_LEADS) * len(_CLOSES), 1 + STYLES_PER_BLOCK * max(0, block - STYLED_FROM_BLOCK + 1))


def _impression(kinds: list[int], rolls: list[int], tail: int, numbered: bool, style: int = 0) -> tuple[str, bool]:
    """Abnormal impression from up to three finding slots in house style `style`; also whether a device is present."""
    seen, phrases, device = set(), [], False
    for kind, roll in zip(kinds, rolls):
        if kind in seen:
            continue
        seen.add(kind)
        device |= kind in _DEVICES
        phrases.append(_FINDINGS[kind](roll))
    if numbered and len(phrases) > 1:
        body = "\n".join(f"{i}. {p}" for i, p in enumerate(phrases, 1))
    else:
        lead = _LEADS[style % len(_LEADS)]  # a lead-in reads as one sentence with the first finding
        body = " ".join(phrases)
        body = lead + body[0].lower() + body[1:] if lead else body
    return body + _CLOSES[style // len(_LEADS)] + _TAILS[tail], device


def _mark(impression: str, mode: int, roll: int) -> str:
    """Add comparison-date / physician / time markers: prefix (mode 0), suffix (1) or both (2)."""
    if mode in (0, 2):
        impression = _MARKER_PREFIXES[roll % 4] + impression
    if mode in (1, 2):
        impression = impression + _MARKER_SUFFIXES[roll // 4 % 4]
    return impression


def _full_text(impression: str, findings: str, header: int, portable: bool) -> str:
    exam = 1 if portable else (0, 2)[header % 2]
    sex = ("man", "woman")[header // 2 % 2]
    indication = _INDICATIONS[header // 4 % 10]
    comparison = _COMPARISONS[header // 40 % 4]
    wrapped = "\n".join(_wrap(line) for line in impression.split("\n"))  # numbered items keep their own lines
    return (
        "                                 FINAL REPORT\n"
        f" EXAMINATION:  {_EXAMS[exam]}\n \n"
        f" INDICATION:  ___-year-old {sex} {indication}\n \n"
        f" TECHNIQUE:  {_TECHNIQUES[exam]}\n \n"
        f" COMPARISON:  {comparison}\n \n"
        f" FINDINGS: \n \n{_wrap(findings)}\n \n"
        f" IMPRESSION: \n \n{wrapped}\n"
    )


def _block(seed: int, block: int, start: int, stop: int, marker_rate: float, normal_share: float) -> list[dict]:
    """Reports with global indices [start, stop) of block `block` (all drawn, then sliced: prefix-stable)."""
    rng = np.random.default_rng([seed, block])
    m = BLOCK
    normal = (rng.random(m) < normal_share).tolist()
    normal_idx = rng.choice(len(NORMAL_IMPRESSIONS), m, p=_NORMAL_WEIGHTS).tolist()
    n_findings = (rng.choice(3, m, p=_N_FINDINGS_P) + 1).tolist()
    kinds = rng.choice(len(_FINDINGS), (m, 3), p=_FINDING_WEIGHTS).tolist()
    rolls = rng.integers(0, 1 << 30, (m, 3)).tolist()
    marked = (rng.random(m) < marker_rate).tolist()
    marker_mode = rng.integers(0, 3, m).tolist()
    # One integer per report drives the small choices (tail, numbering, marker wording, header).
    misc = rng.integers(0, 1 << 30, m).tolist()
    # Drawn last so that the draws above, and so the unstyled blocks, are what they were before styles.
    style = (rng.integers(0, 1 << 30, m) % n_styles(block)).tolist()

    reports = []
    for j in range(start - block * BLOCK, stop - block * BLOCK):
        i = block * BLOCK + j
        r = misc[j]
        if normal[j]:
            impression, portable = NORMAL_IMPRESSIONS[normal_idx[j]], False
            findings = _NORMAL_FINDINGS[r % 3]
        else:
            k = n_findings[j]
            impression, portable = _impression(kinds[j][:k], rolls[j][:k], r % 4, r // 4 % 5 < 2, style[j])
            if marked[j]:
                impression = _mark(impression, marker_mode[j], r // 20)
            findings = " ".join(_FINDINGS[kind](roll) for kind, roll in zip(kinds[j][:k], rolls[j][:k]))
        # Unique, MIMIC-shaped ids: an affine map of the index (coprime step) keeps them distinct.
        subject = 10_000_000 + ((i // 4) * 104_729 + 99_991) % 9_000_000
        study = 50_000_000 + (i * 7_919 + 12_345) % 40_000_000
        reports.append(
            {
                "report_id": f"p{subject // 1_000_000}/p{subject}/s{study}",
                "subject_id": f"p{subject}",
                "study": f"s{study}",
                "text": _full_text(impression, findings, r // 320, portable),
                "impression": impression,
            }
        )
    return reports


def iter_reports(
    n: int, seed: int = 0, marker_rate: float = 0.3, normal_share: float = 0.35
) -> Iterator[dict]:
    """Stream `n` synthetic reports (dicts with report_id, subject_id, study, text, impression)."""
    if n < 0:
        raise ValueError(f"number of synthetic reports must be non-negative, got {n}")
    if not 0 <= marker_rate <= 1 or not 0 <= normal_share < 1:
        raise ValueError(f"marker_rate must be in [0, 1] and normal_share in [0, 1), got {marker_rate}, {normal_share}")
    for block in range((n + BLOCK - 1) // BLOCK):
        start, stop = block * BLOCK, min(n, (block + 1) * BLOCK)
        yield from _block(seed, block, start, stop, marker_rate, normal_share)


def generate_reports(n: int, seed: int = 0, marker_rate: float = 0.3, normal_share: float = 0.35) -> list[dict]:
    """`n` synthetic MIMIC-style reports; the same (n, seed, rates) always gives the same list."""
    return list(iter_reports(n, seed, marker_rate, normal_share))


def tokenizer_texts(n_reports: int = 2000, seed: int = 0) -> list[str]:
    """Text to train a tiny model's tokenizer on: synthetic reports and their impressions."""
    reports = generate_reports(n_reports, seed=seed)
    return [r["text"] for r in reports] + [r["impression"] for r in reports]
