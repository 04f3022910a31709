"""Local paths and s3:// URIs behind one small API (pyarrow's filesystem layer).

Every reader and writer in cxrmem goes through here, so that a run's inputs and outputs can
live on local disk or in S3 without the rest of the code knowing which.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(prefix: str, *parts: str) -> str:
    prefix = str(prefix).rstrip("/")
    return "/".join([prefix, *[p.strip("/") for p in parts]])


def filesystem(uri: str, storage_cfg=None) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `uri` and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        endpoint = getattr(storage_cfg, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
        region = (
            getattr(storage_cfg, "region", None)
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        kwargs = {"region": region}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    path = os.path.abspath(os.path.expanduser(uri))
    return pafs.LocalFileSystem(), path


def exists(uri: str, storage_cfg=None) -> bool:
    fs, path = filesystem(uri, storage_cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str, storage_cfg=None) -> None:
    fs, path = filesystem(uri, storage_cfg)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str, storage_cfg=None) -> bytes:
    fs, path = filesystem(uri, storage_cfg)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes, storage_cfg=None) -> None:
    fs, path = filesystem(uri, storage_cfg)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


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
    return pq.read_table(path, filesystem=fs, columns=columns)


def write_table(table: pa.Table, uri: str, storage_cfg=None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue(), storage_cfg)


def list_files(uri: str, storage_cfg=None, suffix: str = "") -> list[str]:
    """URIs of the files under `uri` (recursively), sorted; empty when the folder does not exist."""
    fs, path = filesystem(uri, storage_cfg)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


@dataclass(frozen=True)
class RunLayout:
    """Where each output of one run lives under its output prefix (DESIGN.md, Outputs)."""

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
