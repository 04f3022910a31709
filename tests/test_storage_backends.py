"""A new storage scheme is one Backend subclass: memory:// here, registered in this file alone, runs the Store,
a corpus listing, a model copy and the one-writer lease with no change anywhere else in cxrmem."""

import hashlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from fsspec.implementations.memory import MemoryFileSystem  # installed with ray[data] and huggingface_hub

from cxrmem import storage
from cxrmem.lease import Lease, LeaseHeldError, LeaseSettings, hold
from cxrmem.runfiles import RunLayout
from cxrmem.storage import Backend, Store, register

_FILES = MemoryFileSystem()  # one per process: fsspec keeps its files in a class-level dict
_CONDITIONAL = threading.Lock()  # the conditional writes' check-then-write happens under it


@register
class MemoryBackend(Backend):
    """memory://key: fsspec's in-memory files through pyarrow's FSSpecHandler; versions are the bytes' sha256.
    Unlike S3 an upload is visible while it runs (fsspec commits a memory file on open); the Store's spool still
    means that a failed write block sends nothing."""

    scheme = "memory"

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        return pafs.PyFileSystem(pafs.FSSpecHandler(_FILES)), str(uri)[len("memory://") :]

    def uri_of(self, path: str) -> str:
        return "memory://" + path.lstrip("/")  # fsspec lists absolute paths

    def read_versioned(self, uri: str) -> Optional[tuple[bytes, str]]:
        with _CONDITIONAL:
            data = self._read(uri)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def create_new(self, uri: str, data: bytes) -> Optional[str]:
        with _CONDITIONAL:
            if self._read(uri) is not None:
                return None
            return self._write(uri, data)

    def replace_if(self, uri: str, data: bytes, version: str) -> Optional[str]:
        with _CONDITIONAL:
            current = self._read(uri)
            if current is None or hashlib.sha256(current).hexdigest() != version:
                return None
            return self._write(uri, data)

    def _read(self, uri: str) -> Optional[bytes]:
        path = self.filesystem(uri)[1]
        return _FILES.cat_file(path) if _FILES.isfile(path) else None

    def _write(self, uri: str, data: bytes) -> str:
        _FILES.pipe_file(self.filesystem(uri)[1], data)
        return hashlib.sha256(data).hexdigest()


@pytest.fixture
def prefix():
    """A memory:// prefix of this test's own, emptied afterwards (the memory files outlive a test)."""
    where = f"memory://test-{uuid.uuid4().hex[:8]}/run"
    yield where
    Store().delete_tree(where)


def test_the_scheme_is_known_by_its_registration_alone(prefix):
    assert isinstance(Store().backend(prefix), MemoryBackend)
    assert storage.local_path(prefix) is None  # remote: lease, corpus and models treat it as they treat s3://
    assert storage.canonical(prefix + "/") == prefix
    with pytest.raises(storage.StorageError, match=r"no storage backend for gs://bucket/x: gs:// is not one of .*memory://.*s3://"):
        Store().read_bytes("gs://bucket/x")


def test_bytes_text_json_and_tables_round_trip_and_list(prefix):
    store, table = Store(), pa.table({"prompt_id": ["a", "b"], "d_mem": [0.5, 1.5]})
    store.write_bytes(storage.join(prefix, "raw.bin"), b"\x00\x01")
    store.write_json(storage.join(prefix, "summary.json"), {"n": 3})
    store.write_table(table, storage.join(prefix, "nested/scores.parquet"))

    assert store.read_bytes(storage.join(prefix, "raw.bin")) == b"\x00\x01"
    assert store.read_json(storage.join(prefix, "summary.json")) == {"n": 3}
    assert store.read_table(storage.join(prefix, "nested/scores.parquet")).equals(table)
    assert store.read_table(storage.join(prefix, "nested/scores.parquet"), columns=["d_mem"]).num_columns == 1
    assert store.parquet_rows(storage.join(prefix, "nested/scores.parquet")) == 2
    assert store.file_size(storage.join(prefix, "raw.bin")) == 2
    assert store.sha256(storage.join(prefix, "raw.bin")) == (2, hashlib.sha256(b"\x00\x01").hexdigest())
    assert [storage.relative(uri, prefix) for uri in store.list_files(prefix)] == ["nested/scores.parquet", "raw.bin", "summary.json"]
    assert store.list_files(prefix, suffix=".parquet") == [storage.join(prefix, "nested/scores.parquet")]
    assert store.list_files(storage.join(prefix, "absent")) == []
    assert store.exists(storage.join(prefix, "raw.bin")) and not store.exists(storage.join(prefix, "nope.bin"))
    with pytest.raises(FileNotFoundError, match=f"{prefix}/nope.bin does not exist"):
        store.read_bytes(storage.join(prefix, "nope.bin"))

    store.delete(storage.join(prefix, "raw.bin"))
    store.delete(storage.join(prefix, "raw.bin"))  # a missing file is not an error
    store.delete_tree(storage.join(prefix, "nested"))
    assert store.list_files(prefix) == [storage.join(prefix, "summary.json")]


