"""The model worker: one model replica, loaded once, that every model stage maps its prompts over.

`ModelWorker` is a callable class in the manner of Ray's batch-inference examples: `__init__`
loads the model, `__call__` maps a batch of (prompt_id, prompt) rows to scores.parquet rows. The
memorized-set stages map their prompts with one callable class per kind of map (`AttributePrompts`,
`MitigatePrompts`, `CopiesOfPrompts`) over the worker that holds the model (`ModelWorker.run`). The
stages run it in this process (`LocalModel`); cxrmem/distributed runs the same class as the audit's
Ray actor pool. Settings reach the domain as small frozen objects cut from the config here.

Tokenization stays in the worker (inside `Scorer.score`): it costs well under 1% of the
2 x G x T UNet passes per prompt, and a separate CPU stage would only ship padded id tensors
through the object store.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from cxrmem.attribution import AttributionSettings, attribute_prompts
from cxrmem.copies.embedders import EmbedderSettings
from cxrmem.copies.settings import CopiesSettings
from cxrmem.detectors import REGISTRY, DetectorSettings
from cxrmem.fidelity import FidelitySettings, make_fidelity
from cxrmem.mitigation import (
    MitigationSettings,
    changed,
    mitigate_prompts,
    mitigated_prompt,
    runnable_strategies,
    strategy_embedding,
    strategy_sampling,
    vocabulary_words,
)
from cxrmem.progress import Progress
from cxrmem.publish import stage_writes
from cxrmem.runfiles import Run
from cxrmem.score_key import config_hash
from cxrmem.scoring.scorer import ScoreBatch, Scorer, UNetWork
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.stages.continuation import STATE_COLUMN, TrajectoryCarry, column_states, continuation, state_column
from cxrmem.stages.score_parts import with_skipped_detectors
from cxrmem.storage import Store

log = logging.getLogger(__name__)

# Fault injection for the tests: a worker that finds this file deletes it and exits at once,
# so exactly one worker dies, mid-run, the way a lost GPU node does.
FAULT_ONCE_ENV = "CXRMEM_FAULT_ONCE_FILE"


def inject_fault_once() -> None:
    flag = os.environ.get(FAULT_ONCE_ENV)
    if not flag:
        return
    try:
        os.remove(flag)
    except FileNotFoundError:
        return
    log.error("fault injection: scoring worker pid %d exits", os.getpid())
    os._exit(1)


def ray_gpu_assigned() -> bool:
    """True in a Ray worker that Ray gave a GPU (it must then run on CUDA, or refuse)."""
    import ray

    return ray.is_initialized() and bool(ray.get_gpu_ids())


def restarted_actor() -> bool:
    """True in a Ray actor that Ray restarted after its process was lost (ray.max_restarts); False elsewhere."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    try:
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception as err:  # the GCS could not say: the run goes on, only the line is lost
        log.warning("worker pid %d could not tell whether it is a restarted actor (%s)", os.getpid(), err)
        return False


def attribution_settings(cfg) -> AttributionSettings:
    return AttributionSettings.of(cfg.attribution, marker_regex=cfg.corpus.marker_regex, batch_size=cfg.score.batch_size)


def mitigation_settings(cfg) -> MitigationSettings:
    return MitigationSettings.of(
        cfg.mitigation,
        marker_regex=cfg.corpus.marker_regex,
        samples_per_call=cfg.score.batch_size * cfg.score.generations,  # as many samples as a scoring call
        grid_generations=cfg.report.grid_generations,
    )


def embedder_settings(cfg) -> EmbedderSettings:
    c = cfg.copies
    return EmbedderSettings(
        name=c.embedder, size=c.pixel_size, repo=c.embedder_repo, cache_dir=c.embedder_cache or "",
        revision=c.embedder_revision, batch_size=c.batch_size,
    )  # fmt: skip


