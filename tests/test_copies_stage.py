"""The copies stage and its image index, on a tiny real model and project-built images."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from cxrmem.config import load_config
from cxrmem.corpus.text import prompt_id
from cxrmem.models.loading import fingerprint_model
from cxrmem.publish import RunExistsError, publish_manifest
from cxrmem.runfiles import Run, RunLayout
from cxrmem.stages import copies, image_index
from cxrmem.stages.results import Skipped
from cxrmem.stages.table import BY_NAME, run_stage
from cxrmem.storage import Store
from tests.test_attribution import write_scores_key

ROOT = Path(__file__).resolve().parents[1]
TINY = ["score.steps=2", "score.generations=1", "score.seed_mode=per_prompt", "model.device=cpu", "copies.generations=2",
        "copies.pixel_size=8", "copies.n_controls=3", "copies.top_k=2"]  # fmt: skip
TEXTS = ["Compared to ___, stable.", "Dr. ___ notified.", "No acute process.", "Small left effusion.", "Heart size is enlarged."]


def save_png(path: Path, image: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)).save(path)
    return str(path)


# -- the index job ----------------------------------------------------------------------------
def test_index_builds_once_resumes_adds_new_images_and_counts_unreadable_files(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for i in range(3):
        save_png(folder / f"img{i}.png", rng.random((16, 16)))
    cfg = load_config(None, [f"run.output={tmp_path / 'run'}", f"images.source={folder}", "images.part_size=2", "copies.pixel_size=8"])
    fingerprint = image_index.make_embedder(copies.embedder_settings(cfg)).fingerprint
    images, index, first = image_index.build_index(cfg, Store(), fingerprint)
    assert (first["embedded"], first["already_stored"], first["unreadable"]) == (3, 0, 0)
    assert list(images.image_id) == ["img0", "img1", "img2"] and tuple(index.shape) == (3, 64)
    parts = Store().list_files(first["prefix"], suffix=".parquet")
    assert first["prefix"] == f"{tmp_path / 'run'}/_parts/image_index/{fingerprint}" and len(parts) == 2  # 2 + 1 images

    _, again, second = image_index.build_index(cfg, Store(), fingerprint)
    assert (second["embedded"], second["already_stored"]) == (0, 3) and np.array_equal(again.numpy(), index.numpy())

    save_png(folder / "img3.png", rng.random((16, 16)))
    (folder / "broken.png").write_bytes(b"not an image")
    images, index, third = image_index.build_index(cfg, Store(), fingerprint)
    assert (third["embedded"], third["already_stored"], third["unreadable"]) == (1, 3, 1)
    assert "broken.png" in third["unreadable_files"][0]
    assert sorted(images.image_id) == ["img0", "img1", "img2", "img3"] and index.shape[0] == 4
    np.testing.assert_allclose(index.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_ray_index_worker_embeds_a_part_as_the_local_executor_does(tmp_path):
    """The Ray Data callable class, called as its actor pool calls it (Ray itself: the demo-copies audit)."""
    from cxrmem.distributed.image_index import IndexWorker

    rng = np.random.default_rng(1)
    paths = [save_png(tmp_path / f"img{i}.png", rng.random((16, 16))) for i in range(2)] + [str(tmp_path / "missing.png")]
    chunk = pd.DataFrame({"part": "part-00000", "image_id": ["img0", "img1", "missing"], "path": paths})
    cfg = load_config(None, ["copies.pixel_size=8", "model.device=cpu"])
    remote = IndexWorker(cfg, Store(), torch_threads=1)(pa.Table.from_pandas(chunk, preserve_index=False))
    local = next(image_index.local_rows(cfg, Store(), [chunk]))
    assert remote.column_names == local.column_names == ["part", "image_id", "path", "embedding", "error"]
    assert remote.column("embedding").to_pylist() == local.column("embedding").to_pylist()
    assert remote.column("error").to_pylist()[:2] == [None, None] and "missing.png" in remote.column("error")[2].as_py()


# -- the stage on a tiny model ----------------------------------------------------------------
def write_run(output: Path, texts: list[str], memorized: int, sources: list[str], model_dir: str) -> list[str]:
    """prompts.parquet (source and patient ids s<i> / p<i>), scores.parquet's key columns as `model_dir` scored
    them (the stage checks the model), and a memorized set of the first `memorized` prompts."""
    ids = [prompt_id(t) for t in texts]
    layout = RunLayout(str(output))
    table = pa.table({"prompt_id": ids, "prompt": texts, "source_ids": [[s] for s in sources],
                      "subject_id": [["p" + s[1:]] for s in sources]})  # fmt: skip
    Store().write_table(table, layout.prompts)
    frame = pd.DataFrame({"prompt": texts[:memorized], "prompt_id": ids[:memorized], "d_mem": 1.0, "n_reports": 1})
    Run(Store(), layout).write_memorized(frame)
    write_scores_key(layout, ids, fingerprint_model(load_config(None, [f"model.path={model_dir}"]).model))
    return ids


@pytest.fixture(scope="module")
def own_images(tiny_model_dir, tmp_path_factory):
    """An image table whose image of study s<i> / patient p<i> is the first generation of prompt i at w=7.5."""
    from cxrmem.stages.worker import CopiesOfPrompts, ModelWorker

    folder = tmp_path_factory.mktemp("own_images")
    cfg = load_config(None, [f"model.path={tiny_model_dir}", *TINY])
    ids = [prompt_id(t) for t in TEXTS]
    _, _, kept, _ = CopiesOfPrompts()(ModelWorker(cfg, Store(), need_vae=True), ids, TEXTS, 7.5, "none", frozenset(ids))
    paths = [save_png(folder / f"{pid}.png", kept[pid][0]) for pid in ids]
    table = pd.DataFrame({"path": paths, "study_id": [f"s{i}" for i in range(len(ids))], "subject_id": [f"p{i}" for i in range(len(ids))]})
    table.to_csv(folder / "images.csv", index=False)
    return str(folder / "images.csv")


def stage_config(tiny_model_dir, output, images_csv, *overrides):
    return load_config(None, [
        f"model.path={tiny_model_dir}", *TINY, f"run.output={output}", f"images.source={images_csv}",
        "images.subject_column=subject_id", "mitigation.strategies=[original,remove_marker,embedding_noise]", *overrides,
    ])  # fmt: skip


def test_copies_checks_mitigations_stratified_sample_of_the_memorized_set(tiny_model_dir, own_images, tmp_path):
    """With mitigation.sample_size below the memorized count, the harm is checked on mitigation's own sample (the
    same seeded, marker-stratified draw), and the section says which prompts and why."""
    from cxrmem.mitigation_sizing import stratified_sample

    write_run(tmp_path, TEXTS, memorized=2, sources=[f"s{i}" for i in range(len(TEXTS))], model_dir=tiny_model_dir)
    cfg = stage_config(tiny_model_dir, tmp_path, own_images, "mitigation.sample_size=1", "copies.second_guidance=null",
                       "copies.strategies=false")  # fmt: skip
    summary = copies.run(cfg)
    table = Store().read_table(RunLayout(str(tmp_path)).copies).to_pandas()
    drawn = stratified_sample(Run.of(cfg).read_memorized(), cfg.corpus.marker_regex, 1, cfg.mitigation.seed)
    assert list(table[table.group == "memorized"].prompt_id) == list(drawn.prompt_id)
    assert (table.group == "control").sum() == 3 and summary.guidances["w=7.5"]["memorized"] == 1
    assert (summary.sample["memorized"], summary.sample["sampled"]) == (2, 1) and "seeded sample" in summary.sample["why"]


def test_copies_stage_finds_each_prompts_own_image_and_writes_its_outputs(tiny_model_dir, own_images, tmp_path):
    ids = write_run(tmp_path, TEXTS, memorized=2, sources=[f"s{i}" for i in range(len(TEXTS))], model_dir=tiny_model_dir)
    summary = copies.run(stage_config(tiny_model_dir, tmp_path, own_images, "report.top_prompts=1"))
    layout = RunLayout(str(tmp_path))
    table = Store().read_table(layout.copies).to_pandas()
    # 2 memorized + 3 controls, and the 2 memorized under remove_marker and embedding_noise, at w=7.5 and w=1.
    assert len(table) == 2 * (5 + 2 + 2) and set(table.guidance) == {7.5, 1.0}
    assert set(table.strategy) == {"none", "remove_marker", "embedding_noise"}
    assert summary.strategies_checked == ["remove_marker", "embedding_noise"]
    # embedding_noise keeps the text and generates from a changed embedding: not the unmitigated generations.
    noisy = table[(table.strategy == "embedding_noise") & (table.prompt_id == ids[0])]
    plain = table[(table.strategy == "none") & (table.prompt_id == ids[0]) & (table.guidance == noisy.guidance.iloc[0])]
    assert noisy.prompt.iloc[0] == plain.prompt.iloc[0] and noisy.max_similarity.iloc[0] != plain.max_similarity.iloc[0]
    rewritten = table[(table.strategy == "remove_marker") & (table.prompt_id == ids[0])].prompt.iloc[0]
    assert rewritten == "Compared to, stable."
    own = table[(table.guidance == 7.5) & (table.strategy == "none")].set_index("prompt_id").loc[ids]
    # Re-identification through the stage: each prompt's nearest image is the one of its own study and patient.
    assert list(own.nearest_source_id) == [f"s{i}" for i in range(5)] and own.same_study.all() and own.same_patient.all()
    assert (own.max_similarity > 0.99).all()
    controls = own[own.group == "control"]
    assert not controls.is_copy.any() and own.threshold.iloc[0] == pytest.approx(controls.max_similarity.max())
    w75 = summary.guidances["w=7.5"]
    assert (w75["memorized"], w75["controls"], w75["control_copies"]) == (2, 3, 0) and "quantile" in summary.rule
    assert summary.figures == [layout.figure(f"copies_{ids[0]}.npz")]
    with np.load(summary.figures[0]) as data:
        assert {"generation_0", "nearest_0", "similarity_0", "generation_1"} <= set(data.files)
    assert Store().read_json(layout.summary)["copies"]["headline"].keys() == {"w=7.5", "w=1"}
    assert Store().read_json(layout.summary)["cost"]["stages"]["copies"]["vae_decodes"] == len(table) * summary.generations  # counted

    from cxrmem.stages import report

    written = report.run(stage_config(tiny_model_dir, tmp_path, own_images))
    html = Path(written.report).read_text()
    assert written.sections["copies"] == "rendered" and layout.figure(f"copies_{ids[0]}.png") in written.figures
    assert "Copies of training images" in html and "copy evidence" in html and "memorized prompts copy a training image" in html


def test_copies_stage_is_off_without_images_and_refuses_a_published_run(tiny_model_dir, own_images, tmp_path):
    off = run_stage(BY_NAME["copies"], load_config(None, [f"run.output={tmp_path}"]), Store())
    assert off == Skipped("copies", "images.source is empty")
    write_run(tmp_path, TEXTS, memorized=2, sources=[f"s{i}" for i in range(len(TEXTS))], model_dir=tiny_model_dir)
    cfg = stage_config(tiny_model_dir, tmp_path, own_images)
    publish_manifest(Store(), str(tmp_path), "f" * 16, cfg)
    with pytest.raises(RunExistsError, match="run.overwrite"):
        copies.run(cfg)
    assert not os.path.exists(RunLayout(str(tmp_path)).copies)


# -- the testbed, through the stage (about 15 s: 1,024 phantoms exported and indexed) -----------
def test_testbed_planted_prompts_copy_their_phantoms_through_the_stage(tmp_path):
    from cxrmem.testbed.export import export_training_images

    model = str(ROOT / "testbed" / "model")
    cfg0 = load_config(ROOT / "conf" / "testbed.yaml")
    table = export_training_images(model, str(tmp_path / "images"), cfg0.corpus)
    planted = table[table.planted & (table.n_copies == 128)].head(2)
    others = table[~table.planted].head(6)
    texts = planted.prompt.tolist() + others.prompt.tolist()
    write_run(tmp_path / "run", texts, memorized=2, sources=planted.source_id.tolist() + others.source_id.tolist(), model_dir=model)
    cfg = load_config(ROOT / "conf" / "testbed.yaml", [
        f"model.path={model}", f"run.output={tmp_path / 'run'}", f"images.source={tmp_path / 'images' / 'images.csv'}",
        "images.study_column=source_id", "score.steps=10", "copies.generations=2", "copies.n_controls=6",
        "copies.pixel_size=32", "copies.strategies=false", "copies.guidance=1.0", "copies.second_guidance=null",
    ])  # fmt: skip
    summary = copies.run(cfg)
    out = Store().read_table(RunLayout(str(tmp_path / "run")).copies).to_pandas()
    memorized = out[out.group == "memorized"]
    assert memorized.is_copy.all() and memorized.same_study.all() and (memorized.max_similarity > 0.95).all()
    assert summary.guidances["w=1"]["auc"] == 1.0


def test_cli_testbed_export_writes_the_phantoms_and_their_table(tmp_path, capsys):
    from cxrmem.cli import main

    assert main(["testbed", "export", "--config", str(ROOT / "conf" / "testbed.yaml"), "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "images.csv")
    assert len(table) == 1024 and int(table.planted.sum()) == 24 and os.path.exists(table.path[0])
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"output: {tmp_path / 'images.csv'}")


def test_copies_stage_checks_the_sampling_strategies_and_judges_every_strategy(tiny_model_dir, own_images, tmp_path):
    """The new strategies generate through the same workers; the judgement has a row per strategy, paired on its prompts."""
    from cxrmem.stages import mitigate

    write_run(tmp_path, TEXTS, memorized=2, sources=[f"s{i}" for i in range(len(TEXTS))], model_dir=tiny_model_dir)
    strategies = "mitigation.strategies=[original,attention_rescaling,delayed_guidance,noise_adjustment]"
    cfg = stage_config(tiny_model_dir, tmp_path, own_images, strategies, "mitigation.n_generations=2", "mitigation.noise_iters=1")
    mitigate.run(cfg)
    summary = copies.run(cfg)
    table = Store().read_table(RunLayout(str(tmp_path)).copies).to_pandas()
    assert set(table.strategy) == {"none", "attention_rescaling", "delayed_guidance", "noise_adjustment"}
    assert table.fidelity.isna().all()  # fidelity.measure = none
    judged = {r["strategy"]: r for r in summary.guidances["w=1"]["judgement"]["strategies"]}
    assert list(judged) == ["original", "attention_rescaling", "delayed_guidance", "noise_adjustment"]
    at1 = table[(table.guidance == 1.0) & (table.group == "memorized")]
    for name, row in judged.items():
        own = at1[at1.strategy == ("none" if name == "original" else name)]
        assert row["prompts"] == 2 and row["copy_rate"] == pytest.approx(own.is_copy.mean()) and row["fidelity"] is None
        assert row["evaluations"] >= 2 * 2 and (row["d_mem_change"] is None) == (name == "original")
    # Both memorized prompts carry a marker, so the re-scaling changed both; d_mem moved.
    assert judged["attention_rescaling"]["d_mem_change"]["mean"] != 0

    from cxrmem.stages import report

    written = report.run(cfg)
    html = Path(written.report).read_text()
    assert "Judged by the harm" in html and "no fidelity measure set" in html
    assert RunLayout(str(tmp_path)).figure("mitigation_frontier.png") in written.figures
    metrics = Store().read_json(RunLayout(str(tmp_path)).path("metrics.json"))
    assert metrics["mitigation.delayed_guidance.w=1.copy_rate"] == pytest.approx(judged["delayed_guidance"]["copy_rate"])


MORE_TEXTS = [*TEXTS, "Clips in the ___ region.", "Stable lines.", "Left basilar atelectasis.", "No effusion seen.",
              "Mild edema.", "Unchanged ___ catheter.", "No pneumothorax."]  # fmt: skip


def test_the_copy_rate_rule_goes_on_past_mitigations_prompts_until_decided_and_only_where_a_strategy_changes_one(
    tiny_model_dir, own_images, tmp_path
):  # fmt: skip
    """Mitigation runs a sample of 2 of the 9 memorized prompts: too few pairs to read a copy-rate change (F3's
    minimum is 5). The rule takes further memorized prompts a look (mitigation.look_every) at a time, each under
    the strategies still undecided and with the unmitigated prompt beside it, until the change is decided; a marker
    rewrite is checked only on the prompts it changes; copies.max_prompts and copies.sequential=false cut it."""
    from cxrmem.stages import mitigate

    ids = write_run(tmp_path, MORE_TEXTS, memorized=9, sources=[f"s{i}" for i in range(len(MORE_TEXTS))], model_dir=tiny_model_dir)
    strategies = "mitigation.strategies=[original,remove_marker,embedding_noise]"
    base = [strategies, "mitigation.sample_size=2", "mitigation.n_generations=2", "copies.second_guidance=null", "mitigation.look_every=3"]
    mitigate.run(stage_config(tiny_model_dir, tmp_path, own_images, *base))
    ran = Store().read_table(RunLayout(str(tmp_path)).mitigation).to_pandas()
    assert ran.groupby("strategy").prompt_id.nunique().to_dict() == {"original": 2, "remove_marker": 2, "embedding_noise": 2}

    summary = copies.run(stage_config(tiny_model_dir, tmp_path, own_images, *base))
    table = Store().read_table(RunLayout(str(tmp_path)).copies).to_pandas()
    rule = summary.guidances["w=7.5"]["copy_rate_rule"]
    noise = table[table.strategy == "embedding_noise"]
    # embedding_noise changes every prompt: 2 of mitigation's, then looks of 3 until its change is decided (>= 5 pairs).
    assert rule["embedding_noise"]["prompts"] == len(noise) >= 5 and "decided" in rule["embedding_noise"]["stopped"]
    assert rule["embedding_noise"]["copy_rate_change"]["n"] == len(noise)
    unmitigated = set(table[(table.strategy == "none") & (table.group == "memorized")].prompt_id)
    assert set(noise.prompt_id) <= unmitigated and len(unmitigated) > 2  # every pair has its unmitigated half
    # remove_marker is judged on marker-bearing prompts only: 4 of the 9 memorized carry a marker.
    marked = {pid for pid, text in zip(ids[:9], MORE_TEXTS[:9]) if "___" in text}
    assert set(table[table.strategy == "remove_marker"].prompt_id) <= marked
    assert rule["remove_marker"]["tried"] == 9 and "ran out" in rule["remove_marker"]["stopped"]  # 4 pairs: undecided
    judged = {r["strategy"]: r for r in summary.guidances["w=7.5"]["judgement"]["strategies"]}
    assert judged["embedding_noise"]["prompts"] == len(noise) and judged["remove_marker"]["prompts"] == len(marked)

    capped = copies.run(stage_config(tiny_model_dir, tmp_path, own_images, *base, "copies.max_prompts=4", "run.overwrite=true"))
    assert capped.guidances["w=7.5"]["copy_rate_rule"]["embedding_noise"]["tried"] == 4
    off = copies.run(stage_config(tiny_model_dir, tmp_path, own_images, *base, "copies.sequential=false", "run.overwrite=true"))
    # mitigation's sample of 2 holds 1 prompt with a marker
    assert {s: r["prompts"] for s, r in off.guidances["w=7.5"]["copy_rate_rule"].items()} == {"remove_marker": 1, "embedding_noise": 2}
    assert all("copies.sequential=false" in r["stopped"] for r in off.guidances["w=7.5"]["copy_rate_rule"].values())
