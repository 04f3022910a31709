"""One writer per run: the lease on run.output, on local disk and on the real S3 server, with real processes.

- two `cxrmem audit` processes started together on one output: exactly one runs, the other is
  refused with a line naming the holder and the way to take over, and the published run verifies;
- many writers racing for one lease (threads, real conditional writes): exactly one wins;
- a lease left by a dead process, or with an old heartbeat, is taken over; a fresh one only with
  run.force_lease, and the writer it was taken from notices before publishing;
- the lease is released on every exit path, and is never published or reported by verify.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cxrmem.config import ConfigError, load_config
from cxrmem.lease import Lease, LeaseHeldError, LeaseSettings, hold
from cxrmem.runfiles import RunLayout
from cxrmem.storage import Store
from tests.cli_process import CXRMEM, REPO, cli_env

LIGHT = [
    "corpus.synthetic.n_reports=60",
    "attribution.enabled=false",
    "mitigation.enabled=false",
    "report.figures=false",
]


def stale_record(**fields):
    record = {"format": "cxrmem-lease/1", "token": "someone-else", "owner": "bob", "host": socket.gethostname(), "pid": os.getpid()}
    record.update(command="cxrmem audit", started="2026-01-01T00:00:00+00:00", heartbeat_unix=time.time())
    record.update(fields)
    return json.dumps(record).encode()


@pytest.mark.slow
def test_two_audits_on_one_output_one_is_refused_and_the_run_verifies(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    command = [CXRMEM, "audit", "--config", str(REPO / "conf/test.yaml"), f"model.path={tiny_model_dir}", f"run.output={output}", *LIGHT]
    started = time.monotonic()
    first = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    second = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    finished = {}

    def wait(name, process):
        out, err = process.communicate(timeout=400)
        finished[name] = (process.returncode, err.strip().splitlines()[-1], time.monotonic() - started)

    threads = [threading.Thread(target=wait, args=item) for item in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(code for code, _, _ in finished.values())
    assert codes == [0, 1], finished
    loser = next(value for value in finished.values() if value[0] == 1)
    winner = next(value for value in finished.values() if value[0] == 0)
    assert "is being written by" in loser[1] and "pid" in loser[1] and "run.force_lease=true" in loser[1], loser
    assert loser[2] < min(winner[2], 15)  # refused at start (1.6 s on an idle machine), not after a run of its own
    verify = subprocess.run([CXRMEM, "verify", str(output)], env=cli_env(), capture_output=True, text=True, cwd=REPO)
    assert verify.returncode == 0, verify.stderr[-2000:]
    assert not os.path.exists(RunLayout(str(output)).lease)  # released by the winner


@pytest.fixture(params=["local", "s3"])
def run_prefix(request, tmp_path):
    """(store, prefix, where) of a run on local disk or on the real S3 server."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return Store.from_config(request.getfixturevalue("s3_storage_cfg")), f"s3://{bucket}/run", "s3"
    return Store(), str(tmp_path / "run"), "local"


def test_racing_writers_exactly_one_wins(run_prefix):
    store, prefix, _ = run_prefix
    leases = [Lease(store, prefix, LeaseSettings(timeout_s=60), f"writer {i}") for i in range(6)]

    def take(lease):
        try:
            lease.acquire()
            return True
        except LeaseHeldError as err:
            assert "is being written by" in str(err)
            return False

    with ThreadPoolExecutor(len(leases)) as pool:
        won = list(pool.map(take, leases))
    assert won.count(True) == 1
    winner = leases[won.index(True)]
    assert json.loads(store.read_bytes(RunLayout(prefix).lease))["token"] == winner.token
    winner.release()
    assert not store.exists(RunLayout(prefix).lease)


def test_stale_leases_are_taken_over_fresh_ones_only_by_force(run_prefix):
    store, prefix, where = run_prefix
    uri = RunLayout(prefix).lease
    store.write_bytes(uri, stale_record())  # alive: this test's own pid, fresh heartbeat
    with pytest.raises(LeaseHeldError, match=r"bob@.* pid .*run\.force_lease=true"):
        Lease(store, prefix, LeaseSettings(), "cxrmem score").acquire()

    store.write_bytes(uri, stale_record(heartbeat_unix=time.time() - 120))
    old = Lease(store, prefix, LeaseSettings(timeout_s=60), "cxrmem score")
    old.acquire()  # the heartbeat is older than run.lease_timeout_s
    assert json.loads(store.read_bytes(uri))["token"] == old.token
    old.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store.write_bytes(uri, stale_record(pid=int(dead.stdout)))
    if where == "local":  # a dead pid on this host: stale at once (on S3 the host may be another machine's)
        taker = Lease(store, prefix, LeaseSettings(), "cxrmem score")
        taker.acquire()
        taker.release()
    else:
        with pytest.raises(LeaseHeldError):
            Lease(store, prefix, LeaseSettings(), "cxrmem score").acquire()

    holder = Lease(store, prefix, LeaseSettings(timeout_s=1.0), "cxrmem audit")
    store.delete(uri)
    holder.acquire()  # beats every 0.2 s
    forced = Lease(store, prefix, LeaseSettings(force=True), "cxrmem audit")
    forced.acquire()
    deadline = time.monotonic() + 10
    while holder.lost_to is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(LeaseHeldError, match="taken over"):
        holder.check()  # the writer that lost its lease does not publish
    holder.release()
    assert json.loads(store.read_bytes(uri))["token"] == forced.token  # the loser leaves the new lease alone
    forced.release()
    assert not store.exists(uri)