def test_a_failed_atomic_write_sends_nothing(prefix):
    store, uri = Store(), storage.join(prefix, "summary.json")
    store.write_text(uri, "old")
    with pytest.raises(RuntimeError, match="stage failed"):
        with store.open_atomic(uri) as stream:
            stream.write(b"half of the new")
            raise RuntimeError("stage failed")
    assert store.read_text(uri) == "old"
    with store.open_atomic(uri) as stream:
        stream.write(b"new")
    assert store.read_text(uri) == "new"


def test_copies_to_and_from_local_disk_and_within(prefix, tmp_path):
    store, data = Store(), bytes(range(256)) * 1000
    local = str(tmp_path / "a.bin")
    store.write_bytes(local, data)
    expected = (len(data), hashlib.sha256(data).hexdigest())
    assert store.copy_file(local, storage.join(prefix, "a.bin")) == expected
    store.copy_within(storage.join(prefix, "a.bin"), storage.join(prefix, "b.bin"))
    assert store.copy_file(storage.join(prefix, "b.bin"), str(tmp_path / "back.bin")) == expected
    assert store.read_bytes(str(tmp_path / "back.bin")) == data


def test_a_corpus_and_a_model_in_memory_are_read_like_s3(prefix, tmp_path):
    from cxrmem.corpus.files import corpus_files
    from cxrmem.models.loading import local_model_root

    store = Store()
    for name in ["b.txt", "a.txt", "notes.md"]:
        store.write_text(storage.join(prefix, "corpus", name), name)
    files, outside = corpus_files(storage.join(prefix, "corpus"), (".txt",), store)
    assert files == [storage.join(prefix, "corpus", name) for name in ["a.txt", "b.txt"]] and outside == []

    store.write_json(storage.join(prefix, "model", "model_index.json"), {"_class_name": "StableDiffusionPipeline"})
    model = SimpleNamespace(path=storage.join(prefix, "model"), cache_dir=str(tmp_path / "cache"), kind="diffusers")
    local = local_model_root(model, store)
    assert local.startswith(str(tmp_path / "cache")) and store.read_json(storage.join(local, "model_index.json"))


def test_one_lease_holder_on_a_memory_prefix(prefix):
    """The lease protocol (create_new / read_versioned / replace_if / delete_if) on the new scheme."""
    store, uri = Store(), RunLayout(prefix).lease
    leases = [Lease(store, prefix, LeaseSettings(timeout_s=60), f"writer {i}") for i in range(6)]

    def take(lease: Lease) -> bool:
        try:
            lease.acquire()
            return True
        except LeaseHeldError:
            return False

    with ThreadPoolExecutor(len(leases)) as pool:
        won = list(pool.map(take, leases))
    assert won.count(True) == 1
    leases[won.index(True)].release()
    assert not store.exists(uri)

    with hold(store, prefix, LeaseSettings(timeout_s=60), "cxrmem audit") as held:
        assert store.read_json(uri)["token"] == held.token
        with hold(store, storage.join(prefix, "stage"), LeaseSettings(timeout_s=60)) as inner:
            assert inner is held  # re-entrant below the held prefix
        with pytest.raises(LeaseHeldError, match=f"{prefix} is being written by .*run.force_lease=true"):
            Lease(store, prefix, LeaseSettings(timeout_s=60), "cxrmem score").acquire()
        taker = Lease(store, prefix, LeaseSettings(force=True, timeout_s=60), "cxrmem score")
        taker.acquire()  # a forced takeover: a conditional replace of the holder's version
        assert store.read_json(uri)["token"] == taker.token
        taker.release()
    assert not store.exists(uri)
