"""Publishing runs atomically (manifest last), overwriting through staging, verified export; local disk."""

import hashlib

import pyarrow as pa
import pytest

from cxrmem import publish, storage
from cxrmem.config import load_config
from cxrmem.storage import Store

FINGERPRINT = "fp-tiny-0001"


def write_run(prefix: str, storage_cfg=None, tag: str = "v1", n_rows: int = 5, after_each=None) -> dict[str, bytes]:
    """Write the outputs of a small run as a pipeline would; `after_each(i)` runs after the i-th file."""
    scores = pa.table({"prompt_id": [f"{tag}-{i:02d}" for i in range(n_rows)], "d_mem": [float(i) for i in range(n_rows)]})
    files = {
        "prompts.parquet": pa.table({"prompt_id": scores["prompt_id"], "prompt": [f"{tag} impression ___"] * n_rows}),
        "scores.parquet": scores,
        "summary.json": f'{{"tag": "{tag}", "n": {n_rows}}}',
        "memorized_prompts.csv": f"prompt\n{tag} impression ___\n",
        "figures/dmem_hist.png": f"png-bytes-{tag}".encode(),
    }
    written = {}
    for i, (name, content) in enumerate(files.items()):
        uri = storage.join(prefix, name)
        if isinstance(content, pa.Table):
            Store.from_config(storage_cfg).write_table(content, uri)
        elif isinstance(content, str):
            Store.from_config(storage_cfg).write_text(uri, content)
        else:
            Store.from_config(storage_cfg).write_bytes(uri, content)
        written[name] = Store.from_config(storage_cfg).read_bytes(uri)
        if after_each is not None:
            after_each(i)
    Store.from_config(storage_cfg).write_text(storage.join(prefix, "_parts/scores/part-00000.parquet"), "resume checkpoint")
    return written


def test_manifest_lists_outputs_with_checksums_rows_and_public_config(tmp_path):
    prefix = str(tmp_path / "run")
    written = write_run(prefix)
    cfg = load_config(overrides=["storage.secret_access_key=hunter2", "storage.access_key_id=AKIAEXAMPLE"])
    assert publish.read_manifest(Store(), prefix) is None and not publish.is_published(Store(), prefix)

    manifest = publish.publish_manifest(Store(), prefix, FINGERPRINT, cfg, extra={"timings": {"score_s": 1.5}})

    assert set(manifest["files"]) == set(written)  # resume parts are internal, never published
    for name, data in written.items():
        entry = manifest["files"][name]
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["files"]["scores.parquet"]["rows"] == 5 and "rows" not in manifest["files"]["summary.json"]
    assert manifest["total_bytes"] == sum(len(d) for d in written.values())
    assert manifest["model_fingerprint"] == FINGERPRINT and manifest["cxrmem_version"]
    assert manifest["config"]["score"]["steps"] == cfg.score.steps
    assert manifest["extra"] == {"timings": {"score_s": 1.5}}
    on_disk = Store().read_text(publish.manifest_uri(prefix))
    assert "hunter2" not in on_disk and "AKIAEXAMPLE" not in on_disk
    assert publish.read_manifest(Store(), prefix) == manifest and publish.is_published(Store(), prefix)


def test_publishing_an_empty_prefix_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to publish"):
        publish.publish_manifest(Store(), str(tmp_path / "empty"), FINGERPRINT, {})


def test_readers_trust_only_published_runs(tmp_path):
    prefix = str(tmp_path / "run")
    write_run(prefix)
    with pytest.raises(publish.RunNotPublishedError, match="no published run"):
        publish.require_published(Store(), prefix)
    publish.publish_manifest(Store(), prefix, FINGERPRINT, {})
    assert publish.require_published(Store(), prefix)["model_fingerprint"] == FINGERPRINT


def test_a_corrupt_parquet_output_is_named(tmp_path):
    prefix = str(tmp_path / "run")
    Store().write_text(storage.join(prefix, "scores.parquet"), "not parquet")
    with pytest.raises(ValueError, match="scores.parquet is not a readable Parquet file"):
        publish.publish_manifest(Store(), prefix, FINGERPRINT, {})
    assert not publish.is_published(Store(), prefix)


def test_verify_run_finds_changed_and_missing_files(tmp_path):
    prefix = str(tmp_path / "run")
    write_run(prefix)
    publish.publish_manifest(Store(), prefix, FINGERPRINT, {})
    assert publish.verify_run(Store(), prefix)["ok"]

    Store().write_text(storage.join(prefix, "summary.json"), '{"tampered": true}')
    Store().delete(storage.join(prefix, "figures/dmem_hist.png"))
    report = publish.verify_run(Store(), prefix)
    assert not report["ok"]
    assert report["changed"] == ["summary.json"] and report["missing"] == ["figures/dmem_hist.png"]


