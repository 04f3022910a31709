"""Evidence of copying: image reading, sources, embedders, exact search, evidence, and a copy found on the testbed."""

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bench.rad_dino_replica import TINY, build_rad_dino_replica
from cxrmem.copies.embedders import EmbedderSettings, make_embedder
from cxrmem.copies.evidence import COPIES_SCHEMA, calibrate_threshold, copies_table, pick_controls, reidentify
from cxrmem.copies.images import ImageReadError, folder_table, read_image, read_table_file, table_images
from cxrmem.copies.search import top_k
from cxrmem.corpus.mimic import report_ids
from cxrmem.models.loading import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def dicom_bytes(pixels: np.ndarray, photometric: str, **fields) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "CR", photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    for name, value in fields.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- reading ----------------------------------------------------------------------------------
def test_png_8_and_16_bit_and_rgb_read_to_grey_unit_range():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    assert np.allclose(read_image(encoded(grey, "PNG"), "a.png"), grey / 255.0)
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    assert np.allclose(read_image(encoded(deep, "PNG"), "b.png"), deep / 65535.0, atol=1e-6)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    image = read_image(encoded(rgb, "PNG"), "c.png")
    assert image.shape == (8, 8) and image.dtype == np.float32
    assert np.allclose(image, grey / 255.0, atol=1 / 255)


def test_jpg_reads_close_to_its_source():
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1)).astype(np.uint8)
    image = read_image(encoded(gradient, "JPEG", quality=95), "x.jpg")
    assert image.shape == (64, 64)
    assert np.abs(image - gradient / 255.0).max() < 0.05


def test_unreadable_file_error_names_the_file():
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(b"not an image at all", "broken.png")
    with pytest.raises(ImageReadError, match="empty.dcm"):
        read_image(b"\0" * 200, "empty.dcm")


def test_dicom_rescale_window_and_monochrome1_inversion():
    pixels = np.arange(0, 4000, 250, dtype=np.uint16).reshape(4, 4)
    plain = read_image(dicom_bytes(pixels, "MONOCHROME2"), "plain.dcm")
    assert np.allclose(plain, pixels / pixels.max(), atol=1e-6)  # no VOI: the values' own range
    inverted = read_image(dicom_bytes(pixels, "MONOCHROME1"), "inverted.dcm")
    assert np.allclose(inverted, 1 - plain, atol=1e-6)
    # A window of 1000-2000 (after rescale x2): everything below is black, everything above white.
    windowed = read_image(
        dicom_bytes(pixels, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=0, WindowCenter=1500, WindowWidth=1000),
        "windowed.dcm",
    )
    raw = pixels * 2
    assert np.all(windowed[raw <= 1000] == 0) and np.all(windowed[raw >= 2000] == 1)
    assert np.all(np.diff(windowed.flatten()) >= 0)  # monotone in the stored values


