"""Clean stops: SIGTERM and SIGINT end a command at the next safe point, with one line saying how to resume.

What sends them: Kubernetes before it kills a pod, `ray job stop` (to a submitted job's
entrypoint), Ctrl-C. While `stop_on_signals` is active, the first signal raises `Interrupted`
in the main thread. It is a BaseException, like KeyboardInterrupt, so no `except Exception`
swallows it: every `finally` runs on the way out (the score stage writes the batches it holds
as one more part, Ray is shut down by its session, the run's lease is released), and the
command ends with `interrupted_line` and exit code 128 + the signal number (143, 130). Further
signals while stopping are logged and ignored; SIGKILL stays the hard stop.

A handler runs wherever the main thread is, also inside a callback that Ray's C++ core calls
(deserialising a result), which turns the exception into another one (a SystemError). So what
counts is that a signal arrived: `as_interrupted` makes any error that ends a signalled command
the interruption it is.

Parts already written are durable, so rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Optional

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The command received SIGTERM or SIGINT; `exit_code` is 128 + its number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum


_scored: Optional[tuple[int, int]] = None  # (prompts scored, of total) as the score stage last reported
_received: list[int] = []  # the signal that started the stop, while stop_on_signals is active


def note_scored(done: int, total: int) -> None:
    """The score stage's progress, for the interrupted line (resumed prompts count as scored)."""
    global _scored
    _scored = (done, total)


def stop_requested() -> bool:
    """True once SIGTERM / SIGINT arrived in this command (whatever exception it then became)."""
    return bool(_received)


def as_interrupted(err: BaseException) -> BaseException:
    """`err`, or the Interrupted it stands for when a signal arrived before it was raised."""
    if isinstance(err, Interrupted) or not _received:
        return err
    return Interrupted(_received[0])


def interrupted_line(command: str, err: Interrupted) -> str:
    where = f"after {_scored[0]}/{_scored[1]} prompts scored" if _scored else "before any prompt was scored"
    return f"cxrmem {command}: interrupted ({err.signal_name}) {where}; rerun the same command to resume"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM / SIGINT raise Interrupted in the main thread while the block runs (a no-op off the main thread)."""
    global _scored
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _scored = None
    _received.clear()

    def handler(signum, frame):
        if _received:
            log.warning("%s received while stopping; finishing the clean stop (SIGKILL stops at once)", signal.Signals(signum).name)
            return
        _received.append(signum)
        log.warning("%s received: stopping at the next safe point, keeping completed parts", signal.Signals(signum).name)
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def keep_handlers() -> Iterator[None]:
    """Keep this process's SIGTERM / SIGINT handlers across the block: `ray.init` installs its own
    (`sys.exit` on SIGTERM), which would bypass the clean stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            if old is not None:
                signal.signal(signum, old)
