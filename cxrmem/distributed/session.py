"""Which Ray the service runs on, and whether the scoring pool fits in it.

`ray.address` decides the session:

- null: a private Ray instance started in this process (`address="local"`). It never joins a
  cluster found on the machine, neither one started with `ray start` (Ray's own `ray.init()`
  would find it through its process list) nor one named by a RAY_ADDRESS left in the shell.
  One exception: the driver of a job submitted with `ray job submit`. Ray's job supervisor starts
  it with RAY_ADDRESS *and* RAY_JOB_CONFIG_JSON_ENV_VAR set; that driver joins the job's cluster,
  since that is where the submitter sent it. A stray RAY_ADDRESS has no job config beside it.
- "auto" or an address (host:port of the GCS, or ray://host:10001): join that cluster. A failed
  join is one ConnectionError that names the address and what to check.

Clusters with token authentication (Ray 2.60 `ray start --head` turns it on when a token exists)
need the token in the driver's environment: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, or with
~/.ray/auth_token (README, Authentication). A submitted job's driver and its workers inherit it
from the cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

from cxrmem.interrupts import keep_handlers
from cxrmem.lease import SUBMITTED_JOB_ENV  # set by Ray's job supervisor for the entrypoint only
from cxrmem.settings import NON_NEGATIVE, OPTIONAL_POSITIVE, POSITIVE, Settings, at_least, knob


@dataclass(frozen=True)
class RayConfig(Settings):
    """The `ray` config section: which Ray, and the scoring pool's size and pace."""

    address: Optional[str] = None  # None: start Ray in-process; "auto" or ray://...: join a cluster
    num_workers: Optional[int] = knob(None, OPTIONAL_POSITIVE)  # scoring actors (None: the cluster's GPUs, or 1 on a CPU-only cluster)
    num_gpus_per_worker: float = knob(1.0, NON_NEGATIVE)  # GPUs per scoring actor (fractions share a GPU; ignored without GPUs)
    num_cpus_per_worker: float = knob(1.0, POSITIVE)  # CPUs per scoring actor
    batch_size: int = knob(64, POSITIVE)  # prompts per map_batches call
    max_restarts: int = knob(3, at_least(-1, "-1: no limit"))  # restarts of a lost scoring actor
    checkpoint_every: int = knob(512, POSITIVE)  # prompts per durable scores part file (the unit of resume)
    progress_every_s: float = knob(30.0, POSITIVE)  # seconds between the driver's progress lines (done/total, prompts/s, ETA)
    local_num_cpus: Optional[int] = knob(None, OPTIONAL_POSITIVE)  # CPUs of the in-process Ray (None: the workers' share plus one, at least 2)
    resource_wait_s: float = knob(120.0, POSITIVE)  # fail if the scoring pool's CPUs/GPUs are not in the cluster within this time (autoscalers need minutes)
    stall_timeout_s: float = knob(1800.0, POSITIVE)  # fail, logging pending work and free resources, when no scored batch reaches the driver for this long

log = logging.getLogger(__name__)

# Workers stay quiet: no load reports, progress bars or colour codes from every model replica in
# the driver's console. Variables the driver already has (set by the user or by a submitted
# job's runtime_env) are left to it: Ray refuses a job whose two runtime_envs disagree.
QUIET_WORKERS = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "NO_COLOR": "1",
    "HF_HUB_OFFLINE": "1",  # weights come from the local cache or the model store, never downloaded
}


def local_num_gpus(device: str = "auto") -> int:
    """The GPUs an in-process Ray gets: this machine's, unless model.device keeps the model on the CPU."""
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_num_cpus(ray_cfg, gpus: int = 0) -> int:
    if ray_cfg.local_num_cpus:
        return ray_cfg.local_num_cpus
    workers = ray_cfg.num_workers or max(1, gpus)  # by default one scoring actor per GPU
    # One extra CPU for the read and filter tasks that feed the pool.
    return max(2, int(workers * ray_cfg.num_cpus_per_worker) + 1)


def in_submitted_job() -> bool:
    """True in the entrypoint of a job submitted with `ray job submit` (not in a shell with RAY_ADDRESS)."""
    return bool(os.environ.get(SUBMITTED_JOB_ENV) and os.environ.get("RAY_ADDRESS"))


def worker_env() -> dict:
    return {"env_vars": {key: value for key, value in QUIET_WORKERS.items() if key not in os.environ}}


