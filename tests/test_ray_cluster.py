"""The distributed service against a real Ray head started here (`ray start --head`), with the tiny model.

- a full audit submitted through the Ray Jobs API completes and publishes every output;
- a scoring actor killed mid-run is restarted, and every prompt is scored exactly once;
- a driver killed after two part files resumes: the rerun scores only the rest, and the result
  equals an uninterrupted single-process run;
- token authentication is on: a client without the token is refused.

The head runs in its own session with its own ports and temp dir, and only its own process
group is stopped at the end.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxrmem.config import load_config
from cxrmem.distributed.pipeline import scored_batches
from cxrmem.models.loading import fingerprint_model
from cxrmem.runfiles import Run, RunLayout
from cxrmem.stages import prepare, score
from cxrmem.storage import Store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Token authentication on, as Ray 2.60's `ray start --head` does when a token exists. The token is
# passed the documented way (README, Authentication): RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, in
# the head's environment (job drivers and workers inherit it) and in this process's (the Jobs API
# client and the in-process driver). A fixed test-only token: Ray caches the token per process.
AUTH_TOKEN = "cxrmem-test-token-0123456789abcdef0123456789abcdef"
AUTH_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": AUTH_TOKEN}
HEAD_ENV = {"OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
# A cheap but complete configuration: every stage runs, on a few dozen prompts.
SMALL = [
    "corpus.synthetic.n_reports=60",
    "score.steps=2",
    "score.generations=2",
    "score.batch_size=4",
    "ray.batch_size=4",
    "ray.checkpoint_every=8",
    "ray.progress_every_s=5",
    "analyze.top_percent=5",
    "attribution.steps=1",
    "attribution.generations=1",
    "attribution.max_prompts=2",
    "mitigation.strategies=[original,remove_marker,embedding_noise]",
    "mitigation.n_generations=2",
    "mitigation.steps=2",
    "mitigation.sample_size=1",
    "report.figures=false",
]


@dataclass
class Head:
    address: str  # GCS address for ray.init
    dashboard: str  # Jobs API
    temp_dir: str  # its sessions and logs


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_head(temp_dir: str, env: dict, *extra: str) -> tuple[subprocess.Popen, Head]:
    """`ray start --head --block` on free loopback ports, in its own session and temp dir; returns once it runs."""
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    log_path = Path(temp_dir) / "head.log"
    command = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}", *extra,
    ]  # fmt: skip
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_log(head, log_path, "Ray runtime started")
    return head, Head(address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dashboard}", temp_dir=temp_dir)


def wait_for_log(process: subprocess.Popen, log_path: Path, line: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while line not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_group(process)
            pytest.fail(f"ray start did not come up (exit {process.returncode}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(head: subprocess.Popen) -> None:
    """Stop the head and everything it started (its own process group), never other Ray instances."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


@contextlib.contextmanager
def token_in_this_process():
    """AUTH_ENV in this process while the block runs. Ray caches the mode and the token per process;
    both caches are refreshed from the environment, as Ray does when it turns authentication on, and
    refreshed again on the way out whatever happens in the block: a failed test must not leave token
    mode cached for the next one (it then fails to start its own GCS with InvalidAuthToken)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in AUTH_ENV.items():
            patch.setenv(key, value)
        refresh_ray_auth_cache()
        try:
            yield
        finally:
            patch.undo()
            refresh_ray_auth_cache()


def refresh_ray_auth_cache() -> None:
    """Make Ray re-read RAY_AUTH_MODE and RAY_AUTH_TOKEN from this process's environment."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture()
def ray_token_auth():
    """AUTH_ENV in this process for one test; restored by pytest's teardown even when the test fails."""
    with token_in_this_process():
        yield


def wait_for_jobs_api(dashboard: str, head: subprocess.Popen, timeout_s: float = 120) -> None:
    """Return once the head's Jobs API answers (with the token); stop the head and fail after `timeout_s`."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(dashboard).list_jobs()
            return
        except Exception as err:
            if time.monotonic() > deadline:
                stop_process_group(head)
                pytest.fail(f"the Ray head's Jobs API did not come up ({err})")
            time.sleep(2)


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="cxrray", dir="/tmp")  # short: Ray's socket paths live under it
    head, info = start_head(temp_dir, {**HEAD_ENV, **AUTH_ENV}, "--num-cpus=2")
    with token_in_this_process():
        wait_for_jobs_api(info.dashboard, head)
        yield info
    stop_process_group(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture()
def driver_on_head(ray_head, tmp_path):
    """This process as a Ray driver of the head; `env` reaches every worker of this driver's job."""
    import ray

    env = {**HEAD_ENV, "CXRMEM_FAULT_ONCE_FILE": str(tmp_path / "kill-one-worker")}
    ray.init(address=ray_head.address, runtime_env={"env_vars": env}, logging_level="WARNING")
    yield tmp_path / "kill-one-worker"
    ray.shutdown()


