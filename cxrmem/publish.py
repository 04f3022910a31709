"""Atomic publishing of a run's outputs, and export of a published run to another prefix.

The scheme (local folders and S3 alike; S3 has no rename, so nothing here relies on one):

* A run writes its outputs under its prefix P and then writes `P/manifest.json` LAST. The
  manifest lists every output file (relative path, bytes, sha256, row count for Parquet), the
  model fingerprint, the configuration without credentials, the creation time and the cxrmem
  version. A run is *published* exactly when its manifest exists. Readers and `rescore` trust
  only published runs and only the files their manifest lists (`require_published`), so a
  reader never sees a half-written run.
* Working files are never listed, by the rule of `RunLayout.is_working`: anything whose first path
  component starts with `_` (the `_lease.json` of the writer, `_parts/` resume checkpoints,
  `_staging/`), local `*.partial-*` files still being written, and rescoring's `latest.json` and
  `runs/`. Nor are foreign files, those the layout does not know (`RunLayout.knows`): a run never
  wrote them, so it never publishes or deletes them; the manifest names them under `foreign`.
  `verify_run` reports every other file the manifest does not list (`unlisted`).
* Starting a run (`prepare_output`) at an unpublished P writes in place: a failed run leaves no
  manifest, so nothing of it is trusted, and a rerun resumes from its parts. At a published P
  it refuses (`RunExistsError`) unless `run.overwrite` is set; then the run writes to
  `P/_staging/` and the published run at P stays intact and readable while it works. A run that
  fails therefore never loses or changes anything already published.
* Finishing (`publish_run`) publishes the manifest at the prefix the run wrote to. A staged run is
  then promoted: (1) the files P's manifest lists are recorded in `P/_staging/_replaced.json` and
  P's manifest is deleted, so P reads as unpublished rather than mixed; (2) those old files are
  deleted, and nothing else: a file the old manifest did not list (or the layout does not know) is
  not the run's, whatever its name; (3) the staged files are copied into P and their sizes checked
  against the staged manifest; (4) P's manifest is written; (5) `P/_staging/` is deleted. If
  promotion is interrupted, the complete new run is still published at `P/_staging/`, and the
  next `prepare_output` or `publish_run` at P finishes the promotion.
* Provenance. `verify_run` alone proves only that the files match the manifest that sits beside them:
  whoever can write the prefix can change a file and its line in the manifest together. What ties a
  run to its publishing is the manifest's digest (`manifest_digest`: sha256 of its canonical JSON
  bytes), logged and returned at publish, recorded by rescoring in `latest.json`, and checked by
  `verify_run(expect=...)` against a record kept outside the prefix; and, optionally, an HMAC-SHA256
  signature of the same bytes (`manifest.sig` beside the manifest) with a key the operator holds
  (`run.signing_key_file`, else $CXRMEM_SIGNING_KEY), checked by `verify_run(key=...)`.
* `export_run` copies a published run file by file, checks each file's sha256 against the
  source manifest while copying and again by reading the copy back, and writes the manifest
  last; a published destination is replaced (through its own `_staging/`) only when asked.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, Optional

import pyarrow as pa

from cxrmem import storage
from cxrmem.lease import LeaseSettings, hold
from cxrmem.runfiles import MANIFEST_NAME, SIGNATURE_NAME, RunLayout
from cxrmem.settings import Settings, at_least, knob, public_config, redact
from cxrmem.storage import Store


@dataclass(frozen=True)
class RunConfig(Settings):
    """The `run` config section: where the run is published, and how it guards what it writes."""

    output: str = "runs/demo"  # output prefix of this run: a local folder or s3://bucket/prefix
    overwrite: bool = False  # allow replacing an already published run at the same prefix
    force_lease: bool = False  # take over the one-writer lease on run.output even while its holder's heartbeat is fresh
    lease_timeout_s: float = knob(600.0, at_least(1, "seconds"))  # a lease with an older heartbeat is stale and taken over (its holder beats 5x per period)
    allow_foreign_files: bool = False  # write into a run.output holding files no cxrmem run wrote (never published nor deleted)
    signing_key_file: Optional[str] = None  # local file of the operator's HMAC key: publishing signs the manifest (else $CXRMEM_SIGNING_KEY)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "cxrmem-run-manifest/1"
STAGING_NAME = "_staging"
REPLACED_NAME = "_replaced.json"  # in the staging prefix: the replaced run's files, while a promotion runs
SIGNATURE_FORMAT = "cxrmem-manifest-signature/1"
SIGNING_KEY_ENV = "CXRMEM_SIGNING_KEY"  # the operator's HMAC key itself, when run.signing_key_file names no file
DIGEST = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")


class RunNotPublishedError(FileNotFoundError):
    """The prefix holds no manifest: the run is unfinished, failed, or was never there."""


class RunExistsError(FileExistsError):
    """The prefix already holds a published run and overwriting was not asked for."""


class ForeignFilesError(FileExistsError):
    """The prefix holds files no run wrote and no run's manifest; writing a run there was not allowed."""


