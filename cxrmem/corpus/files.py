"""Listing a corpus folder's files: folder links are not followed, and nothing outside the root is read."""

from __future__ import annotations

import os
from typing import Optional

from cxrmem.corpus.text import SourceText, skipped
from cxrmem.storage import Store, is_s3


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def corpus_files(root: str, suffixes: tuple[str, ...], store: Optional[Store] = None) -> tuple[list[str], list[SourceText]]:
    """(files under `root` ending in `suffixes`, sorted; skip records of links leading outside it).

    Local folders are walked without following folder links (a link to a parent would list the
    tree again and again), and a file reached through several links is listed once. A link that
    resolves outside `root` is skipped and counted (`outside_root`): a corpus folder must not
    read files its owner did not put there. S3 prefixes have no links.
    """
    if is_s3(root):
        return [u for u in (store or Store()).list_files(root) if u.endswith(suffixes)], []
    real_root = os.path.realpath(root)
    files: dict[str, str] = {}  # real path -> first path seen (sorted walk: the same every run)
    outside: list[SourceText] = []
    for folder, dirs, names in os.walk(root):  # followlinks=False: folder links are not entered
        dirs.sort()
        linked_dirs = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in [n for n in names if n.endswith(suffixes)] + linked_dirs:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if not _inside(real, real_root):
                message = f"{path}: a link to {real}, outside corpus.path {root}; skipped"
                outside.append(skipped(path, "outside_root", message))
            elif name not in linked_dirs and os.path.isfile(real):
                files.setdefault(real, path)
    return sorted(files.values()), outside
