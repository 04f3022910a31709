"""Local paths and s3:// URIs behind one small API (pyarrow's filesystem layer, boto3 for diagnosis).

Every reader and writer in cxrmem goes through here, so that a run's inputs and outputs can
live on local disk or in S3 without the rest of the code knowing which.

S3 settings come from the `storage` config section, else from the standard AWS environment
(AWS_ENDPOINT_URL[_S3], AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), else from the AWS SDK's own credential chain.

Failures: pyarrow retries each S3 request (`AwsStandardS3RetryStrategy(storage.max_attempts)`),
and every operation here is retried as a whole with exponential backoff (`storage.backoff_s`,
doubled each time, `storage.max_attempts` attempts). Problems that a retry cannot fix (wrong
access key, wrong secret, access denied, missing bucket) fail at once. Either way a
`StorageError` names the URI, the endpoint and what to check. The bound for an unreachable
endpoint is max_attempts operations of up to max_attempts requests each: about a minute with
the defaults (5 attempts, 0.5 s backoff), about a second with max_attempts=2. Credentials never appear in
messages, logs or outputs: `public_config` is the configuration that may be written out.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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
SECRET_KEY_PATTERN = re.compile(r"secret|password|token|access_key|credential", re.IGNORECASE)


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


def bucket_of(uri: str) -> str:
    return str(uri)[len("s3://") :].split("/", 1)[0]


# --- settings and clients -------------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 connection settings; hashable, so that filesystems and clients are cached per setting."""

    endpoint_url: Optional[str]
    region: str
    max_attempts: int
    backoff_s: float
    connect_timeout_s: float
    request_timeout_s: float
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """The endpoint as a user would name it in a message."""
        return self.endpoint_url or f"AWS S3 ({self.region})"


def setting(storage_cfg, name: str):
    """`storage.<name>` from the config section, or its schema default (also when no section is given)."""
    from cxrmem.config import StorageConfig

    value = getattr(storage_cfg, name, None) if storage_cfg is not None else None
    return getattr(StorageConfig(), name) if value is None else value