class ChecksumMismatchError(storage.StorageError):
    """A file's bytes differ from what its run's manifest recorded."""


def cxrmem_version() -> str:
    try:
        return importlib.metadata.version("cxrmem")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def manifest_uri(prefix: str) -> str:
    return storage.join(prefix, MANIFEST_NAME)


def staging_prefix(prefix: str) -> str:
    return storage.join(prefix, STAGING_NAME)


def present_files(store: Store, prefix: str) -> list[str]:
    """Relative paths of every file under `prefix` but the working files: a run's outputs and foreign files."""
    relative = (storage.relative(uri, prefix) for uri in store.list_files(prefix))
    return [path for path in relative if not RunLayout.is_working(path)]


def run_files(store: Store, prefix: str) -> list[str]:
    """Relative paths of the output files under `prefix` that a manifest lists: those the run layout knows."""
    return [path for path in present_files(store, prefix) if RunLayout.knows(path)]


def foreign_files(store: Store, prefix: str) -> list[str]:
    """Relative paths of the files under `prefix` that no run writes (a model, a corpus, a user's notes)."""
    return [path for path in present_files(store, prefix) if not RunLayout.knows(path)]


# --- provenance: the manifest's digest and the operator's signature ----------------------------


def canonical_bytes(manifest: dict) -> bytes:
    """The manifest as canonical JSON (sorted keys, no whitespace, UTF-8): the same bytes whether taken from the
    dict that was written or from the file read back, whatever the file's indentation."""
    plain = json.loads(json.dumps(manifest, default=str))  # as written: tuples become lists, other values strings
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_digest(manifest: dict) -> str:
    """sha256 (hex) of the manifest's canonical bytes: what a record kept outside the run checks it against."""
    return hashlib.sha256(canonical_bytes(manifest)).hexdigest()


def signature_uri(prefix: str) -> str:
    return storage.join(prefix, SIGNATURE_NAME)


def signing_key(key_file: Optional[str] = None, from_env: bool = True) -> Optional[bytes]:
    """The operator's HMAC key: the bytes of `key_file` (a local file; one trailing newline dropped), else
    $CXRMEM_SIGNING_KEY when `from_env`; None: nothing is signed."""
    if key_file:
        path = os.path.expanduser(str(key_file))
        try:
            with open(path, "rb") as stream:
                key = stream.read().rstrip(b"\r\n")
        except OSError as err:
            raise ValueError(f"cannot read the signing key file {path} ({err.strerror or err}): check run.signing_key_file or --key") from err
        if not key:
            raise ValueError(f"the signing key file {path} is empty: put the operator's key in it")
        return key
    value = os.environ.get(SIGNING_KEY_ENV, "") if from_env else ""
    return value.encode("utf-8") if value else None


