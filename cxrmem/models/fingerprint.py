"""Model fingerprint: a content hash of the weights and configs of every component used.

Results carry the fingerprint, so that a changed model (any byte of any weight or config)
triggers rescoring, while moving or re-copying the same files does not: file names enter the
hash relative to their component folder, never as absolute paths.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Mapping, Optional, Sequence

CHUNK_BYTES = 8 << 20
# Files that never affect what a model computes.
IGNORED_NAMES = {"README.md", ".gitattributes"}


def component_files(root: str) -> list[tuple[str, str]]:
    """(name relative to `root`, absolute path) of every file under `root` (or `root` itself), sorted.

    Symlinks are followed (Hugging Face cache snapshots link into `blobs/`); hidden files and
    documentation are skipped.
    """
    if os.path.isfile(root):
        return [(os.path.basename(root), root)]
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in names:
            if name.startswith(".") or name in IGNORED_NAMES:
                continue
            path = os.path.join(folder, name)
            found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(found)


def file_digest(path: str) -> str:
    """sha256 of a file, remembered per (real path, inode, size, mtime) for the life of the process
    (a worker that loads a model twice hashes its gigabytes once)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return _digest(real, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _digest(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(components: Mapping[str, str], settings: Optional[Mapping] = None) -> str:
    """16 hex chars of sha256 over the files of each component and the loader's derived settings.

    `components` maps a component name (unet, text_encoder, ...) to its folder or file;
    `settings` holds choices the loader makes that no file records (for example RadEdit's
    scheduler and tokenizer length), as JSON-able values.
    """
    digest = hashlib.sha256()
    for component in sorted(components):
        for name, path in component_files(components[component]):
            digest.update(f"{component}/{name}\0{file_digest(path)}\n".encode())
    if settings:
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def adapted_fingerprint(base: str, adapters: Sequence[tuple[str, float]]) -> str:
    """The fingerprint of base model `base` with LoRA adapters fused in: `base` with each adapter's
    weights file and scale, in order. With no adapters it is `base` itself, so a model scored before
    adapters existed keeps its fingerprint, while a new adapter or scale on an old base is a new model."""
    if not adapters:
        return base
    files = {f"adapter{i}": weight_file for i, (weight_file, _) in enumerate(adapters)}
    return model_fingerprint(files, {"base": base, "adapter_scales": [float(scale) for _, scale in adapters]})
