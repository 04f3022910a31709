"""The Store: every read and write of cxrmem, on whichever storage a URI's scheme names.

Callers pass a Store and URIs; the backend of each URI's scheme (backend.py: local paths,
s3://, any scheme registered) hands the Store a pyarrow filesystem and answers what differs
between schemes. What is the same on every scheme lives here, once:

Writes: one atomic writer (`open_atomic`). A file on this machine's disk is written to a
temporary file, fsynced, renamed into place and its folder fsynced (local.py), so a crash leaves
the old file or the new one, durably. Anywhere else the bytes are spooled here and sent in one
upload: an object appears only once its upload completes.

Failures: one retry layer (`with_retries`). Backends make one attempt per request, and every
operation on a retried backend is tried at most `storage.max_attempts` times in all, with
exponential backoff (`storage.backoff_s`, doubled each time). Problems that a retry cannot fix
(wrong access key, wrong secret, access denied, missing bucket) fail at once. Either way a
`StorageError` names the URI, the endpoint and what to check. Local paths are not retried.

Transfers: `parallel` runs checksums and copies on `storage.transfer_threads` threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Optional, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxrmem.storage.backend import Backend, backend_class, local_path
from cxrmem.storage.errors import StorageError, no_space, short
from cxrmem.storage.local import replace_durably
from cxrmem.storage.s3 import S3Settings, s3_settings
from cxrmem.storage.uris import scheme_of

log = logging.getLogger(__package__)  # "cxrmem.storage": the name that log filters select, whichever module logs

T = TypeVar("T")
CHUNK_BYTES = 8 << 20  # streaming copies, uploads and checksums move this much at a time
SPOOL_BYTES = 64 << 20  # an upload is spooled in memory up to this size, then in a temporary file


@dataclass(frozen=True)
class Store:
    """Where a run's files are read and written: local disk, S3 (settings resolved once), any registered scheme."""

    s3: S3Settings = field(default_factory=lambda: s3_settings(None))  # default: the AWS environment
    transfer_threads: int = 8  # files checksummed or copied in parallel by publish and export

    @classmethod
    def from_config(cls, storage_cfg=None) -> "Store":
        threads = getattr(storage_cfg, "transfer_threads", None) if storage_cfg is not None else None
        return cls(s3=s3_settings(storage_cfg), transfer_threads=int(threads or cls.transfer_threads))

    def backend(self, uri: str) -> Backend:
        """The backend of `uri`'s scheme, with this Store's settings."""
        return backend_class(uri)(self)

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem that holds `uri` and the path inside it."""
        return self.backend(uri).filesystem(str(uri))

    # -- the one retry layer -----------------------------------------------------------------
    def with_retries(self, action: str, uri: str, operation: Callable[[], T]) -> T:
        """Run `operation` on `uri`, at most storage.max_attempts times in all; then a StorageError.

        A missing object stays a FileNotFoundError (after the backend checked that its container,
        an S3 bucket, exists); backends that are not retried (local paths: their errors already
        say what is wrong) run `operation` once, as it is.
        """
        backend = self.backend(uri)
        if not backend.retried:
            return operation()
        retryable, attempts, backoff_s = backend.retryable_errors, self.s3.max_attempts, self.s3.backoff_s
        for attempt in itertools.count(1):
            try:
                return operation()
            except StorageError:
                raise
            except FileNotFoundError as err:
                backend.ensure_reachable(uri, action)
                raise FileNotFoundError(f"{uri} does not exist") from err
            except retryable as err:
                fatal = backend.fatal(err, action, uri)
                if fatal is not None:
                    raise fatal from err
                if attempt >= attempts:
                    raise StorageError(
                        f"cannot {action} {uri} at {backend.endpoint}: tried {attempt} times (storage.max_attempts) over "
                        f"{backoff_s * (2 ** (attempt - 1) - 1):.1f} s of backoff; last error: {short(err)}. "
                        f"{backend.retry_hint}, or raise storage.max_attempts for a flaky link"
                    ) from err
                delay = backoff_s * 2 ** (attempt - 1)
                log.warning("%s %s failed (attempt %d of %d), retrying in %.2f s: %s", action, uri, attempt, attempts, delay, short(err))
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- reading -----------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        found = self.with_retries("inspect", uri, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)
        if not found:
            self.backend(uri).ensure_reachable(uri, "inspect")  # a missing bucket is a configuration error, not a missing file
        return found

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)

        def read() -> bytes:
            with fs.open_input_stream(path) as stream:
                return stream.read()

        return self.with_retries("read", uri, read)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str):
        return json.loads(self.read_text(uri))

    def read_table(self, uri: str, columns: Optional[list[str]] = None, filters=None) -> pa.Table:
        fs, path = self.filesystem(uri)
        return self.with_retries("read", uri, lambda: pq.read_table(path, filesystem=fs, columns=columns, filters=filters))

    def parquet_schema(self, uri: str) -> pa.Schema:
        fs, path = self.filesystem(uri)
        return self.with_retries("read the Parquet schema of", uri, lambda: pq.read_schema(path, filesystem=fs))

    def parquet_rows(self, uri: str) -> int:
        """Row count from the Parquet footer (reads only the footer)."""
        fs, path = self.filesystem(uri)

        def rows() -> int:
            with fs.open_input_file(path) as handle:
                return pq.read_metadata(handle).num_rows

        return self.with_retries("read the Parquet footer of", uri, rows)

    def list_files(self, uri: str, suffix: str = "") -> list[str]:
        """URIs of the files under `uri` (recursively), sorted; empty when the folder does not exist."""
        backend = self.backend(uri)
        fs, path = backend.filesystem(str(uri))

        def listing() -> list[pafs.FileInfo]:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return []
            # allow_not_found: a folder emptied between the two calls (its last file just deleted) lists as empty.
            return fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))

        infos = self.with_retries("list", uri, listing)
        if not infos:
            backend.ensure_reachable(uri, "list")
        return sorted(backend.uri_of(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def file_size(self, uri: str) -> int:
        fs, path = self.filesystem(uri)
        info = self.with_retries("inspect", uri, lambda: fs.get_file_info(path))
        if info.type != pafs.FileType.File:
            self.backend(uri).ensure_reachable(uri, "inspect")
            raise FileNotFoundError(f"{uri} does not exist")
        return info.size

    def sha256(self, uri: str) -> tuple[int, str]:
        """(size in bytes, sha256 hex digest) of a file, streamed in chunks."""
        fs, path = self.filesystem(uri)

        def digest() -> tuple[int, str]:
            hasher, size = hashlib.sha256(), 0
            with fs.open_input_stream(path) as stream:
                while chunk := stream.read(CHUNK_BYTES):
                    hasher.update(chunk)
                    size += len(chunk)
            return size, hasher.hexdigest()

        return self.with_retries("checksum", uri, digest)

    # -- writing: the one atomic writer --------------------------------------------------------
    @contextlib.contextmanager
    def open_atomic(self, uri: str, size: Optional[int] = None) -> Iterator[BinaryIO]:
        """A stream whose bytes appear at `uri` only if the block succeeds, durably on local disk (module doc).

        A full disk is a StorageError naming the file, the bytes (`size`, when the caller knows it),
        the free space and the fix.
        """
        path = local_path(uri)
        if path is not None:
            with replace_durably(path, uri, size) as stream:
                yield stream
            return
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            try:
                yield spool
            except OSError as err:
                raise no_space(err, uri, size or spool.tell(), tempfile.gettempdir(), "TMPDIR", spool=True) or err
            self.with_retries("write", uri, lambda: self._upload(spool, uri))

    def _upload(self, spool: BinaryIO, uri: str) -> None:
        fs, path = self.filesystem(uri)
        spool.seek(0)
        with fs.open_output_stream(path) as stream:  # the object appears only when the upload completes
            while chunk := spool.read(CHUNK_BYTES):
                stream.write(chunk)

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_atomic(uri, size=len(data)) as stream:
            stream.write(data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def write_table(self, table: pa.Table, uri: str) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(uri, buffer.getvalue())

    # -- conditional writes: the lease's primitives (cxrmem/lease.py), each backend's own ---------
    def read_versioned(self, uri: str) -> Optional[tuple[bytes, str]]:
        """(bytes, version) of a small file, None when it does not exist. The version is what `replace_if`
        compares: the S3 ETag, the sha256 of the bytes on local disk."""
        return self.with_retries("read", uri, lambda: self.backend(uri).read_versioned(uri))

    def create_new(self, uri: str, data: bytes) -> Optional[str]:
        """Write `uri` only if it does not exist; its version, or None when it already existed.

        Local: an exclusive create that never shows a half-written file. S3: a conditional PUT
        (`If-None-Match: *`).
        """
        return self.with_retries("write", uri, lambda: self.backend(uri).create_new(uri, data))

    def replace_if(self, uri: str, data: bytes, version: str) -> Optional[str]:
        """Replace `uri` only if it still holds `version` (from read_versioned); the new version, or None.

        S3: a conditional PUT (`If-Match: <ETag>`). Local: renamed aside, compared, created anew.
        """
        return self.with_retries("write", uri, lambda: self.backend(uri).replace_if(uri, data, version))

    def delete_if(self, uri: str, version: str) -> bool:
        """Delete `uri` if it still holds `version`; True when it was deleted (or was already gone)."""
        current = self.read_versioned(uri)
        if current is None:
            return True
        if current[1] != version:
            return False
        self.delete(uri)
        return True

    # -- folders and deletes -------------------------------------------------------------------
    def makedirs(self, uri: str) -> None:
        """Create a local folder; a no-op on S3, which has no folders (pyarrow would write marker objects)."""
        self.backend(uri).makedirs(uri)

    def delete(self, uri: str) -> None:
        """Delete one file; deleting a missing file is not an error."""
        fs, path = self.filesystem(uri)

        def remove() -> None:
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)

        self.with_retries("delete", uri, remove)

    def delete_tree(self, uri: str) -> None:
        """Delete a folder (a key prefix on S3) and everything under it; a missing folder is not an error."""
        self.with_retries("delete", uri, lambda: self.backend(uri).delete_tree(uri))

    # -- copies --------------------------------------------------------------------------------
    def copy_file(self, src: str, dst: str, dst_store: Optional["Store"] = None) -> tuple[int, str]:
        """Stream `src` (read here) to `dst` (written by `dst_store`, default this one), hashing on the way.

        Returns (bytes, sha256 of what was read). The destination appears only complete (open_atomic);
        a failed attempt starts the whole copy again.
        """
        dst_store = dst_store or self
        src_fs, src_path = self.filesystem(src)

        def copy() -> tuple[int, str]:
            hasher, size = hashlib.sha256(), 0
            with src_fs.open_input_stream(src_path) as reader, dst_store.open_atomic(dst) as writer:
                while chunk := reader.read(CHUNK_BYTES):
                    hasher.update(chunk)
                    writer.write(chunk)
                    size += len(chunk)
            return size, hasher.hexdigest()

        return self.with_retries(f"copy to {dst} from", src, copy)

    def copy_within(self, src: str, dst: str) -> None:
        """Copy a file inside one filesystem: a server-side copy on S3 (objects up to 5 GB), no bytes through here."""
        if scheme_of(src) != scheme_of(dst) or local_path(dst) is not None:
            self.copy_file(src, dst)  # local copies go through the durable writer
            return
        fs, src_path = self.filesystem(src)
        _, dst_path = self.filesystem(dst)
        self.with_retries(f"copy {src} to", dst, lambda: fs.copy_file(src_path, dst_path))

    def parallel(self, function: Callable, items) -> list:
        """`function` over `items` on `transfer_threads` threads (pyarrow I/O and sha256 release the GIL)."""
        items = list(items)
        threads = min(self.transfer_threads, max(1, len(items)))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(function, items))
