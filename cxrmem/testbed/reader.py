"""Training the phantom findings reader (cxrmem/fidelity_reader.py) on the testbed's phantoms.

The phantoms draw their findings from the report text (`report_findings.parse_findings`), so a
phantom's labels are known exactly. The reader is trained on phantoms of random patients with
random findings (each finding present with probability `PRESENT`, severities, sides and zones
drawn like the renderer's) at 32 x 32 (the testbed's size).

Nodules and atelectasis are not among its labels: at this size their marks (a 1.5-pixel nodule at
a random place, a thin band) were read at 0.66 and 0.86 held-out accuracy when trained with the
rest (nodules present in 30%: below chance). `cxrmem testbed reader` trains it and prints the
per-label held-out accuracy.

Weights: `testbed/reader/reader.safetensors` (about 60 KB) with `reader.json` (labels, size, held-out accuracy).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cxrmem.fidelity_reader import LABELS, META, SIZE, WEIGHTS, FindingsReader, labels_of
from cxrmem.report_findings import SEVERITY, SIDES, Findings
from cxrmem.testbed.phantoms import ZONE_Y, render, sample_anatomy

PRESENT = 0.3  # chance of each finding in a training phantom


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
