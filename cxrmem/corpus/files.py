"""Listing a corpus folder's files: folder links are not followed, nothing outside the root is read, and no run is.

A run written inside a corpus folder (an earlier run's run.output below corpus.path) must never
be read back as corpus: its prompts.parquet would double every prompt's n_reports, and its
_parts/ hold the same prompts again. A folder is a run's when it holds a run's marker
(RUN_MARKERS: its manifest, its writer's lease, prepare's summary) or a run's working folder
(`_parts/`, `_staging/`); there, every file the run layout knows (`RunLayout.knows`: its outputs and
working files) is skipped and counted in one log line. Other files in it (a table the user put
there) are still read.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

from cxrmem.corpus.text import SourceText, skipped
from cxrmem.runfiles import MANIFEST_NAME, RunLayout
from cxrmem.storage import Store, local_path, relative

log = logging.getLogger(__name__)

RUN_MARKERS = (MANIFEST_NAME, "_lease.json", "prepare_summary.json")
RUN_WORKING_FOLDERS = ("_parts", "_staging")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def run_folders(paths: Iterable[str]) -> set[str]:
    """The folders (relative to the root, '' for the root itself) that hold a run, from the files' relative paths."""
    folders = set()
    for path in paths:
        parts = path.split("/")
        if parts[-1] in RUN_MARKERS:
            folders.add("/".join(parts[:-1]))
        folders.update("/".join(parts[:i]) for i, name in enumerate(parts[:-1]) if name in RUN_WORKING_FOLDERS)
    return folders


def is_run_file(path: str, folders: set[str]) -> bool:
    """True when `path` (relative to the root) is a layout file of a run in one of `folders` above it."""
    parts = path.split("/")
    return any("/".join(parts[:i]) in folders and RunLayout.knows("/".join(parts[i:])) for i in range(len(parts)))


def _drop_runs(root: str, paths: list[str], all_paths: Iterable[str]) -> list[str]:
    """`paths` (relative to `root`) without the files of runs found among `all_paths`; one log line when any."""
    folders = run_folders(all_paths)
    kept = [path for path in paths if not is_run_file(path, folders)]
    if len(kept) < len(paths):
        shown = ", ".join(os.path.join(root, folder) if folder else root for folder in sorted(folders)[:3])
        log.warning(
            "corpus: skipped %d file(s) of %d run folder(s) under %s (%s): a run's outputs are never read as corpus",
            len(paths) - len(kept), len(folders), root, shown,
        )  # fmt: skip
    return kept


def corpus_files(root: str, suffixes: tuple[str, ...], store: Optional[Store] = None) -> tuple[list[str], list[SourceText]]:
    """(files under `root` ending in `suffixes`, sorted; skip records of links leading outside it).

    Local folders are walked without following folder links (a link to a parent would list the
    tree again and again), and a file reached through several links is listed once. A link that
    resolves outside `root` is skipped and counted (`outside_root`): a corpus folder must not
    read files its owner did not put there. S3 prefixes have no links. The files of runs under
    `root` are left out (module doc).
    """
    if local_path(root) is None:  # remote storage: listed through the Store
        everything = [relative(uri, root) for uri in (store or Store()).list_files(root)]
        wanted = _drop_runs(root, [path for path in everything if path.endswith(suffixes)], everything)
        return [root.rstrip("/") + "/" + path for path in wanted], []
    real_root = os.path.realpath(root)
    files: dict[str, str] = {}  # real path -> first path seen (sorted walk: the same every run)
    outside: list[SourceText] = []
    seen: list[str] = []  # every file and folder name, relative to root: where the runs are
    for folder, dirs, names in os.walk(root):  # followlinks=False: folder links are not entered
        dirs.sort()
        here = os.path.relpath(folder, root)
        seen.extend(name if here == "." else f"{here}/{name}" for name in names + [f"{d}/" for d in dirs])
        linked_dirs = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in [n for n in names if n.endswith(suffixes)] + linked_dirs:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if not _inside(real, real_root):
                message = f"{path}: a link to {real}, outside corpus.path {root}; skipped"
                outside.append(skipped(path, "outside_root", message))
            elif name not in linked_dirs and os.path.isfile(real):
                files.setdefault(real, path)
    by_relative = {os.path.relpath(path, root).replace(os.sep, "/"): path for path in files.values()}
    kept = _drop_runs(root, list(by_relative), seen)
    return sorted(by_relative[path] for path in kept), outside
