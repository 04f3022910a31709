"""`cxrmem rescore`: rescore the corpus when the model changed, and diff the new run against the last.

Layout under `run.output` (= O), local or s3://:

    O/latest.json                       {"run": URI of the newest run, "model_fingerprint", "config_hash", "created",
                                         "manifest_sha256": the digest of that run's manifest (`verify RUN --expect O/latest.json`)}
    O/runs/<UTC time>-<fingerprint>/    one published run per rescoring (the audit outputs + diff.parquet)

The previous run is the one `O/latest.json` names; before the first rescoring it is the run
published at O itself (a plain `cxrmem audit`). A rescoring happens when the model fingerprint
(or the score settings' config hash) differs from the previous run's, or when forced; otherwise
nothing is computed. The new run reuses the previous run's prompts.parquet (same corpus), is
published like any audit, then gets diff.parquet (per prompt: d_mem before and after, the change,
whether it entered or left the memorized set) and summary["rescore"], is published again so the
manifest lists them, and only then becomes `latest`.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import pyarrow as pa

from cxrmem import storage
from cxrmem.analysis import score_diff
from cxrmem.distributed.audit import run_audit
from cxrmem.distributed.session import ray_session
from cxrmem.lease import LeaseSettings, hold
from cxrmem.models.loading import fingerprint_model
from cxrmem.publish import is_published, manifest_digest, publish_manifest
from cxrmem.runfiles import Run, RunLayout
from cxrmem.score_key import config_hash
from cxrmem.settings import with_overrides
from cxrmem.stages import score
from cxrmem.stages.compare import memorized_scores
from cxrmem.storage import Store
from cxrmem.summary import RescoreSection

log = logging.getLogger(__name__)

DIFF_FILE = "diff.parquet"


def latest_uri(output: str) -> str:
    return storage.join(output, "latest.json")


def previous_run(store: Store, output: str, force: bool = False) -> Optional[str]:
    """The prefix of the last published run under `output`, or None before the first one.

    A latest.json that names a run which is gone (deleted, or never published) is an error that
    says so; with `force` the rescoring starts afresh (no diff) and latest.json moves to the new run.
    """
    latest = latest_uri(output)
    if not store.exists(latest):
        return output if is_published(store, output) else None
    run = store.read_json(latest)["run"]
    if is_published(store, run):
        return run
    gone = "is gone" if not store.list_files(run) else "is not published (no manifest.json)"
    if force:
        log.warning("rescore: %s names %s, which %s; --force: scoring afresh, without a diff", latest, run, gone)
        return None
    raise FileNotFoundError(
        f"{latest} names the run {run}, which {gone}. Rerun with --force to score afresh (latest.json then "
        f"names the new run), or point latest.json at a published run under {storage.join(output, 'runs')} "
        "(or delete it to start from the run published at run.output, if any)"
    )


def run_key(store: Store, prefix: str) -> tuple[str, str]:
    """(model_fingerprint, config_hash) of a published run, from its scores."""
    scores = RunLayout(prefix).scores
    table = store.read_table(scores, columns=["model_fingerprint", "config_hash"])
    if table.num_rows == 0:
        raise ValueError(f"{scores} has no rows; rerun `cxrmem audit` for that run")
    return table["model_fingerprint"][0].as_py(), table["config_hash"][0].as_py()


def rescore(cfg, force: bool = False, store: Optional[Store] = None) -> dict:
    """Rescore when the model (or score settings) changed since the last run under run.output, or when forced.

    Holds the lease on run.output throughout (a CronJob tick that overlaps a running one is refused).
    """
    store = store or Store.from_config(cfg.storage)
    # The Ray session first: the key compared with the last run's hashes the device the pool will score on
    # (score.with_planned_device); the audit then runs in the same session.
    with hold(store, cfg.run.output, LeaseSettings.of(cfg.run)), ray_session(cfg.ray, cfg.model.device):
        return _rescore(score.with_planned_device(cfg), force, store)


def _rescore(cfg, force: bool, store: Store) -> dict:
    output = cfg.run.output
    previous = previous_run(store, output, force)
    fingerprint = fingerprint_model(cfg.model, store)
    key = (fingerprint, config_hash(cfg))
    old_key = run_key(store, previous) if previous else None
    if old_key == key and not force:
        log.info("rescore: model %s and config %s unchanged since %s; nothing to do", *key, previous)
        return {"status": "unchanged", "previous": previous, "model_fingerprint": fingerprint}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run = storage.join(output, "runs", f"{stamp}-{fingerprint}")
    run_cfg = with_overrides(cfg, run__output=run, run__overwrite=False)
    if previous:
        # Same corpus: the new run starts from the previous run's prompts instead of preparing again.
        store.copy_within(RunLayout(previous).prompts, RunLayout(run).prompts)
    audit = run_audit(run_cfg, Run.of(run_cfg, store))
    result = {
        "status": "rescored",
        "reason": "forced" if old_key == key else ("first run" if old_key is None else "model or score settings changed"),
        "previous": previous,
        "previous_model_fingerprint": old_key[0] if old_key else None,
        "run": run,
        "model_fingerprint": fingerprint,
        "memorized_count": audit["memorized_count"],
    }
    if previous:
        diff, counts = score_diff(memorized_scores(store, previous), memorized_scores(store, run))
        diff_uri = storage.join(run, DIFF_FILE)
        store.write_table(pa.Table.from_pandas(diff, preserve_index=False), diff_uri)
        result.update(diff=diff_uri, **counts)
    Run(store, RunLayout(run)).write_sections(RescoreSection(**result))
    digest = manifest_digest(publish_manifest(store, run, fingerprint, run_cfg, extra={"config_hash": key[1]}))
    store.write_json(latest_uri(output), {"run": run, "model_fingerprint": fingerprint, "config_hash": key[1], "created": stamp,
                                          "manifest_sha256": digest})  # fmt: skip
    log.info("rescore: %s is latest; manifest sha256 %s", run, digest)
    return {**result, "manifest_sha256": digest}
