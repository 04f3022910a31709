"""`cxrmem rescore`: rescore the corpus when the model changed, and diff the new run against the last.

Layout under `run.output` (= O), local or s3://:

    O/latest.json                       {"run": URI of the newest run, "model_fingerprint", "config_hash", "created"}
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

import io
import logging
import time
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from cxrmem import storage
from cxrmem.attribution import merge_summary
from cxrmem.config import config_hash
from cxrmem.distributed.audit import run_audit
from cxrmem.distributed.pipeline import model_fingerprint, with_overrides
from cxrmem.distributed.session import ray_session

log = logging.getLogger(__name__)

DIFF_FILE = "diff.parquet"


def latest_uri(output: str) -> str:
    return storage.join(output, "latest.json")


def previous_run(output: str, storage_cfg=None) -> Optional[str]:
    """The prefix of the last published run under `output`, or None before the first one."""
    from cxrmem.publish import is_published

    if storage.exists(latest_uri(output), storage_cfg):
        return storage.read_json(latest_uri(output), storage_cfg)["run"]
    return output if is_published(output, storage_cfg) else None


def run_key(prefix: str, storage_cfg=None) -> tuple[str, str]:
    """(model_fingerprint, config_hash) of a published run, from its scores."""
    table = storage.read_table(storage.RunLayout(prefix).scores, storage_cfg, columns=["model_fingerprint", "config_hash"])
    if table.num_rows == 0:
        raise ValueError(f"{storage.RunLayout(prefix).scores} has no rows; rerun `cxrmem audit` for that run")
    return table["model_fingerprint"][0].as_py(), table["config_hash"][0].as_py()


def memorized_scores(prefix: str, storage_cfg=None) -> pd.DataFrame:
    """prompt_id, d_mem and the memorized flag of one run (the d_mem column, never the norms)."""
    layout = storage.RunLayout(prefix)
    scores = storage.read_table(layout.scores, storage_cfg, columns=["prompt_id", "d_mem"]).to_pandas()
    memorized = pd.read_csv(io.BytesIO(storage.read_bytes(layout.memorized, storage_cfg)), usecols=["prompt_id"], dtype=str)
    scores["memorized"] = scores["prompt_id"].isin(memorized["prompt_id"])
    return scores


def score_diff(old: pd.DataFrame, new: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per prompt: d_mem before/after, their change, and movement in or out of the memorized set."""
    diff = old.merge(new, on="prompt_id", how="outer", suffixes=("_old", "_new"))
    diff["memorized_old"] = diff["memorized_old"].fillna(False).astype(bool)
    diff["memorized_new"] = diff["memorized_new"].fillna(False).astype(bool)
    diff["d_mem_change"] = diff["d_mem_new"] - diff["d_mem_old"]
    diff["change"] = np.select(
        [
            diff["memorized_new"] & ~diff["memorized_old"],
            diff["memorized_old"] & ~diff["memorized_new"],
            diff["memorized_old"] & diff["memorized_new"],
        ],
        ["entered", "left", "stayed"],
        default="",
    )
    diff = diff.sort_values("prompt_id", ignore_index=True)
    change = diff["d_mem_change"].abs()
    counts = {
        "prompts": int(len(diff)),
        "compared": int(change.notna().sum()),
        "entered": int((diff["change"] == "entered").sum()),
        "left": int((diff["change"] == "left").sum()),
        "stayed": int((diff["change"] == "stayed").sum()),
        "mean_abs_d_mem_change": float(change.mean()) if change.notna().any() else None,
        "max_abs_d_mem_change": float(change.max()) if change.notna().any() else None,
    }
    return diff, counts


def rescore(cfg, force: bool = False) -> dict:
    """Rescore when the model (or score settings) changed since the last run under run.output, or when forced."""
    from cxrmem.publish import publish_manifest

    output = cfg.run.output
    previous = previous_run(output, cfg.storage)
    with ray_session(cfg.ray):
        fingerprint = model_fingerprint(cfg)
        key = (fingerprint, config_hash(cfg))
        old_key = run_key(previous, cfg.storage) if previous else None
        if old_key == key and not force:
            log.info("rescore: model %s and config %s unchanged since %s; nothing to do", *key, previous)
            return {"status": "unchanged", "previous": previous, "model_fingerprint": fingerprint}
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run = storage.join(output, "runs", f"{stamp}-{fingerprint}")
        run_cfg = with_overrides(cfg, run__output=run, run__overwrite=False)
        if previous:
            # Same corpus: the new run starts from the previous run's prompts instead of preparing again.
            storage.copy_within(storage.RunLayout(previous).prompts, storage.RunLayout(run).prompts, cfg.storage)
        audit = run_audit(run_cfg)
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
        diff, counts = score_diff(memorized_scores(previous, cfg.storage), memorized_scores(run, cfg.storage))
        diff_uri = storage.join(run, DIFF_FILE)
        storage.write_table(pa.Table.from_pandas(diff, preserve_index=False), diff_uri, cfg.storage)
        result.update(diff=diff_uri, **counts)
    merge_summary(storage.RunLayout(run), "rescore", result, cfg.storage)
    publish_manifest(run, cfg.storage, fingerprint, run_cfg, extra={"config_hash": key[1]})
    storage.write_json(
        latest_uri(output),
        {"run": run, "model_fingerprint": fingerprint, "config_hash": key[1], "created": stamp},
        cfg.storage,
    )
    return result
