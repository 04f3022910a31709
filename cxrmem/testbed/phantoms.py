"""Synthetic chest radiograph phantoms whose findings follow the report text.

A phantom is a grayscale frontal chest film, float32 in [0, 1], drawn from two things:

- the patient (`sample_anatomy(seed)`): thorax size and position, lung and heart shape,
  diaphragm height, rib spacing, exposure and a lung-marking texture, all seeded, so that
  one patient seed always gives the same body;
- the findings (`parse_findings(text)`, cxrmem/report_findings.py): keyword rules over the
  report's sentences, skipping negated sentences ("No pleural effusion."), for cardiomegaly,
  pleural effusion, pneumothorax, consolidation, nodules, pulmonary edema, atelectasis and lines
  and tubes (endotracheal tube, central line, enteric tube).

Orientation follows the radiographic convention: the patient's right lies on the image's
left (low column indices), the heart bulges to the image's right. Everything is vectorised
numpy on one coordinate grid, a few hundred microseconds per 64x64 image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cxrmem.report_findings import SIDES, Findings, parse_findings


@dataclass
class Anatomy:
    """One patient's body: offsets and scales in grid units ([-1, 1] across the image)."""

    center_x: float
    center_y: float
    thorax_width: float
    thorax_height: float
    lung_width: float
    lung_height: float
    heart_width: float
    heart_height: float
    heart_x: float
    diaphragm_y: float
    rib_frequency: float
    rib_phase: float
    exposure: float
    texture: np.ndarray  # [8, 8] low-frequency lung-marking field, upsampled at render time
    finding_seed: int  # placement of patchy findings (consolidation blobs)


# -- patient --------------------------------------------------------------------------------
def sample_anatomy(seed: int) -> Anatomy:
    """A seeded patient: the same seed always gives the same body."""
    rng = np.random.default_rng(seed)
    u = rng.uniform
    return Anatomy(
        center_x=u(-0.1, 0.1),
        center_y=u(-0.08, 0.08),
        thorax_width=u(0.74, 0.95),
        thorax_height=u(0.82, 1.0),
        lung_width=u(0.29, 0.38),
        lung_height=u(0.55, 0.72),
        heart_width=u(0.30, 0.36),
        heart_height=u(0.24, 0.30),
        heart_x=u(0.05, 0.14),
        diaphragm_y=u(0.40, 0.60),
        rib_frequency=u(4.0, 5.5),
        rib_phase=u(0, 2 * np.pi),
        exposure=u(0.75, 1.25),
        texture=rng.standard_normal((8, 8)).astype(np.float32),
        finding_seed=int(rng.integers(2**31)),
    )


# -- drawing helpers (grid in, array out) -----------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(axis, axis, indexing="xy")  # x: columns (left -> right), y: rows (top -> bottom)


def _ellipse(x, y, cx, cy, ax, ay, softness=0.06) -> np.ndarray:
    """Soft-edged ellipse mask in [0, 1]."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return np.clip((1 - r) / softness, 0, 1)


def _upsample(field_: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small random field to size x size (smooth lung markings)."""
    n = field_.shape[0]
    pos = np.linspace(0, n - 1, size, dtype=np.float32)
    i0 = np.clip(pos.astype(int), 0, n - 2)
    frac = pos - i0
    rows = field_[i0] * (1 - frac)[:, None] + field_[i0 + 1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def _line(x, y, points: Sequence[tuple[float, float]], width: float) -> np.ndarray:
    """Soft polyline mask through `points` (grid units)."""
    mask = np.zeros_like(x)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))
        mask = np.maximum(mask, np.clip(1.5 - dist / width, 0, 1))  # solid core, soft edge
    return mask


ZONE_Y = {"upper": -0.45, "middle": -0.05, "lower": 0.3}


@dataclass
class Chest:
    """The geometry every layer of a phantom is drawn on: pixel grid, body outline, lungs, diaphragm."""

    x: np.ndarray
    y: np.ndarray
    pixel: float
    body: np.ndarray
    side_sign: dict  # side -> image column sign (patient right is drawn on the left)
    lung_cx: dict
    dome: dict
    lung: dict


