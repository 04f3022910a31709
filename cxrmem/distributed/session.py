"""The Ray session of a run, and the size of its actor pool."""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)

# Model loading in every worker otherwise floods the driver's console with load reports.
QUIET_WORKERS = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def local_num_cpus(ray_cfg) -> int:
    if ray_cfg.local_num_cpus:
        return ray_cfg.local_num_cpus
    workers = ray_cfg.num_workers or 1
    # One extra CPU for the read and filter tasks that feed the pool.
    return max(2, int(workers * ray_cfg.num_cpus_per_worker) + 1)


@contextlib.contextmanager
def ray_session(ray_cfg):
    """Join `ray.address`, or the cluster of the Ray job we run in, or start Ray in-process on the CPU.

    A session that is already initialised is used as is and left running.
    """
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        yield
        return
    if ray_cfg.address is not None:
        ray.init(address=ray_cfg.address, logging_level=logging.WARNING)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)  # the entry point of a submitted Ray job
    else:
        ray.init(
            num_cpus=local_num_cpus(ray_cfg),
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": QUIET_WORKERS},
        )
        DataContext.get_current().enable_progress_bars = False  # the driver logs its own progress
    DataContext.get_current().print_on_execution_start = False
    try:
        yield
    finally:
        ray.shutdown()


def pool_size(ray_cfg) -> tuple[int, float]:
    """(actors, GPUs per actor): by default one actor per GPU share of the cluster, 1 on CPUs."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    # A cluster whose GPU workers scale up from zero shows no GPUs yet: a fixed pool on a remote
    # cluster still asks for them, so that the autoscaler brings them up.
    wants_gpus = cluster_gpus > 0 or (ray_cfg.address is not None and bool(ray_cfg.num_workers))
    gpus_per_worker = ray_cfg.num_gpus_per_worker if wants_gpus else 0.0
    if ray_cfg.num_workers:
        return ray_cfg.num_workers, gpus_per_worker
    if gpus_per_worker > 0:
        return max(1, int(cluster_gpus // gpus_per_worker)), gpus_per_worker
    return 1, 0.0