def s3_settings(storage_cfg=None) -> S3Settings:
    """Settings from the `storage` config section, falling back to the standard AWS environment."""
    env = os.environ
    access_key, secret_key = setting(storage_cfg, "access_key_id"), setting(storage_cfg, "secret_access_key")
    session_token = None
    if not (access_key and secret_key) and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        access_key, secret_key = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        session_token = env.get("AWS_SESSION_TOKEN")
    elif not (access_key and secret_key):
        access_key = secret_key = None  # the AWS SDK's credential chain (profile, instance role, ...)
    return S3Settings(
        endpoint_url=(
            setting(storage_cfg, "endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        ),
        region=setting(storage_cfg, "region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        max_attempts=int(setting(storage_cfg, "max_attempts")),
        backoff_s=float(setting(storage_cfg, "backoff_s")),
        connect_timeout_s=float(setting(storage_cfg, "connect_timeout_s")),
        request_timeout_s=float(setting(storage_cfg, "request_timeout_s")),
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
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
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
            retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        ),
    )


def filesystem(uri: str, storage_cfg=None) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `uri` and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        return _s3_filesystem(s3_settings(storage_cfg)), uri[len("s3://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


# --- errors and retries ---------------------------------------------------------------------


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


def _diagnose(uri: str, settings: S3Settings) -> Optional[str]:
    """Ask the server with a listing, whose error body says exactly what is wrong (HEAD answers do not)."""
    from botocore.exceptions import BotoCoreError, ClientError

    key = str(uri)[len("s3://") :].partition("/")[2]
    try:
        _s3_client(settings).list_objects_v2(Bucket=bucket_of(uri), Prefix=key, MaxKeys=1)
    except ClientError as err:
        return _error_code(err)
    except BotoCoreError:
        return None
    return None


def _fatal(code: str, action: str, uri: str, settings: S3Settings) -> StorageError:
    if code == "AccessDenied":
        code = _diagnose(uri, settings) or code  # a wrong key or secret also reads as a bare 403
    detail = FATAL_ERRORS[code]
    if code == "NoSuchBucket":
        detail = f"bucket {bucket_of(uri)!r} does not exist; create it or fix the bucket name in the URI"
    return StorageError(f"cannot {action} {uri} at {settings.endpoint}: {code}: {detail}")


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


_BUCKETS_SEEN: set = set()  # (settings, bucket) pairs known to exist and be accessible


def ensure_bucket(uri: str, storage_cfg=None, action: str = "use") -> None:
    """Fail with a clear StorageError when the bucket of `uri` is missing or the credentials are wrong."""
    settings = s3_settings(storage_cfg)
    if (settings, bucket_of(uri)) in _BUCKETS_SEEN:
        return
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client(settings).head_bucket(Bucket=bucket_of(uri))
    except ClientError as err:
        status = err.response.get("Error", {}).get("Code")
        code = {"403": "AccessDenied", "404": "NoSuchBucket"}.get(status, status)  # HEAD answers carry no body
        if code in FATAL_ERRORS:
            raise _fatal(code, action, uri, settings) from err
        raise StorageError(
            f"cannot {action} {uri}: {settings.endpoint} answered {code} when asked for bucket "
            f"{bucket_of(uri)!r}; check the server's health"
        ) from err
    except BotoCoreError as err:
        raise StorageError(
            f"cannot {action} {uri}: {settings.endpoint} is unreachable ({_short(err)}); "
            "check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
        ) from err
    _BUCKETS_SEEN.add((settings, bucket_of(uri)))


def with_retries(action: str, uri: str, storage_cfg, operation: Callable[[], T]) -> T:
    """Run `operation` on `uri`; S3 failures are retried with backoff, then raised as StorageError.

    A missing object stays a FileNotFoundError (after checking that its bucket exists); local
    paths are not retried (their errors already say what is wrong).
    """
    if not is_s3(uri):
        return operation()
    from botocore.exceptions import BotoCoreError, ClientError

    settings = s3_settings(storage_cfg)
    for attempt in itertools.count(1):
        try:
            return operation()
        except StorageError:
            raise
        except FileNotFoundError as err:
            ensure_bucket(uri, storage_cfg, action)
            raise FileNotFoundError(f"{uri} does not exist") from err
        except (OSError, BotoCoreError, ClientError) as err:
            code = _error_code(err)
            if code is not None:
                raise _fatal(code, action, uri, settings) from err
            if attempt == settings.max_attempts:
                raise StorageError(
                    f"cannot {action} {uri} at {settings.endpoint} after {attempt} attempts: {_short(err)}; "
                    "check that the endpoint is reachable (storage.endpoint_url / AWS_ENDPOINT_URL) and healthy, "
                    "or raise storage.max_attempts for a flaky link"
                ) from err
            delay = settings.backoff_s * 2 ** (attempt - 1)
            log.warning(
                "%s %s failed (attempt %d of %d), retrying in %.2f s: %s",
                action, uri, attempt, settings.max_attempts, delay, _short(err),
            )  # fmt: skip
            time.sleep(delay)


# --- files ----------------------------------------------------------------------------------


def exists(uri: str, storage_cfg=None) -> bool:
    fs, path = filesystem(uri, storage_cfg)
    found = with_retries("inspect", uri, storage_cfg, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)
    if not found and is_s3(uri):
        ensure_bucket(uri, storage_cfg, "inspect")  # a missing bucket is a configuration error, not a missing file
    return found


def makedirs(uri: str, storage_cfg=None) -> None:
    """Create a local folder; a no-op on S3, which has no folders (pyarrow would write marker objects)."""
    if not is_s3(uri):
        fs, path = filesystem(uri, storage_cfg)
        fs.create_dir(path, recursive=True)


def read_bytes(uri: str, storage_cfg=None) -> bytes:
    fs, path = filesystem(uri, storage_cfg)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return with_retries("read", uri, storage_cfg, read)


def write_bytes(uri: str, data: bytes, storage_cfg=None) -> None:
    """Write a whole file; readers see the old file or the new one, never a part (local: rename into place)."""
    fs, path = filesystem(uri, storage_cfg)
    if is_s3(uri):

        def upload() -> None:
            with fs.open_output_stream(path) as stream:  # the object appears only when the upload completes
                stream.write(data)

        with_retries("write", uri, storage_cfg, upload)
        return
    fs.create_dir(os.path.dirname(path), recursive=True)
    partial = f"{path}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(partial) as stream:
        stream.write(data)
    fs.move(partial, path)


def read_text(uri: str, storage_cfg=None) -> str:
    return read_bytes(uri, storage_cfg).decode("utf-8")


def write_text(uri: str, text: str, storage_cfg=None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage_cfg)


def read_json(uri: str, storage_cfg=None):
    return json.loads(read_text(uri, storage_cfg))


def write_json(uri: str, obj, storage_cfg=None) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", storage_cfg)


def read_table(uri: str, storage_cfg=None, columns: Optional[list[str]] = None) -> pa.Table:
    fs, path = filesystem(uri, storage_cfg)
    return with_retries("read", uri, storage_cfg, lambda: pq.read_table(path, filesystem=fs, columns=columns))


def write_table(table: pa.Table, uri: str, storage_cfg=None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue(), storage_cfg)


def parquet_rows(uri: str, storage_cfg=None) -> int:
    """Row count from the Parquet footer (reads only the footer)."""
    fs, path = filesystem(uri, storage_cfg)

    def rows() -> int:
        with fs.open_input_file(path) as handle:
            return pq.read_metadata(handle).num_rows

    return with_retries("read the Parquet footer of", uri, storage_cfg, rows)


def list_files(uri: str, storage_cfg=None, suffix: str = "") -> list[str]:
    """URIs of the files under `uri` (recursively), sorted; empty when the folder does not exist."""
    fs, path = filesystem(uri, storage_cfg)

    def listing() -> list[pafs.FileInfo]:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        return fs.get_file_info(pafs.FileSelector(path, recursive=True))

    infos = with_retries("list", uri, storage_cfg, listing)
    if not infos and is_s3(uri):
        ensure_bucket(uri, storage_cfg, "list")
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def file_size(uri: str, storage_cfg=None) -> int:
    fs, path = filesystem(uri, storage_cfg)
    info = with_retries("inspect", uri, storage_cfg, lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        if is_s3(uri):
            ensure_bucket(uri, storage_cfg, "inspect")
        raise FileNotFoundError(f"{uri} does not exist")
    return info.size


def delete(uri: str, storage_cfg=None) -> None:
    """Delete one file; deleting a missing file is not an error."""
    fs, path = filesystem(uri, storage_cfg)

    def remove() -> None:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)

    with_retries("delete", uri, storage_cfg, remove)


def delete_tree(uri: str, storage_cfg=None) -> None:
    """Delete a folder (a key prefix on S3) and everything under it; a missing folder is not an error."""
    fs, path = filesystem(uri, storage_cfg)

    def remove() -> None:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)

    with_retries("delete", uri, storage_cfg, remove)


def sha256(uri: str, storage_cfg=None) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a file, streamed in chunks."""
    fs, path = filesystem(uri, storage_cfg)

    def digest() -> tuple[int, str]:
        hasher, size = hashlib.sha256(), 0
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                hasher.update(chunk)
                size += len(chunk)
        return size, hasher.hexdigest()

    return with_retries("checksum", uri, storage_cfg, digest)


def copy_file(src: str, dst: str, src_cfg=None, dst_cfg=None) -> tuple[int, str]:
    """Stream `src` to `dst` (any mix of local and S3), hashing on the way; (bytes, sha256 of what was read).

    Large S3 destinations go up as a multipart upload. A failed attempt starts the whole copy
    again. An S3 upload that fails in the network never appears, but one whose *source* fails
    mid-read is completed with what was read (pyarrow cannot abort it): callers that must not
    trust such a file compare checksums, as `cxrmem.publish.export_run` does.
    """
    src_fs, src_path = filesystem(src, src_cfg)
    dst_fs, dst_path = filesystem(dst, dst_cfg)
    partial = dst_path
    if not is_s3(dst):
        dst_fs.create_dir(os.path.dirname(dst_path), recursive=True)
        partial = f"{dst_path}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"

    def copy() -> tuple[int, str]:
        hasher, size = hashlib.sha256(), 0
        with src_fs.open_input_stream(src_path) as reader, dst_fs.open_output_stream(partial) as writer:
            while chunk := reader.read(CHUNK_BYTES):
                hasher.update(chunk)
                writer.write(chunk)
                size += len(chunk)
        return size, hasher.hexdigest()

    try:
        if is_s3(dst):
            result = with_retries(f"copy {src} to", dst, dst_cfg, copy)
        else:
            result = with_retries(f"copy to {dst} from", src, src_cfg, copy)
    except BaseException:
        if partial != dst_path:
            with contextlib.suppress(OSError):
                dst_fs.delete_file(partial)
        raise
    if partial != dst_path:
        dst_fs.move(partial, dst_path)
    return result


def copy_within(src: str, dst: str, storage_cfg=None) -> None:
    """Copy a file inside one filesystem: a server-side copy on S3 (objects up to 5 GB), no bytes through here."""
    if is_s3(src) != is_s3(dst):
        copy_file(src, dst, storage_cfg, storage_cfg)
        return
    fs, src_path = filesystem(src, storage_cfg)
    _, dst_path = filesystem(dst, storage_cfg)
    if not is_s3(dst):
        fs.create_dir(os.path.dirname(dst_path), recursive=True)
    with_retries(f"copy {src} to", dst, storage_cfg, lambda: fs.copy_file(src_path, dst_path))


# --- configuration that may be written out ----------------------------------------------------


def redact(obj):
    """A copy of a nested dict/list with every secret-looking key (secret, password, token, access_key) removed."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items() if not SECRET_KEY_PATTERN.search(str(k))}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def public_config(cfg) -> dict:
    """The resolved configuration as a plain dict without credentials: what manifests and summaries record."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return redact(container)


# --- run layout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLayout:
    """Where each output of one run lives under its output prefix (docs/design.md, Outputs)."""

    prefix: str

    def path(self, name: str) -> str:
        return join(self.prefix, name)

    @property
    def prompts(self) -> str:
        return self.path("prompts.parquet")

    @property
    def scores(self) -> str:
        return self.path("scores.parquet")

    @property
    def score_parts(self) -> str:
        # Durable part files written while scoring streams; the unit of resume.
        return self.path("_parts/scores")

    @property
    def summary(self) -> str:
        return self.path("summary.json")

    @property
    def memorized(self) -> str:
        return self.path("memorized_prompts.csv")

    @property
    def tokens(self) -> str:
        return self.path("tokens.parquet")

    @property
    def mitigation(self) -> str:
        return self.path("mitigation.parquet")

    @property
    def figures(self) -> str:
        return self.path("figures")

    @property
    def report(self) -> str:
        return self.path("report.html")

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")
