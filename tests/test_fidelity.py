"""Fidelity: the phantom findings reader is right on held-out phantoms, and a generation is judged by its prompt's findings."""

from pathlib import Path

import pytest
import torch

from cxrmem.fidelity import FidelitySettings, make_fidelity
from cxrmem.fidelity_reader import LABELS, load_reader, text_labels
from cxrmem.testbed.phantoms import phantoms
from cxrmem.testbed.reader import accuracy, rendered

READER = str(Path(__file__).resolve().parents[1] / "testbed" / "reader")
TEXTS = [
    "Moderate cardiomegaly. Large left pleural effusion.",
    "Endotracheal tube terminates 4 cm above the carina. Right PICC line in place.",
    "No acute cardiopulmonary process.",
]


def test_text_labels_follow_the_report():
    labels = dict(zip(LABELS, text_labels(TEXTS[:1])[0]))
    assert labels["cardiomegaly"] and labels["effusion_left"] and not labels["effusion_right"]
    assert sum(labels.values()) == 2 and not text_labels(TEXTS[2:]).any()  # negated: nothing present


def test_the_committed_reader_is_right_on_held_out_phantoms():
    reader = load_reader(READER)
    images, labels = rendered(300, seed=987654)  # neither the training (0) nor the evaluation (1) seed
    scores = accuracy(reader, images, labels)
    assert all(scores[name] >= 0.85 for name in LABELS), scores
    chance = float(((labels == labels.mean(axis=0).round()).all(axis=1)).mean())  # always answering each label's majority
    assert scores["exact"] >= 0.5 and scores["exact"] > chance + 0.2, scores


def test_fidelity_is_the_share_of_generations_with_the_prompts_findings():
    fidelity = make_fidelity(FidelitySettings(measure="phantom_reader", reader=READER))
    seeds = list(range(100, 108))
    own = torch.stack([torch.from_numpy(phantoms([t] * len(seeds), seeds, 32)) for t in TEXTS])  # [3, 8, 1, 32, 32]
    right = fidelity(own, TEXTS)
    wrong = fidelity(own, [TEXTS[1], TEXTS[2], TEXTS[0]])  # each prompt's images read against another prompt
    assert (right >= 0.75).all() and (wrong <= 0.25).all(), (right, wrong)
    noise = torch.rand(1, 8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert fidelity(noise, TEXTS[:1])[0] <= 0.25


def test_no_measure_and_a_missing_reader():
    assert make_fidelity(FidelitySettings()) is None
    with pytest.raises(FileNotFoundError, match="fidelity.reader"):
        make_fidelity(FidelitySettings(measure="phantom_reader", reader="/nonexistent"))
    with pytest.raises(ValueError, match="phantom_reader"):
        make_fidelity(FidelitySettings(measure="clip"))
