"""Orb-style fixed-window rate limits for the stand-in Orb."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any


class RateLimit:
    """Orb-style fixed-window rate limits (Orb's rate-limit page, docs.withorb.com
    "Rate limits"; see ``RULES.md`` in this package).

    - Ingest (``POST /v1/ingest``): at most ``events_per_window`` events per
      ``window_seconds`` window and ``requests_per_second`` requests per second.
    - Writes: every other POST/PUT/PATCH/DELETE (search, backfill create/close/revert,
      amend, deprecate, customer update), at most ``writes_per_second`` per second. Orb's
      page counts all of them as write actions (live 50/s, test 5/s, trial 1/s).
    - Reads: every GET (ping, backfill list/fetch, invoices, customer fetch), at most
      ``reads_per_second`` per second (live 100/s, test 50/s, trial 10/s).

    Every budget is off (None) unless given. Windows are fixed (aligned to the clock,
    not to the client). A request over a budget is refused whole with 429
    ``429-too-many-requests`` and no ``Retry-After`` (Orb documents none) and counts
    against nothing.
    """

    def __init__(
        self,
        *,
        events_per_window: int | None = None,
        window_seconds: float = 60.0,
        requests_per_second: int | None = None,
        writes_per_second: int | None = None,
        reads_per_second: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        for name, value in (
            ("events_per_window", events_per_window),
            ("requests_per_second", requests_per_second),
            ("writes_per_second", writes_per_second),
            ("reads_per_second", reads_per_second),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        self.events_per_window = events_per_window
        self.window_seconds = window_seconds
        self.requests_per_second = requests_per_second
        self.writes_per_second = writes_per_second
        self.reads_per_second = reads_per_second
        self.clock = clock
        self.refused = 0  # ingest requests refused
        self.refused_writes = 0
        self.refused_reads = 0
        self._lock = threading.Lock()
        self._window = self._second = None
        self._events = self._requests = 0
        self._counts: dict[str, tuple[int, int]] = {}  # kind -> (second, requests)

    def admit(self, events: int) -> bool:
        """Count an ingest request of ``events`` events, or refuse it (False)."""
        with self._lock:
            now = self.clock()
            window, second = math.floor(now / self.window_seconds), math.floor(now)
            if window != self._window:
                self._window, self._events = window, 0
            if second != self._second:
                self._second, self._requests = second, 0
            if (
                self.events_per_window is not None
                and self._events + events > self.events_per_window
            ) or (
                self.requests_per_second is not None
                and self._requests + 1 > self.requests_per_second
            ):
                self.refused += 1
                return False
            self._events += events
            self._requests += 1
            return True

    def _admit_one(self, kind: str, budget: int | None) -> bool:
        if budget is None:
            return True
        with self._lock:
            second = math.floor(self.clock())
            at, used = self._counts.get(kind, (second, 0))
            if at != second:
                used = 0
            if used + 1 > budget:
                if kind == "write":
                    self.refused_writes += 1
                else:
                    self.refused_reads += 1
                return False
            self._counts[kind] = (second, used + 1)
            return True

    def admit_write(self) -> bool:
        """Count a write request (POST/PUT/PATCH/DELETE other than ingest), or refuse it."""
        return self._admit_one("write", self.writes_per_second)

    def admit_read(self) -> bool:
        """Count a read request (GET/HEAD), or refuse it."""
        return self._admit_one("read", self.reads_per_second)

    def settings(self) -> dict[str, Any]:
        return {
            "events_per_window": self.events_per_window,
            "window_seconds": self.window_seconds,
            "requests_per_second": self.requests_per_second,
            "writes_per_second": self.writes_per_second,
            "reads_per_second": self.reads_per_second,
        }
