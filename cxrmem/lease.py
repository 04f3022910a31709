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

Leases this code cannot read, and clocks that disagree (docs/design.md, Outputs):

* A lease that is not JSON, not a JSON object, or whose owner fields (host, pid) have the wrong
  types cannot say who holds it: it is reported in one line naming the file and taken over as
  stale. One whose owner can be read but whose heartbeat cannot is judged by the rule below.
* A heartbeat more than CLOCK_SKEW_S in the future (another host's clock is ahead) says nothing
  about the lease's age. A live holder rewrites its lease every `run.lease_timeout_s / 5`, so such
  a lease counts as stale once this process has seen it unchanged for `run.lease_timeout_s` of
  its own wall time (time.monotonic); the acquiring process waits that long, and is refused at
  once if the lease changes meanwhile (its holder is alive).

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
from cxrmem.storage import Store, canonical, local_path

log = logging.getLogger(__name__)

LEASE_FORMAT = "cxrmem-lease/1"
HEARTBEATS_PER_TIMEOUT = 5  # a live holder refreshes its heartbeat this many times per lease_timeout_s
CLOCK_SKEW_S = 5.0  # a heartbeat at most this far in the future is read as fresh (hosts' clocks differ a little)
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


@dataclass(frozen=True)
class Holder:
    """A lease as read from storage: its fields, and what makes it unreadable (None for a lease cxrmem wrote)."""

    record: dict  # the JSON object's fields ({} when the file holds no object)
    problem: Optional[str] = None

    @classmethod
    def parse(cls, data: bytes) -> "Holder":
        try:
            record = json.loads(data)
        except ValueError:  # UnicodeDecodeError included
            return cls({}, f"not JSON: {data[:40]!r}")
        if not isinstance(record, dict):
            return cls({}, f"JSON {type(record).__name__} {json.dumps(record)[:40]}, not an object")
        wrong = [f"{key} {record.get(key)!r} is not {what}" for key, (ok, what) in FIELDS.items() if not ok(record.get(key))]
        return cls(record, "; ".join(wrong) or None)

    @property
    def owner_known(self) -> bool:
        """Whether the host and process that took the lease can be read."""
        return all(FIELDS[key][0](self.record.get(key)) for key in ("host", "pid"))

    @property
    def heartbeat(self) -> Optional[float]:
        value = self.record.get("heartbeat_unix")
        return float(value) if FIELDS["heartbeat_unix"][0](value) else None

    def describe(self, now: float) -> str:
        """'alice@node1 pid 1234 (Ray job raysubmit_x, `cxrmem audit ...`), started ..., last heartbeat 12 s ago'."""
        record = self.record
        job = f"Ray job {record['job_id']}, " if record.get("job_id") else ""
        heartbeat = self.heartbeat
        beat = "unreadable" if heartbeat is None else (f"{now - heartbeat:.0f} s ago" if heartbeat <= now else f"{heartbeat - now:.0f} s in the future")
        return (
            f"{record.get('owner', '?')}@{record.get('host', '?')} pid {record.get('pid', '?')} "
            f"({job}`{record.get('command', '?')}`), started {record.get('started', '?')}, last heartbeat {beat}"
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


# The fields a lease must hold, each with its check and what it must be.
FIELDS = {
    "token": (lambda v: isinstance(v, str), "a string"),
    "host": (lambda v: isinstance(v, str), "a string"),
    "pid": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "heartbeat_unix": (_is_number, "a number (seconds since 1970)"),
}


def describe(holder: dict, now: float) -> str:
    """The holder of a lease record as one phrase (see Holder.describe)."""
    return Holder(holder).describe(now)


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

    def stale_reason(self, holder: Holder, now: float, unchanged_s: float = 0.0) -> tuple[Optional[str], float]:
        """(why a lease found at the prefix may be taken over, or None; seconds to keep watching it first).

        `unchanged_s`: how long this process has seen this very version of the lease (module doc).
        """
        timeout = self.settings.timeout_s
        if holder.problem and not holder.owner_known:
            return f"it is unreadable ({holder.problem}) and its owner cannot be read", 0.0
        pid = holder.record.get("pid")
        # A pid is checked only for a lease on this machine's disk: in remote storage another machine may share the host name.
        on_this_disk = local_path(self.uri) is not None
        if holder.owner_known and on_this_disk and holder.record["host"] == socket.gethostname() and not _pid_running(pid):
            return f"its process {pid} no longer runs on this host", 0.0
        if self.settings.force:
            return "run.force_lease=true", 0.0
        heartbeat = holder.heartbeat
        if heartbeat is not None and heartbeat <= now + CLOCK_SKEW_S:
            age = now - heartbeat
            return (f"its heartbeat is {age:.0f} s old (run.lease_timeout_s={timeout:g})" if age > timeout else None), 0.0
        # The heartbeat cannot tell the lease's age (unreadable, or a clock ahead of ours): its holder, if alive,
        # rewrites it every timeout / 5 s, so a lease this process has seen unchanged for timeout s is stale.
        what = "is unreadable" if heartbeat is None else f"is {heartbeat - now:.0f} s in the future"
        if unchanged_s >= timeout:
            return f"its heartbeat {what} and the lease did not change for {unchanged_s:.0f} s (run.lease_timeout_s={timeout:g})", 0.0
        return None, timeout - unchanged_s

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeldError naming its live holder."""
        first_seen: dict[str, float] = {}  # version of the lease found -> monotonic time this process first read it
        races, watched = 0, False
        while races < 5:  # a lease released or replaced between our reads: look again
            self.version = self.store.create_new(self.uri, self._payload())
            if self.version is not None:
                break
            found = self.store.read_versioned(self.uri)
            if found is None:
                races += 1
                continue
            data, version = found
            holder = Holder.parse(data)
            if holder.record.get("token") == self.token:  # our own create, answered late and retried
                self.version = version
                break
            now = time.time()
            seen = first_seen.setdefault(version, time.monotonic())
            reason, wait_s = self.stale_reason(holder, now, time.monotonic() - seen)
            if reason is None:
                if wait_s <= 0 or len(first_seen) > 1:  # a fresh lease, or one that changed while we watched: alive
                    raise self.refusal(holder, now)
                self._watch(holder, now, wait_s, announce=not watched)
                watched = True
                continue
            self._report_takeover(holder, now, reason)
            self.version = self.store.replace_if(self.uri, self._payload(), version)
            if self.version is not None:
                break
            races += 1
        else:
            raise LeaseHeldError(f"{self.uri} keeps changing while this run tries to take it; another writer is starting, try again later")
        self._thread = threading.Thread(target=self._heartbeat, name=f"cxrmem-lease {self.prefix}", daemon=True)
        self._thread.start()

    def _watch(self, holder: Holder, now: float, wait_s: float, announce: bool) -> None:
        """Wait a beat interval (at most `wait_s`) before looking at a lease whose heartbeat tells nothing again;
        `announce`: the first look, which says so in one line."""
        interval = self.settings.timeout_s / HEARTBEATS_PER_TIMEOUT
        if announce:
            log.warning(
                "the lease %s of %s cannot be aged by its heartbeat (%s); it is taken over as stale unless it changes "
                "within %.0f s (run.lease_timeout_s); run.force_lease=true takes it over now",
                self.uri, holder.describe(now), holder.problem or "a clock ahead of this host's", wait_s,
            )  # fmt: skip
        time.sleep(min(interval, wait_s))

    def _report_takeover(self, holder: Holder, now: float, reason: str) -> None:
        if holder.problem and not holder.owner_known:  # one line: the file, why, and what a still-running writer does
            log.warning(
                "taking over the lease %s as stale: %s. If a cxrmem command still writes %s, it notices at its next "
                "heartbeat and refuses to publish; rerun it once this one has finished",
                self.uri, reason, self.prefix,
            )  # fmt: skip
            return
        log.warning("taking over the lease on %s from %s: %s", self.prefix, holder.describe(now), reason)

    def refusal(self, holder: Holder, now: float) -> LeaseHeldError:
        unreadable = f" (its {holder.problem})" if holder.problem else ""
        return LeaseHeldError(
            f"{self.prefix} is being written by {holder.describe(now)}{unreadable}; only one writer per run.output. "
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
                self.lost_to = Holder.parse(found[0]).record if found else {}
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


def held_over(prefix: str) -> Optional[Lease]:
    """The lease this process holds on `prefix` or on a prefix above it."""
    key = canonical(prefix)
    with _HELD_LOCK:
        return next((lease for held, lease in _HELD.items() if key == held or key.startswith(held + "/")), None)


@contextlib.contextmanager
def hold(store: Store, prefix: str, settings: LeaseSettings, command: Optional[str] = None) -> Iterator[Lease]:
    """The lease on `prefix` for the block (re-entrant: a lease already held over it is reused)."""
    outer = held_over(prefix)
    if outer is not None:
        yield outer
        return
    lease = Lease(store, prefix, settings, command or " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300])
    lease.acquire()
    key = canonical(prefix)
    with _HELD_LOCK:
        _HELD[key] = lease
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lease.release()