@pytest.fixture(scope="module")
def scored_reference(tiny_model_dir, tmp_path_factory):
    """prompts.parquet and the scores of an uninterrupted single-process run, for the same settings."""
    out = str(tmp_path_factory.mktemp("reference"))
    cfg = load_config(None, [f"run.output={out}", f"model.path={tiny_model_dir}", "corpus.synthetic.n_reports=120", *SMALL])
    prepare.run(cfg)
    score.run(cfg)
    return RunLayout(out)


def small_config(output, model_dir, *extra):
    return load_config(None, [f"run.output={output}", f"model.path={model_dir}", "corpus.synthetic.n_reports=120", *SMALL, *extra])


def assert_scores_match(layout, reference):
    scores = pq.read_table(layout.scores)
    expected = pq.read_table(reference.scores).sort_by("prompt_id")
    assert scores["prompt_id"].to_pylist() == expected["prompt_id"].to_pylist()  # sorted, each prompt once
    np.testing.assert_allclose(scores["d_mem"].to_numpy(), expected["d_mem"].to_numpy(), rtol=1e-4, atol=1e-6)


def test_audit_job_through_the_jobs_api(ray_head, tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    output = tmp_path / "run"
    overrides = [f"run.output={output}", f"model.path={tiny_model_dir}", *SMALL]
    entrypoint = " ".join([sys.executable, str(REPO / "ray_jobs" / "audit.py"), *[f"'{o}'" for o in overrides]])
    client = JobSubmissionClient(ray_head.dashboard)
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": HEAD_ENV})
    deadline = time.monotonic() + 240  # about 90 s on an idle 2-core machine
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"the audit job did not finish in time:\n{client.get_job_logs(job)[-4000:]}")
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]

    layout = RunLayout(str(output))
    manifest = Store().read_json(layout.manifest)
    for name in ["prompts.parquet", "scores.parquet", "summary.json", "memorized_prompts.csv", "tokens.parquet", "mitigation.parquet", "report.html"]:
        assert name in manifest["files"], name
    prompts = pq.read_table(layout.prompts, columns=["prompt_id"])["prompt_id"].to_pylist()
    scores = pq.read_table(layout.scores)
    assert scores["prompt_id"].to_pylist() == sorted(prompts)
    assert np.isfinite(scores["d_mem"].to_numpy()).all()
    assert set(scores["model_fingerprint"].to_pylist()) == {manifest["model_fingerprint"]}
    summary = Store().read_json(layout.summary)
    assert summary["audit"]["scoring"]["computed"] == len(prompts)
    # The audit section is written once, before the report (which shows it) and the manifest (which checksums it).
    assert {"score", "analyze", "attribute", "mitigate"} <= set(summary["audit"]["timings_s"])
    assert summary["analysis"]["memorized_count"] >= 1
    assert pq.read_table(layout.tokens).num_rows > 0 and pq.read_table(layout.mitigation).num_rows == 3
    assert resume_parts(layout) == []


