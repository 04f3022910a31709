"""A small findings reader for the testbed's phantoms: which of the report's findings an image shows.

The phantoms draw their findings from the report text (`phantoms.parse_findings`), so a phantom's
labels are known exactly. The reader is a two-layer CNN trained on phantoms of random patients
with random findings (each finding present with probability `PRESENT`, severities, sides and zones
drawn like the renderer's), one sigmoid output per label of `LABELS`. It reads 32 x 32 images (the
testbed's size; other sizes are resized first).

Labels are the findings visible at 32 pixels; nodules and atelectasis are not among them: at this
size their marks (a 1.5-pixel nodule at a random place, a thin band) were read at 0.66 and 0.86
held-out accuracy when trained with the rest (nodules present in 30%: below chance), and a label
the reader cannot see would make every generation look unfaithful. `cxrmem testbed reader`
trains it and prints the per-label held-out accuracy.

Weights: `testbed/reader/reader.safetensors` (about 60 KB) with `reader.json` (labels, size, held-out accuracy).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cxrmem.testbed.phantoms import SEVERITY, SIDES, ZONE_Y, Findings, parse_findings, render, sample_anatomy

LABELS = (
    "cardiomegaly", "effusion_right", "effusion_left", "pneumothorax", "consolidation", "edema", "et_tube", "central_line",
    "enteric_tube",
)  # fmt: skip
PRESENT = 0.3  # chance of each finding in a training phantom
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


def random_findings(rng: np.random.Generator) -> Findings:
    """Findings drawn at random (every finding the renderer knows, so that the reader sees them all as context)."""
    yes = lambda: rng.random() < PRESENT  # noqa: E731
    severity = lambda: float(rng.choice(list(SEVERITY.values())))  # noqa: E731
    sided = lambda value: {side: value() for side in SIDES if yes()}  # noqa: E731
    return Findings(
        cardiomegaly=severity() if yes() else 0.0, effusion=sided(severity), pneumothorax=sided(severity),
        consolidation=sided(lambda: str(rng.choice(list(ZONE_Y)))), atelectasis=sided(severity),
        nodules=[(str(rng.choice(SIDES)), str(rng.choice(list(ZONE_Y))))] if yes() else [],
        edema=severity() if yes() else 0.0, et_tube=yes(), central_line=yes(), enteric_tube=yes(),
    )  # fmt: skip


def rendered(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(phantoms [n, 1, size, size] float32, labels [n, len(LABELS)] bool) of random patients and findings."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        findings = random_findings(rng)
        images.append(render(sample_anatomy(int(rng.integers(2**31))), findings, size))
        labels.append(labels_of(findings))
    return np.stack(images)[:, None], np.stack(labels)


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


@dataclass
class Trained:
    reader: FindingsReader
    accuracy: dict  # held-out accuracy per label, and "exact" (all labels right)


def accuracy(reader: FindingsReader, images: np.ndarray, labels: np.ndarray) -> dict:
    read = reader.read(torch.from_numpy(images))
    per_label = {name: float((read[:, i] == labels[:, i]).mean()) for i, name in enumerate(LABELS)}
    return {**per_label, "exact": float((read == labels).all(axis=1).mean())}


def train_reader(n_train: int = 8000, n_test: int = 1000, steps: int = 3000, seed: int = 0) -> Trained:
    """Train on `n_train` random phantoms; the accuracy is measured on `n_test` others (another seed)."""
    torch.manual_seed(seed)
    images, labels = rendered(n_train, seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).float()
    reader = FindingsReader()
    optimiser = torch.optim.Adam(reader.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(x), (128,), generator=generator)
        loss = nn.functional.binary_cross_entropy_with_logits(reader(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    reader.eval()
    return Trained(reader, accuracy(reader, *rendered(n_test, seed + 1)))


def save_reader(trained: Trained, out_dir: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.reader.state_dict().items()}, os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump({"labels": list(LABELS), "size": SIZE, "held_out_accuracy": trained.accuracy}, f, indent=1)


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
