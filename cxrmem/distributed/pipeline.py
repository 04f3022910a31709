"""The audit's actor pool: every stage that runs the model maps its work over the same Ray actors.

    prompts.parquet (ids and texts not yet scored, read on the driver, one block per ray.batch_size)
        -> ModelPool.scored_batches: the blocks over the actors (ActorPool, results in order)
        -> the score stage's part files -> scores.parquet

Each actor is a ModelWorker (cxrmem/stages/worker.py) in the manner of Ray's batch-inference examples:
its `__init__` loads the model once, and each call maps one block. A call brings its stage's config,
and the worker serves it from the model it holds (`ModelWorker.for_config`), so the cascade's screens,
the full score, the audit sample, attribution, mitigation and copies run on one set of actors: the
model is loaded once per actor per audit (summary.json's `audit.model_loads` counts it). A lost actor
is restarted (ray.max_restarts) and reruns the block it held; only completed blocks reach the driver,
which is what makes every prompt land in exactly one part. `scored_batches` is the score stage's
executor for a scoring that has no pool of its own (a pool for that one scoring).

No Ray Data read, filter or repartition tasks run before the pool: each of those asks for a whole CPU,
and when the scoring pools of jobs sharing a cluster hold every CPU, no job could read and all of them
would hang. Only the ids and texts of the prompts left to score are read, on the driver (tens of MB
for MIMIC-CXR's 100,000 prompts), and a lost actor costs one block, not a whole file.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
from typing import Callable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cxrmem.distributed.session import pool_size
from cxrmem.scoring.scorer import UNetWork
from cxrmem.scoring.settings import ScoreSettings
from cxrmem.stages.worker import ModelWorker
from cxrmem.storage import Store

log = logging.getLogger(__name__)


class ModelPool:
    """The audit's model actors (one per GPU share by default, `pool_size`), each loading the model once."""

    def __init__(self, cfg, store: Store, need_vae: bool = False, worker: type = ModelWorker):
        """`worker`: the actor class (bench/scale.py measures the pool's own ceiling with one that loads no model)."""
        import ray

        actors, gpus = pool_size(cfg.ray, cfg.model.device)
        remote = ray.remote(worker).options(
            num_cpus=cfg.ray.num_cpus_per_worker,
            num_gpus=gpus,
            max_restarts=cfg.ray.max_restarts,
            max_task_retries=-1 if cfg.ray.max_restarts else 0,  # a restarted actor reruns the lost block
        )
        threads = int(cfg.ray.num_cpus_per_worker)
        self.actors = [remote.remote(cfg, store, need_vae=need_vae, torch_threads=threads) for _ in range(actors)]
        self.described = f"{actors} workers x ({cfg.ray.num_cpus_per_worker:g} CPU, {gpus:g} GPU)"
        self.work = UNetWork()  # the model work of every result `map` received (a stage reads its own as a difference)
        log.info("model pool: %s", self.described)

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scored_batches(
        self, cfg, store: Store, fingerprint: str, prompts_uri: str, skip_ids: pa.Array, carry=None, *, work: UNetWork
    ) -> Iterator[pa.Table]:
        """scores.parquet rows of the prompts not in `skip_ids` under `cfg`'s scoring, block by block in order
        (the score stage's executor); each block's model work, which comes back with it, is added to `work`.
        `carry`: the cascade's TrajectoryCarry (cxrmem/stages/continuation.py); where it holds these settings'
        trajectories, its states ride in the blocks to the actors and the states they make come back to it."""
        import ray
        from ray.util import ActorPool

        prompts = store.read_table(prompts_uri, columns=["prompt_id", "prompt"])
        if len(skip_ids):
            prompts = prompts.filter(pc.invert(pc.is_in(prompts["prompt_id"], value_set=skip_ids)))
        size = cfg.ray.batch_size
        blocks = [prompts.slice(lo, size) for lo in range(0, prompts.num_rows, size)]
        settings, carried = ScoreSettings.of(cfg.score), None
        if carry is not None and carry.matches(settings):
            blocks = [carry.with_states(block, settings.scored_steps, cfg.score.batch_size) for block in blocks]
            carried = carry.worker_kwargs()
        stage_cfg = ray.put(cfg)  # once, not with every block
        results = ActorPool(self.actors).map(lambda actor, block: actor.score_block.remote(stage_cfg, fingerprint, block, carried), blocks)
        tables = map(functools.partial(counted, work), results)
        if carried is not None:
            tables = map(carry.receive, tables)
        return watched(tables, cfg.ray.stall_timeout_s, lambda waited: stall_message(waited, self.described))

    def map(self, task, prompts: pd.DataFrame, *args) -> Iterator[tuple[int, object]]:
        """The memorized-set stages' executor (the signature of the in-process `LocalModel.map`): chunks of
        prompts over the actors, each running `task` (a callable class of cxrmem/stages/worker.py) on its
        loaded model, (prompts done, result) per chunk in input order."""
        from ray.util import ActorPool

        # A few chunks per actor balance uneven prompts; always at least one so the result has its schema.
        size = max(1, math.ceil(len(prompts) / (4 * len(self.actors))))
        chunks = [prompts.iloc[lo : lo + size] for lo in range(0, max(len(prompts), 1), size)]
        results = ActorPool(self.actors).map(
            lambda actor, chunk: actor.run.remote(task, chunk["prompt_id"].tolist(), chunk["prompt"].tolist(), *args),
            chunks,
        )
        for chunk, result in zip(chunks, results):
            yield len(chunk), counted(self.work, result)

    def model_loads(self) -> dict:
        """Per actor process (pid), the models it loaded: 1 each when every stage reused the pool."""
        import ray

        return {str(pid): loads for pid, loads in ray.get([actor.model_loads.remote() for actor in self.actors])}

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def counted(work: UNetWork, result: tuple[object, UNetWork]):
    """A worker's (result, model work): the result, its work added to `work`."""
    value, spent = result
    work += spent
    return value


