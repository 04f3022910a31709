"""Local paths and s3:// URIs behind one small API: the `Store` (pyarrow's filesystem layer, boto3 for diagnosis).

Every reader and writer in cxrmem goes through a Store, so that a run's inputs and outputs can
live on local disk or in S3 without the rest of the code knowing which. Its settings are
resolved once (`Store.from_config(cfg.storage)`: the `storage` config section, else the
standard AWS environment AWS_ENDPOINT_URL[_S3], AWS_REGION / AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, else the AWS SDK's own chain),
and the object is passed on by the stages.

Writes: one atomic writer (`open_atomic`). On local disk it writes a temporary file, fsyncs
it, renames it into place and fsyncs the folder, so a crash leaves the old file or the new one,
durably. On S3 an object appears only once its upload completes.

Failures: one retry layer. pyarrow's and boto3's own retries are off (one attempt per
request), and every operation here is tried at most `storage.max_attempts` times in all, with
exponential backoff (`storage.backoff_s`, doubled each time). Problems that a retry cannot fix
(wrong access key, wrong secret, access denied, missing bucket) fail at once. Either way a
`StorageError` names the URI, the endpoint and what to check.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Optional, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxrmem.settings import NON_NEGATIVE, POSITIVE, Settings, knob

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK_BYTES = 8 << 20  # streaming copies and checksums read this much at a time
PARTIAL_MARK = ".partial-"  # local files being written carry this in their name until renamed into place


class StorageError(OSError):
    """A storage operation failed; the message names the URI, the endpoint and what to check."""


# What a user must fix for each S3 error code that retrying cannot cure.
FATAL_ERRORS = {
    "InvalidAccessKeyId": "the server does not know this access key; check AWS_ACCESS_KEY_ID or storage.access_key_id",
    "SignatureDoesNotMatch": (
        "the secret key does not match the access key; check AWS_SECRET_ACCESS_KEY or storage.secret_access_key"
    ),
    "AccessDenied": (
        "access denied; check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage.*) "
        "and that their policy allows this bucket and prefix"
    ),
    "NoSuchBucket": "the bucket does not exist; create it or fix the bucket name in the URI",
    "InvalidBucketName": "the bucket name is not valid; fix the URI",
}
# pyarrow reports the AWS SDK's error enum names, e.g. "AWS Error ACCESS_DENIED during HeadObject".
PYARROW_ERRORS = {
    "INVALID_ACCESS_KEY_ID": "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH": "SignatureDoesNotMatch",
    "ACCESS_DENIED": "AccessDenied",
    "NO_SUCH_BUCKET": "NoSuchBucket",
}


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(prefix: str, *parts: str) -> str:
    prefix = str(prefix).rstrip("/")
    return "/".join([prefix, *[p.strip("/") for p in parts]])


def relative(uri: str, prefix: str) -> str:
    """`uri` relative to `prefix` (both local or both s3://; local paths may be relative)."""
    if not is_s3(prefix):
        # Listings return absolute local paths, while run.output may be relative (runs/demo).
        uri, prefix = (os.path.abspath(os.path.expanduser(str(p))) for p in (uri, prefix))
    prefix = str(prefix).rstrip("/") + "/"
    if not str(uri).startswith(prefix):
        raise ValueError(f"{uri} is not under {prefix}")
    return str(uri)[len(prefix) :]


def join_inside(prefix: str, name: str, what: str) -> str:
    """prefix/name, refusing a `name` (built from data) that would resolve outside `prefix`."""
    parts = str(name).replace("\\", "/").split("/")
    if not name or str(name).startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{what} {name!r} would resolve outside {prefix}; the input that named it is corrupt or hostile")
    return join(prefix, name)


def _bucket_key(uri: str) -> tuple[str, str]:
    """("bucket", "key/inside") of an s3:// URI."""
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    return bucket, key


def bucket_of(uri: str) -> str:
    return _bucket_key(uri)[0]


# --- settings and clients -------------------------------------------------------------------


@dataclass(frozen=True)
class StorageConfig(Settings):
    """The `storage` config section: S3 endpoint, credentials and retries."""

    endpoint_url: Optional[str] = None  # S3 endpoint (None: AWS or $AWS_ENDPOINT_URL)
    region: Optional[str] = None  # S3 region (None: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)
    max_attempts: int = knob(5, POSITIVE)  # attempts per S3 request before giving up
    backoff_s: float = knob(0.5, NON_NEGATIVE)  # first retry delay, doubled each attempt
    connect_timeout_s: float = knob(5.0, POSITIVE)  # S3 connect timeout
    request_timeout_s: float = knob(60.0, POSITIVE)  # S3 socket read/write timeout of one request
    access_key_id: Optional[str] = None  # None: $AWS_ACCESS_KEY_ID or the AWS credential chain; never written to outputs
    secret_access_key: Optional[str] = None  # None: $AWS_SECRET_ACCESS_KEY or the AWS credential chain; never written to outputs
    transfer_threads: int = knob(8, POSITIVE)  # files checksummed or copied in parallel by publish and export


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 connection settings; hashable, so that filesystems and clients are cached per setting."""

    endpoint_url: Optional[str] = None
    region: str = "us-east-1"
    max_attempts: int = 5
    backoff_s: float = 0.5
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """The endpoint as a user would name it in a message."""
        return self.endpoint_url or f"AWS S3 ({self.region})"


def s3_settings(storage_cfg=None) -> S3Settings:
    """Settings from the `storage` config section (None: schema defaults), falling back to the AWS environment."""
    defaults = StorageConfig()

    def setting(name: str):
        value = getattr(storage_cfg, name, None) if storage_cfg is not None else None
        return getattr(defaults, name) if value is None else value

    env = os.environ
    access_key, secret_key = setting("access_key_id"), setting("secret_access_key")
    session_token = None
    if not (access_key and secret_key) and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        access_key, secret_key = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        session_token = env.get("AWS_SESSION_TOKEN")
    elif not (access_key and secret_key):
        access_key = secret_key = None  # the AWS SDK's credential chain (profile, instance role, ...)
    return S3Settings(
        endpoint_url=setting("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        region=setting("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        max_attempts=int(setting("max_attempts")),
        backoff_s=float(setting("backoff_s")),
        connect_timeout_s=float(setting("connect_timeout_s")),
        request_timeout_s=float(setting("request_timeout_s")),
        access_key=access_key,
        secret_key=secret_key,
        session_token=session_token,
    )


@functools.lru_cache(maxsize=16)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs = dict(
        region=settings.region,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        session_token=settings.session_token,
        connect_timeout=settings.connect_timeout_s,
        request_timeout=settings.request_timeout_s,
        # One attempt per request: the Store's own loop is the only retry layer.
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    if settings.endpoint_url:
        scheme, _, host = settings.endpoint_url.rstrip("/").partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=16)
def _s3_client(settings: S3Settings):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        config=Config(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.request_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},  # diagnosis only: no retries of its own
        ),
    )


# --- errors ---------------------------------------------------------------------------------


def _error_code(err: BaseException) -> Optional[str]:
    """The S3 error code of a pyarrow or boto3 error when it is one retrying cannot fix."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return code if code in FATAL_ERRORS else None
    text = str(err)
    for name, code in PYARROW_ERRORS.items():
        if name in text:
            return code
    return next((code for code in FATAL_ERRORS if code in text), None)


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def _no_space(err: OSError, uri: str, written: int, folder: str, elsewhere: str, spool: bool = False) -> Optional[StorageError]:
    """A StorageError naming the file, the bytes written, the free space and the fix, when `err` is a full disk."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f"its local spool in {folder}" if spool else folder
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    quota = "quota exceeded" if err.errno == errno.EDQUOT else "no space left on the device"
    return StorageError(
        f"cannot write {uri} ({written:,} bytes): {quota} of {where} ({free}). "
        f"Free space there (finished runs, their _parts/ folders, other files), or point {elsewhere} at a larger disk"
    )


def _limit(path: str, name: str, default: int) -> int:
    """os.pathconf's `name` (PC_NAME_MAX, PC_PATH_MAX) for the filesystem of `path`'s nearest existing folder."""
    folder = os.path.abspath(path)
    while folder and not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return int(os.pathconf(folder, name))
    except (OSError, ValueError):
        return default


def _abbreviated(name: str, keep: int = 24) -> str:
    return name if len(name) <= 2 * keep + 1 else f"{name[:keep]}…{name[-keep // 2:]}"


def name_too_long(err: BaseException) -> Optional[str]:
    """One line naming the path component over the filesystem's limit when `err` (or what caused it) is
    ENAMETOOLONG ([Errno 36], from Python or from pyarrow's local filesystem); None for any other error."""
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        text = str(err)
        if isinstance(err, OSError) and (err.errno == errno.ENAMETOOLONG or "errno 36]" in text.lower() or "name too long" in text.lower()):
            break
        err = err.__cause__ or err.__context__
    else:
        return None
    paths = [os.fsdecode(p) for p in (err.filename, err.filename2) if p] + re.findall(r"'([^']+)'", str(err))
    for path in paths:
        limit = _limit(path, "PC_NAME_MAX", 255)
        for part in path.split("/"):
            size = len(os.fsencode(part))
            if size > limit:
                return (
                    f"the name {_abbreviated(part)!r} ({size} bytes) in {path.replace(part, _abbreviated(part))} is longer than "
                    f"this filesystem allows ({limit} bytes per file or folder name): shorten it (run.output, or the name "
                    "given for that file)"
                )
        longest = _limit(path, "PC_PATH_MAX", 4096)
        if len(os.fsencode(path)) >= longest:
            return (
                f"the path {_abbreviated(path, 60)} ({len(os.fsencode(path))} bytes) is longer than this filesystem allows "
                f"({longest} bytes per path): choose a shorter run.output"
            )
    return f"{err}: a file or folder name is longer than this filesystem allows (usually 255 bytes): shorten run.output"


def _fsync_folder(path: str) -> None:
    """Make a rename inside `path` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_BUCKETS_SEEN: set = set()  # (settings, bucket) pairs known to exist and be accessible


@dataclass(frozen=True)
class Store:
    """Where a run's files are read and written: local disk, or S3 with settings resolved once."""

    s3: S3Settings = field(default_factory=lambda: s3_settings(None))  # default: the AWS environment
    transfer_threads: int = 8  # files checksummed or copied in parallel by publish and export

    @classmethod
    def from_config(cls, storage_cfg=None) -> "Store":
        threads = getattr(storage_cfg, "transfer_threads", None) if storage_cfg is not None else None
        return cls(s3=s3_settings(storage_cfg), transfer_threads=int(threads or cls.transfer_threads))

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem that holds `uri` and the path inside it."""
        uri = str(uri)
        if is_s3(uri):
            return _s3_filesystem(self.s3), uri[len("s3://") :]
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))

    # -- errors and retries ------------------------------------------------------------------
    def _diagnose(self, uri: str) -> Optional[str]:
        """Ask the server with a listing, whose error body says exactly what is wrong (HEAD answers do not)."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_key(uri)
        try:
            _s3_client(self.s3).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except ClientError as err:
            return _error_code(err)
        except BotoCoreError:
            return None
        return None

    def _fatal(self, code: str, action: str, uri: str) -> StorageError:
        if code == "AccessDenied":
            code = self._diagnose(uri) or code  # a wrong key or secret also reads as a bare 403
        detail = FATAL_ERRORS[code]
        if code == "NoSuchBucket":
            detail = f"bucket {bucket_of(uri)!r} does not exist; create it or fix the bucket name in the URI"
        return StorageError(f"cannot {action} {uri} at {self.s3.endpoint}: {code}: {detail}")

    def ensure_bucket(self, uri: str, action: str = "use") -> None:
        """Fail with a clear StorageError when the bucket of `uri` is missing or the credentials are wrong."""
        if (self.s3, bucket_of(uri)) in _BUCKETS_SEEN:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            _s3_client(self.s3).head_bucket(Bucket=bucket_of(uri))
        except ClientError as err:
            status = err.response.get("Error", {}).get("Code")
            code = {"403": "AccessDenied", "404": "NoSuchBucket"}.get(status, status)  # HEAD answers carry no body
            if code in FATAL_ERRORS:
                raise self._fatal(code, action, uri) from err
            raise StorageError(
                f"cannot {action} {uri}: {self.s3.endpoint} answered {code} when asked for bucket "
                f"{bucket_of(uri)!r}; check the server's health"
            ) from err
        except BotoCoreError as err:
            raise StorageError(
                f"cannot {action} {uri}: {self.s3.endpoint} is unreachable ({_short(err)}); "
                "check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
            ) from err
        _BUCKETS_SEEN.add((self.s3, bucket_of(uri)))

    def with_retries(self, action: str, uri: str, operation: Callable[[], T]) -> T:
        """Run `operation` on `uri`, at most storage.max_attempts times in all; then a StorageError.

        A missing object stays a FileNotFoundError (after checking that its bucket exists); local
        paths are not retried (their errors already say what is wrong).
        """
        if not is_s3(uri):
            return operation()
        from botocore.exceptions import BotoCoreError, ClientError

        attempts = self.s3.max_attempts
        for attempt in itertools.count(1):
            try:
                return operation()
            except StorageError:
                raise
            except FileNotFoundError as err:
                self.ensure_bucket(uri, action)
                raise FileNotFoundError(f"{uri} does not exist") from err
            except (OSError, BotoCoreError, ClientError) as err:
                code = _error_code(err)
                if code is not None:
                    raise self._fatal(code, action, uri) from err
                if attempt >= attempts:
                    raise StorageError(
                        f"cannot {action} {uri} at {self.s3.endpoint}: tried {attempt} times "
                        f"(storage.max_attempts) over {self.s3.backoff_s * (2 ** (attempt - 1) - 1):.1f} s of backoff; "
                        f"last error: {_short(err)}. Check that the endpoint is reachable (storage.endpoint_url / "
                        "AWS_ENDPOINT_URL) and healthy, or raise storage.max_attempts for a flaky link"
                    ) from err
                delay = self.s3.backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "%s %s failed (attempt %d of %d), retrying in %.2f s: %s",
                    action, uri, attempt, attempts, delay, _short(err),
                )  # fmt: skip
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- reading -----------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        found = self.with_retries("inspect", uri, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)
        if not found and is_s3(uri):
            self.ensure_bucket(uri, "inspect")  # a missing bucket is a configuration error, not a missing file
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
        return self.with_retries(
            "read", uri, lambda: pq.read_table(path, filesystem=fs, columns=columns, filters=filters)
        )

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
        fs, path = self.filesystem(uri)

        def listing() -> list[pafs.FileInfo]:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return []
            # allow_not_found: a folder emptied between the two calls (its last file just deleted) lists as empty.
            return fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))

        infos = self.with_retries("list", uri, listing)
        if not infos and is_s3(uri):
            self.ensure_bucket(uri, "list")
        prefix = "s3://" if is_s3(uri) else ""
        return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def file_size(self, uri: str) -> int:
        fs, path = self.filesystem(uri)
        info = self.with_retries("inspect", uri, lambda: fs.get_file_info(path))
        if info.type != pafs.FileType.File:
            if is_s3(uri):
                self.ensure_bucket(uri, "inspect")
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
        """A stream whose bytes appear at `uri` only if the block succeeds, durably on local disk.

        Local: temporary file, fsync, rename, fsync of the folder. S3: the bytes are spooled here
        and sent in one upload at the end, so a failed block uploads nothing. A full disk is a
        StorageError naming the file, the bytes (`size`, when the caller knows it), the free space and the fix.
        """
        if is_s3(uri):
            with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
                try:
                    yield spool
                except OSError as err:
                    raise _no_space(err, uri, size or spool.tell(), tempfile.gettempdir(), "TMPDIR", spool=True) or err
                self.with_retries("write", uri, lambda: self._upload(spool, uri))
            return
        _, path = self.filesystem(uri)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        partial = f"{path}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
        try:
            with open(partial, "wb") as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(partial, path)
        except BaseException as err:
            written = size or (os.path.getsize(partial) if os.path.exists(partial) else 0)
            with contextlib.suppress(OSError):
                os.remove(partial)
            if isinstance(err, OSError):
                too_long = name_too_long(err)
                raise _no_space(err, uri, written, folder, "run.output") or (StorageError(too_long) if too_long else err)
            raise
        _fsync_folder(folder)

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

    # -- conditional writes: the lease's primitives (cxrmem/lease.py) ---------------------------
    def read_versioned(self, uri: str) -> Optional[tuple[bytes, str]]:
        """(bytes, version) of a small file, None when it does not exist. The version is what
        `replace_if` compares: the S3 ETag, the sha256 of the bytes on local disk."""
        if not is_s3(uri):
            try:
                with open(self.filesystem(uri)[1], "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                return None
            return data, hashlib.sha256(data).hexdigest()
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)

        def read() -> Optional[tuple[bytes, str]]:
            try:
                answer = _s3_client(self.s3).get_object(Bucket=bucket, Key=key)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return answer["Body"].read(), answer["ETag"]

        return self.with_retries("read", uri, read)

    def create_new(self, uri: str, data: bytes) -> Optional[str]:
        """Write `uri` only if it does not exist; its version, or None when it already existed.

        Local: the bytes go to a temporary file that is hard-linked into place, an exclusive
        create (like O_EXCL) that never shows a half-written file. S3: a conditional PUT
        (`If-None-Match: *`), which AWS and SeaweedFS refuse with 412 when the key exists.
        """
        if not is_s3(uri):
            path = self.filesystem(uri)[1]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
            try:
                with open(partial, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.link(partial, path)
            except FileExistsError:
                return None
            finally:
                with contextlib.suppress(OSError):
                    os.remove(partial)
            _fsync_folder(os.path.dirname(path))
            return hashlib.sha256(data).hexdigest()
        return self._put_conditional(uri, data, IfNoneMatch="*")

    def replace_if(self, uri: str, data: bytes, version: str) -> Optional[str]:
        """Replace `uri` only if it still holds `version` (from read_versioned); the new version, or None.

        S3: a conditional PUT (`If-Match: <ETag>`). Local: the file is renamed aside (one renamer
        wins), its bytes compared, and the new bytes created in its place; a file that changed in
        between is put back.
        """
        if is_s3(uri):
            return self._put_conditional(uri, data, IfMatch=version)
        path = self.filesystem(uri)[1]
        aside = f"{path}{PARTIAL_MARK}aside-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        try:
            with open(aside, "rb") as handle:
                if hashlib.sha256(handle.read()).hexdigest() != version:
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, path)  # someone else's file: put it back
                    return None
            return self.create_new(uri, data)
        finally:
            with contextlib.suppress(OSError):
                os.remove(aside)

    def _put_conditional(self, uri: str, data: bytes, **condition: str) -> Optional[str]:
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)

        def put() -> Optional[str]:
            try:
                return _s3_client(self.s3).put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
            except ClientError as err:
                # 412: the condition failed; 409: a concurrent conditional write to the same key won.
                if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    return None
                raise

        return self.with_retries("write", uri, put)

    def delete_if(self, uri: str, version: str) -> bool:
        """Delete `uri` if it still holds `version`; True when it was deleted (or was already gone)."""
        current = self.read_versioned(uri)
        if current is None:
            return True
        if current[1] != version:
            return False
        self.delete(uri)
        return True

    def makedirs(self, uri: str) -> None:
        """Create a local folder; a no-op on S3, which has no folders (pyarrow would write marker objects)."""
        if not is_s3(uri):
            os.makedirs(self.filesystem(uri)[1], exist_ok=True)

    def delete(self, uri: str) -> None:
        """Delete one file; deleting a missing file is not an error."""
        fs, path = self.filesystem(uri)

        def remove() -> None:
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)

        self.with_retries("delete", uri, remove)

    def delete_tree(self, uri: str) -> None:
        """Delete a folder (a key prefix on S3) and everything under it; a missing folder is not an error.

        On S3 the keys are listed and deleted here: pyarrow's delete_dir would leave a marker object
        for the parent folder behind (a `_parts/` key in a finished run).
        """
        if is_s3(uri):
            self.with_retries("delete", uri, lambda: self._delete_keys(uri))
            return
        fs, path = self.filesystem(uri)

        def remove() -> None:
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)

        self.with_retries("delete", uri, remove)

    def _delete_keys(self, uri: str) -> None:
        bucket, key = _bucket_key(uri)
        client = _s3_client(self.s3)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})

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
        if is_s3(src) != is_s3(dst) or not is_s3(dst):
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
