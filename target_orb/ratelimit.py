"""Client-side rate limits shared by every stream and thread, plus a global pause after 429."""

from __future__ import annotations

import threading
import time
import typing as t


class RateLimiter:
    """Token buckets for requests/second and events/minute, and a shared 429 cool-down.

    Both caps are optional; with neither set only the 429 cool-down applies.
    """

    def __init__(
        self,
        *,
        requests_per_second: int | None = None,
        events_per_minute: int | None = None,
        clock: t.Callable[[], float] = time.monotonic,
        sleep: t.Callable[[float], t.Any] = time.sleep,
    ) -> None:
        """Configure the limits.

        Args:
            requests_per_second: Max ingest requests per second, or None.
            events_per_minute: Max events per minute, or None.
            clock: Monotonic seconds.
            sleep: Blocking wait.
        """
        self._rps = requests_per_second
        self._epm = events_per_minute
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        now = clock()
        self._req_tokens = float(requests_per_second or 0)
        self._evt_tokens = float(events_per_minute or 0)
        self._last = now
        self._paused_until = 0.0

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)
        self._last = now
        if self._rps:
            self._req_tokens = min(float(self._rps), self._req_tokens + elapsed * self._rps)
        if self._epm:
            self._evt_tokens = min(float(self._epm), self._evt_tokens + elapsed * self._epm / 60)

    def acquire(self, events: int) -> None:
        """Block until one request carrying `events` events may be sent.

        Args:
            events: Events in the request (a request larger than the per-minute cap waits
                for a full bucket, then goes).
        """
        while True:
            with self._lock:
                now = self._clock()
                self._refill(now)
                wait = max(0.0, self._paused_until - now)
                need_events = min(float(events), float(self._epm)) if self._epm else 0.0
                if self._rps and self._req_tokens < 1:
                    wait = max(wait, (1 - self._req_tokens) / self._rps)
                if self._epm and self._evt_tokens < need_events:
                    wait = max(wait, (need_events - self._evt_tokens) * 60 / self._epm)
                if wait <= 0:
                    if self._rps:
                        self._req_tokens -= 1
                    if self._epm:
                        self._evt_tokens -= need_events
                    return
            self._sleep(min(wait, 1.0))

    def penalize(self, seconds: float) -> None:
        """Orb answered 429: pause every sender for `seconds` (automatic slow-down).

        Args:
            seconds: How long all requests should wait.
        """
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))
