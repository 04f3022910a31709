"""Publishing and export against a real S3 server, including the server stopping mid-run."""

import pytest

from cxrmem import publish, storage
from cxrmem.storage import Store
from tests.test_publish import FINGERPRINT, write_run

pytestmark = pytest.mark.s3


def test_publish_and_verify_a_run_in_s3(s3_bucket, s3_storage_cfg):
    prefix = f"s3://{s3_bucket}/runs/a"
    written = write_run(prefix, s3_storage_cfg)
    store = Store.from_config(s3_storage_cfg)
    manifest = publish.publish_run(store, prefix, publish.prepare_output(store, prefix), FINGERPRINT, {})
    assert set(manifest["files"]) == set(written)
    assert publish.read_manifest(Store.from_config(s3_storage_cfg), prefix) == manifest
    assert publish.verify_run(Store.from_config(s3_storage_cfg), prefix)["ok"]
    store = Store.from_config(s3_storage_cfg)
    store.write_text(f"{prefix}/_lease.json", "{}")  # a working file: not reported
    store.write_text(f"{prefix}/figures/evil.png", "added")
    result = publish.verify_run(store, prefix)
    assert not result["ok"] and result["unlisted"] == ["figures/evil.png"]


def test_export_local_to_s3_and_back(tmp_path, s3_bucket, s3_storage_cfg):
    local = str(tmp_path / "run")
    written = write_run(local)
    manifest = publish.publish_manifest(Store(), local, FINGERPRINT, {})
    remote = f"s3://{s3_bucket}/exports/run"

    up = publish.export_run(Store.from_config(s3_storage_cfg), local, remote)
    assert (up["files"], up["bytes"]) == (len(written), manifest["total_bytes"])
    assert publish.read_manifest(Store.from_config(s3_storage_cfg), remote) == manifest
    assert publish.verify_run(Store.from_config(s3_storage_cfg), remote)["ok"]

    back = str(tmp_path / "back")
    down = publish.export_run(Store.from_config(s3_storage_cfg), remote, back)
    assert down["bytes"] == manifest["total_bytes"]
    assert publish.verify_run(Store(), back)["ok"]
    assert {name: Store().read_bytes(storage.join(back, name)) for name in written} == written


def test_export_to_a_missing_bucket_fails_clearly(tmp_path, s3_env, s3_storage_cfg):
    local = str(tmp_path / "run")
    write_run(local)
    publish.publish_manifest(Store(), local, FINGERPRINT, {})
    with pytest.raises(storage.StorageError, match="NoSuchBucket"):
        publish.export_run(Store.from_config(s3_storage_cfg), local, "s3://no-such-bucket-cxrmem/run")


def test_server_stopped_mid_write_fails_clearly_and_publishes_nothing(s3_server, s3_bucket, s3_storage_cfg):
    prefix = f"s3://{s3_bucket}/runs/interrupted"
    work = publish.prepare_output(Store.from_config(s3_storage_cfg), prefix)

    def stop_after_second_file(i):
        if i == 1:
            s3_server.stop()

    try:
        with pytest.raises(storage.StorageError, match="tried 2 times") as caught:
            write_run(work, s3_storage_cfg, after_each=stop_after_second_file)
            publish.publish_run(Store.from_config(s3_storage_cfg), prefix, work, FINGERPRINT, {})
        assert s3_server.endpoint_url in str(caught.value) and prefix in str(caught.value)
    finally:
        s3_server.start()
    assert not publish.is_published(Store.from_config(s3_storage_cfg), prefix)
    assert len(publish.run_files(Store.from_config(s3_storage_cfg), prefix)) == 2  # the files written before the stop, untrusted


def test_server_stopped_before_the_manifest_publishes_nothing(s3_server, s3_bucket, s3_storage_cfg):
    prefix = f"s3://{s3_bucket}/runs/unpublished"
    write_run(prefix, s3_storage_cfg)
    with s3_server.stopped():
        with pytest.raises(storage.StorageError, match="reachable"):
            publish.publish_run(Store.from_config(s3_storage_cfg), prefix, prefix, FINGERPRINT, {})
    assert not publish.is_published(Store.from_config(s3_storage_cfg), prefix)
    with pytest.raises(publish.RunNotPublishedError):
        publish.export_run(Store.from_config(s3_storage_cfg), prefix, f"s3://{s3_bucket}/copy")


def test_a_failing_overwrite_never_touches_the_published_run(s3_server, s3_bucket, s3_storage_cfg):
    prefix = f"s3://{s3_bucket}/runs/precious"
    old = write_run(prefix, s3_storage_cfg, tag="old")
    old_manifest = publish.publish_run(Store.from_config(s3_storage_cfg), prefix, prefix, FINGERPRINT, {})

    with pytest.raises(publish.RunExistsError):
        publish.prepare_output(Store.from_config(s3_storage_cfg), prefix, overwrite=False)
    work = publish.prepare_output(Store.from_config(s3_storage_cfg), prefix, overwrite=True)

    def stop_after_third_file(i):
        if i == 2:
            s3_server.stop()

    try:
        with pytest.raises(storage.StorageError):
            write_run(work, s3_storage_cfg, tag="new", after_each=stop_after_third_file)
            publish.publish_run(Store.from_config(s3_storage_cfg), prefix, work, "fp-new", {})
    finally:
        s3_server.start()

    assert publish.read_manifest(Store.from_config(s3_storage_cfg), prefix) == old_manifest
    assert publish.verify_run(Store.from_config(s3_storage_cfg), prefix)["ok"]
    assert Store.from_config(s3_storage_cfg).read_bytes(storage.join(prefix, "summary.json")) == old["summary.json"]

    # The rerun writes to the same staging prefix and replaces the old run only once complete.
    assert publish.prepare_output(Store.from_config(s3_storage_cfg), prefix, overwrite=True) == work
    new = write_run(work, s3_storage_cfg, tag="new")
    publish.publish_run(Store.from_config(s3_storage_cfg), prefix, work, "fp-new", {})
    assert publish.read_manifest(Store.from_config(s3_storage_cfg), prefix)["model_fingerprint"] == "fp-new"
    assert Store.from_config(s3_storage_cfg).read_bytes(storage.join(prefix, "summary.json")) == new["summary.json"]
    assert publish.verify_run(Store.from_config(s3_storage_cfg), prefix)["ok"]
    assert Store.from_config(s3_storage_cfg).list_files(work) == []
