"""Jobs that cannot starve each other: no CPU-needing task runs before the scoring pool, a stalled pipeline
fails with one line, and two audits submitted as two `ray job submit` jobs to one 2-CPU head both finish
(`ray job stop` then ends a third as stopped, not succeeded, with the interrupted line)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrmem.config import load_config
from cxrmem.distributed.pipeline import StallError, scored_batches, watched
from cxrmem.distributed.session import ray_session
from cxrmem.stages import prepare, score
from cxrmem.storage import Store
from tests.test_ray_cluster import AUTH_ENV, HEAD_ENV, RAY, SMALL, ray_token_auth, start_head, stop_process_group, wait_for_jobs_api  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def slow_items(delays):
    for i, delay in enumerate(delays):
        time.sleep(delay)
        yield i


def test_watched_passes_items_through_and_fails_a_stall_in_time():
    assert list(watched(slow_items([0, 0.05, 0]), 5.0, str)) == [0, 1, 2]
    started = time.monotonic()
    with pytest.raises(StallError, match="waited 0.5"):
        list(watched(slow_items([0, 30]), 0.5, lambda waited: f"waited {waited}"))
    assert time.monotonic() - started < 5

    def broken():
        yield 1
        raise ValueError("a batch failed")

    with pytest.raises(ValueError, match="a batch failed"):
        list(watched(broken(), 5.0, str))


def test_a_pool_holding_every_cpu_still_gets_its_prompts(tiny_model_dir, tmp_path):
    """One CPU in all, taken by the scoring actor: with read tasks before the pool this hung forever
    (`Cluster resources are not enough to run any task from TaskPoolMapOperator[ReadFilesParquetV2]`)."""
    overrides = [f"run.output={tmp_path}", f"model.path={tiny_model_dir}", "corpus.synthetic.n_reports=40"]
    cfg = load_config(REPO / "conf/test.yaml", [*overrides, "ray.local_num_cpus=1", "ray.num_cpus_per_worker=1", "ray.stall_timeout_s=120"])
    prepare.run(cfg)
    with ray_session(cfg.ray):
        result = score.run(cfg, scored_batches=scored_batches)
    assert result.computed == result.total > 0


@pytest.mark.slow
def test_two_submitted_audits_on_one_two_cpu_head_both_finish(tiny_model_dir, tmp_path, ray_token_auth):  # noqa: F811 (the fixture)
    from ray.job_submission import JobStatus, JobSubmissionClient

    temp_dir = os.path.join("/tmp", f"cxrst{os.getpid()}")  # short: Ray's socket paths live under it
    os.makedirs(temp_dir, exist_ok=True)
    # A clean stop needs more than Ray's default 3 s between SIGTERM and SIGKILL (README, Interrupts): the driver
    # writes its last part, stops the pool and Ray, and releases the lease. On a loaded 2-core machine that took
    # more than 30 s (the line never came); the manifests give the head 60 s, the test 120.
    head, info = start_head(temp_dir, {**HEAD_ENV, **AUTH_ENV, "RAY_JOB_STOP_WAIT_TIME_S": "120"}, "--num-cpus=2")
    env = {**os.environ, **AUTH_ENV, "PYTHONPATH": str(REPO)}
    try:
        wait_for_jobs_api(info.dashboard, head)

        def submit(output, *extra):
            overrides = [f"run.output={output}", f"model.path={tiny_model_dir}", *SMALL, *extra]
            runtime_env = f'{{"env_vars": {{"OMP_NUM_THREADS": "1", "PYTHONPATH": "{REPO}"}}}}'
            command = [RAY, "job", "submit", "--address", info.dashboard, "--runtime-env-json", runtime_env,
                       "--", sys.executable, str(REPO / "ray_jobs" / "audit.py"), *overrides]  # fmt: skip
            return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        started = time.monotonic()
        jobs = [submit(tmp_path / f"run{i}", "ray.stall_timeout_s=300") for i in range(2)]
        walls = []
        for job in jobs:
            out, _ = job.communicate(timeout=900)
            walls.append(time.monotonic() - started)
            assert job.returncode == 0 and "succeeded" in out, out[-4000:]
        for i in range(2):
            assert Store().exists(str(tmp_path / f"run{i}" / "manifest.json"))
        print(f"two submitted audits on one 2-CPU head: wall {walls[0]:.0f} s and {walls[1]:.0f} s")

        client = JobSubmissionClient(info.dashboard)
        # Long by construction (hundreds of prompts at 40 steps: many minutes on 2 CPUs), so that it is still
        # scoring when the stop reaches it however fast the machine is; the stop comes within seconds.
        stopped = submit(tmp_path / "stopped", "corpus.synthetic.n_reports=2000", "score.steps=40")
        job_id = wait_for_running_job(client, tmp_path / "stopped")
        assert subprocess.run([RAY, "job", "stop", "--address", info.dashboard, job_id], env=env, capture_output=True, timeout=120).returncode == 0
        stopped.communicate(timeout=300)
        status = client.get_job_status(job_id)
        assert status in (JobStatus.STOPPED, JobStatus.FAILED), status
        logs = [line for line in client.get_job_logs(job_id).splitlines() if line.startswith("cxrmem ")]
        assert logs and "interrupted (SIGTERM)" in logs[-1] and "rerun the same command to resume" in logs[-1], logs[-3:]
        assert not os.path.exists(tmp_path / "stopped" / "_lease.json")
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_running_job(client, output, timeout_s=300):
    """The id of the job writing `output`, once it is RUNNING and its scoring has written a part (mid-run).
    A job that ends first fails the test at once with its log, instead of waiting out the timeout."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = [job for job in client.list_jobs() if str(output) in job.entrypoint]
        if jobs and jobs[0].status.is_terminal():
            pytest.fail(f"the job to be stopped ended {jobs[0].status} first:\n{client.get_job_logs(jobs[0].submission_id)[-3000:]}")
        if jobs and jobs[0].status == JobStatus.RUNNING and Store().list_files(str(output / "_parts" / "scores"), suffix=".parquet"):
            return jobs[0].submission_id
        time.sleep(0.5)
    pytest.fail(f"no job scoring into {output} within {timeout_s} s")
