"""The phantom findings reader of the fidelity measure: which of a report's findings an image shows.

A two-layer CNN, one sigmoid output per label of `LABELS`, that reads 32 x 32 grey images (other
sizes are resized first). Its labels are the findings visible at 32 pixels; nodules and
atelectasis are not among them (at this size their marks were read at 0.66 and 0.86 held-out
accuracy, and a label the reader cannot see would make every generation look unfaithful).
`text_labels` gives the findings a prompt asks for by the same keyword rules the testbed's
phantoms are drawn by (cxrmem/report_findings.py).

The testbed trains it on its phantoms (cxrmem/testbed/reader.py, `cxrmem testbed reader`).
Weights: `testbed/reader/reader.safetensors` (about 60 KB) with `reader.json` (labels, size, held-out accuracy).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from cxrmem.report_findings import Findings, parse_findings

LABELS = (
    "cardiomegaly", "effusion_right", "effusion_left", "pneumothorax", "consolidation", "edema", "et_tube", "central_line",
    "enteric_tube",
)  # fmt: skip
SIZE = 32
WEIGHTS, META = "reader.safetensors", "reader.json"


def labels_of(findings: Findings) -> np.ndarray:
    """[len(LABELS)] bool: the reader's labels of a findings record."""
    values = {
        "cardiomegaly": findings.cardiomegaly > 0,
        "effusion_right": "right" in findings.effusion,
        "effusion_left": "left" in findings.effusion,
        "pneumothorax": bool(findings.pneumothorax),
        "consolidation": bool(findings.consolidation),
        "edema": findings.edema > 0,
        "et_tube": findings.et_tube,
        "central_line": findings.central_line,
        "enteric_tube": findings.enteric_tube,
    }
    return np.array([values[name] for name in LABELS], dtype=bool)


def text_labels(texts) -> np.ndarray:
    """[N, len(LABELS)] bool: the findings each report text asks for."""
    return np.stack([labels_of(parse_findings(t)) for t in texts]) if len(texts) else np.zeros((0, len(LABELS)), bool)


class FindingsReader(nn.Module):
    """Two conv layers and a linear read-out: [M, 1, 32, 32] in [0, 1] -> [M, len(LABELS)] logits."""

    def __init__(self, n_labels: int = 0):
        super().__init__()
        n_labels = n_labels or len(LABELS)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(32 * (SIZE // 4) ** 2, n_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != SIZE or images.shape[-2] != SIZE:
            images = nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return self.head(self.features(images * 2 - 1).flatten(1))

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> np.ndarray:
        """[M, len(LABELS)] bool: the labels read from grey images [M, 1, H, W] (channels averaged if more)."""
        images = images.float().mean(dim=1, keepdim=True).to(next(self.parameters()).device)
        return (self(images) > 0).cpu().numpy()


def load_reader(folder: str, device="cpu") -> FindingsReader:
    from safetensors.torch import load_file

    path = os.path.join(folder, WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no findings reader at {path}: set fidelity.reader to a folder holding {WEIGHTS} "
                                f"(the testbed's is testbed/reader; `cxrmem testbed reader --out DIR` trains one)")
    with open(os.path.join(folder, META)) as f:
        labels = json.load(f)["labels"]
    if labels != list(LABELS):
        raise ValueError(f"{folder}/{META}: the reader reads {labels}, this code expects {list(LABELS)}; retrain it")
    reader = FindingsReader()
    reader.load_state_dict(load_file(path))
    return reader.eval().to(device)
