"""A whole worker node lost mid-scoring: every prompt is still scored exactly once, with the scores
of an uninterrupted run.

The cluster is simulated on this machine with Ray's own cluster utilities: a head (the driver's
read tasks) and three worker nodes with one fake GPU each (`num_gpus=1`; the model runs on the
CPU, model.device=cpu, so "GPU" is only a scheduling resource). The pool asks for two actors of
one GPU each, as on a GPU cluster, which leaves one spare node for the lost actor to restart on.
Once the first part file exists, the node holding a scoring actor is killed whole: its worker
processes and then its raylet and other services, with SIGKILL.
"""

import signal
import threading
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from cxrmem.config import load_config
from cxrmem.runfiles import RunLayout
from cxrmem.stages import prepare, score
from cxrmem.storage import Store
from tests.test_ray_cluster import SMALL

pytestmark = pytest.mark.slow

SETTINGS = [*SMALL, "corpus.synthetic.n_reports=120", "attribution.enabled=false", "mitigation.enabled=false", "model.device=cpu"]


@pytest.fixture()
def gpu_cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    temp_dir = str(tmp_path_factory.mktemp("nodes", numbered=True))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "temp_dir": temp_dir})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1, env_vars={"OMP_NUM_THREADS": "1"}) for _ in range(3)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


def scoring_node(workers):
    """The first worker node with a scoring actor process, and those processes."""
    for node in workers:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        actors = [p for p in raylet.children(recursive=True) if "ModelWorker" in " ".join(p.cmdline())]
        if actors:
            return node, actors
    return None, []


def kill_a_scoring_node_mid_run(cluster, workers, layout, record: dict) -> None:
    """Once the first part file exists, SIGKILL a node with a scoring actor; `record` says what happened."""
    import ray

    try:
        node = None
        while node is None:  # the first part file, and an actor process that shows its class name
            node, actors = scoring_node(workers) if Store().list_files(layout.score_parts, suffix=".parquet") else (None, [])
            time.sleep(0.05)
        record["scores_existed"] = Store().exists(layout.scores)
        record["rows_before"] = sum(pq.read_metadata(p).num_rows for p in Store().list_files(layout.score_parts, suffix=".parquet"))
        for process in actors:
            process.send_signal(signal.SIGKILL)
        cluster.remove_node(node, allow_graceful=False)  # raylet, object store and agents, SIGKILL
        record["killed"], killed = node.node_id, time.monotonic()
        while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            time.sleep(0.2)
        record["seen_dead_after_s"] = time.monotonic() - killed
    except Exception as err:  # reported by the test's assertions, not lost in the thread
        record.setdefault("error", repr(err))


def test_losing_a_node_mid_scoring_scores_every_prompt_once(gpu_cluster, tiny_model_dir, tmp_path):
    import ray

    from cxrmem.distributed.audit import run_audit

    cluster, workers = gpu_cluster
    reference = load_config(None, [f"run.output={tmp_path / 'reference'}", f"model.path={tiny_model_dir}", *SETTINGS])
    prepare.run(reference)
    score.run(reference)  # one process, uninterrupted

    layout = RunLayout(str(tmp_path / "run"))
    cfg = load_config(
        None,
        [f"run.output={layout.prefix}", f"model.path={tiny_model_dir}", *SETTINGS,
         f"ray.address={cluster.address}", "ray.num_workers=2", "ray.num_gpus_per_worker=1"],
    )  # fmt: skip
    record: dict = {}
    threading.Thread(target=kill_a_scoring_node_mid_run, args=(cluster, workers, layout, record), daemon=True).start()
    try:
        summary = run_audit(cfg)
    finally:
        ray.shutdown()

    assert "killed" in record and not record["scores_existed"], f"the run finished before the node was lost: {record}"
    print(f"node lost after {record['rows_before']} rows; seen dead after {record.get('seen_dead_after_s', '?')} s")
    total = pq.read_metadata(layout.prompts).num_rows
    assert record["rows_before"] < total
    scoring = summary["scoring"] if "scoring" in summary else Store().read_json(layout.summary)["audit"]["scoring"]
    assert scoring["computed"] == total and scoring["duplicates_dropped"] == 0  # every prompt once
    scores = pq.read_table(layout.scores)
    expected = pq.read_table(RunLayout(str(tmp_path / "reference")).scores).sort_by("prompt_id")
    assert scores["prompt_id"].to_pylist() == expected["prompt_id"].to_pylist()
    assert np.allclose(scores["d_mem"].to_numpy(), expected["d_mem"].to_numpy(), rtol=1e-4, atol=1e-6)
