"""Storage errors, and the messages that say what to fix (a full disk, a name too long); no backend here."""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Optional


class StorageError(OSError):
    """A storage operation failed; the message names the URI, the endpoint and what to check."""


def short(err: BaseException) -> str:
    """An error on one line, cut to a length a message can quote."""
    return " ".join(str(err).split())[:300]


def no_space(err: OSError, uri: str, written: int, folder: str, elsewhere: str, spool: bool = False) -> Optional[StorageError]:
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
