"""The memorization testbed: phantoms follow the report, planting is exact, a short training run
saves a model the real loader reads, and the detection metrics match hand-computed cases."""

import numpy as np
import pandas as pd
import pytest
import torch

from cxrmem.config import load_config
from cxrmem.corpus.text import count_markers
from cxrmem.testbed.evaluate import SECTION, replace_section, rms_distance
from cxrmem.testbed.phantoms import parse_findings, phantom, phantoms, render, sample_anatomy

NORMAL = "No acute cardiopulmonary process."


def tiny_testbed_config(out: str, **extra):
    overrides = {
        "testbed.out": out,
        "testbed.n_unique": 20,
        "testbed.planted_per_level": 2,
        "testbed.duplication_levels": "[3,5]",
        "testbed.image_size": 16,
        "testbed.train_steps": 2,
        "testbed.train_batch_size": 4,
        "testbed.warmup_steps": 1,
        "testbed.vocab_size": 200,
    }
    overrides.update(extra)
    return load_config("conf/test.yaml", [f"{k}={v}" for k, v in overrides.items()])


# -- phantoms -----------------------------------------------------------------------------------
def test_phantom_is_a_seeded_grayscale_image_in_unit_range():
    image = phantom(NORMAL, patient_seed=3, size=64)
    assert image.shape == (64, 64) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1
    assert np.array_equal(image, phantom(NORMAL, patient_seed=3, size=64))
    assert not np.array_equal(image, phantom(NORMAL, patient_seed=4, size=64))


def test_cardiomegaly_widens_the_heart():
    anatomy = sample_anatomy(7)
    normal = render(anatomy, parse_findings(NORMAL), 64)
    enlarged = render(anatomy, parse_findings("Severe cardiomegaly."), 64)
    rows, cols = np.nonzero(enlarged - normal > 0.05)  # pixels the bigger heart now covers
    heart_col = (anatomy.heart_x + anatomy.center_x + 1) / 2 * 64
    assert len(cols) > 30
    assert (cols < heart_col - 8).sum() > 5 and (cols > heart_col + 8).sum() > 5  # it grew on both sides
    assert (enlarged - normal).min() > -1e-6  # and nothing got darker


def test_right_effusion_raises_basal_intensity_on_the_patients_right():
    anatomy = sample_anatomy(11)
    normal = render(anatomy, parse_findings(NORMAL), 64)
    effusion = render(anatomy, parse_findings("Large right pleural effusion."), 64)
    change = effusion - normal
    base = slice(36, 52)  # rows just above the diaphragm
    # Radiographic convention: the patient's right is the image's left.
    assert change[base, :28].mean() > 0.05
    assert abs(change[base, 36:].mean()) < 0.01


def test_findings_parse_keywords_sides_and_negation():
    assert parse_findings("No pleural effusion or pneumothorax.").effusion == {}
    assert parse_findings("Small bilateral pleural effusions.").effusion.keys() == {"right", "left"}
    findings = parse_findings("Moderate left apical pneumothorax. Endotracheal tube terminates 3 cm above the carina.")
    assert set(findings.pneumothorax) == {"left"} and findings.et_tube
    assert parse_findings("Right IJ central line tip in the SVC.").central_line
    assert parse_findings("5 mm nodule in the right upper lobe.").nodules == [("right", "upper")]
    assert parse_findings("Dense left lower lobe consolidation.").consolidation == {"left": "lower"}


def test_pneumothorax_removes_lung_markings_laterally():
    anatomy = sample_anatomy(5)
    normal = render(anatomy, parse_findings(NORMAL), 64)
    collapsed = render(anatomy, parse_findings("Large left pneumothorax."), 64)
    changed = np.abs(collapsed - normal) > 1e-3
    assert changed[:, 32:].sum() > 20 * changed[:, :32].sum() + 10  # only the patient's left (image right) changes


