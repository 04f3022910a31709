"""A lost and restarted scoring actor leaves lines in the audit's log naming the block it reruns (issue 31,
item 8): a real `cxrmem audit` process on Ray in-process, whose first scoring actor exits mid-run
(the worker's fault injection, as a lost GPU node would), restarted by Ray (ray.max_restarts).
The restarted worker's lines reach the driver's stderr through Ray's log_to_driver."""

import re
import subprocess

import pyarrow.parquet as pq
import pytest

from cxrmem.runfiles import RunLayout
from cxrmem.stages.worker import FAULT_ONCE_ENV
from tests.cli_process import CXRMEM, REPO, cli_env

pytestmark = pytest.mark.slow

LIGHT = ["corpus.synthetic.n_reports=60", "attribution.enabled=false", "mitigation.enabled=false", "report.figures=false"]
BLOCK = 16  # ray.batch_size of conf/test.yaml: the prompts of one block


def test_a_restarted_actor_names_the_block_it_reruns(tiny_model_dir, tmp_path):
    output, flag = tmp_path / "run", tmp_path / "fault.flag"
    flag.touch()
    command = [CXRMEM, "audit", "--config", str(REPO / "conf/test.yaml"), f"model.path={tiny_model_dir}", f"run.output={output}",
               f"ray.batch_size={BLOCK}", *LIGHT]  # fmt: skip
    done = subprocess.run(command, env=cli_env(**{FAULT_ONCE_ENV: str(flag)}), capture_output=True, text=True, cwd=REPO, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not flag.exists() and "fault injection: scoring worker pid" in done.stderr  # one actor was lost
    restarted = re.search(r"scoring worker restarted as pid (\d+) \(its previous process was lost\)", done.stderr)
    assert restarted, done.stderr[-3000:]
    rerun = re.search(r"restarted worker pid (\d+) reruns the score block it lost: (\d+) prompts from prompt_id ([0-9a-f]{16})", done.stderr)
    assert rerun and rerun.group(1) == restarted.group(1), done.stderr[-3000:]
    assert "Use get_actor_id() instead" not in done.stderr  # Ray's deprecation noise stays out of the log

    # The block named is a real block: it starts at a multiple of the block size in the prompts the pool was given.
    layout = RunLayout(str(output))
    ids = pq.read_table(layout.prompts, columns=["prompt_id"])["prompt_id"].to_pylist()
    start = ids.index(rerun.group(3))
    assert start % BLOCK == 0 and int(rerun.group(2)) == min(BLOCK, len(ids) - start)
    scored = pq.read_table(layout.scores, columns=["prompt_id"])["prompt_id"].to_pylist()
    assert sorted(scored) == sorted(ids)  # every prompt once: the rerun block is not doubled
