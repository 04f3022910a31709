"""Storage layer against a real S3 server (SeaweedFS on loopback, started by tests/s3server.py)."""

import hashlib
import logging
import os

import pyarrow as pa
import pytest

from cxrmem import storage
from cxrmem.storage import Store

pytestmark = pytest.mark.s3


def retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cxrmem.storage" and "retrying" in r.getMessage()]


def test_tables_text_and_listing_round_trip(s3_bucket, s3_storage_cfg):
    prefix = f"s3://{s3_bucket}/runs/demo"
    table = pa.table({"prompt_id": ["a", "b", "c"], "d_mem": [0.1, 2.5, 0.3]})
    Store.from_config(s3_storage_cfg).write_table(table, storage.join(prefix, "scores.parquet"))
    Store.from_config(s3_storage_cfg).write_text(storage.join(prefix, "memorized_prompts.csv"), "prompt\nno change ___\n")
    Store.from_config(s3_storage_cfg).write_json(storage.join(prefix, "figures/meta.json"), {"dpi": 100})

    assert Store.from_config(s3_storage_cfg).read_table(storage.join(prefix, "scores.parquet")).equals(table)
    assert Store.from_config(s3_storage_cfg).read_table(storage.join(prefix, "scores.parquet"), columns=["d_mem"]).num_columns == 1
    assert Store.from_config(s3_storage_cfg).read_text(storage.join(prefix, "memorized_prompts.csv")) == "prompt\nno change ___\n"
    assert Store.from_config(s3_storage_cfg).read_json(storage.join(prefix, "figures/meta.json")) == {"dpi": 100}
    assert Store.from_config(s3_storage_cfg).parquet_rows(storage.join(prefix, "scores.parquet")) == 3
    assert [storage.relative(u, prefix) for u in Store.from_config(s3_storage_cfg).list_files(prefix)] == [
        "figures/meta.json",
        "memorized_prompts.csv",
        "scores.parquet",
    ]
    assert Store.from_config(s3_storage_cfg).exists(storage.join(prefix, "scores.parquet"))
    assert not Store.from_config(s3_storage_cfg).exists(storage.join(prefix, "tokens.parquet"))
    with pytest.raises(FileNotFoundError, match="tokens.parquet"):
        Store.from_config(s3_storage_cfg).read_bytes(storage.join(prefix, "tokens.parquet"))

    Store.from_config(s3_storage_cfg).delete_tree(storage.join(prefix, "figures"))
    Store.from_config(s3_storage_cfg).delete(storage.join(prefix, "memorized_prompts.csv"))
    assert Store.from_config(s3_storage_cfg).list_files(prefix) == [storage.join(prefix, "scores.parquet")]


def test_settings_from_aws_environment_alone(s3_bucket):
    """No storage config at all: endpoint, region and keys come from AWS_* (set by the s3_env fixture)."""
    uri = f"s3://{s3_bucket}/env-only.txt"
    Store().write_text(uri, "from the environment")
    assert Store().read_text(uri) == "from the environment"


def test_multipart_upload_of_a_large_file(s3_bucket, s3_storage_cfg, tmp_path):
    """24 MiB goes up in several multipart parts (pyarrow's part size is 10 MB) and reads back identical."""
    data = os.urandom(24 << 20)
    local = str(tmp_path / "big.bin")
    Store().write_bytes(local, data)
    uri = f"s3://{s3_bucket}/big/big.bin"
    size, digest = Store.from_config(s3_storage_cfg).copy_file(local, uri)
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert Store.from_config(s3_storage_cfg).file_size(uri) == len(data)
    assert Store.from_config(s3_storage_cfg).sha256(uri) == (size, digest)
    back = storage.join(str(tmp_path), "back.bin")
    assert Store().copy_file(uri, back) == (size, digest)


def test_server_side_copy(s3_bucket, s3_storage_cfg):
    src, dst = f"s3://{s3_bucket}/a/x.txt", f"s3://{s3_bucket}/b/x.txt"
    Store.from_config(s3_storage_cfg).write_text(src, "copy me")
    Store.from_config(s3_storage_cfg).copy_within(src, dst)
    assert Store.from_config(s3_storage_cfg).read_text(dst) == "copy me"