def key_file_of(config) -> Optional[str]:
    """run.signing_key_file of a config (DictConfig or the plain dict a manifest records), if any."""
    run = (config or {}).get("run") if hasattr(config, "get") else None
    return run.get("signing_key_file") if hasattr(run, "get") else None


def sign(manifest: dict, key: bytes) -> str:
    return hmac.new(key, canonical_bytes(manifest), hashlib.sha256).hexdigest()


def write_manifest(store: Store, prefix: str, manifest: dict, key: Optional[bytes] = None) -> str:
    """Write `manifest` at `prefix` (and, with a signing key, `manifest.sig` after it); its digest.

    The key is `key`, else the one the manifest's own config names (run.signing_key_file) or
    $CXRMEM_SIGNING_KEY. A signature left by an earlier manifest is removed first, so that a prefix never
    shows a signature of another manifest than the one beside it.
    """
    key = key or signing_key(key_file_of(manifest.get("config")))
    if store.exists(signature_uri(prefix)):
        store.delete(signature_uri(prefix))
    store.write_json(manifest_uri(prefix), manifest)
    digest = manifest_digest(manifest)
    if key:
        store.write_json(signature_uri(prefix), {
            "format": SIGNATURE_FORMAT, "algorithm": "HMAC-SHA256", "manifest_sha256": digest, "hmac": sign(manifest, key),
        })  # fmt: skip
    return digest


def check_signature(store: Store, prefix: str, manifest: dict, key: bytes) -> str:
    """"valid", "missing" (no manifest.sig) or "invalid" (another manifest, or another key)."""
    try:
        record = store.read_json(signature_uri(prefix))
    except FileNotFoundError:
        return "missing"
    except ValueError:
        return "invalid"
    given = record.get("hmac") if isinstance(record, dict) else None
    return "valid" if isinstance(given, str) and hmac.compare_digest(given, sign(manifest, key)) else "invalid"


def same_prefix(a: str, b: str) -> bool:
    return storage.canonical(a) == storage.canonical(b)


def expected_digest(store: Store, expect: str, prefix: str) -> tuple[str, str]:
    """(digest, where it came from) of `verify --expect`: a sha256 hex digest, or a record kept outside the run
    that holds `manifest_sha256` (rescoring's latest.json; its `run` must be the run verified)."""
    match = DIGEST.fullmatch(expect.strip())
    if match:
        return match.group(1).lower(), "--expect"
    try:
        record = store.read_json(expect)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--expect {expect} is neither a manifest digest (64 hex characters) nor a record that exists "
            "(rescoring's latest.json)"
        ) from None
    except ValueError as err:
        raise ValueError(f"--expect {expect} is not a JSON record ({err}); give the digest itself") from err
    digest = record.get("manifest_sha256") if isinstance(record, dict) else None
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ValueError(
            f"{expect} records no manifest digest (manifest_sha256; written before runs had one): give the digest itself, "
            "or rescore to record one"
        )
    named = record.get("run")
    if named and not same_prefix(str(named), prefix):
        raise ValueError(f"{expect} records the run {named}, not {prefix}: verify that run, or give this run's own digest")
    return digest.lower(), expect


def _describe(store: Store, prefix: str, path: str) -> dict:
    uri = storage.join(prefix, path)
    size, digest = store.sha256(uri)
    entry = {"bytes": size, "sha256": digest}
    if path.endswith(".parquet"):
        try:
            entry["rows"] = store.parquet_rows(uri)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{uri} is not a readable Parquet file ({err}); rerun the stage that writes it") from err
    return entry