def test_a_published_run_is_not_replaced_without_overwrite(tmp_path):
    prefix = str(tmp_path / "run")
    assert publish.prepare_output(Store(), prefix) == prefix  # nothing published yet: write in place
    write_run(prefix)
    publish.publish_manifest(Store(), prefix, FINGERPRINT, {})
    with pytest.raises(publish.RunExistsError, match="run.overwrite=true"):
        publish.prepare_output(Store(), prefix, overwrite=False)


def test_a_failed_overwrite_leaves_the_published_run_intact(tmp_path):
    prefix = str(tmp_path / "run")
    old = write_run(prefix, tag="old")
    publish.publish_manifest(Store(), prefix, FINGERPRINT, {})

    work = publish.prepare_output(Store(), prefix, overwrite=True)
    assert work == publish.staging_prefix(prefix)

    def crash(i):
        if i == 2:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        write_run(work, tag="new", after_each=crash)

    assert publish.verify_run(Store(), prefix)["ok"]
    assert Store().read_bytes(storage.join(prefix, "summary.json")) == old["summary.json"]
    assert not publish.is_published(Store(), work)


def test_overwrite_publishes_the_new_run_and_removes_staging(tmp_path):
    prefix = str(tmp_path / "run")
    write_run(prefix, tag="old")
    Store().write_table(pa.table({"unit": ["___"]}), storage.join(prefix, "tokens.parquet"))  # only in the old run
    publish.publish_manifest(Store(), prefix, FINGERPRINT, {})

    work = publish.prepare_output(Store(), prefix, overwrite=True)
    new = write_run(work, tag="new", n_rows=7)
    manifest = publish.publish_run(Store(), prefix, work, "fp-new", load_config(overrides=[f"run.output={work}"]))

    assert publish.read_manifest(Store(), prefix) == manifest and manifest["model_fingerprint"] == "fp-new"
    assert manifest["files"]["scores.parquet"]["rows"] == 7
    assert manifest["config"]["run"]["output"] == prefix  # not the staging prefix it was written at
    assert set(publish.run_files(Store(), prefix)) == set(new)  # the old run's tokens.parquet is gone
    assert publish.verify_run(Store(), prefix)["ok"]
    assert Store().list_files(work) == []


def test_an_interrupted_promotion_is_finished_by_the_next_run(tmp_path):
    prefix = str(tmp_path / "run")
    write_run(prefix, tag="old")
    publish.publish_manifest(Store(), prefix, FINGERPRINT, {})
    work = publish.prepare_output(Store(), prefix, overwrite=True)
    new = write_run(work, tag="new")
    publish.publish_manifest(Store(), work, "fp-new", {})
    # The promotion stopped after step 1: the old manifest is gone, the staged run is complete.
    Store().delete(publish.manifest_uri(prefix))
    assert not publish.is_published(Store(), prefix)

    assert publish.prepare_output(Store(), prefix, overwrite=True) == publish.staging_prefix(prefix)
    assert publish.require_published(Store(), prefix)["model_fingerprint"] == "fp-new"
    assert Store().read_bytes(storage.join(prefix, "summary.json")) == new["summary.json"]


def test_export_copies_a_published_run_with_manifest_last(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "exported")
    write_run(src)
    manifest = publish.publish_manifest(Store(), src, FINGERPRINT, {})

    result = publish.export_run(Store(), src, dst)

    assert result["files"] == len(manifest["files"]) and result["bytes"] == manifest["total_bytes"]
    assert result["seconds"] > 0 and result["mb_per_s"] >= 0 and result["verified"]
    assert publish.read_manifest(Store(), dst) == manifest
    assert publish.verify_run(Store(), dst)["ok"]
    assert set(publish.run_files(Store(), dst)) == set(manifest["files"])  # internal parts are not exported


def test_export_refuses_unpublished_source_and_published_destination(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write_run(src)
    with pytest.raises(publish.RunNotPublishedError):
        publish.export_run(Store(), src, dst)
    publish.publish_manifest(Store(), src, FINGERPRINT, {})
    write_run(dst, tag="precious")
    publish.publish_manifest(Store(), dst, "fp-precious", {})

    with pytest.raises(publish.RunExistsError):
        publish.export_run(Store(), src, dst)
    assert publish.read_manifest(Store(), dst)["model_fingerprint"] == "fp-precious"

    publish.export_run(Store(), src, dst, overwrite=True)
    assert publish.read_manifest(Store(), dst)["model_fingerprint"] == FINGERPRINT
    assert publish.verify_run(Store(), dst)["ok"]


def test_export_of_a_tampered_source_publishes_nothing(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write_run(src)
    publish.publish_manifest(Store(), src, FINGERPRINT, {})
    Store().write_text(storage.join(src, "summary.json"), '{"edited": "after publishing"}')

    with pytest.raises(publish.ChecksumMismatchError, match="summary.json"):
        publish.export_run(Store(), src, dst)
    assert not publish.is_published(Store(), dst)
