"""One writer per run: a lease on the run's output prefix, taken before anything is written there.

The lease is one small JSON object, `RunLayout.lease` (`<run.output>/_lease.json`), created
atomically (`Store.create_new`: an exclusive create on local disk, a conditional PUT with
`If-None-Match: *` on S3). It records who writes (user, host, PID, Ray job id, command), when it
started, and a heartbeat that a background thread refreshes every `run.lease_timeout_s / 5`
seconds with a conditional replace, so a writer notices when its lease was taken over.

A second writer is refused at once (`LeaseHeldError`, naming the holder) unless the lease is
stale or `run.force_lease` is set. Stale means: its heartbeat is older than `run.lease_timeout_s`,
or it was taken on this host by a process that no longer runs (a crashed or killed holder).
A stale or forced lease is taken over with a conditional replace, so two takers cannot both win.

Leases are re-entrant within a process: the audit holds `run.output`, and the stages it runs
(which also take one, for when they run alone) write under it without a second lease. The same
holds for rescore, whose runs live under its own `run.output`. The lease is released on every
exit path of the `hold` block (exceptions and signals included); a process killed with SIGKILL
leaves it behind, and the next writer takes it over as stale.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, Optional

from cxrmem.runfiles import RunLayout
from cxrmem.storage import Store, is_s3

log = logging.getLogger(__name__)

LEASE_FORMAT = "cxrmem-lease/1"
HEARTBEATS_PER_TIMEOUT = 5  # a live holder refreshes its heartbeat this many times per lease_timeout_s
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's job supervisor puts the submission id here


class LeaseHeldError(FileExistsError):
    """Another writer holds the run's lease; the message names it and how to take over."""


@dataclass(frozen=True)
class LeaseSettings:
    """The `run` section's lease keys, cut from the config by the callers."""

    force: bool = False  # run.force_lease
    timeout_s: float = 600.0  # run.lease_timeout_s

    @classmethod
    def of(cls, run_cfg) -> "LeaseSettings":
        return cls(force=bool(run_cfg.force_lease), timeout_s=float(run_cfg.lease_timeout_s))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers without a passwd entry for the uid
        return f"uid {os.getuid()}"


def _job_id() -> Optional[str]:
    """The Ray job submission id when this process is a submitted job's entrypoint."""
    with contextlib.suppress(ValueError, TypeError):
        return json.loads(os.environ.get(SUBMITTED_JOB_ENV, "") or "{}").get("metadata", {}).get("job_submission_id")
    return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def describe(holder: dict, now: float) -> str:
    """'alice@node1 pid 1234 (Ray job raysubmit_x, `cxrmem audit ...`), started ..., last heartbeat 12 s ago'."""
    job = f"Ray job {holder['job_id']}, " if holder.get("job_id") else ""
    age = now - float(holder.get("heartbeat_unix", 0))
    return (
        f"{holder.get('owner', '?')}@{holder.get('host', '?')} pid {holder.get('pid', '?')} "
        f"({job}`{holder.get('command', '?')}`), started {holder.get('started', '?')}, last heartbeat {age:.0f} s ago"
    )