def scores_table(
    prompt_ids, prompts, batch: ScoreBatch, model_fingerprint: str, cfg_hash: str, detected: Optional[dict] = None
) -> pa.Table:
    """One scores.parquet row per prompt (docs/design.md, Outputs); `detected`: the extra detectors' columns,
    after d_mem's, in the order given."""
    n = len(prompt_ids)
    detected = {name: pa.array(values, pa.float32()) for name, values in (detected or {}).items()}
    return pa.table(
        {
            "prompt_id": pa.array(list(prompt_ids), pa.string()),
            "prompt": pa.array(list(prompts), pa.string()),
            "d_mem": pa.array(batch.d_mem, pa.float32()),
            **detected,
            "step_norms": pa.array(batch.step_norms.tolist(), pa.list_(pa.list_(pa.float32()))),
            "nonfinite": pa.array(batch.nonfinite, pa.bool_()),
            "n_tokens": pa.array(batch.n_tokens, pa.int32()),
            "truncated": pa.array(batch.truncated, pa.bool_()),
            "model_fingerprint": pa.array([model_fingerprint] * n, pa.string()),
            "config_hash": pa.array([cfg_hash] * n, pa.string()),
        }
    )


MODEL_LOADS = [0]  # models this process has loaded (ModelWorker.model_loads: one per actor when the pool is reused)