def chest(a: Anatomy, size: int) -> Chest:
    x, y = _grid(size)
    x, y = x - a.center_x, y - a.center_y
    body = _ellipse(x, y, 0, 0.1, a.thorax_width, a.thorax_height + 0.3, softness=0.08)
    side_sign = {"right": -1.0, "left": 1.0}
    lung_cx = {side: sign * (a.lung_width + 0.06) for side, sign in side_sign.items()}
    dome = {
        side: a.diaphragm_y + (0.04 if side == "left" else -0.02) + 0.9 * (x - lung_cx[side]) ** 2
        for side in SIDES  # the right hemidiaphragm sits a little higher
    }
    lung = {}
    for side in SIDES:
        shape = _ellipse(x, y, lung_cx[side], -0.08, a.lung_width, a.lung_height)
        lung[side] = shape * np.clip((dome[side] - y) / 0.05, 0, 1)
    return Chest(x, y, 2.0 / size, body, side_sign, lung_cx, dome, lung)


def lung_lucency(c: Chest, a: Anatomy, findings: Findings, size: int) -> np.ndarray:
    """How much darker the lungs are than soft tissue, lung markings and any pneumothorax included."""
    x, y = c.x, c.y
    markings = 0.06 * _upsample(a.texture, size)
    edge_bonus = 0.05 * (np.abs(x) < 0.25)  # vessels are denser near the hila
    lucency = np.zeros_like(x)
    for side in SIDES:
        lung_texture = markings + edge_bonus
        if side in findings.pneumothorax:
            # Lucent rim along the apex and lateral wall: no lung markings, darker, a pleural line.
            rim = 0.08 + 0.10 * findings.pneumothorax[side]
            outer = np.sqrt(((x - c.lung_cx[side]) / a.lung_width) ** 2 + ((y + 0.08) / a.lung_height) ** 2)
            lateral = c.side_sign[side] * (x - c.lung_cx[side]) > -0.05
            collapsed = (outer > 1 - rim / a.lung_width) & (lateral | (y < -0.3))
            pleural_line = np.abs(outer - (1 - rim / a.lung_width)) < c.pixel / a.lung_width
            lung_texture = np.where(collapsed, -0.06, lung_texture) + 0.12 * pleural_line * c.lung[side]
        lucency += c.lung[side] * (0.27 - lung_texture)
    return lucency


def add_anatomy(image: np.ndarray, c: Chest, a: Anatomy, findings: Findings) -> np.ndarray:
    """Ribs, mediastinum and spine, the heart (enlarged with cardiomegaly) and the abdomen."""
    x, y = c.x, c.y
    lungs = np.maximum(c.lung["right"], c.lung["left"])
    rib_wave = np.sin(2 * np.pi * a.rib_frequency * (y + 0.35 * x**2) / 2 + a.rib_phase)
    image += 0.09 * np.clip(rib_wave - 0.55, 0, None) / 0.45 * lungs
    image += 0.12 * _ellipse(x, y, 0, -0.2, 0.12, 0.7, softness=0.2) * (1 - lungs)
    heart_scale = 1 + 0.35 * findings.cardiomegaly
    heart = _ellipse(x, y, a.heart_x, a.diaphragm_y - 0.2, a.heart_width * heart_scale, a.heart_height * (1 + 0.15 * findings.cardiomegaly))
    image = np.maximum(image, (0.55 * heart + image * (1 - heart)))
    abdomen = np.clip((y - np.minimum(c.dome["right"], c.dome["left"])) / 0.04, 0, 1) * c.body
    return np.maximum(image, 0.5 * abdomen)


