"""s3:// URIs: pyarrow's S3FileSystem for the data, boto3 for what it cannot say or do.

Settings are resolved once (`s3_settings(cfg.storage)`: the `storage` config section, else the
standard AWS environment AWS_ENDPOINT_URL[_S3], AWS_REGION / AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, else the AWS SDK's own chain).
pyarrow's and boto3's own retries are off (one attempt per request): the Store's loop is the only
retry layer. boto3 serves three things pyarrow cannot: diagnosis (a listing's error body names a
wrong key or secret, which a HEAD's bare 403 does not), the lease's conditional PUTs
(If-None-Match / If-Match), and deleting a prefix without leaving a folder marker object behind.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Optional

import pyarrow.fs as pafs

from cxrmem.settings import NON_NEGATIVE, POSITIVE, Settings, knob
from cxrmem.storage.backend import Backend, register
from cxrmem.storage.errors import StorageError, short

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
# A conditional PUT that lost: 412, the condition failed; 409, a concurrent conditional write to the same key won.
CONDITION_LOST = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def bucket_key(uri: str) -> tuple[str, str]:
    """("bucket", "key/inside") of an s3:// URI."""
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    return bucket, key


def error_code(err: BaseException) -> Optional[str]:
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


def _client_error_code(err) -> Optional[str]:
    return err.response.get("Error", {}).get("Code")


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
    """Resolved S3 connection settings (the `storage` section: cxrmem.config.StorageConfig), with the retry
    settings every retried backend uses; hashable, so that filesystems and clients are cached per setting."""

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
def _filesystem(settings: S3Settings) -> pafs.S3FileSystem:
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
def _client(settings: S3Settings):
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
            retries={"total_max_attempts": 1, "mode": "standard"},  # the Store's loop retries, not boto3
        ),
    )


_BUCKETS_SEEN: set = set()  # (settings, bucket) pairs known to exist and be accessible


# --- the backend ----------------------------------------------------------------------------


@register
class S3Backend(Backend):
    """s3:// URIs, with the Store's S3 settings."""

    scheme = "s3"

    def __init__(self, store):
        super().__init__(store)
        self.settings: S3Settings = store.s3

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        return _filesystem(self.settings), str(uri)[len("s3://") :]

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint

    # -- errors ------------------------------------------------------------------------------
    @property
    def retryable_errors(self) -> tuple[type[BaseException], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (OSError, BotoCoreError, ClientError)

    @property
    def retry_hint(self) -> str:
        return "Check that the endpoint is reachable (storage.endpoint_url / AWS_ENDPOINT_URL) and healthy"

    def fatal(self, err: BaseException, action: str, uri: str) -> Optional[StorageError]:
        code = error_code(err)
        return None if code is None else self._fatal(code, action, uri)

    def _diagnose(self, uri: str) -> Optional[str]:
        """Ask the server with a listing, whose error body says exactly what is wrong (HEAD answers do not)."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = bucket_key(uri)
        try:
            _client(self.settings).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except ClientError as err:
            return error_code(err)
        except BotoCoreError:
            return None
        return None

    def _fatal(self, code: str, action: str, uri: str) -> StorageError:
        if code == "AccessDenied":
            code = self._diagnose(uri) or code  # a wrong key or secret also reads as a bare 403
        detail = FATAL_ERRORS[code]
        if code == "NoSuchBucket":
            detail = f"bucket {bucket_key(uri)[0]!r} does not exist; create it or fix the bucket name in the URI"
        return StorageError(f"cannot {action} {uri} at {self.endpoint}: {code}: {detail}")

    def ensure_reachable(self, uri: str, action: str) -> None:
        """Fail with a clear StorageError when the bucket of `uri` is missing or the credentials are wrong."""
        bucket = bucket_key(uri)[0]
        if (self.settings, bucket) in _BUCKETS_SEEN:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            _client(self.settings).head_bucket(Bucket=bucket)
        except ClientError as err:
            status = _client_error_code(err)
            code = {"403": "AccessDenied", "404": "NoSuchBucket"}.get(status, status)  # HEAD answers carry no body
            if code in FATAL_ERRORS:
                raise self._fatal(code, action, uri) from err
            raise StorageError(
                f"cannot {action} {uri}: {self.endpoint} answered {code} when asked for bucket {bucket!r}; check the server's health"
            ) from err
        except BotoCoreError as err:
            raise StorageError(
                f"cannot {action} {uri}: {self.endpoint} is unreachable ({short(err)}); "
                "check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
            ) from err
        _BUCKETS_SEEN.add((self.settings, bucket))

    # -- what pyarrow cannot do ------------------------------------------------------------------
    def delete_tree(self, uri: str) -> None:
        """The keys are listed and deleted here: pyarrow's delete_dir would leave a marker object for the parent
        folder behind (a `_parts/` key in a finished run)."""
        bucket, key = bucket_key(uri)
        client = _client(self.settings)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})

    def read_versioned(self, uri: str) -> Optional[tuple[bytes, str]]:
        """The version is the object's ETag."""
        from botocore.exceptions import ClientError

        bucket, key = bucket_key(uri)
        try:
            answer = _client(self.settings).get_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if _client_error_code(err) in ("NoSuchKey", "404"):
                return None
            raise
        return answer["Body"].read(), answer["ETag"]

    def create_new(self, uri: str, data: bytes) -> Optional[str]:
        """A conditional PUT (`If-None-Match: *`), which AWS and SeaweedFS refuse with 412 when the key exists."""
        return self._put_conditional(uri, data, IfNoneMatch="*")

    def replace_if(self, uri: str, data: bytes, version: str) -> Optional[str]:
        """A conditional PUT (`If-Match: <ETag>`)."""
        return self._put_conditional(uri, data, IfMatch=version)

    def _put_conditional(self, uri: str, data: bytes, **condition: str) -> Optional[str]:
        from botocore.exceptions import ClientError

        bucket, key = bucket_key(uri)
        try:
            return _client(self.settings).put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as err:
            if _client_error_code(err) in CONDITION_LOST:
                return None
            raise
