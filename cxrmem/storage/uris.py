"""URIs as strings: their scheme, joining and relating them. Pure: no filesystem is asked.

A URI is `scheme://rest` (s3://bucket/key, or any scheme a backend registers); anything without
a scheme is a local path, absolute or relative to the working folder.
"""

from __future__ import annotations

import os
import re

LOCAL_SCHEME = ""  # the scheme of a local path, which has none
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    """'s3' for s3://bucket/key, LOCAL_SCHEME for a local path."""
    match = _SCHEME.match(str(uri))
    return match.group(1).lower() if match else LOCAL_SCHEME


def join(prefix: str, *parts: str) -> str:
    prefix = str(prefix).rstrip("/")
    return "/".join([prefix, *[p.strip("/") for p in parts]])


def relative(uri: str, prefix: str) -> str:
    """`uri` relative to `prefix` (both local or both of one scheme; local paths may be relative)."""
    if scheme_of(prefix) == LOCAL_SCHEME:
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
