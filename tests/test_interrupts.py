"""Clean interrupts, with real processes: SIGTERM mid-scoring stops an audit (in-process Ray) with exit 143
and one last line, keeps its parts and releases the lease, and the rerun's scores equal an uninterrupted
run's; SIGINT stops a single stage with 130."""

import os
import re
import signal
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxrmem.config import load_config
from cxrmem.runfiles import RunLayout
from cxrmem.stages import prepare, score
from cxrmem.storage import Store
from tests.cli_process import CXRMEM, REPO, cli_env

SETTINGS = [
    "corpus.synthetic.n_reports=120",
    "ray.checkpoint_every=8",
    "ray.batch_size=4",
    "attribution.enabled=false",
    "mitigation.enabled=false",
    "report.figures=false",
]
LAST_LINE = re.compile(r"cxrmem (\w+): interrupted \((SIG\w+)\) after (\d+)/(\d+) prompts scored; rerun the same command to resume")


def command(stage, model_dir, output):
    return [CXRMEM, stage, "--config", str(REPO / "conf/test.yaml"), f"model.path={model_dir}", f"run.output={output}", *SETTINGS]


def interrupt_after_first_part(args, layout, signum, timeout_s=300):
    """Start `args`, send `signum` once a score part exists; (exit code, stderr lines)."""
    process = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + timeout_s
    while not Store().list_files(layout.score_parts, suffix=".parquet"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no score part appeared (exit {process.poll()}):\n{process.stderr.read()[-3000:]}")
        time.sleep(0.1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err.strip().splitlines()


@pytest.mark.slow
def test_sigterm_mid_scoring_stops_cleanly_and_the_rerun_resumes_to_the_same_scores(tiny_model_dir, tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    code, lines = interrupt_after_first_part(command("audit", tiny_model_dir, layout.prefix), layout, signal.SIGTERM)

    assert code == 143, "\n".join(lines[-30:])
    match = LAST_LINE.fullmatch(lines[-1])
    assert match and match.group(1, 2) == ("audit", "SIGTERM"), lines[-1]
    scored, total = int(match.group(3)), int(match.group(4))
    assert 8 <= scored < total == pq.read_metadata(layout.prompts).num_rows
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-30:])
    parts = Store().list_files(layout.score_parts, suffix=".parquet")
    assert sum(pq.read_metadata(part).num_rows for part in parts) == scored  # every prompt it counted is kept
    assert not os.path.exists(layout.lease) and not os.path.exists(layout.manifest)

    rerun = subprocess.run(command("audit", tiny_model_dir, layout.prefix), env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = Store().read_json(layout.summary)["audit"]["scoring"]
    assert summary["resumed"] == scored and summary["computed"] == total - scored

    reference = str(tmp_path / "reference")
    cfg = load_config(REPO / "conf/test.yaml", [f"model.path={tiny_model_dir}", f"run.output={reference}", *SETTINGS])
    prepare.run(cfg)
    score.run(cfg)  # uninterrupted, in this process
    resumed, expected = pq.read_table(layout.scores), pq.read_table(RunLayout(reference).scores)
    assert resumed["prompt_id"].to_pylist() == expected["prompt_id"].to_pylist()
    assert np.allclose(resumed["d_mem"].to_numpy(), expected["d_mem"].to_numpy(), rtol=1e-4, atol=1e-6)


def test_sigint_stops_a_single_stage_with_130(tiny_model_dir, tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    cfg = load_config(REPO / "conf/test.yaml", [f"model.path={tiny_model_dir}", f"run.output={layout.prefix}", *SETTINGS])
    prepare.run(cfg)
    code, lines = interrupt_after_first_part(command("score", tiny_model_dir, layout.prefix), layout, signal.SIGINT)
    assert code == 130, "\n".join(lines[-30:])
    match = LAST_LINE.fullmatch(lines[-1])
    assert match and match.group(1, 2) == ("score", "SIGINT"), lines[-1]
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines)
    assert not os.path.exists(layout.lease)