def publish_manifest(store: Store, prefix: str, model_fingerprint: str, config_dict, extra: Optional[dict] = None) -> dict:
    """Checksum every output file under `prefix` and write its manifest last; the manifest.

    `config_dict` may be a DictConfig or a dict; credentials are removed before it is written.
    """
    present = present_files(store, prefix)
    paths = [path for path in present if RunLayout.knows(path)]
    if not paths:
        raise FileNotFoundError(f"nothing to publish under {prefix}: the run wrote no output files")
    entries = store.parallel(lambda path: _describe(store, prefix, path), paths)
    files = dict(zip(paths, entries))
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cxrmem_version": cxrmem_version(),
        "model_fingerprint": model_fingerprint,
        "config": public_config(config_dict) if config_dict is not None else None,
        "files": files,
        "total_bytes": sum(entry["bytes"] for entry in entries),
        # Files beside the run that it did not write (run.allow_foreign_files): named, so that `verify` does
        # not report them as added, but never checksummed, exported or deleted as the run's.
        "foreign": [path for path in present if not RunLayout.knows(path)],
        "extra": redact(extra or {}),
    }
    digest = write_manifest(store, prefix, manifest)
    log.info("published %s: %d files, %d bytes; manifest sha256 %s%s", prefix, len(files), manifest["total_bytes"], digest,
             ", signed" if store.exists(signature_uri(prefix)) else "")  # fmt: skip
    return manifest


def read_manifest(store: Store, prefix: str) -> Optional[dict]:
    """The run's manifest, or None when the run is not published."""
    uri = manifest_uri(prefix)
    try:
        manifest = store.read_json(uri)
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{uri} is not a valid manifest ({err}); delete it and publish the run again") from err
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{uri} is not a cxrmem run manifest (format {manifest.get('format')!r})")
    return manifest


def is_published(store: Store, prefix: str) -> bool:
    return store.exists(manifest_uri(prefix))


