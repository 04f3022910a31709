"""Driver-side progress of a streaming run: prompts done out of total, prompts/s, ETA."""

from __future__ import annotations

import logging
import time
from typing import Optional

log = logging.getLogger(__name__)


class Progress:
    """Counts prompts as their results reach the driver and logs at most every `every_s` seconds."""

    def __init__(self, total: int, what: str = "scored", every_s: float = 10.0, already_done: int = 0):
        self.total = total
        self.what = what
        self.every_s = every_s
        self.already_done = already_done  # resumed from an earlier run; not part of this run's rate
        self.done = 0
        self.start = time.monotonic()
        self._last_log = self.start
        self.first_result_s: Optional[float] = None  # start-up: actors placed, models loaded, first batch
        self._first_rows = 0
        self._last_update = self.start

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        """Prompts per second computed in this run."""
        elapsed = self.elapsed_s
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> Optional[float]:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    @property
    def steady_rate(self) -> Optional[float]:
        """Prompts per second from the first result on: the throughput once start-up is paid."""
        if self.first_result_s is None:
            return None
        seconds = self._last_update - self.start - self.first_result_s
        return (self.done - self._first_rows) / seconds if seconds > 0 else None

    def update(self, n: int) -> None:
        now = time.monotonic()
        if self.first_result_s is None:
            self.first_result_s, self._first_rows = now - self.start, n
        self.done += n
        self._last_update = now
        if now - self._last_log >= self.every_s or self.done >= self.total:
            self._last_log = now
            log.info("%s", self.line())

    def line(self) -> str:
        eta = "?" if self.eta_s is None else f"{self.eta_s:.0f} s"
        resumed = f" (+{self.already_done} resumed)" if self.already_done else ""
        return (
            f"{self.what} {self.done}/{self.total} prompts{resumed}, "
            f"{self.rate:.2f} prompts/s, elapsed {self.elapsed_s:.0f} s, ETA {eta}"
        )

    def summary(self) -> dict:
        return {
            "prompts": self.done,
            "resumed": self.already_done,
            "seconds": round(self.elapsed_s, 2),
            "prompts_per_s": round(self.rate, 3),
            "startup_s": None if self.first_result_s is None else round(self.first_result_s, 2),
            "prompts_per_s_after_startup": None if self.steady_rate is None else round(self.steady_rate, 3),
        }