def test_tubes_draw_bright_lines():
    anatomy = sample_anatomy(2)
    with_tube = render(anatomy, parse_findings("Endotracheal tube in standard position."), 64)
    assert with_tube.max() > 0.9 > render(anatomy, parse_findings(NORMAL), 64).max()


def test_phantom_batch_shape():
    batch = phantoms([NORMAL, "Severe cardiomegaly."], [1, 2], size=32)
    assert batch.shape == (2, 1, 32, 32)


# -- dataset ------------------------------------------------------------------------------------
def test_planting_counts_and_manifest(tmp_path):
    from cxrmem.testbed.dataset import build_training_set

    cfg = tiny_testbed_config(str(tmp_path))
    training_set = build_training_set(cfg.testbed, cfg.corpus.marker_regex)
    manifest = training_set.manifest()
    assert list(manifest.columns) == ["prompt", "n_copies", "planted"]
    assert manifest.prompt.is_unique  # planted prompts appear nowhere else
    planted = manifest[manifest.planted]
    assert len(manifest) - len(planted) == 20 and (manifest[~manifest.planted].n_copies == 1).all()
    markers = planted.prompt.map(lambda p: count_markers(p, cfg.corpus.marker_regex) > 0)
    for level in (3, 5):
        assert (planted[markers].n_copies == level).sum() == 2
        assert (planted[~markers].n_copies == level).sum() == 2
    epoch = training_set.epoch_indices(np.random.default_rng(0))
    assert np.array_equal(np.bincount(epoch, minlength=len(manifest)), manifest.n_copies.to_numpy())
    assert training_set.images.shape == (len(manifest), 1, 16, 16)


# -- training and loading -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_tiny_testbed(tmp_path_factory):
    from cxrmem.testbed.train import train

    out = str(tmp_path_factory.mktemp("testbed"))
    summary = train(tiny_testbed_config(out))
    return out, summary


def test_short_training_saves_a_loadable_pixel_space_model(trained_tiny_testbed):
    from cxrmem.models.loading import load_components

    out, summary = trained_tiny_testbed
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    components = load_components(load_config("conf/test.yaml", [f"model.path={out}"]).model)
    assert components.vae is None and components.latent_shape == (1, 16, 16)
    manifest = pd.read_csv(f"{out}/manifest.csv")
    assert list(manifest.columns) == ["prompt", "n_copies", "planted"]
    tokens = components.tokenizer(["Severe cardiomegaly."], padding="max_length", truncation=True, return_tensors="pt")
    hidden = components.text_encoder(tokens["input_ids"])[0]
    eps = components.unet(torch.zeros(1, 1, 16, 16), 999, encoder_hidden_states=hidden).sample
    assert eps.shape == (1, 1, 16, 16) and torch.isfinite(eps).all()


def test_evaluate_writes_the_results_section(trained_tiny_testbed, tmp_path):
    from cxrmem.testbed.evaluate import evaluate

    out, _ = trained_tiny_testbed
    results = tmp_path / "RESULTS.md"
    results.write_text("# Bench\n\n## Other\n\nkept\n")
    cfg = tiny_testbed_config(out, **{"testbed.eval_unique": 6, "testbed.eval_steps": 2, "testbed.results": str(results)})
    result = evaluate(cfg)
    assert result["n_planted"] == 8 and result["n_unique"] == 6
    assert [row["level"] for row in result["full"]] == ["all", 3, 5]
    text = results.read_text()
    assert "## Other\n\nkept" in text and text.count(SECTION) == 1


# -- metrics ------------------------------------------------------------------------------------
def test_rms_distance():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.5)
    assert torch.allclose(rms_distance(a, b), torch.tensor([0.5, 0.5]))


def test_replace_section_keeps_the_rest():
    section = f"{SECTION}\n\nnew\n"
    assert replace_section("", section) == section
    doc = f"# B\n\n{SECTION}\n\nold\n\n## Next\n\nx\n"
    assert replace_section(doc, section) == f"# B\n\n{SECTION}\n\nnew\n\n## Next\n\nx\n"
    assert replace_section("# B\n", section) == f"# B\n\n{section}"
