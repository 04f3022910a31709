"""The backend protocol, and the registry that picks a backend by URI scheme.

The Store (store.py) does what is the same on every scheme through the pyarrow filesystem a
backend hands it: reads, listings, deletes, uploads, copies, checksums, and the one retry layer
around them. A backend says only what differs:

* where its data is: `filesystem(uri)` (pyarrow's) and `uri_of(path)` back from a listed path;
  `local_path(uri)`, the file on this machine's disk or None (the Store writes local files by
  rename, and a lease's holder on this host can be checked by its pid); `canonical(uri)`;
* how it fails: whether its requests are retried at all, which errors no retry can fix
  (`fatal`), and whether a missing file is really a missing container (`ensure_reachable`);
* what pyarrow's filesystems cannot express: the lease's conditional writes (read_versioned,
  create_new, replace_if), folders, and deleting a tree when that needs more than delete_dir.

A new scheme is one module: a Backend subclass decorated with `@register`.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import pyarrow.fs as pafs

from cxrmem.storage.errors import StorageError
from cxrmem.storage.uris import LOCAL_SCHEME, scheme_of


class Backend:
    """One URI scheme's storage, for one Store (whose settings it reads). Each call is one attempt:
    the Store retries (`retried`), so a backend never loops on its own."""

    scheme: ClassVar[str]
    retried: ClassVar[bool] = True  # requests can fail transiently and are tried storage.max_attempts times

    def __init__(self, store):
        self.store = store  # the Store (store.py, which imports this module) whose settings the backend reads

    # -- what a URI names (no settings needed: the registry answers these for callers without a Store) --
    @classmethod
    def local_path(cls, uri: str) -> Optional[str]:
        """The file or folder on this machine's disk that `uri` names; None where there is none."""
        return None

    @classmethod
    def canonical(cls, uri: str) -> str:
        """`uri` in one spelling, to tell whether two URIs name the same place."""
        return uri.rstrip("/")

    # -- where the data is ------------------------------------------------------------------------
    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """pyarrow's filesystem holding `uri`, and the path inside it."""
        raise NotImplementedError(f"{type(self).__name__} must say which pyarrow filesystem holds {uri}")

    def uri_of(self, path: str) -> str:
        """The URI of a path that `filesystem(...)`'s listing returned."""
        return f"{self.scheme}://{path}"

    @property
    def endpoint(self) -> str:
        """The service that holds the data, as a user would name it in a message."""
        return f"{self.scheme}://"

    # -- how it fails -----------------------------------------------------------------------------
    @property
    def retryable_errors(self) -> tuple[type[BaseException], ...]:
        return (OSError,)

    @property
    def retry_hint(self) -> str:
        """What to check once every attempt failed."""
        return f"Check that {self.endpoint} is reachable and healthy"

    def fatal(self, err: BaseException, action: str, uri: str) -> Optional[StorageError]:
        """The StorageError to raise at once when `err` is one that no retry can fix; None to retry it."""
        return None

    def ensure_reachable(self, uri: str, action: str) -> None:
        """Raise a StorageError when what holds `uri` (an S3 bucket) is missing or refuses us, so that a
        missing container is not taken for a missing file or an empty folder."""

    # -- what pyarrow's filesystems cannot express ------------------------------------------------
    def makedirs(self, uri: str) -> None:
        """Create a folder; nothing where folders do not exist (object stores: a marker object would be a stray file)."""

    def delete_tree(self, uri: str) -> None:
        """Delete the folder `uri` and everything under it; a missing folder is not an error."""
        fs, path = self.filesystem(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)

    def read_versioned(self, uri: str) -> Optional[tuple[bytes, str]]:
        """(bytes, version) of a small file, None when it does not exist. The version is what `replace_if` compares."""
        raise self._no_conditional_writes(uri)

    def create_new(self, uri: str, data: bytes) -> Optional[str]:
        """Write `uri` only if it does not exist, whole or not at all; its version, or None when it existed."""
        raise self._no_conditional_writes(uri)

    def replace_if(self, uri: str, data: bytes, version: str) -> Optional[str]:
        """Replace `uri` only if it still holds `version`; the new version, or None (changed or gone)."""
        raise self._no_conditional_writes(uri)

    def _no_conditional_writes(self, uri: str) -> StorageError:
        return StorageError(
            f"cannot hold a lease at {uri}: {self.scheme}:// storage has no conditional writes, which the one-writer "
            "lease needs; write the run to a local folder or s3://"
        )


BACKENDS: dict[str, type[Backend]] = {}  # scheme -> the backend for its URIs (LOCAL_SCHEME: local paths)


def register(backend: type[Backend]) -> type[Backend]:
    """Class decorator: `backend` serves the URIs of its `scheme`."""
    BACKENDS[backend.scheme] = backend
    return backend


def backend_class(uri: str) -> type[Backend]:
    scheme = scheme_of(uri)
    if scheme not in BACKENDS:
        known = ", ".join(f"{name}://" for name in sorted(BACKENDS) if name != LOCAL_SCHEME)
        raise StorageError(f"no storage backend for {uri}: {scheme}:// is not one of {known} nor a local path; fix the URI")
    return BACKENDS[scheme]


def local_path(uri: str) -> Optional[str]:
    """The file or folder on this machine's disk that `uri` names (absolute); None for a URI of remote storage."""
    return backend_class(uri).local_path(str(uri))


def canonical(uri: str) -> str:
    """`uri` in one spelling (local paths absolute with links resolved, others without a trailing slash)."""
    return backend_class(uri).canonical(str(uri))