class Lease:
    """The lease on one prefix, held by this process between `acquire` and `release`."""

    def __init__(self, store: Store, prefix: str, settings: LeaseSettings, command: str):
        self.store, self.prefix, self.settings = store, prefix, settings
        self.uri = RunLayout(prefix).lease
        self.token = uuid.uuid4().hex
        self.record = {
            "format": LEASE_FORMAT,
            "token": self.token,
            "owner": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": _job_id(),
            "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.version: Optional[str] = None
        self.lost_to: Optional[dict] = None  # the record of whoever took the lease over while we held it
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _payload(self) -> bytes:
        now = time.time()
        record = {**self.record, "heartbeat_unix": round(now, 3), "heartbeat": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds")}
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()

    def stale_reason(self, holder: dict, now: float) -> Optional[str]:
        """Why a lease found at the prefix may be taken over, or None while its holder is alive."""
        age = now - float(holder.get("heartbeat_unix", 0))
        if age > self.settings.timeout_s:
            return f"its heartbeat is {age:.0f} s old (run.lease_timeout_s={self.settings.timeout_s:g})"
        if not is_s3(self.uri) and holder.get("host") == socket.gethostname() and not _pid_running(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} no longer runs on this host"
        if self.settings.force:
            return "run.force_lease=true"
        return None

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeldError naming its live holder."""
        for _ in range(5):  # a lease released or replaced between our reads: look again
            self.version = self.store.create_new(self.uri, self._payload())
            if self.version is not None:
                break
            found = self.store.read_versioned(self.uri)
            if found is None:
                continue
            data, version = found
            try:
                holder = json.loads(data)
            except ValueError:
                holder = {}  # not a lease cxrmem wrote: treat it as stale, once its age is unknown
            if holder.get("token") == self.token:  # our own create, answered late and retried
                self.version = version
                break
            now = time.time()
            reason = self.stale_reason(holder, now)
            if reason is None:
                raise self.refusal(holder, now)
            log.warning("taking over the lease on %s from %s: %s", self.prefix, describe(holder, now), reason)
            self.version = self.store.replace_if(self.uri, self._payload(), version)
            if self.version is not None:
                break
        else:
            raise LeaseHeldError(f"{self.uri} keeps changing while this run tries to take it; another writer is starting, try again later")
        self._thread = threading.Thread(target=self._heartbeat, name=f"cxrmem-lease {self.prefix}", daemon=True)
        self._thread.start()

    def refusal(self, holder: dict, now: float) -> LeaseHeldError:
        return LeaseHeldError(
            f"{self.prefix} is being written by {describe(holder, now)}; only one writer per run.output. "
            f"Wait for it to finish, or, if that writer is gone, rerun with run.force_lease=true (a lease whose "
            f"heartbeat is older than run.lease_timeout_s={self.settings.timeout_s:g} s is taken over without it; "
            f"the lease is {self.uri})"
        )

    def _heartbeat(self) -> None:
        interval = self.settings.timeout_s / HEARTBEATS_PER_TIMEOUT
        while not self._stop.wait(interval):
            try:
                version = self.store.replace_if(self.uri, self._payload(), self.version)
            except OSError as err:  # storage down for a while: the next beat tries again
                log.warning("cannot refresh the lease %s: %s", self.uri, err)
                continue
            if version is None:
                found = self.store.read_versioned(self.uri)
                self.lost_to = json.loads(found[0]) if found else {}
                taker = describe(self.lost_to, time.time()) if self.lost_to else "nobody (it was deleted)"
                log.error("the lease on %s was taken over by %s; this run no longer owns it", self.prefix, taker)
                return
            self.version = version

    def check(self) -> None:
        """Raise before a step that must not happen without the lease (publishing the run)."""
        if self.lost_to is not None:
            raise LeaseHeldError(
                f"the lease on {self.prefix} was taken over by {describe(self.lost_to, time.time()) if self.lost_to else 'another writer'} "
                "while this run wrote; nothing was published. Rerun once that writer has finished"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost_to is None and self.version is not None:
            with contextlib.suppress(OSError):  # an unreachable store: the lease expires on its own
                self.store.delete_if(self.uri, self.version)


_HELD: dict[str, Lease] = {}  # prefix -> the lease this process holds on it
_HELD_LOCK = threading.Lock()


def _key(store: Store, prefix: str) -> str:
    return str(prefix).rstrip("/") if is_s3(prefix) else store.filesystem(prefix)[1].rstrip("/")


def held_over(store: Store, prefix: str) -> Optional[Lease]:
    """The lease this process holds on `prefix` or on a prefix above it."""
    key = _key(store, prefix)
    with _HELD_LOCK:
        return next((lease for held, lease in _HELD.items() if key == held or key.startswith(held + "/")), None)


@contextlib.contextmanager
def hold(store: Store, prefix: str, settings: LeaseSettings, command: Optional[str] = None) -> Iterator[Lease]:
    """The lease on `prefix` for the block (re-entrant: a lease already held over it is reused)."""
    outer = held_over(store, prefix)
    if outer is not None:
        yield outer
        return
    lease = Lease(store, prefix, settings, command or " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300])
    lease.acquire()
    key = _key(store, prefix)
    with _HELD_LOCK:
        _HELD[key] = lease
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lease.release()
