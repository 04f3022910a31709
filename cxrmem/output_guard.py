"""Where a run may write: never into one of its inputs, and never among files that no run wrote.

Checked once, where every command that writes under a run's prefix starts (`cxrmem.cli.writing`,
for the CLI and the Ray job entry points), before the lease file or anything else is written:

* the prefix must not be, lie inside or contain a path the config reads (the model, a local
  corpus, the training images, a reference list...): overwriting or republishing the run there
  would change the input, and a later run would read its own outputs back as input. A
  configuration error (exit 2) naming both paths and both keys.
* a prefix without a run's manifest must hold only files the run layout knows
  (`RunLayout.knows`), unless `run.allow_foreign_files`: an unpublished run writes in place, and a
  folder of someone else's files is far more likely a wrong run.output than a wish to share it.
  Even when allowed, foreign files are never published nor deleted (cxrmem/publish.py).
"""

from __future__ import annotations

import os
from typing import Optional

from cxrmem import storage
from cxrmem.publish import ForeignFilesError, foreign_files, is_published, staging_prefix
from cxrmem.settings import ConfigError
from cxrmem.storage import Store, canonical, local_path, scheme_of


def input_paths(cfg, command: str = "") -> list[tuple[str, str]]:
    """(key, path) of every path the config names that a run reads; only those in use with these settings."""
    models = [("model.path", cfg.model.path)] + [(f"model.adapters[{i}].path", a.path) for i, a in enumerate(cfg.model.adapters)]
    candidates = list(models)
    if any(local_path(str(path)) is None for _, path in models):
        candidates.append(("model.cache_dir", cfg.model.cache_dir))  # the local copy of an s3:// model or adapter
    if cfg.corpus.source != "synthetic":
        candidates.append(("corpus.path", cfg.corpus.path))
    candidates += [
        ("images.source", cfg.images.source),
        ("images.root", cfg.images.root if cfg.images.source else None),
        ("images.index", cfg.images.index if cfg.images.source else None),
        ("analyze.known_memorized", cfg.analyze.known_memorized),
        ("analyze.reference", cfg.analyze.reference),
    ]
    if cfg.fidelity.measure != "none":
        candidates.append(("fidelity.reader", cfg.fidelity.reader))
    if cfg.copies.embedder != "pixel":
        candidates.append(("copies.embedder_cache", cfg.copies.embedder_cache))
    if command == "export":
        candidates.append(("run.output", cfg.run.output))  # export reads the run at run.output and writes --to
    return [(key, str(path)) for key, path in candidates if path]


def _relation(output: str, other: str) -> Optional[str]:
    """How `output` overlaps `other` ('is', 'is inside', 'contains'), or None."""
    if output == other:
        return "is"
    if output.startswith(other.rstrip("/") + "/"):
        return "is inside"
    if other.startswith(output.rstrip("/") + "/"):
        return "contains"
    return None


def check_inputs(cfg, output: str, output_key: str = "run.output", command: str = "") -> None:
    """Raise a ConfigError when `output` is, lies inside or contains one of the config's inputs."""
    where = canonical(str(output))
    for key, path in input_paths(cfg, command):
        local = local_path(path)
        if scheme_of(path) != scheme_of(where) or (local is not None and not os.path.lexists(local)):
            continue  # a local input that is not there has nothing to lose (the stage that reads it says so)
        relation = _relation(where, canonical(path))
        if relation is not None:
            raise ConfigError(
                f"{output_key} {output} {relation} {key} {path}: a run must not write into its inputs (overwriting or "
                f"publishing it would change them); set {output_key} to a folder of its own, outside {path}"
            )


def check_foreign(store: Store, output: str, allow: bool) -> None:
    """Raise ForeignFilesError when `output` holds no run's manifest and files no run wrote, unless `allow`."""
    if allow or is_published(store, output) or is_published(store, staging_prefix(output)):
        return  # a published run (or one being promoted): its manifest says which files are its own
    foreign = foreign_files(store, output)
    if foreign:
        shown = ", ".join(storage.join(output, path) for path in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ForeignFilesError(
            f"{output} holds {len(foreign)} file(s) that no cxrmem run wrote ({shown}) and no manifest.json of a run; "
            "choose an empty or new run.output, or set run.allow_foreign_files=true to write beside them "
            "(they are then never published nor deleted)"
        )


def check_output(cfg, store: Store, output: str, command: str = "") -> None:
    """Both checks of the module doc on the prefix a command is about to write (run.output; export: --to)."""
    output_key = "--to" if command == "export" else "run.output"
    check_inputs(cfg, output, output_key, command)
    check_foreign(store, output, bool(cfg.run.allow_foreign_files))