def join_cluster(address) -> None:
    """ray.init on an existing cluster; any failure is a ConnectionError naming the address and what to check."""
    import ray

    shown = address or os.environ.get("RAY_ADDRESS")
    try:
        check_reachable(shown)
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=worker_env())
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConnectionError(
            f"cannot join the Ray cluster at {shown} ({first_line}). Check that the cluster runs "
            f"(`ray status --address {shown}`), that ray.address is its GCS host:port, ray://host:10001 or auto, "
            "that this machine reaches that port, and, with token authentication on, that RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN (or ~/.ray/auth_token) hold the cluster's token. ray.address=null runs Ray in-process."
        ) from err


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds when nothing listens at a host:port address (Ray itself retries for minutes)."""
    if not address or address == "auto" or "://" in address:
        return  # found or connected by Ray itself
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


@contextlib.contextmanager
def ray_session(ray_cfg, device: str = "auto"):
    """Join `ray.address`, or the cluster of the Ray job we run in, or start a private Ray in-process, sized
    from this machine's GPUs (one scoring actor each) unless `device` (model.device) is the CPU.

    A session that is already initialised is used as is and left running.
    """
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        yield
        return
    try:
        with keep_handlers():  # ray.init's SIGTERM handler would bypass the clean stop (cxrmem/interrupts.py)
            start_or_join(ray_cfg, device)
        DataContext.get_current().print_on_execution_start = False
        yield
    finally:
        ray.shutdown()


def start_or_join(ray_cfg, device: str = "auto") -> None:
    import ray
    from ray.data import DataContext

    if ray_cfg.address is not None:
        join_cluster(ray_cfg.address)
    elif in_submitted_job():
        join_cluster(None)  # RAY_ADDRESS, as set by the job supervisor
    else:
        gpus = local_num_gpus(device)
        ray.init(
            address="local",
            num_cpus=local_num_cpus(ray_cfg, gpus),
            num_gpus=gpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env=worker_env(),
        )
        DataContext.get_current().enable_progress_bars = False  # the driver logs its own progress


def pool_size(ray_cfg, device: str = "auto") -> tuple[int, float]:
    """(actors, GPUs per actor): by default one actor per GPU share of the cluster, 1 on CPUs.

    `device` is model.device: a pool meant for CUDA always asks for GPUs and waits for them (within
    ray.resource_wait_s), never falling back to a CPU actor because the GPU nodes have not joined yet.
    Returns once the cluster can hold the whole pool (see `wait_for_pool`) and, for a GPU pool, once a
    process on one of its GPUs has shown that torch can use CUDA (`check_cuda_on_gpus`).
    """
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    # A cluster whose GPU workers scale up from zero shows no GPUs yet: a fixed pool on a remote
    # cluster still asks for them, so that the autoscaler brings them up.
    meant_for_cuda = str(device).startswith("cuda")
    wants_gpus = meant_for_cuda or cluster_gpus > 0 or (ray_cfg.address is not None and bool(ray_cfg.num_workers))
    gpus_per_worker = ray_cfg.num_gpus_per_worker if wants_gpus and device != "cpu" else 0.0
    if meant_for_cuda and gpus_per_worker <= 0:
        raise ValueError(f"model.device is {device} but ray.num_gpus_per_worker is {ray_cfg.num_gpus_per_worker:g}: "
                         "give each worker a GPU share, or set model.device=cpu")  # fmt: skip
    if ray_cfg.num_workers:
        actors = ray_cfg.num_workers
    elif gpus_per_worker > 0:
        actors = max(1, int(cluster_gpus // gpus_per_worker))
    else:
        actors, gpus_per_worker = 1, 0.0
    wait_for_pool(actors, {"CPU": ray_cfg.num_cpus_per_worker, "GPU": gpus_per_worker}, ray_cfg.resource_wait_s)
    check_cuda_on_gpus(gpus_per_worker, ray_cfg.resource_wait_s)
    return actors, gpus_per_worker


def check_cuda_on_gpus(gpus_per_worker: float, wait_s: float) -> None:
    """Fail at once, with the worker's one line (torch's CUDA, the node's driver, what to do), when a process
    that Ray gives a GPU cannot use CUDA: otherwise every actor of the pool fails the same way, deep in Ray
    Data, after loading the model."""
    import ray

    from cxrmem.scoring.device import DeviceUnavailable, resolve_device

    if gpus_per_worker <= 0:
        return

    @ray.remote(num_cpus=0, num_gpus=gpus_per_worker, max_retries=0)
    def cuda_refusal():
        try:
            resolve_device("auto", gpu_assigned=True)
        except DeviceUnavailable as err:
            return str(err)
        return None

    refusal = ray.get(cuda_refusal.remote(), timeout=wait_s)
    if refusal:
        raise DeviceUnavailable(refusal)


def wait_for_pool(actors: int, per_actor: dict, wait_s: float) -> None:
    """Reserve the pool's resources once (a placement group: it also asks an autoscaler for nodes),
    then release them for the actors; a TimeoutError after `wait_s` names the request and the cluster.

    Without this, actors asking for GPUs on a CPU-only cluster (or more CPUs than exist) wait forever, silently.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {name: amount for name, amount in per_actor.items() if amount > 0}
    if not bundle:
        return
    group = placement_group([bundle] * actors, strategy="SPREAD")
    started = time.monotonic()
    try:
        ready, _ = ray.wait([group.ready()], timeout=wait_s)
    finally:
        remove_placement_group(group)
    if not ready:
        asked = ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())
        have = {name: ray.cluster_resources().get(name, 0) for name in bundle}
        nodes = [{k: n["Resources"].get(k, 0) for k in bundle} for n in ray.nodes() if n.get("Alive")]
        raise TimeoutError(
            f"the Ray cluster cannot hold the scoring pool: {actors} workers x ({asked}) asked for, "
            f"the cluster has {', '.join(f'{v:g} {k}' for k, v in have.items())} in all (per node: {nodes}); "
            f"waited {time.monotonic() - started:.0f} s (ray.resource_wait_s). Lower ray.num_workers, "
            "ray.num_cpus_per_worker or ray.num_gpus_per_worker, or add nodes with these resources."
        )
    log.debug("pool of %d x %s reserved in %.1f s", actors, bundle, time.monotonic() - started)