@pytest.mark.parametrize(
    "override, code",
    [
        ({"secret_access_key": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"access_key_id": "unknown-key", "secret_access_key": "whatever"}, "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_fail_fast_with_the_cause(s3_server, s3_bucket, caplog, override, code):
    good = s3_server.storage_cfg()
    Store.from_config(good).write_text(f"s3://{s3_bucket}/run/summary.json", "{}")
    override = {"access_key_id": s3_server.access_key, **override}
    bad = s3_server.storage_cfg(max_attempts=3, **override)
    caplog.set_level(logging.WARNING)
    operations = {
        "read": lambda: Store.from_config(bad).read_text(f"s3://{s3_bucket}/run/summary.json"),
        "write": lambda: Store.from_config(bad).write_text(f"s3://{s3_bucket}/run/other.json", "{}"),
        "inspect": lambda: Store.from_config(bad).exists(f"s3://{s3_bucket}/run/summary.json"),
        "list": lambda: Store.from_config(bad).list_files(f"s3://{s3_bucket}/run"),
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
        Store().read_text(f"s3://{s3_bucket}/anything.txt")


def test_missing_bucket_is_a_clear_error_not_an_empty_run(s3_env, s3_storage_cfg, caplog):
    caplog.set_level(logging.WARNING)
    uri = "s3://no-such-bucket-cxrmem/run/scores.parquet"
    operations = [
        lambda: Store.from_config(s3_storage_cfg).read_bytes(uri),
        lambda: Store.from_config(s3_storage_cfg).write_text(uri, "x"),
        lambda: Store.from_config(s3_storage_cfg).exists(uri),
        lambda: Store.from_config(s3_storage_cfg).list_files("s3://no-such-bucket-cxrmem/run"),
    ]
    for operation in operations:
        with pytest.raises(storage.StorageError, match="NoSuchBucket: bucket 'no-such-bucket-cxrmem' does not exist"):
            operation()
    assert retry_warnings(caplog) == []


def test_unreachable_server_is_retried_a_bounded_number_of_times(s3_server, s3_bucket, caplog):
    cfg = s3_server.storage_cfg(max_attempts=2, backoff_s=0.01)
    uri = f"s3://{s3_bucket}/run/summary.json"
    Store.from_config(cfg).write_text(uri, "{}")
    caplog.set_level(logging.WARNING)
    with s3_server.stopped():
        for operation in [lambda: Store.from_config(cfg).read_text(uri), lambda: Store.from_config(cfg).write_text(uri, "{}")]:
            caplog.clear()
            with pytest.raises(storage.StorageError, match="tried 2 times") as caught:
                operation()
            assert s3_server.endpoint_url in str(caught.value) and "reachable" in str(caught.value)
            assert len(retry_warnings(caplog)) == 1
    assert Store.from_config(cfg).read_text(uri) == "{}"  # back after the restart, data intact


class CountingBusyServer:
    """An S3 endpoint on loopback that answers every request 503 SlowDown (retryable) and counts them."""

    def __init__(self):
        import http.server
        import threading

        counts = self.requests = []

        class Busy(http.server.BaseHTTPRequestHandler):
            def answer(self):
                counts.append(self.command)
                body = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("attempts", [1, 3])
def test_one_retry_layer_tries_a_request_at_most_max_attempts_times(attempts):
    """pyarrow's and boto3's own retries are off: a failing read is sent `storage.max_attempts` times in all."""
    from omegaconf import OmegaConf

    from cxrmem.storage import StorageConfig

    busy = CountingBusyServer()
    try:
        cfg = OmegaConf.structured(StorageConfig(endpoint_url=busy.endpoint, max_attempts=attempts, backoff_s=0.0,
                                                 access_key_id="test", secret_access_key="test"))  # fmt: skip
        with pytest.raises(storage.StorageError, match=f"tried {attempts} times"):
            Store.from_config(cfg).read_bytes("s3://bucket/run/summary.json")
        # One request per attempt (the HEAD that fails): not attempts x pyarrow's own retries (5 x 5 before).
        assert busy.requests == ["HEAD"] * attempts
    finally:
        busy.close()


def test_merged_score_parts_leave_no_key_behind(s3_server, s3_bucket, s3_storage_cfg):
    """Consolidation removes the parts and their folder: no `_parts/scores/` marker key stays in the run."""
    from cxrmem.runfiles import RunLayout
    from cxrmem.stages import score_parts
    from tests.test_ray_resume import hex_ids, rows

    store, layout = Store.from_config(s3_storage_cfg), RunLayout(f"s3://{s3_bucket}/run")
    ids = hex_ids(20)
    score_parts.write_part(store, rows(ids[:10]), layout.score_parts, 0)
    score_parts.write_part(store, rows(ids[10:]), layout.score_parts, 1)
    assert score_parts.consolidate(store, layout, "fp1", "cfg1")["parts"] == 2
    keys = [item["Key"] for item in s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == ["run/scores.parquet"]