def test_real_chest_cr_from_pydicom_data():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm", download=False)  # pydicom-data: a real PA chest CR, MONOCHROME1
    assert path is not None, "install pydicom-data (a test dependency)"
    image = read_image(Path(path).read_bytes(), os.path.basename(path))
    assert image.shape == (1955, 1841) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    rows, cols = image.shape
    spine = image[rows // 3 : rows // 2, cols // 2 - 40 : cols // 2 + 40].mean()
    right_lung = image[rows // 3 : rows // 2, cols // 4 - 40 : cols // 4 + 40].mean()
    assert spine > right_lung  # displayed as a radiograph: bone bright, aerated lung darker


# -- sources ----------------------------------------------------------------------------------
def test_mimic_jpg_layout_links_each_image_to_its_report():
    root = "/data/mimic-cxr-jpg/files"
    paths = [
        f"{root}/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg",
        f"{root}/p10/p10000032/s53189527/2a2277a9-b0ded155.jpg",
        f"{root}/p11/p11000011/s51029426/00ac7b1d.JPG",
        f"{root}/p10/p10000032/s50414267.txt",  # a report beside them: not an image
    ]
    table = folder_table(paths)
    assert list(table.path) == sorted(paths[:3])
    report_key, report_ids_ = report_ids("/reports/files/p10/p10000032/s50414267.txt")
    first = table[table.image_id == "02aa804e-bde0afdd"].iloc[0]
    assert first.source_id == report_key == "p10/p10000032/s50414267"
    assert first.subject_id == report_ids_["subject_id"] == "p10000032"
    assert set(table.subject_id) == {"p10000032", "p11000011"}


def test_plain_folder_and_layout_errors():
    table = folder_table(["/x/b.png", "/x/a.dcm", "/x/notes.txt"])
    assert list(table.image_id) == ["a", "b"] and table.source_id.isna().all()
    with pytest.raises(ImageReadError, match="/x/b.png"):
        folder_table(["/x/b.png", "/f/p10/p10000032/s50414267/a.jpg"], layout="mimic")
    with pytest.raises(ImageReadError, match="no .png"):
        folder_table(["/x/readme.md"])


def test_table_source_with_mimic_integer_ids():
    frame = pd.DataFrame({"file": ["a/1.jpg", "/abs/2.jpg"], "study_id": ["50414267", "53189527"], "subject_id": ["10000032", "10000032"]})
    table = table_images(frame, "meta.csv", path_column="file", subject_column="subject_id", id_format="mimic", root="/img")
    assert list(table.path) == ["/img/a/1.jpg", "/abs/2.jpg"]
    assert list(table.source_id) == ["p10/p10000032/s50414267", "p10/p10000032/s53189527"]
    assert list(table.subject_id) == ["p10000032", "p10000032"]
    as_is = table_images(frame, "meta.csv", path_column="file")
    assert list(as_is.source_id) == ["50414267", "53189527"] and as_is.subject_id.isna().all()
    with pytest.raises(ImageReadError, match="meta.csv: no column 'path'"):
        table_images(frame, "meta.csv")


def test_image_table_files_keep_ids_as_text(tmp_path):
    path = tmp_path / "images.csv"
    path.write_text("path,study_id\nx.png,007\n", encoding="utf-8")
    assert read_table_file(str(path)).study_id.tolist() == ["007"]
    with pytest.raises(ImageReadError, match="images.txt: an image table must be"):
        read_table_file(str(tmp_path / "images.txt"))


# -- embedders --------------------------------------------------------------------------------
def test_pixel_embedding_is_unit_norm_and_ignores_brightness_and_size():
    embed = make_embedder(EmbedderSettings(name="pixel", size=16))
    rng = np.random.default_rng(0)
    image = rng.random((64, 64), dtype=np.float32)
    vectors = embed([image, 0.5 * image + 0.2, rng.random((48, 40), dtype=np.float32)])
    assert vectors.shape == (3, 256)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > 0.9999  # cosine of centred pixels is their correlation
    assert float(vectors[0] @ vectors[2]) < 0.5
    batch = embed(torch.from_numpy(image)[None, None].repeat(1, 3, 1, 1))  # a [B, C, H, W] generation batch
    assert torch.allclose(batch[0], vectors[0], atol=1e-5)
    assert embed.fingerprint != make_embedder(EmbedderSettings(name="pixel", size=32)).fingerprint


def test_rad_dino_replica_loads_offline_and_embeds_cls(tmp_path):
    cache = str(tmp_path / "hub")
    build_rad_dino_replica(cache, TINY, seed=0)
    settings = EmbedderSettings(name="rad_dino", cache_dir=cache, batch_size=2)
    embed = make_embedder(settings)
    assert type(embed.model).__name__ == "Dinov2Model" and embed.dim == TINY["hidden_size"]
    rng = np.random.default_rng(0)
    images = [rng.random((90, 70), dtype=np.float32), rng.random((56, 56), dtype=np.float32), rng.random((120, 120), dtype=np.float32)]
    vectors = embed(images)
    assert vectors.shape == (3, TINY["hidden_size"])
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(embed(images[:1]), vectors[:1], atol=1e-5)  # batch composition does not matter
    # The fingerprint is the files' content: same replica, same key; other weights, another key.
    assert make_embedder(settings).fingerprint == embed.fingerprint
    other = str(tmp_path / "other")
    build_rad_dino_replica(other, TINY, seed=1)
    assert make_embedder(EmbedderSettings(name="hf", repo="microsoft/rad-dino", cache_dir=other)).fingerprint != embed.fingerprint


def test_missing_embedder_in_cache_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="microsoft/rad-dino: no snapshot folder"):
        make_embedder(EmbedderSettings(name="rad_dino", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="use one of pixel, rad_dino, hf"):
        make_embedder(EmbedderSettings(name="clip"))


def test_index_parts_embed_in_batches_skip_unreadable_files_and_stack(tmp_path):
    from cxrmem.copies.index import embed_files, embedding_part, stack_parts

    rng = np.random.default_rng(0)
    for i in range(5):
        (tmp_path / f"img{i}.png").write_bytes(encoded((rng.random((20, 20)) * 255).astype(np.uint8), "PNG"))
    (tmp_path / "img5.png").write_bytes(b"truncated")
    table = folder_table([str(p) for p in tmp_path.iterdir()])
    embed = make_embedder(EmbedderSettings(name="pixel", size=8))
    read = lambda path: Path(path).read_bytes()  # noqa: E731
    whole, ok, errors = embed_files(embed, list(table.path), read)
    assert ok.tolist() == [True] * 5 + [False] and len(errors) == 1 and "img5.png" in errors[0]
    parts = []  # two batches, as a job that stopped after the first and resumed would write them
    for rows in (slice(0, 3), slice(3, 6)):
        vectors, ok, _ = embed_files(embed, list(table.path[rows]), read)
        parts.append(embedding_part(table.image_id[rows][ok].tolist(), vectors))
    ids, index = stack_parts(parts)
    assert ids == [f"img{i}" for i in range(5)]
    assert torch.allclose(index, whole, atol=1e-6)


# -- search -----------------------------------------------------------------------------------
@pytest.mark.parametrize("query_chunk,index_chunk,k", [(7, 13, 5), (64, 1000, 10), (20, 4, 9)])
def test_chunked_top_k_equals_brute_force(query_chunk, index_chunk, k):
    generator = torch.Generator().manual_seed(0)
    index = torch.nn.functional.normalize(torch.randn(301, 24, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(40, 24, generator=generator), dim=1)
    sims, rows = top_k(queries, index, k, query_chunk=query_chunk, index_chunk=index_chunk)
    expected_sims, expected_rows = (queries @ index.T).topk(k, dim=1)
    assert torch.equal(rows, expected_rows)
    assert torch.allclose(sims, expected_sims, atol=1e-6)


def test_top_k_caps_k_and_checks_shapes():
    index = torch.eye(3)
    sims, rows = top_k(index, index, k=10)
    assert rows.shape == (3, 3) and torch.equal(rows[:, 0], torch.arange(3))
    with pytest.raises(ValueError, match="must be"):
        top_k(torch.ones(2, 4), index, k=1)


# -- evidence ---------------------------------------------------------------------------------
def test_threshold_is_an_observed_control_quantile():
    controls = np.arange(200, dtype=np.float64) / 200
    threshold = calibrate_threshold(controls, 0.99)
    # The observed value at or just above the quantile: position 0.99 x 199 = 197.01, rounded up to 198;
    # not the largest control (a threshold no control exceeds), not one interpolated between two.
    assert threshold.value == controls[198] and threshold.n_controls == 200
    assert calibrate_threshold(controls, 0.5).value == controls[100]  # position 99.5, rounded up
    shuffled = np.append(np.random.default_rng(0).permutation(controls), np.nan)  # order and NaN rows do not count
    assert calibrate_threshold(shuffled, 0.99).summary() == threshold.summary()
    assert "200 control prompts" in threshold.summary()["rule"]
    with pytest.raises(ValueError, match="no control prompt"):
        calibrate_threshold(np.array([np.nan]))


def test_pick_controls_is_seeded_and_excludes_memorized():
    ids = [f"id{i}" for i in range(50)]
    chosen = pick_controls(ids, {"id1", "id2"}, 10, seed=3)
    assert len(chosen) == 10 and not {"id1", "id2"} & set(chosen)
    assert chosen == pick_controls(list(reversed(ids)), {"id1", "id2"}, 10, seed=3)


def test_reidentification_join_on_study_and_patient():
    images = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "path": ["/i/a.jpg", "/i/b.jpg", "/i/c.png"],
            "source_id": ["p10/p10000032/s1", "p10/p10000032/s2", None],
            "subject_id": ["p10000032", "p10000032", None],
        }
    )
    prompts = pd.DataFrame(
        {
            "prompt_id": ["x", "y", "z"],
            "prompt": ["X", "Y", "Z"],
            "group": ["memorized", "memorized", "control"],
            # as read from prompts.parquet: list columns arrive as numpy arrays
            "source_ids": [np.array(["p10/p10000032/s1", "p11/p11/s9"]), np.array(["p10/p10000032/s3"]), np.array(["p12/p12/s4"])],
            "subject_id": [np.array(["p10000032", "p11"]), np.array(["p10000032"]), np.array([None])],
        }
    )
    # [P=3, N=2, k=2]: prompt x's second generation finds a (own study); y's best finds b (same
    # patient, other study); z's best finds c (no ids: re-identifies nobody).
    sims = np.array([[[0.5, 0.4], [0.97, 0.6]], [[0.9, 0.2], [0.3, 0.1]], [[0.7, 0.6], [0.2, 0.1]]], dtype=np.float32)
    rows = np.array([[[1, 2], [0, 1]], [[1, 0], [2, 0]], [[2, 0], [1, 0]]])
    threshold = calibrate_threshold(np.array([0.7, 0.8]), 0.99)
    table = copies_table(prompts, sims, rows, images, threshold, guidance=1.0, embedder="fp")
    assert table.schema == COPIES_SCHEMA
    out = table.to_pandas()
    assert list(out.nearest_image_id) == ["a", "b", "c"]
    assert list(out.same_study) == [True, False, False]
    assert list(out.same_patient) == [True, True, False]
    assert list(out.best_generation) == [1, 0, 0]
    assert list(out.is_copy) == [True, True, False]  # threshold 0.8
    assert np.allclose(out.copy_share, [0.5, 0.5, 0.0]) and np.allclose(out.mean_similarity, [0.735, 0.6, 0.45])
    assert list(out.neighbour_image_ids[0]) == ["a", "b"]
    assert list(reidentify(["k", None], [None, [None]])) == [False, False]


# -- the testbed ------------------------------------------------------------------------------
def test_a_planted_prompt_finds_its_own_training_image_on_the_testbed(tmp_path):
    from omegaconf import OmegaConf

    from cxrmem.config import load_config
    from cxrmem.copies.find import find_copies
    from cxrmem.copies.settings import CopiesSettings
    from cxrmem.models.loading import load_components
    from cxrmem.scoring.scorer import Scorer
    from cxrmem.testbed.export import export_training_images

    model = str(ROOT / "testbed" / "model")
    cfg = load_config(ROOT / "conf" / "testbed.yaml", [f"testbed.out={model}", f"model.path={model}"])
    table = export_training_images(model, str(tmp_path), cfg.corpus)
    assert len(table) == 1024 and table.path.map(os.path.exists).all()
    embed = make_embedder(EmbedderSettings(name="pixel", size=cfg.testbed.image_size))
    index = embed([read_image(Path(p).read_bytes(), p) for p in table.path])
    planted = table[table.planted & (table.n_copies == 128)].iloc[:1]
    controls = table[~table.planted].iloc[:3]
    prompts = pd.concat([planted, controls]).assign(
        group=["memorized"] + ["control"] * 3, source_ids=lambda f: [[pid] for pid in f.prompt_id]
    )
    scorer = Scorer(load_components(cfg.model, cfg.storage), OmegaConf.merge(cfg.score, {"steps": 10, "screening_steps": None}), device="cpu")
    # The median of 3 controls (quantile 0.5, an observed value): exactly the one control above it is a copy. A
    # threshold at the controls' max would flag none, a `>=` comparison two, a threshold off the controls any number.
    settings = CopiesSettings(generations=2, top_k=3, threshold_quantile=0.5)
    found = find_copies(scorer, embed, prompts, index, table, settings, guidance=1.0)
    out = found.table.to_pandas()
    assert found.best_images.shape == (4, 1, cfg.testbed.image_size, cfg.testbed.image_size)
    assert out.nearest_image_id[0] == planted.prompt_id.iloc[0] and out.same_study[0]  # its own phantom
    assert out.max_similarity[0] > 0.95 and out.is_copy[0] and out.copy_share[0] == 1.0
    control_max = out.max_similarity[1:].to_numpy()
    assert found.threshold.n_controls == 3 and found.threshold.value == pytest.approx(float(np.sort(control_max)[1]))
    assert list(out.is_copy[1:]) == list(control_max > np.sort(control_max)[1]) and out.is_copy[1:].sum() == 1