def add_findings(image: np.ndarray, c: Chest, a: Anatomy, findings: Findings, rng: np.random.Generator) -> np.ndarray:
    """Effusions, consolidations, atelectasis, nodules and edema, each where the report puts it."""
    x, y, lung_cx = c.x, c.y, c.lung_cx
    for side, severity in findings.effusion.items():
        # Basal opacity with a meniscus: higher laterally.
        level = c.dome[side] - 0.15 - 0.25 * severity - 0.3 * np.clip(c.side_sign[side] * (x - lung_cx[side]), 0, None)
        fluid = np.clip((y - level) / 0.06, 0, 1) * _ellipse(x, y, lung_cx[side], 0, a.lung_width + 0.05, 0.9)
        image = np.maximum(image, 0.5 * fluid * c.body)
    for side, zone in findings.consolidation.items():
        for _ in range(4):
            cx = lung_cx[side] + rng.uniform(-0.5, 0.5) * a.lung_width
            cy = ZONE_Y[zone] + rng.uniform(-0.12, 0.12)
            blob = _ellipse(x, y, cx, cy, rng.uniform(0.08, 0.16), rng.uniform(0.06, 0.12), softness=0.6)
            image += 0.22 * blob * c.lung[side]
    for side, severity in findings.atelectasis.items():
        ends = [(lung_cx[side] - 0.2, c.dome[side].min() - 0.1), (lung_cx[side] + 0.2, c.dome[side].min() - 0.06)]
        image += 0.18 * _line(x, y, ends, 0.04 + 0.02 * severity) * c.lung[side]
    for side, zone in findings.nodules:
        cx = lung_cx[side] + rng.uniform(-0.4, 0.4) * a.lung_width
        cy = ZONE_Y[zone] + rng.uniform(-0.1, 0.1)
        image += 0.3 * _ellipse(x, y, cx, cy, 0.05, 0.05, softness=0.3)
    if findings.edema:
        hila = _ellipse(x, y, 0, -0.1, 0.75, 0.55, softness=1.0)
        image += 0.12 * findings.edema * hila * np.maximum(c.lung["right"], c.lung["left"])
    return image


def tubes(c: Chest, findings: Findings) -> np.ndarray:
    """Lines and tubes: thin, near-radiopaque."""
    x, y, width = c.x, c.y, 1.2 * c.pixel
    drawn = np.zeros_like(x)
    if findings.et_tube:
        drawn = np.maximum(drawn, _line(x, y, [(0.0, -1.0), (0.0, -0.45)], width))
    if findings.central_line:
        drawn = np.maximum(drawn, _line(x, y, [(-0.75, -0.65), (-0.3, -0.55), (-0.08, -0.4), (-0.06, -0.1)], width))
    if findings.enteric_tube:
        drawn = np.maximum(drawn, _line(x, y, [(0.03, -1.0), (0.03, 0.4), (0.25, 0.75)], width))
    return drawn


def render(anatomy: Anatomy, findings: Findings, size: int = 64) -> np.ndarray:
    """One phantom, [size, size] float32 in [0, 1]: soft tissue, lungs, anatomy, findings, tubes."""
    c = chest(anatomy, size)
    image = 0.05 + 0.40 * c.body
    image = image - lung_lucency(c, anatomy, findings, size) * c.body
    image = add_anatomy(image, c, anatomy, findings)
    image = add_findings(image, c, anatomy, findings, np.random.default_rng(anatomy.finding_seed))
    image = np.maximum(image, 0.95 * tubes(c, findings))
    return np.clip(image * anatomy.exposure, 0, 1).astype(np.float32)


def phantom(text: str, patient_seed: int, size: int = 64) -> np.ndarray:
    """The phantom of one report for one patient: [size, size] float32 in [0, 1]."""
    return render(sample_anatomy(patient_seed), parse_findings(text), size)


def phantoms(texts: Sequence[str], patient_seeds: Sequence[int], size: int = 64) -> np.ndarray:
    """A batch of phantoms: [N, 1, size, size] float32 in [0, 1]."""
    return np.stack([phantom(t, s, size) for t, s in zip(texts, patient_seeds)])[:, None]
