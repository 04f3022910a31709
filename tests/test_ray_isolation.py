"""ray.address=null keeps Ray to itself; a pool the cluster cannot hold fails in time, saying why.

- An in-process audit runs while a `ray start --head` cluster runs on the same machine (and a
  stray RAY_ADDRESS names it): the audit completes on its own private instance and never
  connects to that cluster (no driver of it appears in the cluster's logs).
- Asking for GPUs on a CPU-only instance, or for more CPUs than it has, is a TimeoutError after
  ray.resource_wait_s that names the request and what the cluster has.
- A failed join names the address and what to check.
"""

import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cxrmem.config import load_config
from cxrmem.runfiles import RunLayout
from cxrmem.storage import Store
from tests.test_ray_cluster import HEAD_ENV, SMALL, start_head, stop_process_group

LIGHT = ["attribution.enabled=false", "mitigation.enabled=false", "corpus.synthetic.n_reports=40"]


@pytest.fixture(scope="module")
def foreign_cluster():
    """Somebody else's Ray on this machine: a plain `ray start --head`, own temp dir, stopped by its PID."""
    temp_dir = tempfile.mkdtemp(prefix="cxrforeign", dir="/tmp")
    head, info = start_head(temp_dir, HEAD_ENV, "--num-cpus=1", "--include-dashboard=false")
    yield info
    stop_process_group(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


def drivers_of(cluster) -> list[str]:
    """The driver processes that ever connected to the cluster (each leaves its core-driver log)."""
    return sorted(p.name for p in Path(cluster.temp_dir).glob("session_*/logs/python-core-driver-*"))


@pytest.mark.slow
def test_in_process_audit_ignores_a_cluster_on_the_machine(foreign_cluster, tiny_model_dir, tmp_path, monkeypatch):
    from cxrmem.distributed.audit import run_audit

    monkeypatch.setenv("RAY_ADDRESS", foreign_cluster.address)  # left in the shell; not a submitted job
    before = drivers_of(foreign_cluster)
    cfg = load_config(None, [f"run.output={tmp_path / 'run'}", f"model.path={tiny_model_dir}", *SMALL, *LIGHT, "ray.address=null"])

    run_audit(cfg)

    layout = RunLayout(str(tmp_path / "run"))
    prompts = pq.read_table(layout.prompts, columns=["prompt_id"])["prompt_id"].to_pylist()
    assert pq.read_table(layout.scores)["prompt_id"].to_pylist() == sorted(prompts)
    assert "scores.parquet" in Store().read_json(layout.manifest)["files"]
    assert drivers_of(foreign_cluster) == before  # never joined it


@pytest.fixture()
def local_ray():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_gpus_on_a_cpu_only_cluster_fail_after_resource_wait(local_ray):
    from cxrmem.distributed.session import pool_size

    # A fixed pool on a joined cluster asks for GPUs even when none show yet (an autoscaler may add them).
    cfg = load_config(None, ["ray.address=auto", "ray.num_workers=2", "ray.resource_wait_s=1"])
    with pytest.raises(TimeoutError, match=r"2 workers x \(1 CPU, 1 GPU\) asked for, the cluster has 1 CPU, 0 GPU"):
        pool_size(cfg.ray)


def test_more_cpus_than_exist_fail_after_resource_wait(local_ray):
    from cxrmem.distributed.session import pool_size

    cfg = load_config(None, ["ray.num_workers=3", "ray.num_cpus_per_worker=1", "ray.resource_wait_s=1"])
    with pytest.raises(TimeoutError, match=r"3 workers x \(1 CPU\) asked for, the cluster has 1 CPU.*ray.resource_wait_s"):
        pool_size(cfg.ray)
    assert pool_size(load_config(None, ["ray.num_workers=1"]).ray) == (1, 0.0)  # a pool that fits starts


def test_a_failed_join_names_the_address():
    from cxrmem.distributed.session import ray_session

    cfg = load_config(None, ["ray.address=127.0.0.1:1"])
    with pytest.raises(ConnectionError, match=r"cannot join the Ray cluster at 127\.0\.0\.1:1 \(.*refused.*RAY_AUTH_TOKEN"):
        with ray_session(cfg.ray):
            pass


def test_a_pool_meant_for_cuda_waits_for_gpus_instead_of_starting_a_cpu_actor(local_ray):
    from cxrmem.distributed.session import pool_size

    cfg = load_config(None, ["ray.resource_wait_s=1"])  # in-process, no GPUs yet, ray.num_workers unset
    assert pool_size(cfg.ray, "auto") == (1, 0.0)  # auto on a CPU-only instance: the CPU is the plan
    with pytest.raises(TimeoutError, match=r"1 workers x \(1 CPU, 1 GPU\) asked for"):
        pool_size(cfg.ray, "cuda")
    with pytest.raises(ValueError, match="ray.num_gpus_per_worker is 0"):
        pool_size(load_config(None, ["ray.num_gpus_per_worker=0"]).ray, "cuda")


def test_in_process_ray_is_sized_from_the_machines_gpus():
    from cxrmem.distributed.session import local_num_cpus

    ray_cfg = load_config(None, ["ray.num_cpus_per_worker=4"]).ray
    assert local_num_cpus(ray_cfg, gpus=3) == 3 * 4 + 1  # one scoring actor per GPU, one CPU for the feed
    assert local_num_cpus(ray_cfg, gpus=0) == 4 + 1


@pytest.mark.slow
def test_an_audit_whose_worker_gets_a_gpu_it_cannot_use_stops_with_the_cuda_line(tiny_model_dir, tmp_path):
    """A head that advertises a GPU (`ray start --num-gpus=1`) on this CPU machine: the worker Ray gives it to
    cannot use CUDA, and the audit stops with one line (exit 1) instead of scoring on the CPU."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("shows the refusal of a torch without CUDA")
    temp_dir = tempfile.mkdtemp(prefix="cxrgpu", dir="/tmp")
    head, info = start_head(temp_dir, HEAD_ENV, "--num-cpus=2", "--num-gpus=1", "--include-dashboard=false")
    try:
        cli = str(Path(sys.executable).with_name("cxrmem"))
        overrides = [f"run.output={tmp_path / 'run'}", f"model.path={tiny_model_dir}", *SMALL, *LIGHT, f"ray.address={info.address}"]
        done = subprocess.run([cli, "audit", *overrides], capture_output=True, text=True, timeout=600)
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-3000:]
    assert last.startswith("cxrmem audit: Ray gave this worker a GPU, but torch") and "cannot use CUDA" in last, last
    assert not (tmp_path / "run" / "scores.parquet").exists()
