"""The memorization testbed: phantoms follow the report, planting is exact, a short training run
saves a model the real loader reads, and the detection metrics match hand-computed cases."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from cxrmem.config import load_config
from cxrmem.corpus.text import count_markers
from cxrmem.results_page import replace_section
from cxrmem.testbed.evaluate import SECTIONS, evaluation_prompts, rms_distance, template_ranking
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
    training_set = build_training_set(cfg.testbed, cfg.corpus)
    manifest = training_set.manifest()
    assert list(manifest.columns) == ["prompt", "n_copies", "planted", "n_images"]
    assert manifest.prompt.is_unique  # planted prompts appear nowhere else
    planted = manifest[manifest.planted]
    assert len(manifest) - len(planted) == 20 and (manifest[~manifest.planted].n_copies == 1).all()
    assert (manifest.n_images == 1).all()  # synthetic prompts are deduplicated: one image each
    markers = planted.prompt.map(lambda p: count_markers(p, cfg.corpus.marker_regex) > 0)
    for level in (3, 5):
        assert (planted[markers].n_copies == level).sum() == 2
        assert (planted[~markers].n_copies == level).sum() == 2
    epoch = training_set.epoch_indices(np.random.default_rng(0))
    assert np.array_equal(np.bincount(epoch, minlength=len(manifest)), manifest.n_copies.to_numpy())
    assert training_set.images.shape == (len(manifest), 1, 16, 16)


def test_iuxray_keeps_natural_duplicates_and_plants_singletons(tmp_path):
    from collections import Counter

    from cxrmem.corpus.text import normalise_whitespace
    from cxrmem.testbed.dataset import build_training_set, source_impressions

    cfg = tiny_testbed_config(str(tmp_path), **{"testbed.source": "iuxray", "testbed.n_unique": 5000, "corpus.max_reports": 300})
    reports = Counter(source_impressions(cfg.testbed, cfg.corpus))
    training_set = build_training_set(cfg.testbed, cfg.corpus)
    manifest = training_set.manifest()
    planted, natural = manifest[manifest.planted], manifest[~manifest.planted]
    markers = planted.prompt.map(lambda p: count_markers(p, cfg.corpus.marker_regex) > 0)
    assert all("XXXX" in p for p in planted.prompt[markers]) and markers.sum() == 4
    for level in (3, 5):
        assert (planted[markers].n_copies == level).sum() == 2 and (planted[~markers].n_copies == level).sum() == 2
    assert (planted.n_images == 1).all() and all(reports[p] == 1 for p in planted.prompt)  # one fixed image each
    # Every other report is one pair with its own image: templates have n_images == n_copies > 1.
    assert dict(zip(natural.prompt, natural.n_copies)) == {p: n for p, n in reports.items() if p not in set(planted.prompt)}
    assert (natural.n_images == natural.n_copies).all() and natural.n_copies.max() > 5
    assert len(training_set.images) == sum(reports.values())
    epoch = training_set.epoch_indices(np.random.default_rng(0))
    per_prompt = np.bincount(training_set.image_prompt[epoch], minlength=len(manifest))
    assert np.array_equal(per_prompt, manifest.n_copies.to_numpy())
    top = int(natural.n_copies.idxmax())
    top_images = training_set.images[training_set.image_prompt == top]
    assert len(top_images) == manifest.n_copies[top] and not np.array_equal(top_images[0], top_images[1])
    assert normalise_whitespace(manifest.prompt[top]) == manifest.prompt[top]


def test_a_heldout_share_is_never_trained_on_and_becomes_the_reference(tmp_path):
    """testbed.heldout_share keeps the last share of the unplanted distinct impressions (seeded order) out
    of training; with 0 the training set is the one it always was."""
    from cxrmem.testbed.dataset import build_training_set, source_impressions

    overrides = {"testbed.source": "iuxray", "testbed.n_unique": 5000, "corpus.max_reports": 300}
    cfg = tiny_testbed_config(str(tmp_path), **overrides)
    whole = build_training_set(cfg.testbed, cfg.corpus)
    split = build_training_set(tiny_testbed_config(str(tmp_path), **overrides, **{"testbed.heldout_share": 0.3}).testbed, cfg.corpus)
    assert whole.heldout == () and whole.reference().empty
    heldout, trained = set(split.heldout), set(split.prompts)
    assert heldout and not heldout & trained  # never trained on: every report of a held-out impression is out
    assert trained | heldout == set(whole.prompts) and list(split.planted).count(True) == list(whole.planted).count(True)
    unplanted = len(whole.prompts) - int(whole.planted.sum())
    assert len(heldout) == round(0.3 * unplanted)
    assert len(split.images) == len(whole.images) - sum(n for p, n in Counter(source_impressions(cfg.testbed, cfg.corpus)).items() if p in heldout)
    assert list(split.reference().prompt) == list(split.heldout)


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
    assert list(manifest.columns) == ["prompt", "n_copies", "planted", "n_images"]
    tokens = components.tokenizer(["Severe cardiomegaly."], padding="max_length", truncation=True, return_tensors="pt")
    hidden = components.text_encoder(tokens["input_ids"])[0]
    eps = components.denoiser(torch.zeros(1, 1, 16, 16), 999, encoder_hidden_states=hidden).sample
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
    assert "## Other\n\nkept" in text and text.count(SECTIONS["synthetic", "unet"].heading) == 1


def test_iuxray_evaluation_ranks_templates_in_its_own_section(tmp_path):
    from cxrmem.testbed.evaluate import evaluate
    from cxrmem.testbed.train import train

    results = tmp_path / "RESULTS.md"
    synthetic, iuxray = SECTIONS["synthetic", "unet"].heading, SECTIONS["iuxray", "unet"].heading
    results.write_text(f"{synthetic}\n\nfirst testbed\n")
    extra = {"testbed.source": "iuxray", "testbed.n_unique": 5000, "corpus.max_reports": 120}
    extra.update({"testbed.eval_unique": 6, "testbed.eval_steps": 2, "testbed.results": str(results)})
    cfg = tiny_testbed_config(str(tmp_path / "model"), **extra)
    train(cfg)
    manifest = pd.read_csv(tmp_path / "model" / "manifest.csv")
    result = evaluate(cfg)
    assert result["n_planted"] == 8 and result["n_unique"] == 6
    for key in ("full", "first_step"):
        ranking = result["templates"][key]
        assert ranking["n"] == (manifest.n_images > 1).sum() > 0
        assert ranking["most_copied"][0]["n_copies"] == manifest.n_copies[~manifest.planted].max()
    text = results.read_text()
    assert text.startswith(f"{synthetic}\n\nfirst testbed\n\n{iuxray}\n") and "`XXXX` markers" in text
    assert "templates flagged" in text


def test_learning_rate_decays_by_steps_or_by_the_time_budget():
    from cxrmem.testbed.train import learning_rate_factor

    assert learning_rate_factor(0, 100, 10) == pytest.approx(0.1)  # warmup
    assert learning_rate_factor(10, 100, 10) == pytest.approx(1.0)
    assert learning_rate_factor(100, 100, 10) == pytest.approx(0.1)
    # A run stopped by max_minutes at step 20 of 100 has still decayed fully.
    assert learning_rate_factor(20, 100, 10, time_share=1.0) == pytest.approx(0.1)
    assert learning_rate_factor(20, 100, 10, time_share=0.5) == pytest.approx(0.55)


# -- metrics ------------------------------------------------------------------------------------
def test_rms_distance():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.5)
    assert torch.allclose(rms_distance(a, b), torch.tensor([0.5, 0.5]))


def test_replace_section_keeps_the_rest():
    heading = SECTIONS["synthetic", "unet"].heading
    section = f"{heading}\n\nnew\n"
    assert replace_section("", heading, section) == section
    doc = f"# B\n\n{heading}\n\nold\n\n## Next\n\nx\n"
    assert replace_section(doc, heading, section) == f"# B\n\n{heading}\n\nnew\n\n## Next\n\nx\n"
    assert replace_section("# B\n", heading, section) == f"# B\n\n{section}"


def test_each_testbed_replaces_only_its_own_section():
    synthetic, iuxray = SECTIONS["synthetic", "unet"].heading, SECTIONS["iuxray", "unet"].heading
    assert iuxray.startswith(synthetic)  # headings share a prefix: matching must take the whole line
    doc = replace_section(f"{synthetic}\n\nfirst\n", iuxray, f"{iuxray}\n\nsecond\n")
    assert doc == f"{synthetic}\n\nfirst\n\n{iuxray}\n\nsecond\n"
    doc = replace_section(doc, synthetic, f"{synthetic}\n\nFIRST\n")
    assert doc == f"{synthetic}\n\nFIRST\n\n{iuxray}\n\nsecond\n"


def test_templates_are_scored_apart_from_planted_and_never_duplicated_prompts():
    manifest = pd.DataFrame(
        {
            "prompt": ["p1", "p2", "t1", "t2", "u1", "u2", "u3", "u4"],
            "n_copies": [32, 64, 300, 5, 1, 1, 1, 1],
            "planted": [True, True, False, False, False, False, False, False],
            "n_images": [1, 1, 300, 5, 1, 1, 1, 1],
        }
    )
    frame = evaluation_prompts(manifest, n_unique=3, seed=0)
    assert list(frame.kind) == ["planted"] * 2 + ["unique"] * 3 + ["template"] * 2
    scores = np.array([9.0, 8.0, 1.0, 2.0, 3.0, 2.5, 0.5])  # templates: one mid-pack, one below every negative
    ranking = template_ranking(scores, frame)
    assert ranking["n"] == 2 and ranking["auc_vs_unique"] == pytest.approx(2 / 6)
    assert ranking["flagged_at_1pct_fpr"] == 0.0 and ranking["auc_planted_vs_templates"] == 1.0
    assert [(t["prompt"], t["n_copies"]) for t in ranking["most_copied"]] == [("t1", 300), ("t2", 5)]
    assert ranking["most_copied"][0]["percentile"] == pytest.approx(2 / 3)
    assert template_ranking(scores[:5], frame.iloc[:5]) is None