def scored_batches(
    cfg, store: Store, fingerprint: str, prompts_uri: str, skip_ids: pa.Array, worker: type = ModelWorker, carry=None, *, work: UNetWork
) -> Iterator[pa.Table]:
    """The score stage's executor on Ray for a scoring with no pool of its own: a ModelPool for this scoring,
    closed when the batches end. Needs a Ray session."""
    with ModelPool(cfg, store, worker=worker) as pool:
        yield from pool.scored_batches(cfg, store, fingerprint, prompts_uri, skip_ids, carry, work=work)


class StallError(TimeoutError):
    """No scored batch reached the driver for ray.stall_timeout_s; the message names what the cluster holds."""


def watched(items: Iterator, stall_timeout_s: float, explain: Callable[[float], str]) -> Iterator:
    """`items`, failing with StallError(explain(seconds)) when none arrives for `stall_timeout_s`.

    The driver keeps iterating in its main thread (so that closing the iterator shuts Ray Data's
    execution down there, before Ray itself); a watchdog thread only times the gaps, and on a
    stall logs the diagnosis and raises the error in the main thread through SIGALRM's handler.
    Off the main thread there is no watchdog.
    """
    if threading.current_thread() is not threading.main_thread():
        yield from items
        return
    arrived, finished, stalled = threading.Event(), threading.Event(), []
    main = threading.main_thread().ident

    def watch() -> None:
        while not finished.is_set():
            if arrived.wait(stall_timeout_s):
                arrived.clear()
                continue
            if not finished.is_set():
                stalled.append(explain(stall_timeout_s))
                signal.pthread_kill(main, signal.SIGALRM)  # a real signal: it also wakes a blocking wait
            return

    def on_stall(signum, frame):
        raise StallError(stalled[0])

    previous = signal.signal(signal.SIGALRM, on_stall)
    threading.Thread(target=watch, name="cxrmem-stall-watchdog", daemon=True).start()
    try:
        for item in items:
            arrived.set()
            yield item
    except BaseException as err:
        if stalled and not isinstance(err, StallError):  # raised inside a Ray callback, it became another error
            raise StallError(stalled[0]) from None
        raise
    finally:
        finished.set()
        arrived.set()
        signal.signal(signal.SIGALRM, previous)


def stall_message(waited: float, pool: str) -> str:
    """Log what is pending and what the cluster holds; one line naming the cause, for the error."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    shown = ", ".join(f"{free.get(name, 0):g} of {total[name]:g} {name}" for name in ("CPU", "GPU") if name in total)
    pending = pending_tasks()
    log.error("stalled: no scored batch for %.0f s; pool %s; cluster free %s; pending %s; all resources: %s free of %s",
              waited, pool, shown, pending, free, total)  # fmt: skip
    return (
        f"no scored batch reached the driver for {waited:.0f} s (ray.stall_timeout_s): the scoring pool holds {pool}, "
        f"the cluster has {shown} free, pending: {pending}. Other jobs may hold what the pool waits for (`ray status`, "
        "`ray job list`): stop them or add nodes; if one batch really takes this long, raise ray.stall_timeout_s"
    )


def pending_tasks() -> str:
    """Tasks and actors of this cluster waiting for resources, from Ray's state API (needs the dashboard)."""
    try:
        from ray.util.state import list_actors, list_tasks

        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], timeout=5, raise_on_missing_output=False)
        actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], timeout=5, raise_on_missing_output=False)
    except Exception as err:  # no dashboard (the in-process Ray) or an old cluster: say so, the rest still helps
        return f"unknown ({type(err).__name__}: the Ray state API is unavailable)"
    names = sorted({getattr(t, "name", "?") for t in tasks} | {getattr(a, "class_name", "?") for a in actors})
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{len(tasks)} tasks and {len(actors)} actors waiting for resources ({shown or 'none'})"
