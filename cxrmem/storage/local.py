"""Local paths: pyarrow's LocalFileSystem for the data, POSIX files for what must be durable or exclusive.

A file is replaced through a temporary name in its folder (fsync, rename, fsync of the folder),
so a crash leaves the old file or the new one. The lease's exclusive create hard-links a complete
temporary file into place (like O_EXCL, but never showing a half-written file), and its versions
are the sha256 of the bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from typing import BinaryIO, Iterator, Optional

import pyarrow.fs as pafs

from cxrmem.storage.backend import Backend, register
from cxrmem.storage.errors import StorageError, name_too_long, no_space
from cxrmem.storage.uris import LOCAL_SCHEME

PARTIAL_MARK = ".partial-"  # local files being written carry this in their name until renamed into place


def _partial(path: str, tag: str = "") -> str:
    """A temporary name beside `path`, unique to this write."""
    return f"{path}{PARTIAL_MARK}{tag}{uuid.uuid4().hex[:8]}"


def _fsync_folder(path: str) -> None:
    """Make a rename inside `path` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replace_durably(path: str, uri: str, size: Optional[int] = None) -> Iterator[BinaryIO]:
    """A stream whose bytes replace the file `path` only if the block succeeds, durably (module doc).

    A full disk, or a name over the filesystem's limit, is a StorageError naming `uri`, the bytes
    (`size`, when the caller knows it) and the fix.
    """
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    partial = _partial(path)
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
            raise no_space(err, uri, written, folder, "run.output") or (StorageError(too_long) if too_long else err)
        raise
    _fsync_folder(folder)


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@register
class LocalBackend(Backend):
    """Paths on this machine's disk (no scheme)."""

    scheme = LOCAL_SCHEME
    retried = False  # a local error already says what is wrong, and trying again does not change the disk

    @classmethod
    def local_path(cls, uri: str) -> str:
        return os.path.abspath(os.path.expanduser(uri))

    @classmethod
    def canonical(cls, uri: str) -> str:
        return os.path.realpath(os.path.expanduser(uri))

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), self.local_path(uri)

    def uri_of(self, path: str) -> str:
        return path

    @property
    def endpoint(self) -> str:
        return "local disk"

    def makedirs(self, uri: str) -> None:
        os.makedirs(self.local_path(uri), exist_ok=True)

    def read_versioned(self, uri: str) -> Optional[tuple[bytes, str]]:
        try:
            with open(self.local_path(uri), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return data, _version(data)

    def create_new(self, uri: str, data: bytes) -> Optional[str]:
        """The bytes go to a temporary file that is hard-linked into place: an exclusive create (like O_EXCL)
        that never shows a half-written file."""
        path = self.local_path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = _partial(path)
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
        return _version(data)

    def replace_if(self, uri: str, data: bytes, version: str) -> Optional[str]:
        """The file is renamed aside (one renamer wins), its bytes compared, and the new bytes created in its
        place; a file that changed in between is put back."""
        path = self.local_path(uri)
        aside = _partial(path, "aside-")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        try:
            with open(aside, "rb") as handle:
                if _version(handle.read()) != version:
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, path)  # someone else's file: put it back
                    return None
            return self.create_new(uri, data)
        finally:
            with contextlib.suppress(OSError):
                os.remove(aside)
