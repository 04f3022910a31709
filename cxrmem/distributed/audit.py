"""`cxrmem audit` on Ray: the stage table's stages in order (cxrmem/stages/table.py), then publish.

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
from typing import Optional, Sequence

from cxrmem.distributed.image_index import ray_rows
from cxrmem.distributed.pipeline import ModelPool
from cxrmem.distributed.session import ray_session
from cxrmem.lease import LeaseSettings, hold
from cxrmem.models.loading import fingerprint_model
from cxrmem.publish import manifest_digest, prepare_output, publish_run
from cxrmem.runfiles import Run, RunLayout
from cxrmem.score_key import config_hash
from cxrmem.settings import with_overrides
from cxrmem.stages import copies, prepare, score
from cxrmem.stages.table import AUDIT, BY_NAME, Stage
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


def run_stages(stages: Sequence[Stage], cfg, out: Run, timer: StageTimer, pool: dict) -> dict:
    """stage name -> result of each stage its settings turn on, in the table's order, on the run `out`, handed
    what it takes of `pool`."""
    results = {}
    for stage in stages:
        if stage.off(cfg) is None:
            with timer(stage.name):
                results[stage.name] = stage.function()(cfg, out, **{name: pool[name] for name in stage.takes})
    return results


def audit_section(output: str, results: dict, timer: StageTimer, model_loads: dict) -> AuditSection:
    scoring = results["score"].to_json()
    if "reference" in results:
        scoring["reference"] = results["reference"].to_json()
    analysis = results["analyze"]
    return AuditSection(output=output, scoring=scoring, memorized_count=analysis.memorized_count, threshold=analysis.threshold,
                        timings_s=dict(timer.seconds), model_loads=model_loads)  # fmt: skip


def run_audit(cfg, out: Optional[Run] = None) -> dict:
    """Every stage of the run `out` (default: at `run.output`), published at the end; returns the run's summary.

    The run's lease (cxrmem/lease.py) is held from before the first write to after publishing:
    a second audit or stage on the same run.output is refused at start.
    """
    out = out or Run.of(cfg)
    with hold(out.store, cfg.run.output, LeaseSettings.of(cfg.run)) as lease:
        return _audit(cfg, out.held_by(lease))


def _audit(cfg, published: Run) -> dict:
    output, store = published.layout.prefix, published.store
    work = prepare_output(store, output, overwrite=cfg.run.overwrite)
    cfg = with_overrides(cfg, run__output=work)
    out = published.at(work)  # an overwrite writes under _staging/ until it is published
    timer = StageTimer()
    start = time.perf_counter()
    # The table's first stage reads the corpus, its last (report) every other output; the rest run on the model pool.
    first, *pooled, last = AUDIT
    with ray_session(cfg.ray, cfg.model.device):
        if out.exists(out.layout.prompts):
            prepare.check_same_corpus(cfg, out)  # resuming: the prompts must come from this config's corpus
        else:
            run_stages([first], cfg, out, timer, {})
        with timer("fingerprint"):
            out = out.with_fingerprint(fingerprint_model(cfg.model, store))
        if cfg.images.source:  # its own actors (the embedder), released before the model pool takes the devices
            with timer("image_index"):  # the copies stage then retries only the files that could not be read
                log.info("image index: %s", copies.build_image_index(cfg, store, ray_rows))
        cfg = score.with_planned_device(cfg)  # the pool's workers and every stage's score key agree on the device
        need_vae = cfg.mitigation.enabled or bool(cfg.images.source)
        with ModelPool(cfg, store, need_vae=need_vae) as models:
            pool = {"scored_batches": models.scored_batches, "models": models}
            results = run_stages(pooled, cfg, out, timer, pool)
            model_loads = models.model_loads()
    audit = audit_section(output, results, timer, model_loads)
    out.write_sections(audit)  # before the report, which shows it, and the manifest, which checksums it
    written = run_stages([last], cfg, out, timer, {}).get(last.name)
    with timer("publish"):
        out.lease.check()  # never publish a run another writer took over
        manifest = publish_run(store, output, work, out.fingerprint, cfg, extra={"config_hash": config_hash(cfg)})
    return {
        **audit.to_json(),
        "timings_s": {**timer.seconds, "total": round(time.perf_counter() - start, 2)},
        "model_fingerprint": out.fingerprint,
        "files": len(manifest["files"]),
        # The published manifest's sha256: kept outside the run, it tells this run from an edited one (`verify --expect`).
        "manifest_sha256": manifest_digest(manifest),
        # Where the report lives once published, not the _staging prefix an overwrite wrote it at (gone by now).
        "report": RunLayout(output).report if written else None,
        "explained": {name: result.prompts for name, result in results.items() if "models" in BY_NAME[name].takes},
    }
