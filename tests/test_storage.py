"""Storage layer on local disk: round trips, atomic writes, streaming copies, settings and secrets."""

import hashlib
import os

import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from cxrmem import storage
from cxrmem.config import load_config
from cxrmem.settings import public_config, redact
from cxrmem.storage import StorageConfig, Store


def test_round_trips_bytes_text_json_and_tables(tmp_path):
    prefix = str(tmp_path / "run")
    Store().write_bytes(storage.join(prefix, "raw.bin"), b"\x00\x01")
    Store().write_text(storage.join(prefix, "note.txt"), "IMPRESSION: ___ no change")
    Store().write_json(storage.join(prefix, "summary.json"), {"n": 3})
    table = pa.table({"prompt_id": ["a", "b"], "d_mem": [0.5, 1.5]})
    Store().write_table(table, storage.join(prefix, "nested/scores.parquet"))

    assert Store().read_bytes(storage.join(prefix, "raw.bin")) == b"\x00\x01"
    assert Store().read_text(storage.join(prefix, "note.txt")) == "IMPRESSION: ___ no change"
    assert Store().read_json(storage.join(prefix, "summary.json")) == {"n": 3}
    assert Store().read_table(storage.join(prefix, "nested/scores.parquet")).equals(table)
    assert Store().parquet_rows(storage.join(prefix, "nested/scores.parquet")) == 2
    assert [storage.relative(uri, prefix) for uri in Store().list_files(prefix)] == [
        "nested/scores.parquet",
        "note.txt",
        "raw.bin",
        "summary.json",
    ]
    assert Store().list_files(prefix, suffix=".parquet") == [storage.join(prefix, "nested/scores.parquet")]
    assert Store().list_files(str(tmp_path / "absent")) == []


def test_local_write_replaces_whole_file_and_leaves_no_partial(tmp_path):
    uri = str(tmp_path / "out" / "summary.json")
    Store().write_text(uri, "old")
    Store().write_text(uri, "new")
    assert Store().read_text(uri) == "new"
    assert os.listdir(tmp_path / "out") == ["summary.json"]


def test_missing_local_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Store().read_bytes(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Store().file_size(str(tmp_path / "nope.txt"))
    assert not Store().exists(str(tmp_path / "nope.txt"))


def test_copy_file_streams_and_hashes(tmp_path):
    data = os.urandom(storage.CHUNK_BYTES + 12345)  # more than one chunk
    src, dst = str(tmp_path / "a.bin"), str(tmp_path / "copy" / "b.bin")
    Store().write_bytes(src, data)
    size, digest = Store().copy_file(src, dst)
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert Store().sha256(dst) == (size, digest)
    assert Store().read_bytes(dst) == data
    assert os.listdir(tmp_path / "copy") == ["b.bin"]


def test_failed_copy_leaves_nothing_at_destination(tmp_path):
    with pytest.raises(FileNotFoundError):
        Store().copy_file(str(tmp_path / "missing.bin"), str(tmp_path / "copy" / "b.bin"))
    assert not (tmp_path / "copy" / "b.bin").exists() and not list(tmp_path.rglob("*partial*"))


def test_delete_and_delete_tree(tmp_path):
    prefix = str(tmp_path / "run")
    for name in ["a.txt", "sub/b.txt", "sub/deeper/c.txt"]:
        Store().write_text(storage.join(prefix, name), name)
    Store().delete(storage.join(prefix, "a.txt"))
    Store().delete(storage.join(prefix, "a.txt"))  # a missing file is not an error
    Store().delete_tree(storage.join(prefix, "sub"))
    Store().delete_tree(storage.join(prefix, "sub"))
    assert Store().list_files(prefix) == []


def test_settings_prefer_config_then_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    from_env = storage.s3_settings(None)
    assert (from_env.access_key, from_env.secret_key) == ("env-key", "env-secret")
    assert (from_env.endpoint_url, from_env.region) == ("http://127.0.0.1:1", "eu-west-1")
    assert from_env.max_attempts == StorageConfig().max_attempts

    cfg = OmegaConf.structured(
        StorageConfig(endpoint_url="http://10.0.0.1:9000", region="us-west-2", access_key_id="cfg-key",
                      secret_access_key="cfg-secret", max_attempts=2)
    )  # fmt: skip
    from_cfg = storage.s3_settings(cfg)
    assert (from_cfg.access_key, from_cfg.secret_key) == ("cfg-key", "cfg-secret")
    assert (from_cfg.endpoint_url, from_cfg.region, from_cfg.max_attempts) == ("http://10.0.0.1:9000", "us-west-2", 2)
    assert "cfg-secret" not in repr(from_cfg) and "cfg-key" not in repr(from_cfg)


def test_filesystem_for_s3_uses_endpoint_and_bucket_path(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    cfg = OmegaConf.structured(StorageConfig(endpoint_url="http://127.0.0.1:8333", region="us-east-1"))
    fs, path = Store.from_config(cfg).filesystem("s3://bucket/run/scores.parquet")
    assert fs.type_name == "s3" and path == "bucket/run/scores.parquet"
    assert fs.region == "us-east-1"


def test_public_config_drops_credentials():
    cfg = load_config(overrides=["storage.access_key_id=AKIAEXAMPLE", "storage.secret_access_key=verysecret"])
    public = public_config(cfg)
    assert "access_key_id" not in public["storage"] and "secret_access_key" not in public["storage"]
    assert public["storage"]["max_attempts"] == cfg.storage.max_attempts
    assert "verysecret" not in str(public) and "AKIAEXAMPLE" not in str(public)
    assert redact({"a": [{"session_token": "t", "b": 1}]}) == {"a": [{"b": 1}]}


def test_storage_config_rejects_bad_values():
    from cxrmem.config import ConfigError

    with pytest.raises(ConfigError, match="storage.transfer_threads"):
        load_config(overrides=["storage.transfer_threads=0"])
    with pytest.raises(ConfigError, match="storage.backoff_s"):
        load_config(overrides=["storage.backoff_s=-1"])


def test_relative_accepts_a_relative_local_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listed = os.path.join(str(tmp_path), "runs", "demo", "figures", "a.png")
    assert storage.relative(listed, "runs/demo") == "figures/a.png"
    assert storage.relative("s3://b/runs/demo/x.json", "s3://b/runs/demo") == "x.json"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 32 KiB tmpfs (a full disk in miniature); skipped where mounting is not allowed."""
    import shutil
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command to make a small tmpfs")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or 'not permitted'}); needs root or CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_names_the_file_the_bytes_and_the_fix(small_tmpfs, tiny_model_dir):
    import subprocess

    from tests.cli_process import CXRMEM, REPO, cli_env

    output = small_tmpfs / "run"
    command = [CXRMEM, "prepare", "--config", str(REPO / "conf/test.yaml"),
               f"model.path={tiny_model_dir}", f"run.output={output}", "corpus.synthetic.n_reports=2000"]  # fmt: skip
    failed = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=300)
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert last.startswith(f"cxrmem prepare: cannot write {output}/prompts.parquet (") and "bytes): no space left on the device" in last, last
    assert "bytes free" in last and "point run.output at a larger disk" in last
    assert os.listdir(output) == []  # no partial file and no lease left behind