def require_published(store: Store, prefix: str) -> dict:
    """The manifest of a published run; readers call this before trusting any file under `prefix`."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise RunNotPublishedError(
            f"{prefix} holds no published run (no {MANIFEST_NAME}): the run is unfinished or failed; "
            "rerun it, or point to a published run"
        )
    return manifest


def verify_run(store: Store, prefix: str, expect: Optional[str] = None, key: Optional[bytes] = None) -> dict:
    """Re-read every file a published run lists and compare sizes and sha256 with its manifest; list the
    files present that it does not list (`unlisted`: for an audit artefact an added file is a finding).

    That alone shows the files match the manifest beside them, not that the manifest is the one published:
    `expect` (a digest, or a record such as latest.json, see `expected_digest`) checks the manifest's digest
    against a record kept outside the run, and `key` checks the operator's signature (manifest.sig).
    """
    manifest = require_published(store, prefix)
    digest = manifest_digest(manifest)
    expected, source = expected_digest(store, expect, prefix) if expect else (None, None)
    signature = check_signature(store, prefix, manifest, key) if key else None

    def check(item: tuple[str, dict]) -> Optional[str]:
        path, expected = item
        try:
            size, digest = store.sha256(storage.join(prefix, path))
        except FileNotFoundError:
            return "missing"
        return None if (size, digest) == (expected["bytes"], expected["sha256"]) else "changed"

    problems = store.parallel(check, manifest["files"].items())
    by_path = dict(zip(manifest["files"], problems))
    missing = sorted(path for path, problem in by_path.items() if problem == "missing")
    changed = sorted(path for path, problem in by_path.items() if problem == "changed")
    foreign = set(manifest.get("foreign", []))
    unlisted = sorted(set(present_files(store, prefix)) - set(manifest["files"]) - foreign)
    return {
        "prefix": prefix,
        "ok": not missing and not changed and not unlisted and (expected is None or expected == digest) and signature in (None, "valid"),
        "manifest_sha256": digest,
        "expected_sha256": expected,
        "expected_from": source,
        "signature": signature,
        "files": len(by_path),
        "bytes": manifest["total_bytes"],
        "missing": missing,
        "changed": changed,
        "unlisted": unlisted,
        "foreign": sorted(foreign),
    }


# --- runs: start, publish, promote ------------------------------------------------------------


def prepare_output(store: Store, output: str, overwrite: bool = False) -> str:
    """The prefix a new run at `output` writes to: `output` itself, or its staging prefix (see module doc)."""
    finish_interrupted_promotion(store, output)
    if not is_published(store, output):
        return output
    if not overwrite:
        created = (read_manifest(store, output) or {}).get("created", "?")
        raise RunExistsError(
            f"{output} already holds a run published at {created}; set run.overwrite=true to replace it "
            "(it stays intact until the new run is published), or choose another run.output"
        )
    log.info("%s is published; this run writes to %s and replaces it only once complete", output, staging_prefix(output))
    return staging_prefix(output)


def publish_run(
    store: Store,
    output: str,
    work_prefix: str,
    model_fingerprint: str,
    config_dict,
    extra: Optional[dict] = None,
) -> dict:
    """Publish the run written at `work_prefix` (from `prepare_output`) as the run at `output`; the manifest
    as published at `output` (its digest: `manifest_digest`)."""
    config = public_config(config_dict) if config_dict is not None else None
    if config and config.get("run", {}).get("output") == work_prefix:
        config["run"]["output"] = output  # record where the run lives, not where it was staged
    manifest = publish_manifest(store, work_prefix, model_fingerprint, config, extra)
    if work_prefix.rstrip("/") != output.rstrip("/"):
        manifest = promote(store, work_prefix, output)
    return manifest


def promote(store: Store, staged: str, output: str) -> dict:
    """Replace the run at `output` with the published run at `staged` (steps 1-5 of the module doc)."""
    manifest = require_published(store, staged)
    old = replaced_files(store, staged, output)
    store.parallel(lambda path: store.delete(storage.join(output, path)), old)

    def copy(item: tuple[str, dict]) -> None:
        path, expected = item
        target = storage.join(output, path)
        store.copy_within(storage.join(staged, path), target)
        if store.file_size(target) != expected["bytes"]:
            raise ChecksumMismatchError(
                f"{target} has {store.file_size(target)} bytes after promotion, "
                f"its manifest says {expected['bytes']}; rerun to finish promoting {staged}"
            )

    store.parallel(copy, manifest["files"].items())
    # Files beside the old run that it did not write stayed: named as foreign, as a run written beside them is.
    promoted = {**manifest, "foreign": foreign_files(store, output)}
    digest = write_manifest(store, output, promoted)
    store.delete_tree(staged)
    log.info("promoted %s to %s; manifest sha256 %s", staged, output, digest)
    return promoted


def replaced_files(store: Store, staged: str, output: str) -> list[str]:
    """The files of the run at `output` that promoting `staged` deletes (steps 1-2 of the module doc).

    Only the files its manifest lists, so that a model, a corpus or a user's file that shares the
    folder is never touched; and of those only the ones the layout knows, since a manifest written
    before foreign files were told apart may list them. The list is recorded in the staged run
    before the old manifest goes, so that an interrupted promotion still knows it.
    """
    record = storage.join(staged, REPLACED_NAME)
    old = read_manifest(store, output)
    if old is not None:
        listed = sorted(old["files"])
        store.write_json(record, listed)
        store.delete(manifest_uri(output))
    elif store.exists(record):
        listed = store.read_json(record)
    else:
        listed = []  # nothing was published at `output`: nothing there is a run's to remove
    return [path for path in listed if RunLayout.knows(path) and not RunLayout.is_working(path)]


def finish_interrupted_promotion(store: Store, output: str) -> bool:
    """Finish a promotion that stopped part-way (the staged run has a manifest); True if there was one."""
    staged = staging_prefix(output)
    if not is_published(store, staged):
        return False
    log.warning("finishing the interrupted promotion of %s to %s", staged, output)
    promote(store, staged, output)
    return True


# --- export ----------------------------------------------------------------------------------


def export_run(
    store: Store,
    src_prefix: str,
    dst_prefix: str,
    overwrite: bool = False,
    verify: bool = True,
) -> dict:
    """Copy the published run at `src_prefix` to `dst_prefix` (local or s3://), manifest last.

    Every file's sha256 is checked against the source manifest while copying, and (with
    `verify`) again by reading the copy back. Refuses an unpublished source, and a published
    destination unless `overwrite`. Returns files, bytes, seconds and MB/s (10^6 bytes per second).
    """
    if src_prefix.rstrip("/") == dst_prefix.rstrip("/"):
        raise ValueError(f"export source and destination are the same prefix {src_prefix}")
    manifest = require_published(store, src_prefix)
    finish_interrupted_promotion(store, dst_prefix)
    target = dst_prefix
    if is_published(store, dst_prefix):
        if not overwrite:
            raise RunExistsError(
                f"{dst_prefix} already holds a published run; export with overwrite (run.overwrite=true) "
                "to replace it, or choose another destination"
            )
        target = staging_prefix(dst_prefix)

    def copy(item: tuple[str, dict]) -> int:
        path, expected = item
        src, dst = storage.join(src_prefix, path), storage.join(target, path)
        size, digest = store.copy_file(src, dst)
        if (size, digest) != (expected["bytes"], expected["sha256"]):
            raise ChecksumMismatchError(
                f"{src} does not match its manifest (sha256 {digest[:12]}..., {size} bytes; manifest says "
                f"{expected['sha256'][:12]}..., {expected['bytes']} bytes): the source run was changed after "
                "it was published; republish or rerun it"
            )
        if verify and store.sha256(dst) != (size, digest):
            raise ChecksumMismatchError(f"{dst} does not read back as written (sha256 differs); export again")
        return size

    start = time.perf_counter()
    copied = store.parallel(copy, manifest["files"].items())
    exported = {**manifest, "foreign": []}  # the source's foreign files stay behind
    write_manifest(store, target, exported)
    if target != dst_prefix:
        exported = promote(store, target, dst_prefix)
    seconds = time.perf_counter() - start
    total = sum(copied)
    return {
        "src": src_prefix,
        "dst": dst_prefix,
        "files": len(copied),
        "bytes": total,
        "seconds": round(seconds, 3),
        "mb_per_s": round(total / 1e6 / seconds, 1) if seconds > 0 else None,
        "verified": verify,
        "manifest_sha256": manifest_digest(exported),
    }


# --- single stages on a run ------------------------------------------------------------------


@contextmanager
def stage_writes(store: Store, run_cfg, stage: str) -> Iterator[None]:
    """Guard a stage that writes under `run_cfg.output`: one writer (the run's lease, cxrmem/lease.py), and a
    published run is immutable unless `run_cfg.overwrite`.

    With `overwrite` the run's manifest is removed first (the run reads as unpublished while it
    changes) and written again over the new files when the stage succeeds: it is republished.
    """
    with hold(store, run_cfg.output, LeaseSettings.of(run_cfg)):
        with _published_guard(store, run_cfg.output, bool(run_cfg.overwrite), stage):
            yield


@contextmanager
def _published_guard(store: Store, output: str, overwrite: bool, stage: str) -> Iterator[None]:
    manifest = read_manifest(store, output)
    if manifest is not None and not overwrite:
        raise RunExistsError(
            f"{output} holds a run published at {manifest.get('created', '?')}; `cxrmem {stage}` would change its "
            "files under the manifest's checksums. Set run.overwrite=true to rewrite and republish it, or copy it "
            "first (`cxrmem export --to NEW`) and run the stage on the copy"
        )
    if manifest is not None:
        store.delete(manifest_uri(output))
    yield
    if manifest is not None:
        publish_manifest(store, output, manifest["model_fingerprint"], manifest["config"], manifest.get("extra"))
        log.info("republished %s after `%s`", output, stage)
