"""`cxrmem audit` on Ray: prepare, score, analyze, attribute, mitigate, report, publish.

Scoring streams the corpus through a Ray Data actor pool (pipeline.py). The driver then reads
only the d_mem column (analysis), and sends the small memorized set to a few actors of the same
worker class, each loading the model once for both attribution and mitigation. The run is
published (manifest written last) only when every stage has finished; a failed run leaves no
manifest, and rerunning it resumes from its score parts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import pandas as pd
import pyarrow as pa
from omegaconf import OmegaConf

from cxrmem import storage
from cxrmem.attribution import merge_summary
from cxrmem.config import config_hash
from cxrmem.distributed.pipeline import model_fingerprint, pool_size, ray_session, score_corpus
from cxrmem.distributed.workers import ModelWorker

log = logging.getLogger(__name__)


def with_overrides(cfg, **dotted):
    """A read-only copy of `cfg` with dot-keys replaced (keyword `a__b` is the key `a.b`)."""
    items = [f"{key.replace('__', '.')}={value}" for key, value in dotted.items()]
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))
    OmegaConf.set_readonly(merged, True)
    return merged


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


# ---------------------------------------------------------------- the memorized set on actors


def start_actors(cfg, n_prompts: int, need_vae: bool) -> list:
    import ray

    actors, gpus = pool_size(cfg.ray)
    worker = ray.remote(ModelWorker).options(
        num_cpus=cfg.ray.num_cpus_per_worker,
        num_gpus=gpus,
        max_restarts=cfg.ray.max_restarts,
        max_task_retries=-1 if cfg.ray.max_restarts else 0,  # a restarted actor reruns the lost chunk
    )
    count = max(1, min(actors, n_prompts))
    return [worker.remote(cfg, need_vae=need_vae, torch_threads=int(cfg.ray.num_cpus_per_worker)) for _ in range(count)]


def map_on_actors(actors: list, method: str, prompts: pd.DataFrame) -> pd.DataFrame:
    """Call `method(prompt_ids, prompts)` on chunks spread over the actors; rows in input order."""
    from ray.util import ActorPool

    # A few chunks per actor balance uneven prompts; always at least one so the result has its schema.
    size = max(1, math.ceil(len(prompts) / (4 * len(actors))))
    chunks = [prompts.iloc[lo : lo + size] for lo in range(0, max(len(prompts), 1), size)]
    pool = ActorPool(actors)
    frames = pool.map(
        lambda actor, chunk: getattr(actor, method).remote(chunk["prompt_id"].tolist(), chunk["prompt"].tolist()),
        chunks,
    )
    return pd.concat(list(frames), ignore_index=True)


def explain_memorized(cfg, timer: StageTimer) -> dict:
    """tokens.parquet and mitigation.parquet for the memorized set, on one set of actors."""
    import ray

    from cxrmem import attribution

    results: dict = {}
    if not (cfg.attribution.enabled or cfg.mitigation.enabled):
        return results
    layout = storage.RunLayout(cfg.run.output)
    memorized = attribution.read_memorized(layout, cfg.storage, None)
    actors = start_actors(cfg, len(memorized), need_vae=cfg.mitigation.enabled)
    try:
        if cfg.attribution.enabled:
            with timer("attribute"):
                chosen = memorized.head(cfg.attribution.max_prompts) if cfg.attribution.max_prompts else memorized
                tokens = map_on_actors(actors, "attribute", chosen)
                schema = pa.schema(attribution.TOKEN_COLUMNS)
                storage.write_table(pa.Table.from_pandas(tokens, schema=schema, preserve_index=False), layout.tokens, cfg.storage)
                results["attribution"] = {**attribution.attribution_summary(tokens), "tokens": layout.tokens}
                merge_summary(layout, "attribution", results["attribution"], cfg.storage)
        if cfg.mitigation.enabled:
            from cxrmem import mitigation

            with timer("mitigate"):
                chosen = memorized.head(cfg.mitigation.max_prompts) if cfg.mitigation.max_prompts else memorized
                rows = map_on_actors(actors, "mitigate", chosen)
                results["mitigation"] = mitigation.write_mitigation(rows, cfg)
    finally:
        for actor in actors:
            ray.kill(actor)
    return results


# ---------------------------------------------------------------- the audit


def run_audit(cfg) -> dict:
    """Every stage of one run at `run.output`, published at the end; returns the run's summary."""
    from cxrmem.analysis import analyze
    from cxrmem.publish import prepare_output, publish_run

    output = cfg.run.output
    work = prepare_output(output, cfg.storage, overwrite=cfg.run.overwrite)
    cfg = with_overrides(cfg, run__output=work)
    layout = storage.RunLayout(work)
    timer = StageTimer()
    start = time.perf_counter()
    with ray_session(cfg.ray):
        if not storage.exists(layout.prompts, cfg.storage):
            from cxrmem.corpus.prepare import prepare

            with timer("prepare"):
                prepare(cfg)
        with timer("fingerprint"):
            fingerprint = model_fingerprint(cfg)
        with timer("score"):
            if cfg.cascade.enabled:
                from cxrmem.distributed.cascade import run_cascade

                scoring = run_cascade(cfg, fingerprint)
            else:
                scoring = score_corpus(cfg, fingerprint)
        with timer("analyze"):
            analysis = analyze(cfg)
        explained = explain_memorized(cfg, timer)
    with timer("report"):
        from cxrmem.report import build_report

        report = build_report(cfg)
    audit = {
        "output": output,
        "scoring": scoring,
        "memorized_count": analysis["memorized_count"],
        "threshold": analysis["threshold"],
        "timings_s": {**timer.seconds, "total": round(time.perf_counter() - start, 2)},
    }
    merge_summary(layout, "audit", audit, cfg.storage)  # before publishing: the manifest checksums it
    with timer("publish"):
        manifest = publish_run(output, work, cfg.storage, fingerprint, cfg, extra={"config_hash": config_hash(cfg)})
    audit["timings_s"]["publish"] = timer.seconds["publish"]
    return {
        **audit,
        "model_fingerprint": fingerprint,
        "files": len(manifest["files"]),
        "report": report.get("report") if isinstance(report, dict) else report,
        **{key: value for key, value in explained.items() if key == "attribution"},
    }