class ModelWorker:
    """One model replica: tokenizer, text encoder and UNet (and the VAE if asked), loaded once.

    On Ray one of these is an actor of the audit's pool (cxrmem/distributed/pipeline.py) that every stage
    maps its work over: each call brings its stage's config, and `for_config` serves it from the loaded model.
    """

    def __init__(
        self, cfg, store: Store, fingerprint: str = "", need_vae: bool = False, torch_threads: Optional[int] = None, carry=None
    ):
        """`carry`: a cxrmem/stages/continuation.py TrajectoryCarry whose trajectories this worker continues
        and keeps (the cascade in this process); None: every trajectory starts at x_T."""
        import torch

        from cxrmem.models.loading import load_components

        # A restarted actor (its process was lost: a killed worker, a lost node) says so, here and at the block it
        # reruns (`note_rerun`); a WARNING reaches the driver's log through Ray's log_to_driver.
        self.rerun_pending = restarted_actor()
        if self.rerun_pending:
            log.warning("scoring worker restarted as pid %d (its previous process was lost): loading the model again "
                        "to rerun the block it held", os.getpid())  # fmt: skip
        if torch_threads:
            torch.set_num_threads(torch_threads)  # the actor's CPU share, not the whole node
        components = load_components(cfg.model, store, need_vae=need_vae)
        m = cfg.model
        self.scorer = Scorer(components, ScoreSettings.of(cfg.score), m.device, ray_gpu_assigned(), m.tf32, m.vae_decode_batch)
        self.components, self.null_scorer = components, None  # the null model: built by the first attribute_null
        self.batch_size = cfg.score.batch_size
        self.fingerprint, self.config_hash = fingerprint, config_hash(cfg)
        self.attribution, self.mitigation = attribution_settings(cfg), mitigation_settings(cfg)
        self.copy_settings, self.embedder_settings = CopiesSettings.of(cfg.copies), embedder_settings(cfg)
        self.embedder = None  # the image embedder, loaded by the first `copies` call
        self.fidelity_settings = FidelitySettings.of(cfg.fidelity)
        self._fidelity: object = False  # the fidelity measure, loaded by the first call that needs it (None: none set)
        self.detectors, self.detect = tuple(cfg.score.detectors), DetectorSettings.of(cfg.detect)
        self.carry = carry if carry is not None and carry.matches(self.scorer.settings) else None  # other trajectories: restart
        self.model_cfg, self._views = cfg.model, {}
        MODEL_LOADS[0] += 1
        log.info("worker pid %d loaded %s on %s", os.getpid(), components.source, self.scorer.device)

    def measured(self, call, *args, **kwargs) -> tuple[object, UNetWork]:
        """(call(*args, **kwargs), the model work it did): a result brings its work back to the driver with it, so the
        driver counts exactly the work of the results it received (a lost actor's unfinished block is not counted)."""
        before = copy.copy(self.scorer.work)  # every view of this worker counts into the same tally (Scorer.on)
        return call(*args, **kwargs), self.scorer.work - before

    def model_loads(self) -> tuple[int, int]:
        """(pid, models this process loaded): the audit counts them to show one load per actor."""
        return os.getpid(), MODEL_LOADS[0]

    def for_config(self, cfg, fingerprint: str) -> "ModelWorker":
        """This worker as another scoring's config asks (a cascade screen's G, steps and detectors, the full score,
        the audit sample): a view on the same loaded model, made once per settings. The model must be the one loaded."""
        if cfg.model != self.model_cfg:
            raise ValueError("a stage asked the pool's workers for another model than the one they loaded (model.* differs)")
        key = (config_hash(cfg), cfg.score.batch_size, fingerprint)
        if key not in self._views:
            view = copy.copy(self)
            view.scorer = self.scorer.on(self.components, ScoreSettings.of(cfg.score))
            view.batch_size, view.fingerprint, view.config_hash = cfg.score.batch_size, fingerprint, key[0]
            view.detectors, view.detect, view.carry, view._views = tuple(cfg.score.detectors), DetectorSettings.of(cfg.detect), None, {}
            self._views[key] = view
        return self._views[key]

    def note_rerun(self, prompt_ids: list, what: str) -> None:
        """The first call of a restarted actor is the one its lost process held (Ray reruns it: max_task_retries):
        one line naming it by its first prompt_id and size."""
        if getattr(self, "rerun_pending", False):
            self.rerun_pending = False
            first = prompt_ids[0] if len(prompt_ids) else "-"
            log.warning("restarted worker pid %d reruns the %s it lost: %d prompts from prompt_id %s", os.getpid(), what, len(prompt_ids), first)

    def score_block(self, cfg, fingerprint: str, block: pa.Table, carried: Optional[dict] = None) -> tuple[pa.Table, UNetWork]:
        """scores.parquet rows of one block under `cfg`'s scoring, and the model work they took; `carried`: the block
        brings the trajectories it continues (`STATE_COLUMN`) and takes back the states this stage makes (`score_carried`)."""
        self.note_rerun(block.column("prompt_id").to_pylist(), "score block")
        worker = self.for_config(cfg, fingerprint)
        return self.measured(worker, block) if carried is None else self.measured(score_carried, worker, block, **carried)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score a batch of (prompt_id, prompt) rows into scores.parquet rows."""
        inject_fault_once()
        ids, prompts = batch.column("prompt_id").to_pylist(), batch.column("prompt").to_pylist()
        tables = []
        for lo in range(0, len(ids), self.batch_size):
            chunk_ids, chunk = ids[lo : lo + self.batch_size], prompts[lo : lo + self.batch_size]
            if self.carry is None:
                scored = self.scorer.score(chunk, chunk_ids)
                tables.append(scores_table(chunk_ids, chunk, scored, self.fingerprint, self.config_hash, self.detected(chunk, chunk_ids)))
            else:
                tables += self.continued(chunk_ids, chunk)
        if not tables:
            tables = [scores_table([], [], ScoreBatch.empty(), "", "", self.detected([], []))]
        # Which detectors' columns are NaN because this denoiser cannot run them, and why: the analyze stage's record.
        return with_skipped_detectors(pa.concat_tables(tables), self.scorer.skipped({name: REGISTRY[name].needs for name in self.detectors}))

    def continued(self, ids: list[str], prompts: list[str]) -> list[pa.Table]:
        """One batch's rows with the carry: its prompts grouped by the step their carried trajectories
        reached (None: from x_T), each group scored from there and its states offered to the carry. The
        detectors run on the whole batch once, as without a carry (their shared passes per batch)."""
        starts = self.carry.starts(ids, self.scorer.settings.scored_steps)
        detected = self.detected(prompts, ids)
        groups: dict = {}
        for i, state in enumerate(starts):
            groups.setdefault(None if state is None else state.steps, []).append(i)
        tables = []
        for k, rows in groups.items():
            sub_ids, sub_prompts = [ids[i] for i in rows], [prompts[i] for i in rows]
            start = None if k is None else continuation([starts[i] for i in rows])
            scored = self.scorer.score(sub_prompts, sub_ids, start=start)
            columns = {name: np.asarray(values)[rows] for name, values in detected.items()}
            table = scores_table(sub_ids, sub_prompts, scored, self.fingerprint, self.config_hash, columns)
            self.carry.keep(sub_ids, scored, table[self.carry.column].to_numpy(zero_copy_only=False))
            tables.append(table)
        return tables

    def detected(self, prompts: list[str], prompt_ids: list[str]) -> dict:
        """The columns of score.detectors, in the order they are named (empty ones for no prompts)."""
        out = self.scorer.detect(prompts, prompt_ids, self.detectors, self.detect) if self.detectors and prompts else {}
        return {column: out.get(column, []) for name in self.detectors for column in REGISTRY[name].columns}

    def run(self, task, prompt_ids: list[str], prompts: list[str], *args) -> tuple[object, UNetWork]:
        """One kind of map over these prompts (AttributePrompts, MitigatePrompts, CopiesOfPrompts) on this
        worker's loaded model, and the model work it took: the actor's entry for the memorized-set stages."""
        self.note_rerun(prompt_ids, f"{type(task).__name__} chunk")
        return self.measured(task, self, prompt_ids, prompts, *args)

    def null_model_scorer(self) -> Scorer:
        """A scorer of the re-initialised copy of the model (attribution's null), built by the first call."""
        if self.null_scorer is None:
            from cxrmem.models.components import null_copy

            null = null_copy(self.components, self.attribution.null_seed)
            self.null_scorer = self.scorer.on(null)
            log.info("worker pid %d built the attribution null model (seed %d)", os.getpid(), self.attribution.null_seed)
        return self.null_scorer

    def image_embedder(self):
        """The copies check's image embedder, loaded by the first call."""
        if self.embedder is None:
            from cxrmem.copies.embedders import make_embedder

            self.embedder = make_embedder(self.embedder_settings, self.scorer.device)
        return self.embedder

    def strategy_texts(self, strategy: str, prompts: list[str], prompt_ids: list[str]) -> list[str]:
        """The texts `strategy` generates from (its rewrite's, seeded by prompt id), as the mitigate stage makes them."""
        vocab = vocabulary_words(self.scorer.tokenizer)
        return [mitigated_prompt(strategy, p, i, vocab, self.mitigation) for p, i in zip(prompts, prompt_ids)]

    def sampling_plan(self, strategy: str):
        """The same text; a changed embedding, attention, guidance schedule or initial noise, as the mitigate stage makes it."""
        import torch

        def plan(texts, ids, embeddings, latents, w):
            rows = [strategy_embedding(self.scorer, strategy, embeddings[i : i + 1], pid, self.mitigation) for i, pid in enumerate(ids)]
            return strategy_sampling(self.scorer, strategy, texts, torch.cat(rows), latents, w, self.mitigation)

        return plan

    def fidelity(self):
        """The configured fidelity measure (cxrmem/fidelity.py), loaded once; None when none is set."""
        if self._fidelity is False:
            self._fidelity = make_fidelity(self.fidelity_settings, self.scorer.device)
        return self._fidelity



class AttributePrompts:
    """tokens.parquet rows of memorized prompts on a worker's model (`null`: on its re-initialised copy, with
    the same seeds and units)."""

    def __init__(self, null: bool = False):
        self.null = null

    def __call__(self, worker: ModelWorker, prompt_ids: list[str], prompts: list[str], loo_ids: Optional[frozenset] = None) -> pd.DataFrame:
        scorer = worker.null_model_scorer() if self.null else worker.scorer
        return attribute_prompts(scorer, prompts, prompt_ids, worker.attribution, loo_ids)


class MitigatePrompts:
    """mitigation.parquet rows of memorized prompts under `strategies` (None: mitigation.strategies), the image
    grids of those in `grid_ids`, and the strategies this model cannot run with their reasons; `embed`: the rows
    also carry their generations embedded by the copies embedder."""

    def __call__(self, worker: ModelWorker, prompt_ids: list[str], prompts: list[str], grid_ids: frozenset = frozenset(),
                 strategies: Optional[tuple[str, ...]] = None, embed: bool = False):  # fmt: skip
        settings = worker.mitigation.replace(strategies=strategies) if strategies is not None else worker.mitigation
        embedder = worker.image_embedder() if embed else None
        return mitigate_prompts(worker.scorer, prompts, prompt_ids, settings, grid_ids, worker.fidelity(), embedder)


class SkippedStrategies:
    """The mitigation strategies of `strategies` this worker's model cannot run, with the reasons (no prompts needed)."""

    def __call__(self, worker: ModelWorker, prompt_ids: list[str], prompts: list[str], strategies: tuple[str, ...]) -> dict[str, str]:
        return runnable_strategies(worker.scorer, worker.mitigation.replace(strategies=strategies))[1]


class ChangedPrompts:
    """Per prompt, whether `strategy` changes anything for it (cxrmem/mitigation.py `changed`, as the mitigate stage
    records it): the copies check generates only the changed ones, no model work here."""

    def __call__(self, worker: ModelWorker, prompt_ids: list[str], prompts: list[str], strategy: str) -> list[bool]:
        texts = worker.strategy_texts(strategy, prompts, prompt_ids)
        return [changed(strategy, p, t, worker.scorer, worker.mitigation) for p, t in zip(prompts, texts)]


class CopiesOfPrompts:
    """Embeddings [P, N, D] of N generations per prompt (generated under a mitigation `strategy` unless "none"),
    the texts generated from, the grey generations [N, H, W] of those in `keep_ids`, and per prompt the
    fidelity of its generations to the original prompt ([P], NaN without a measure)."""

    def __call__(self, worker: ModelWorker, prompt_ids: list[str], prompts: list[str], guidance: float, strategy: str = "none",
                 keep_ids=frozenset()):  # fmt: skip
        from cxrmem.copies.find import embedded_generations

        plan, originals = None, list(prompts)
        if strategy != "none":  # the strategy's text (its rewrite's), embedding and sampling, as the mitigate stage makes them
            prompts, plan = worker.strategy_texts(strategy, prompts, prompt_ids), worker.sampling_plan(strategy)
        queries, generations = embedded_generations(
            worker.scorer, worker.image_embedder(), prompts, prompt_ids, worker.copy_settings, guidance, plan
        )
        kept = {pid: generations[i].mean(dim=1).numpy() for i, pid in enumerate(prompt_ids) if pid in keep_ids}
        measure = worker.fidelity()
        faithful = measure(generations, originals) if measure is not None else [float("nan")] * len(prompt_ids)
        return queries.numpy(), prompts, kept, list(faithful)


def score_carried(worker: ModelWorker, batch: pa.Table, screen: str = "dmem", column: str = "d_mem", keeps: bool = False) -> pa.Table:
    """A batch whose rows bring the trajectories they continue and take back the states the worker makes
    (`STATE_COLUMN`): the cascade on Ray, where the driver's carry cannot be shared with the actors
    (cxrmem/stages/continuation.py). `keeps`: the stage makes states (a screen; the full score does not)
    for the driver's carry to choose from, by the `screen` detector's `column`."""
    worker.carry = TrajectoryCarry(worker.scorer.settings)  # the driver checked that these are the carried trajectories
    worker.carry.states = column_states(batch)
    worker.carry.begin_stage(batch.num_rows if keeps else 0, screen, column)
    try:
        scored = worker(batch.drop_columns([STATE_COLUMN]))
        return scored.append_column(STATE_COLUMN, state_column([worker.carry.made(pid) for pid in scored["prompt_id"].to_pylist()]))
    finally:
        worker.carry = None


@contextmanager
def memorized_stage(cfg, out: Run, stage: str, limit: Optional[int], models=None, need_vae: bool = False):
    """Inside a stage that maps the memorized set of the run `out` over a model: (memorized set, models, the scores'
    identity), with the published-run guard around it. `models` defaults to a model loaded in this process.
    The model must be the one that scored: the memorized set is that model's (`scores_identity`). The model
    work of the results `models` returned meanwhile is the stage's cost (summary.json's cost section)."""
    with stage_writes(out.store, cfg.run, stage):
        identity = scores_identity(cfg, out, stage)
        models = models or LocalModel(cfg, out.store, need_vae)
        before = copy.copy(models.work)  # the audit's pool served the stages before this one
        yield out.read_memorized(limit), models, identity
        out.record_cost(stage, (models.work - before).to_json())


def scores_identity(cfg, out: Run, stage: str) -> dict:
    """{model_fingerprint, config_hash} of the run's scores, which every memorized-set artefact carries; a
    model.path whose weights are not the scoring model's (`out.fingerprint`, computed here when unknown) is
    refused, naming both fingerprints."""
    from cxrmem.models.loading import fingerprint_model

    store, layout = out.store, out.layout
    keys = store.read_table(layout.scores, columns=["model_fingerprint", "config_hash"]) if store.exists(layout.scores) else None
    if keys is None or keys.num_rows == 0:
        raise FileNotFoundError(f"{layout.scores} does not exist or is empty: run `cxrmem score` (and `cxrmem analyze`) first")
    scored = sorted(set(keys["model_fingerprint"].to_pylist()))
    current = out.fingerprint or fingerprint_model(cfg.model, store)
    if scored != [current]:
        raise ValueError(
            f"`cxrmem {stage}` would run the model at {cfg.model.path} (fingerprint {current}) on the memorized set that the "
            f"model(s) {', '.join(scored)} scored in {layout.scores}: rescore with this model first (`cxrmem score` then "
            "`cxrmem analyze`, or `cxrmem rescore`), or set model.path back to the model that scored"
        )
    return {"model_fingerprint": current, "config_hash": ",".join(sorted(set(keys["config_hash"].to_pylist())))}


def stamped(table: pa.Table, identity: dict) -> pa.Table:
    """`table` with the scores' model fingerprint and config hash on every row (tokens, mitigation, copies)."""
    for name, value in identity.items():
        table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
    return table


def map_with_progress(models, task, prompts: pd.DataFrame, what: str, every_s: float, *args) -> tuple[list, float]:
    """`models.map(task, prompts, *args)` with progress lines (done/total, rate, ETA); the results and seconds."""
    progress = Progress(len(prompts), what, every_s)
    results = []
    for done, result in models.map(task, prompts, *args):
        results.append(result)
        progress.update(done)
    return results, progress.elapsed_s


class LocalModel:
    """The stages' executor in this process: one ModelWorker, one prompt per step (progress per prompt).

    cxrmem/distributed/pipeline.py's ModelPool has the same `map` and `work` on the audit's Ray actor pool.
    """

    def __init__(self, cfg, store: Store, need_vae: bool = False):
        self.worker = ModelWorker(cfg, store, need_vae=need_vae)
        self.work = UNetWork()  # the model work of every result `map` returned (a stage reads its own as a difference)

    def map(self, task, prompts: pd.DataFrame, *args) -> Iterator[tuple[int, object]]:
        """(prompts done, task's result) per chunk, in input order; one empty chunk when there are no prompts."""
        chunks = [prompts.iloc[i : i + 1] for i in range(len(prompts))] or [prompts]
        for chunk in chunks:
            result, spent = self.worker.run(task, chunk["prompt_id"].tolist(), chunk["prompt"].tolist(), *args)
            self.work += spent
            yield len(chunk), result