def test_a_client_without_the_token_is_refused(ray_head, tmp_path):
    """Authentication is really on: the Jobs API client needs RAY_AUTH_MODE=token and the token."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV} | {"HOME": str(tmp_path)}  # no ~/.ray/auth_token
    command = [RAY, "job", "list", "--address", ray_head.dashboard]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr
    allowed = subprocess.run(command, env=env | AUTH_ENV, capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def resume_parts(layout):
    return Store().list_files(layout.score_parts, suffix=".parquet")


def test_killed_worker_is_restarted_and_every_prompt_scored_once(driver_on_head, scored_reference, tiny_model_dir, tmp_path):
    kill_flag = driver_on_head
    layout = RunLayout(str(tmp_path / "run"))
    Store().makedirs(layout.prefix)
    shutil.copy(scored_reference.prompts, layout.prompts)
    cfg = small_config(layout.prefix, tiny_model_dir)

    def kill_a_worker_once_parts_exist():
        while not resume_parts(layout):
            time.sleep(0.05)
        kill_flag.touch()  # the next batch's worker deletes it and exits

    threading.Thread(target=kill_a_worker_once_parts_exist, daemon=True).start()
    result = score.run(cfg, Run.of(cfg).with_fingerprint(fingerprint_model(cfg.model)), scored_batches)

    assert not kill_flag.exists(), "no worker died: the run finished before the fault was armed"
    total = pq.read_metadata(layout.prompts).num_rows
    assert result.computed == total and result.resumed == 0  # every row reached the driver once
    assert result.duplicates_dropped == 0
    assert_scores_match(layout, scored_reference)


DRIVER_KILLED_AFTER_TWO_PARTS = textwrap.dedent(
    """
    import os, signal, sys
    import ray
    from cxrmem.config import load_config
    from cxrmem.distributed.pipeline import scored_batches
    from cxrmem.stages import score, score_parts

    write_part = score_parts.write_part
    def write_part_then_die(store, table, parts_dir, sequence):
        uri = write_part(store, table, parts_dir, sequence)
        if sequence == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the driver dies hard right after its second part
        return uri
    score_parts.write_part = write_part_then_die

    cfg = load_config(None, sys.argv[2:])
    ray.init(address=sys.argv[1], runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, logging_level="WARNING")
    score.run(cfg, scored_batches=scored_batches)
    """
)


def test_interrupted_driver_resumes_with_only_the_rest(ray_head, driver_on_head, scored_reference, tiny_model_dir, tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    Store().makedirs(layout.prefix)
    shutil.copy(scored_reference.prompts, layout.prompts)
    overrides = [f"run.output={layout.prefix}", f"model.path={tiny_model_dir}", "corpus.synthetic.n_reports=120", *SMALL]
    killed = subprocess.run(
        [sys.executable, "-c", DRIVER_KILLED_AFTER_TWO_PARTS, ray_head.address, *overrides],
        env={**os.environ, **HEAD_ENV, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    parts = resume_parts(layout)
    assert len(parts) == 2 and not Store().exists(layout.scores)
    rows_in_parts = sum(pq.read_metadata(part).num_rows for part in parts)

    cfg = small_config(layout.prefix, tiny_model_dir)
    result = score.run(cfg, scored_batches=scored_batches)

    total = pq.read_metadata(layout.prompts).num_rows
    assert result.resumed == rows_in_parts >= 2 * cfg.ray.checkpoint_every
    assert result.computed == total - result.resumed
    assert result.duplicates_dropped == 0
    assert_scores_match(layout, scored_reference)


def test_rescore_runs_only_when_the_model_changes(driver_on_head, tiny_model_dir, tmp_path):
    from cxrmem.corpus.synthetic import tokenizer_texts
    from cxrmem.distributed.rescore import DIFF_FILE, latest_uri, rescore
    from cxrmem.models.tiny import build_tiny_model

    output = str(tmp_path / "service")
    light = ["attribution.enabled=false", "mitigation.enabled=false", "corpus.synthetic.n_reports=60"]
    first = rescore(small_config(output, tiny_model_dir, *light))
    assert first["status"] == "rescored" and first["previous"] is None
    assert rescore(small_config(output, tiny_model_dir, *light))["status"] == "unchanged"

    retrained = build_tiny_model(str(tmp_path / "retrained"), tokenizer_texts(seed=1), seed=1)
    second = rescore(small_config(output, retrained, *light))

    assert second["status"] == "rescored" and second["previous"] == first["run"]
    assert second["previous_model_fingerprint"] == first["model_fingerprint"] != second["model_fingerprint"]
    diff = pq.read_table(second["diff"]).to_pandas().set_index("prompt_id")
    assert len(diff) == pq.read_metadata(RunLayout(first["run"]).prompts).num_rows
    # Each prompt's scores and memorized flags as the two runs wrote them, against the diff's.
    runs = {}
    for name, run in (("old", first["run"]), ("new", second["run"])):
        scores = pq.read_table(RunLayout(run).scores, columns=["prompt_id", "d_mem"]).to_pandas().set_index("prompt_id")
        runs[name] = (scores["d_mem"].reindex(diff.index).to_numpy(), diff.index.isin(Run(Store(), RunLayout(run)).read_memorized().prompt_id))
    (old, was), (new, now) = runs["old"], runs["new"]
    np.testing.assert_array_equal(diff["d_mem_old"].to_numpy(), old)
    np.testing.assert_array_equal(diff["d_mem_new"].to_numpy(), new)
    np.testing.assert_allclose(diff["d_mem_change"].to_numpy(), new - old, rtol=1e-12)
    assert (diff["d_mem_change"] != 0).all()  # another model: every prompt's score moves
    expected = np.select([now & ~was, was & ~now, was & now], ["entered", "left", "stayed"], default="")
    assert diff["change"].tolist() == expected.tolist()
    assert [second[key] for key in ("entered", "left", "stayed")] == [(expected == key).sum() for key in ("entered", "left", "stayed")]
    assert second["entered"] + second["stayed"] == second["memorized_count"] == now.sum()
    assert Store().read_json(latest_uri(output))["run"] == second["run"]
    manifest = Store().read_json(RunLayout(second["run"]).manifest)
    assert DIFF_FILE in manifest["files"] and manifest["model_fingerprint"] == second["model_fingerprint"]
    assert Store().read_json(RunLayout(second["run"]).summary)["rescore"]["entered"] == second["entered"]


@pytest.mark.slow  # a Ray Data pipeline per stage, round and audit: about 2 minutes on a loaded 2-core machine
def test_cascade_on_ray_scores_and_continues_as_in_process(driver_on_head, scored_reference, tiny_model_dir, tmp_path):
    """The multi-stage cascade with the actor pool as executor (cxrmem/distributed/cascade.py) against the
    same cascade in this process: each stage screens the survivors of the one before, the audit sample is
    fully scored, the trajectories carried between stages ride in the blocks (stage 2 continues stage 1's
    step, the full score stage 2's two) and save what they save in process, and the scores agree."""
    import json

    from cxrmem.distributed.cascade import run_cascade
    from cxrmem.stages import cascade

    # A detector screen first (its first-step d_mem runs the full score's trajectories), then a dmem one.
    stages = "cascade.stages=[{screen: latent_update, keep_percent: 60, steps: 1}, {screen: dmem, keep_percent: 50, steps: 2}]"
    sections, scores, selected = {}, {}, {}
    for where, executor in (("ray", run_cascade), ("local", cascade.run_cascade)):
        output = tmp_path / where
        output.mkdir()
        shutil.copy(scored_reference.prompts, RunLayout(str(output)).prompts)
        # one round: what is compared is the executors, not the widening (tests/test_cascade.py)
        cfg = small_config(output, tiny_model_dir, "score.steps=4", "cascade.enabled=true", "cascade.audit_sample=6", stages,
                           "cascade.widen_above_expected_missed=null")  # fmt: skip
        selected[where] = executor(cfg, Run.of(cfg).with_fingerprint(fingerprint_model(cfg.model, Store()))).selected
        sections[where] = json.loads(open(RunLayout(str(output)).summary).read())["cascade"]
        scores[where] = pq.read_table(RunLayout(str(output)).scores).to_pandas().set_index("prompt_id").sort_index()
    section = sections["ray"]
    one, two = section["rounds"][-1]["stages"]
    assert one["screened"] == section["corpus"] and two["screened"] == one["kept"]
    assert section["audit"]["sample"] == 6 and selected["ray"] == selected["local"] == two["kept"]
    assert section["continuation"]["off_because"] is None and section["continuation"]["continued"] >= one["kept"] + two["kept"]
    assert section["continuation"] == sections["local"]["continuation"] and section["evaluations"] == sections["local"]["evaluations"]
    assert list(scores["ray"].index) == list(scores["local"].index)
    np.testing.assert_allclose(scores["ray"]["d_mem"], scores["local"]["d_mem"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_one_model_pool_serves_every_stage_of_an_audit(driver_on_head, tiny_model_dir, tmp_path):
    """The cascade's screens, the full score, the audit sample, attribution and mitigation on the same actors:
    each actor loads the model once in the whole audit (before: a pool per stage, 8 loads for this audit)."""
    from cxrmem.distributed.audit import run_audit

    stages = "cascade.stages=[{screen: dmem, keep_percent: 60, steps: 1, generations: 1}, {screen: dmem, keep_percent: 50, steps: 2}]"
    cfg = small_config(tmp_path / "run", tiny_model_dir, "score.steps=4", "cascade.enabled=true", "cascade.audit_sample=4", stages,
                       "ray.num_workers=2", "ray.num_cpus_per_worker=1")  # fmt: skip
    result = run_audit(cfg)
    loads = result["model_loads"]
    assert len(loads) == 2 and set(loads.values()) == {1}, loads  # two actors, one model load each
    summary = Store().read_json(RunLayout(str(tmp_path / "run")).summary)
    assert summary["audit"]["model_loads"] == loads
    assert len(summary["cascade"]["rounds"][-1]["stages"]) == 2 and summary["cascade"]["audit"]["sample"] == 4
    assert {"attribute", "mitigate"} <= set(summary["audit"]["timings_s"])
    # The work counted on the actors comes back with their results: each stage's, as declared where it is declared.
    cost = summary["cost"]["stages"]
    assert cost["score"]["evaluations"] == summary["cascade"]["evaluations"]["total"] > 0
    mitigation = pq.read_table(RunLayout(str(tmp_path / "run")).mitigation).to_pandas()
    assert cost["mitigate"]["evaluations"] == mitigation["evaluations"].sum() and cost["attribute"]["backward_samples"] > 0
