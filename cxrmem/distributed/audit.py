"""`cxrmem audit` on Ray: prepare, score, analyze, attribute, mitigate, copies (with images.source), report, publish.

The same stage functions as the single-stage commands, with the model work mapped over one Ray actor
pool for the whole audit (pipeline.py's ModelPool): the cascade's screens, the full score, the audit
sample, attribution, mitigation and copies run on the same actors, each loading the model once. The
copies stage's image index (another model: the image embedder) is built first, on its own actors,
before the model pool holds the devices. The run is published (manifest written last) only when every
stage has finished; a failed run leaves no manifest, and rerunning it resumes from its score parts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

from cxrmem.distributed.image_index import ray_rows
from cxrmem.distributed.pipeline import ModelPool
from cxrmem.distributed.session import ray_session
from cxrmem.lease import LeaseSettings, hold
from cxrmem.models.loading import fingerprint_model
from cxrmem.publish import manifest_digest, prepare_output, publish_run
from cxrmem.runfiles import RunLayout, write_sections
from cxrmem.score_key import config_hash
from cxrmem.settings import with_overrides
from cxrmem.stages import analyze, attribute, copies, mitigate, prepare, reference, report, score
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


def explain_memorized(cfg, store: Store, models: ModelPool, timer: StageTimer) -> dict:
    """tokens.parquet, mitigation.parquet and (with images.source) copies.parquet for the memorized set, on the
    audit's model pool."""
    results: dict = {}
    if cfg.attribution.enabled:
        with timer("attribute"):
            results["attribution"] = attribute.run(cfg, store, models)
    if cfg.mitigation.enabled:
        with timer("mitigate"):
            results["mitigation"] = mitigate.run(cfg, store, models)
    if cfg.images.source:
        with timer("copies"):
            results["copies"] = copies.run(cfg, store, models)  # the index is built: only unreadable files are retried
    return results


def score_and_analyze(cfg, store: Store, fingerprint: str, models: ModelPool, timer: StageTimer) -> tuple[dict, dict]:
    with timer("score"):
        if cfg.cascade.enabled:
            from cxrmem.distributed.cascade import run_cascade

            scoring = run_cascade(cfg, store, fingerprint, models.scored_batches)
            # scores.parquet holds the screened share only: the same top share of the whole corpus.
            top_percent: Optional[float] = scoring["analysis_top_percent"]
        else:
            scoring, top_percent = score.run(cfg, store, fingerprint, models.scored_batches), None
    if cfg.analyze.reference:
        with timer("reference"):
            scoring["reference"] = reference.run(cfg, store, fingerprint, models.scored_batches)
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
        if cfg.images.source:  # its own actors (the embedder), released before the model pool takes the devices
            with timer("image_index"):
                log.info("image index: %s", copies.build_image_index(cfg, store, ray_rows))
        cfg = score.with_planned_device(cfg)  # the pool's workers and every stage's score key agree on the device
        need_vae = cfg.mitigation.enabled or bool(cfg.images.source)
        with ModelPool(cfg, store, need_vae=need_vae) as models:
            scoring, analysis = score_and_analyze(cfg, store, fingerprint, models, timer)
            explained = explain_memorized(cfg, store, models, timer)
            model_loads = models.model_loads()
    audit = AuditSection(output=output, scoring=scoring, memorized_count=analysis["memorized_count"],
                         threshold=analysis["threshold"], timings_s=dict(timer.seconds), model_loads=model_loads)
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
        # The published manifest's sha256: kept outside the run, it tells this run from an edited one (`verify --expect`).
        "manifest_sha256": manifest_digest(manifest),
        # Where the report lives once published, not the _staging prefix an overwrite wrote it at (gone by now).
        "report": RunLayout(output).report if written.get("report") else None,
        "explained": {stage: summary.get("prompts") for stage, summary in explained.items()},
    }
