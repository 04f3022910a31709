"""Ray Data scoring: prompts.parquet streams through an actor pool of model workers to the driver.

    prompts.parquet (ids and texts not yet scored, read on the driver, one block per batch)
        -> from_arrow -> map_batches(ModelWorker, actor pool) -> iter_batches on the driver
        -> the score stage's part files -> scores.parquet

`scored_batches` is the score stage's executor on Ray (cxrmem/stages/score.py has the one in
this process). The driver holds at most one part's rows at a time. Ray Data restarts a lost
actor and retries its batch; only completed batches reach the driver, which is what makes every
prompt land in exactly one part.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from cxrmem.distributed.session import pool_size
from cxrmem.scoring.scorer import ScoreSettings
from cxrmem.stages.worker import CarriedWorker, ModelWorker
from cxrmem.storage import Store

log = logging.getLogger(__name__)


def scored_batches(
    cfg, store: Store, fingerprint: str, prompts_uri: str, skip_ids: pa.Array, worker: type = ModelWorker, carry=None
) -> Iterator[pa.Table]:
    """scores.parquet rows of the prompts not in `skip_ids`, streamed from the actor pool. Needs a Ray session.

    `worker` is the actor class (bench/scale.py measures the pipeline's own ceiling with one that scores nothing).
    `carry`: the cascade's TrajectoryCarry (cxrmem/stages/continuation.py); where it holds these settings'
    trajectories, its states ride in the blocks to `CarriedWorker` actors and the states they make come back to it."""
    import ray
    from ray.data import ActorPoolStrategy

    # The blocks are cut here, on the driver, and handed to Ray Data ready to map: no read, filter or
    # repartition tasks run before the pool. Each of those asks for a whole CPU (Ray Data's ListFiles
    # and StreamingRepartition take no resource arguments), and when the scoring pools of jobs sharing
    # a cluster hold every CPU, no job could read and all of them would hang. Only the ids and texts
    # of the prompts left to score are read (tens of MB for MIMIC-CXR's 100,000 prompts), and every
    # block is one batch: results then reach the driver and the part files batch by batch, and a lost
    # actor costs one batch, not a whole file.
    prompts = store.read_table(prompts_uri, columns=["prompt_id", "prompt"])
    if len(skip_ids):
        prompts = prompts.filter(pc.invert(pc.is_in(prompts["prompt_id"], value_set=skip_ids)))
    size = cfg.ray.batch_size
    blocks = [prompts.slice(lo, size) for lo in range(0, prompts.num_rows, size)] or [prompts]
    kwargs = {}
    settings = ScoreSettings.of(cfg.score)
    if carry is not None and carry.matches(settings):
        blocks = [carry.with_states(block, settings.scored_steps, cfg.score.batch_size) for block in blocks]
        worker, kwargs = CarriedWorker, carry.worker_kwargs()
    else:
        carry = None
    ds = ray.data.from_arrow(blocks)
    actors, gpus = pool_size(cfg.ray, cfg.model.device)
    log.info("scoring on %d workers x %.2f GPU", actors, gpus)
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; Ray 2.60 flags every extra remote arg as deprecated.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(
            worker,
            fn_constructor_kwargs={
                "cfg": cfg,
                "store": store,
                "fingerprint": fingerprint,
                "torch_threads": int(cfg.ray.num_cpus_per_worker),
                **kwargs,
            },
            batch_size=cfg.ray.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cfg.ray.num_cpus_per_worker,
            num_gpus=gpus or None,
            udf_modifying_row_count=False,
            max_restarts=cfg.ray.max_restarts,
        )
    pool = f"{actors} workers x ({cfg.ray.num_cpus_per_worker:g} CPU, {gpus:g} GPU)"
    batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    if carry is not None:
        batches = map(carry.receive, batches)
    return watched(batches, cfg.ray.stall_timeout_s, lambda waited: stall_message(waited, pool))


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
