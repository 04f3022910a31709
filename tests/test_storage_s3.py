"""Storage layer against a real S3 server (SeaweedFS on loopback, started by tests/s3server.py)."""

import hashlib
import logging
import os

import pyarrow as pa
import pytest

from cxrmem import storage

pytestmark = pytest.mark.s3


def retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cxrmem.storage" and "retrying" in r.getMessage()]


def test_tables_text_and_listing_round_trip(s3_bucket, s3_storage_cfg):
    prefix = f"s3://{s3_bucket}/runs/demo"
    table = pa.table({"prompt_id": ["a", "b", "c"], "d_mem": [0.1, 2.5, 0.3]})
    storage.write_table(table, storage.join(prefix, "scores.parquet"), s3_storage_cfg)
    storage.write_text(storage.join(prefix, "memorized_prompts.csv"), "prompt\nno change ___\n", s3_storage_cfg)
    storage.write_json(storage.join(prefix, "figures/meta.json"), {"dpi": 100}, s3_storage_cfg)

    assert storage.read_table(storage.join(prefix, "scores.parquet"), s3_storage_cfg).equals(table)
    assert storage.read_table(storage.join(prefix, "scores.parquet"), s3_storage_cfg, columns=["d_mem"]).num_columns == 1
    assert storage.read_text(storage.join(prefix, "memorized_prompts.csv"), s3_storage_cfg) == "prompt\nno change ___\n"
    assert storage.read_json(storage.join(prefix, "figures/meta.json"), s3_storage_cfg) == {"dpi": 100}
    assert storage.parquet_rows(storage.join(prefix, "scores.parquet"), s3_storage_cfg) == 3
    assert [storage.relative(u, prefix) for u in storage.list_files(prefix, s3_storage_cfg)] == [
        "figures/meta.json",
        "memorized_prompts.csv",
        "scores.parquet",
    ]
    assert storage.exists(storage.join(prefix, "scores.parquet"), s3_storage_cfg)
    assert not storage.exists(storage.join(prefix, "tokens.parquet"), s3_storage_cfg)
    with pytest.raises(FileNotFoundError, match="tokens.parquet"):
        storage.read_bytes(storage.join(prefix, "tokens.parquet"), s3_storage_cfg)

    storage.delete_tree(storage.join(prefix, "figures"), s3_storage_cfg)
    storage.delete(storage.join(prefix, "memorized_prompts.csv"), s3_storage_cfg)
    assert storage.list_files(prefix, s3_storage_cfg) == [storage.join(prefix, "scores.parquet")]


def test_settings_from_aws_environment_alone(s3_bucket):
    """No storage config at all: endpoint, region and keys come from AWS_* (set by the s3_env fixture)."""
    uri = f"s3://{s3_bucket}/env-only.txt"
    storage.write_text(uri, "from the environment")
    assert storage.read_text(uri) == "from the environment"


def test_multipart_upload_of_a_large_file(s3_bucket, s3_storage_cfg, tmp_path):
    """24 MiB goes up in several multipart parts (pyarrow's part size is 10 MB) and reads back identical."""
    data = os.urandom(24 << 20)
    local = str(tmp_path / "big.bin")
    storage.write_bytes(local, data)
    uri = f"s3://{s3_bucket}/big/big.bin"
    size, digest = storage.copy_file(local, uri, None, s3_storage_cfg)
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert storage.file_size(uri, s3_storage_cfg) == len(data)
    assert storage.sha256(uri, s3_storage_cfg) == (size, digest)
    back = storage.join(str(tmp_path), "back.bin")
    assert storage.copy_file(uri, back, s3_storage_cfg, None) == (size, digest)


def test_server_side_copy(s3_bucket, s3_storage_cfg):
    src, dst = f"s3://{s3_bucket}/a/x.txt", f"s3://{s3_bucket}/b/x.txt"
    storage.write_text(src, "copy me", s3_storage_cfg)
    storage.copy_within(src, dst, s3_storage_cfg)
    assert storage.read_text(dst, s3_storage_cfg) == "copy me"


@pytest.mark.parametrize(
    "override, code",
    [
        ({"secret_access_key": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"access_key_id": "unknown-key", "secret_access_key": "whatever"}, "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_fail_fast_with_the_cause(s3_server, s3_bucket, caplog, override, code):
    good = s3_server.storage_cfg()
    storage.write_text(f"s3://{s3_bucket}/run/summary.json", "{}", good)
    override = {"access_key_id": s3_server.access_key, **override}
    bad = s3_server.storage_cfg(max_attempts=3, **override)
    caplog.set_level(logging.WARNING)
    operations = {
        "read": lambda: storage.read_text(f"s3://{s3_bucket}/run/summary.json", bad),
        "write": lambda: storage.write_text(f"s3://{s3_bucket}/run/other.json", "{}", bad),
        "inspect": lambda: storage.exists(f"s3://{s3_bucket}/run/summary.json", bad),
        "list": lambda: storage.list_files(f"s3://{s3_bucket}/run", bad),
    }
    for action, operation in operations.items():
        with pytest.raises(storage.StorageError) as caught:
            operation()
        message = str(caught.value)
        assert code in message and s3_server.endpoint_url in message and f"s3://{s3_bucket}/run" in message
        assert "not-the-secret" not in message and "whatever" not in message
    assert retry_warnings(caplog) == []  # a credential problem is not retried
    assert "not-the-secret" not in caplog.text


def test_wrong_secret_in_environment(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-wrong-secret")
    with pytest.raises(storage.StorageError, match="SignatureDoesNotMatch.*AWS_SECRET_ACCESS_KEY"):
        storage.read_text(f"s3://{s3_bucket}/anything.txt")


def test_missing_bucket_is_a_clear_error_not_an_empty_run(s3_env, s3_storage_cfg, caplog):
    caplog.set_level(logging.WARNING)
    uri = "s3://no-such-bucket-cxrmem/run/scores.parquet"
    operations = [
        lambda: storage.read_bytes(uri, s3_storage_cfg),
        lambda: storage.write_text(uri, "x", s3_storage_cfg),
        lambda: storage.exists(uri, s3_storage_cfg),
        lambda: storage.list_files("s3://no-such-bucket-cxrmem/run", s3_storage_cfg),
    ]
    for operation in operations:
        with pytest.raises(storage.StorageError, match="NoSuchBucket: bucket 'no-such-bucket-cxrmem' does not exist"):
            operation()
    assert retry_warnings(caplog) == []


def test_unreachable_server_is_retried_a_bounded_number_of_times(s3_server, s3_bucket, caplog):
    cfg = s3_server.storage_cfg(max_attempts=2, backoff_s=0.01)
    uri = f"s3://{s3_bucket}/run/summary.json"
    storage.write_text(uri, "{}", cfg)
    caplog.set_level(logging.WARNING)
    with s3_server.stopped():
        for operation in [lambda: storage.read_text(uri, cfg), lambda: storage.write_text(uri, "{}", cfg)]:
            caplog.clear()
            with pytest.raises(storage.StorageError, match="after 2 attempts") as caught:
                operation()
            assert s3_server.endpoint_url in str(caught.value) and "reachable" in str(caught.value)
            assert len(retry_warnings(caplog)) == 1
    assert storage.read_text(uri, cfg) == "{}"  # back after the restart, data intact
