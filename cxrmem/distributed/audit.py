"""`cxrmem audit` on Ray: prepare, score, analyze, attribute, mitigate, copies (with images.source), report, publish.

The same stage functions as the single-stage commands, with the model work mapped over Ray:
scoring streams the corpus through a Ray Data actor pool (pipeline.py), and the small memorized
set goes to a few actors of the same worker class (actors.py), each loading the model once for
both attribution and mitigation. The run is published (manifest written last) only when every
stage has finished; a failed run leaves no manifest, and rerunning it resumes from its score parts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

from cxrmem.config import config_hash, with_overrides
from cxrmem.distributed.actors import ActorModels
from cxrmem.distributed.image_index import ray_rows
from cxrmem.distributed.pipeline import scored_batches
from cxrmem.distributed.session import ray_session
from cxrmem.lease import LeaseSettings, hold
from cxrmem.models.loading import fingerprint_model
from cxrmem.publish import prepare_output, publish_run
from cxrmem.runfiles import RunLayout, write_sections
from cxrmem.stages import analyze, attribute, copies, mitigate, prepare, report, score
from cxrmem.storage import Store
from cxrmem.summary import AuditSection

log = logging.getLogger(__name__)


class StageTimer:
    """Wall seconds per stage, in run order, for summary.json."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        log.info("audit: %s ...", stage)
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 2)
        log.info("audit: %s done in %.1f s", stage, self.seconds[stage])


def explain_memorized(cfg, store: Store, n_memorized: int, timer: StageTimer) -> dict:
    """tokens.parquet, mitigation.parquet and (with images.source) copies.parquet for the memorized set, on one
    set of actors; the copies stage's image index is built first, on its own actor pool."""
    results: dict = {}
    check_copies = bool(cfg.images.source)
    if not (cfg.attribution.enabled or cfg.mitigation.enabled or check_copies):
        return results
    if check_copies:
        with timer("image_index"):
            log.info("image index: %s", copies.build_image_index(cfg, store, ray_rows))
    # The controls of the copies check are mapped too: actors for them as well.
    n_prompts = n_memorized + (cfg.copies.n_controls if check_copies else 0)
    models = ActorModels(cfg, store, n_prompts, need_vae=cfg.mitigation.enabled or check_copies)
    try:
        if cfg.attribution.enabled:
            with timer("attribute"):
                results["attribution"] = attribute.run(cfg, store, models)
        if cfg.mitigation.enabled:
            with timer("mitigate"):
                results["mitigation"] = mitigate.run(cfg, store, models)
        if check_copies:
            with timer("copies"):
                results["copies"] = copies.run(cfg, store, models)  # the index is built: only unreadable files are retried
    finally:
        models.close()
    return results


def score_and_analyze(cfg, store: Store, fingerprint: str, timer: StageTimer) -> tuple[dict, dict]:
    with timer("score"):
        if cfg.cascade.enabled:
            from cxrmem.distributed.cascade import run_cascade

            scoring = run_cascade(cfg, store, fingerprint)
            # scores.parquet holds the screened share only: the same top share of the whole corpus.
            top_percent: Optional[float] = scoring["analysis_top_percent"]
        else:
            scoring, top_percent = score.run(cfg, store, fingerprint, scored_batches), None
    with timer("analyze"):
        analysis = analyze.run(cfg, store, top_percent=top_percent)
    return scoring, analysis


def run_audit(cfg, store: Optional[Store] = None) -> dict:
    """Every stage of one run at `run.output`, published at the end; returns the run's summary.

    The run's lease (cxrmem/lease.py) is held from before the first write to after publishing:
    a second audit or stage on the same run.output is refused at start.
    """
    store = store or Store.from_config(cfg.storage)
    with hold(store, cfg.run.output, LeaseSettings.of(cfg.run)) as lease:
        return _audit(cfg, store, lease)


def _audit(cfg, store: Store, lease) -> dict:
    output = cfg.run.output
    work = prepare_output(store, output, overwrite=cfg.run.overwrite)
    cfg = with_overrides(cfg, run__output=work)
    layout = RunLayout(work)
    timer = StageTimer()
    start = time.perf_counter()
    with ray_session(cfg.ray, cfg.model.device):
        if store.exists(layout.prompts):
            prepare.check_same_corpus(cfg, store)  # resuming: the prompts must come from this config's corpus
        else:
            with timer("prepare"):
                prepare.run(cfg, store)
        with timer("fingerprint"):
            fingerprint = fingerprint_model(cfg.model, store)
        scoring, analysis = score_and_analyze(cfg, store, fingerprint, timer)
        explained = explain_memorized(cfg, store, analysis["memorized_count"], timer)
    audit = AuditSection(output=output, scoring=scoring, memorized_count=analysis["memorized_count"],
                         threshold=analysis["threshold"], timings_s=dict(timer.seconds))
    write_sections(store, layout, audit)  # before the report, which shows it, and the manifest, which checksums it
    with timer("report"):
        written = report.run(cfg, store)
    with timer("publish"):
        lease.check()  # never publish a run another writer took over
        manifest = publish_run(store, output, work, fingerprint, cfg, extra={"config_hash": config_hash(cfg)})
    return {
        **audit.to_json(),
        "timings_s": {**timer.seconds, "total": round(time.perf_counter() - start, 2)},
        "model_fingerprint": fingerprint,
        "files": len(manifest["files"]),
        # Where the report lives once published, not the _staging prefix an overwrite wrote it at (gone by now).
        "report": RunLayout(output).report if written.get("report") else None,
        "explained": {stage: summary.get("prompts") for stage, summary in explained.items()},
    }