def test_the_lease_is_released_on_errors_reentrant_and_never_published(tmp_path):
    store, prefix = Store(), str(tmp_path / "run")
    uri = RunLayout(prefix).lease
    with pytest.raises(RuntimeError):
        with hold(store, prefix, LeaseSettings()):
            assert os.path.exists(uri)
            with hold(store, f"{prefix}/_staging", LeaseSettings()) as inner:  # the stages inside an audit
                assert inner.prefix == prefix
            raise RuntimeError("a stage failed")
    assert not os.path.exists(uri)
    with hold(store, prefix, LeaseSettings()):
        store.write_text(f"{prefix}/summary.json", "{}")
        from cxrmem.publish import publish_manifest, verify_run

        manifest = publish_manifest(store, prefix, "fp", None)
        assert list(manifest["files"]) == ["summary.json"]
        assert verify_run(store, prefix)["ok"]  # the lease is a working file: not unlisted


def test_lease_keys_are_validated():
    assert load_config(None, ["run.lease_timeout_s=30"]).run.lease_timeout_s == 30
    with pytest.raises(ConfigError, match="run.lease_timeout_s"):
        load_config(None, ["run.lease_timeout_s=0"])
    with pytest.raises(ConfigError, match="run.force_lease"):
        load_config(None, ["run.force_lease=maybe"])


# -- leases this code cannot read, and clocks ahead of ours -------------------------------------
BAD_LEASES = {
    "not JSON": b"{half a lease",
    "a list": b"[1, 2, 3]",
    "null": b"null",
    "wrong types": json.dumps({"host": 7, "pid": "1234", "heartbeat_unix": "yesterday", "token": None}).encode(),
}


@pytest.mark.parametrize("kind", list(BAD_LEASES))
def test_an_unreadable_lease_is_reported_in_one_line_and_taken_over(run_prefix, kind, caplog):
    store, prefix, _ = run_prefix
    uri = RunLayout(prefix).lease
    store.write_bytes(uri, BAD_LEASES[kind])
    taker = Lease(store, prefix, LeaseSettings(), "cxrmem score")  # the default 600 s timeout: no waiting for these
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="cxrmem.lease"):
        taker.acquire()
    assert time.monotonic() - started < 5
    assert json.loads(store.read_bytes(uri))["token"] == taker.token
    lines = [record.getMessage() for record in caplog.records if record.name == "cxrmem.lease"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"taking over the lease {uri} as stale: it is unreadable" in lines[0] and "its owner cannot be read" in lines[0]
    assert "refuses to publish" in lines[0] and "rerun it" in lines[0]  # what a writer still running does, and the way on
    taker.release()
    assert not store.exists(uri)


def test_an_unreadable_heartbeat_of_a_known_owner_is_stale_once_unchanged_for_the_timeout(tmp_path, caplog):
    store, prefix = Store(), str(tmp_path / "run")
    uri = RunLayout(prefix).lease
    store.write_bytes(uri, stale_record(heartbeat_unix="yesterday"))  # this process: alive, but it never beats this lease
    taker = Lease(store, prefix, LeaseSettings(timeout_s=1.0), "cxrmem score")
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="cxrmem.lease"):
        taker.acquire()
    waited = time.monotonic() - started
    assert 1.0 <= waited < 4, waited
    assert "heartbeat_unix 'yesterday' is not a number" in caplog.text and uri in caplog.text
    taker.release()


def test_a_heartbeat_in_the_future_is_stale_after_the_timeout_of_this_process_clock(run_prefix, caplog):
    store, prefix, _ = run_prefix
    uri = RunLayout(prefix).lease
    store.write_bytes(uri, stale_record(host="another-host", heartbeat_unix=time.time() + 86400))  # a clock a day ahead
    taker = Lease(store, prefix, LeaseSettings(timeout_s=1.0), "cxrmem score")
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="cxrmem.lease"):
        taker.acquire()
    waited = time.monotonic() - started
    assert 1.0 <= waited < 5, waited  # not the day the heartbeat claims
    assert json.loads(store.read_bytes(uri))["token"] == taker.token
    assert "86400 s in the future" in caplog.text and "did not change for 1 s" in caplog.text
    taker.release()


def test_a_live_holder_with_a_clock_ahead_is_refused(run_prefix):
    store, prefix, _ = run_prefix
    uri = RunLayout(prefix).lease
    stop = threading.Event()

    def beat():  # a holder on a host whose clock is a day ahead, rewriting its lease as a live one does
        while not stop.is_set():
            store.write_bytes(uri, stale_record(host="another-host", heartbeat_unix=time.time() + 86400))
            stop.wait(0.3)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        deadline = time.monotonic() + 10
        while not store.exists(uri) and time.monotonic() < deadline:  # its first write is there
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(LeaseHeldError, match=r"bob@another-host .* s in the future"):
            Lease(store, prefix, LeaseSettings(timeout_s=3.0), "cxrmem score").acquire()
        assert time.monotonic() - started < 3.0  # refused once the lease changed, before the timeout
    finally:
        stop.set()
        beating.join()


def test_a_list_lease_does_not_stop_a_real_command(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "_lease.json").write_text("[1, 2, 3]")
    command = [CXRMEM, "prepare", f"model.path={tiny_model_dir}", "corpus.synthetic.n_reports=40", f"run.output={output}"]
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "_lease.json" in line]
    assert len(lines) == 1 and "JSON list [1, 2, 3], not an object" in lines[0] and "Traceback" not in done.stderr
    assert not (output / "_lease.json").exists()  # taken over, then released
