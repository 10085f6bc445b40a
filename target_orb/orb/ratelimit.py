"""Client-side rate limits shared by every stream and thread, and pacing at Orb's own limit.

Two independent parts, one lock:

- Optional caps the user configures (`max_requests_per_second`, `max_events_per_minute`):
  token buckets.
- `WindowPacer`: what Orb allows, learned from its answers. Orb answers 429 without
  `Retry-After` when a fixed window's budget (events per window, requests per second) is
  spent. The pacer learns the budget (units accepted in a window before the first 429) and
  brackets the window length and the time of each reset between answers (a 429 to a
  request sent at t: the reset is after t; a 200 answered at t: it is at or before t). It
  then sends a window's budget right after each reset and waits for the next one, probing
  with one request at a time, at the middle of the bracket while it is wide and at its
  late edge once it is narrow: about one 429 every few windows instead of one per request
  in flight, and the allowed rate is used.

The same class serves ingest (units = events) and the separate budgets of other writes and
reads (units = requests).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import typing as t
from dataclasses import dataclass

from target_orb.errors import DeliveryAbortedError

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.ratelimit")

_FIRST_GAP = 1.0  # first probe after a 429 while nothing is known about the window
_MAX_GAP = 30.0
_GATE_POLL = 0.01  # how often waiting senders look at a probe in flight
_NARROW = 0.01  # a bracket narrower than this fraction of the window: probe at its late edge
_MIN_NARROW = 0.02  # seconds
_MAX_FAILS_PER_WAIT = 1  # then probe where the reset has surely passed
_MIN_SPACING = 0.25  # seconds between refused probes, doubling with each one in a row
_HISTORY = 32  # resets remembered for learning the window length
# Where in a wide bracket to probe: late enough that most probes succeed (each 429 counts
# against Orb's patience), early enough that the bracket narrows within a few windows.
_AIM = 0.8


@dataclass(slots=True)
class Ticket:
    """One admitted request (returned by `acquire`, handed back with the answer)."""

    units: float
    sent_at: float
    epoch: int = 0
    probe: bool = False
    overdraft: bool = False  # one request past the learned budget, to check it


class WindowPacer:
    """Learns Orb's fixed-window limit from 429s and paces to it. Pure: time is passed in.

    Each reset k seen is kept as a bracket (lo_k, hi_k]; the window length W is bounded
    by every pair of brackets ((lo_k - hi_j) / (k - j) <= W <= (hi_k - lo_j) / (k - j)),
    so it gets sharper the more windows pass, and the next reset is predicted from all of
    them. Not thread-safe by itself; `RateLimiter` holds the lock.
    """

    def __init__(self) -> None:
        """Start open: nothing is known, every request goes."""
        self.limited = False
        self.budget: float | None = None  # units per window
        self.w_lo = 0.0  # bounds on the window length
        self.w_hi = math.inf
        self.history: list[tuple[int, float, float]] = []  # (index, lo, hi) of resets
        self.index = 0  # index of the current window (the reset that started it)
        self.epoch = 0
        self.used = 0.0  # units sent in the current window
        self.accepted = 0.0  # units accepted from requests of the current window
        self.waiting = False  # budget spent: waiting for the next reset
        self.probe_out = False
        self.next_probe = 0.0
        self.fail_lo = -math.inf  # the next reset is after this
        self.fails = 0
        self.gap = _FIRST_GAP
        self.inflight = 0  # requests of the current window not answered yet
        self.short_windows = 0  # consecutive windows refused before their budget was used
        # The budget learned in the first window may be short (the window was partly used
        # before we started, by another client or an earlier run): once a window, one request
        # goes past it until Orb refuses one.
        self.budget_sure = False
        self.overdraft_out = False
        self.failed_early = False

    # -- prediction ------------------------------------------------------------------

    def predict(self, index: int) -> tuple[float, float]:
        """Bounds on the time of reset `index` from every reset seen and the W bounds."""
        low, high = -math.inf, math.inf
        for k, lo, hi in self.history:
            steps = index - k
            if lo > -math.inf:
                low = max(low, lo + steps * self.w_lo)
            if hi < math.inf and self.w_hi < math.inf:
                high = min(high, hi + steps * self.w_hi)
        return low, high

    def _learn_window(self) -> None:
        w_lo, w_hi = self.w_lo, self.w_hi
        hist = self.history
        for a in range(len(hist)):
            j, lo_j, hi_j = hist[a]
            for b in range(a + 1, len(hist)):
                k, lo_k, hi_k = hist[b]
                steps = k - j
                if lo_k > -math.inf and hi_j < math.inf:
                    w_lo = max(w_lo, (lo_k - hi_j) / steps)
                if hi_k < math.inf and lo_j > -math.inf:
                    w_hi = min(w_hi, (hi_k - lo_j) / steps)
        if w_lo > w_hi:  # not a fixed window after all (or it changed): keep the newest only
            self.history = hist[-1:]
            w_lo, w_hi = 0.0, math.inf
        self.w_lo, self.w_hi = w_lo, w_hi

    # -- admission ------------------------------------------------------------------

    def reserve(self, now: float, units: float) -> Ticket | float:
        """Admit one request now (a Ticket) or say how long to wait (seconds)."""
        if not self.limited:
            self.used += units
            self.inflight += 1
            return Ticket(units, now, self.epoch)
        if self.waiting:
            if self.probe_out or self.inflight:
                return _GATE_POLL  # a probe's answer means something only once these settled
            if now < self.next_probe:
                return self.next_probe - now
            self.probe_out = True
            return Ticket(units, now, self.epoch + 1, probe=True)
        _, surely = self.predict(self.index + 1)
        if now > surely and self.used:
            # Idle past the next reset: start a new window now, the bracket as wide as W.
            self.index += 1
            self.epoch += 1
            self.inflight = 0
            self.history = [(self.index, now - self.w_hi, now)]
            self.used = 0.0
            self.accepted = 0.0
        if self.budget is not None and self.used + units > self.budget and self.used:
            if (
                not self.budget_sure
                and not self.overdraft_out
                and self.w_hi - self.w_lo < 0.1 * self.w_lo  # the window is known by now
            ):
                self.overdraft_out = True
                self.used += units
                self.inflight += 1
                return Ticket(units, now, self.epoch, overdraft=True)
            self._start_wait(now)
            return self.reserve(now, units)
        self.used += units
        self.inflight += 1
        return Ticket(units, now, self.epoch)

    # -- answers --------------------------------------------------------------------

    def _settle(self, ticket: Ticket) -> None:
        if ticket.overdraft:
            self.overdraft_out = False
        if not ticket.probe and ticket.epoch == self.epoch and self.inflight:
            self.inflight -= 1

    def accepted_answer(self, ticket: Ticket, now: float) -> None:
        """Orb accepted the request of `ticket` (answered at `now`)."""
        self._settle(ticket)
        if ticket.probe and self.waiting:
            self.probe_out = False
            self._reset_seen(now)
            self.used = ticket.units
            self.accepted = ticket.units
            return
        if ticket.epoch == self.epoch:
            self.accepted += ticket.units
            if self.budget is not None and self.accepted > self.budget:
                self.budget = self.accepted  # an answer that was still in flight
        if not self.limited and not self.history:
            self.history = [(0, -math.inf, now)]  # window 0 began at or before this answer

    def released(self, ticket: Ticket) -> None:
        """The attempt got no answer about the limit (no reply, 5xx, Retry-After)."""
        self._settle(ticket)
        if ticket.probe and self.probe_out:
            self.probe_out = False

    def refused_answer(self, ticket: Ticket, now: float) -> float:
        """Orb answered 429 without Retry-After; returns how long this request should wait."""
        self._settle(ticket)
        if not self.limited:
            self.limited = True
            self.budget = self.accepted if self.accepted > 0 else None
            self.fail_lo = ticket.sent_at
            self._start_wait(now)
            return max(0.0, self.next_probe - now)
        if ticket.overdraft:
            self.budget_sure = True  # the budget was right: the window is spent
        if self.waiting:
            if ticket.epoch >= self.epoch:  # sent since the last reset seen
                self.fail_lo = max(self.fail_lo, ticket.sent_at)
            if ticket.probe:
                self.probe_out = False
                self.fails += 1
                self._schedule(now)
            return max(0.0, self.next_probe - now)
        if ticket.epoch != self.epoch:
            return 0.0  # sent in an older window: just ask again
        if ticket.overdraft:  # past the budget, as expected: wait for the next reset
            self.fail_lo = max(self.fail_lo, ticket.sent_at)
            self._start_wait(now)
            return max(0.0, self.next_probe - now)
        # Refused inside the current window: the window began earlier than modelled (our
        # requests straddled a reset), or the budget is smaller than assumed (twice in a row).
        self.short_windows += 1
        self.failed_early = True
        if self.accepted > 0 and (self.budget is None or self.short_windows >= 2):
            self.budget = self.accepted
        self.fail_lo = max(self.fail_lo, ticket.sent_at)
        if self.w_hi < math.inf:  # the server's current window holds this request
            self.history = [(self.index, ticket.sent_at - self.w_hi, now)]
        self._start_wait(now)
        return max(0.0, self.next_probe - now)

    # -- internals ------------------------------------------------------------------

    def _reset_seen(self, now: float) -> None:
        if not self.failed_early:
            self.short_windows = 0
        self.failed_early = False
        index = self.index + 1
        low, high = self.predict(index)
        lo = max(self.fail_lo, low)
        hi = min(now, high)
        if lo > hi:  # the answers contradict the model: start learning again from here
            self.history = []
            self.w_lo, self.w_hi = 0.0, math.inf
            lo, hi = self.fail_lo, now
        self.history.append((index, lo, hi))
        del self.history[:-_HISTORY]
        self._learn_window()
        self.index = index
        self.epoch += 1
        self.inflight = 0
        self.waiting = False
        self.fail_lo = -math.inf
        self.fails = 0
        self.gap = _FIRST_GAP

    def _start_wait(self, now: float) -> None:
        self.waiting = True
        self.fails = 0
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        """When to send the next probe for reset `index + 1` (never in quick succession)."""
        self._plan(now)
        if self.fails:  # whatever the model says, refused probes back off exponentially
            self.next_probe = max(self.next_probe, now + min(_MAX_GAP, _MIN_SPACING * 2 ** (
                self.fails - 1)))

    def _plan(self, now: float) -> None:
        low, high = self.predict(self.index + 1)
        low = max(low, self.fail_lo)
        if high == math.inf:
            # Window length unknown: probe 1, 2, 4, … s after the current window began.
            self.gap = max(self.gap, self.w_lo)
            if self.fails:
                self.gap *= 2
            base = self.history[-1][2] if self.history else now
            soonest = now + (_FIRST_GAP if self.fails else 0.0)
            self.next_probe = min(max(base + self.gap, soonest), now + _MAX_GAP)
            return
        narrow = max(_MIN_NARROW, _NARROW * self.w_lo)
        # After a 429, go (nearly) where the reset has surely passed, but never more than
        # about a window past the earliest possible reset.
        give_up = self.fails >= _MAX_FAILS_PER_WAIT
        # Never aim more than a window past the earliest possible reset: a probe that lands a
        # window late would make a later reset look like the next one.
        reach = min(high - low, max(self.w_lo, (self.w_lo + self.w_hi) / 2))
        if high - low <= narrow or low == -math.inf:
            self.next_probe = max(now, high)  # the reset has surely passed by then
        elif give_up:
            self.next_probe = max(now, low + max(reach * 0.98, min(narrow, high - low)))
        else:
            self.next_probe = max(now, low + _AIM * reach)

    def describe(self) -> str:
        """What was learned, for the log."""
        if self.budget is None:
            return "budget not learned yet"
        if self.w_hi == math.inf:
            return f"about {self.budget:,.0f} per window, window length not learned yet"
        return f"about {self.budget:,.0f} per {(self.w_lo + self.w_hi) / 2:.1f} s window"


class RateLimiter:
    """Shared admission for one Orb budget: optional caps, Orb's Retry-After, learned pacing.

    `acquire` before each attempt; then `accepted(ticket)`, `refused(ticket)` (429 without
    Retry-After) or `penalize(seconds)` (Retry-After) with the answer.
    """

    def __init__(
        self,
        *,
        requests_per_second: int | None = None,
        events_per_minute: int | None = None,
        name: str = "ingest",
        unit: str = "events",
        clock: t.Callable[[], float] = time.monotonic,
        sleep: t.Callable[[float], t.Any] = time.sleep,
    ) -> None:
        """Configure the limits.

        Args:
            requests_per_second: Max requests per second, or None.
            events_per_minute: Max events per minute, or None.
            name: Which Orb budget (for the log).
            unit: What a request's weight counts (`events`, or `requests` when weight is 0).
            clock: Monotonic seconds.
            sleep: Blocking wait.
        """
        self._rps = requests_per_second
        self._epm = events_per_minute
        self._name = name
        self._unit = unit
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        now = clock()
        self._req_tokens = float(requests_per_second or 0)
        self._evt_tokens = float(events_per_minute or 0)
        self._last = now
        self._paused_until = 0.0
        self.pacer = WindowPacer()
        self.last_accepted = now
        self.refusals = 0  # 429s without Retry-After, in total
        self._logged_refusals = 0
        self._last_log = -math.inf

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)
        self._last = now
        if self._rps:
            self._req_tokens = min(float(self._rps), self._req_tokens + elapsed * self._rps)
        if self._epm:
            self._evt_tokens = min(float(self._epm), self._evt_tokens + elapsed * self._epm / 60)

    def acquire(self, events: int, abort: threading.Event | None = None) -> Ticket:
        """Block until one request carrying `events` events may be sent.

        Args:
            events: Events in the request (0 for calls other than ingest: one unit each).
                A request larger than the per-minute cap waits for a full bucket, then goes.
            abort: The caller's abort signal (the run's): a wait ends at once when it is set.

        Returns:
            The ticket to hand back with the answer.

        Raises:
            DeliveryAbortedError: The abort signal was set while waiting.
        """
        units = float(events) if events > 0 else 1.0
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
                    admitted = self.pacer.reserve(now, units)
                    if isinstance(admitted, Ticket):
                        if self._rps:
                            self._req_tokens -= 1
                        if self._epm:
                            self._evt_tokens -= need_events
                        return admitted
                    wait = admitted
            self._wait(min(wait, 1.0), abort)

    def _wait(self, seconds: float, abort: threading.Event | None) -> None:
        """Sleep (the injected sleep in tests); with `abort`, wake when it is set."""
        if abort is None:
            self._sleep(seconds)
            return
        if self._sleep is time.sleep:
            abort.wait(seconds)
        else:
            self._sleep(seconds)
        if abort.is_set():
            raise DeliveryAbortedError("delivery aborted while waiting for the rate limit")

    def accepted(self, ticket: Ticket | None) -> None:
        """Orb accepted the attempt made with `ticket`."""
        if ticket is None:
            return
        with self._lock:
            now = self._clock()
            self.last_accepted = now
            self.pacer.accepted_answer(ticket, now)

    def released(self, ticket: Ticket | None) -> None:
        """The attempt got no answer that says anything about the limit."""
        if ticket is None:
            return
        with self._lock:
            self.pacer.released(ticket)

    def refused(self, ticket: Ticket | None) -> float:
        """Orb answered 429 without Retry-After: learn from it.

        Returns:
            Seconds this request should wait before it asks again (the wait is part of
            pacing, not of a retry budget).
        """
        if ticket is None:
            return 0.0
        with self._lock:
            now = self._clock()
            self.refusals += 1
            wait = self.pacer.refused_answer(ticket, now)
            self._summarise(now)
            return wait

    def _summarise(self, now: float) -> None:
        """One log line per window (at most one every 5 s before the window is known)."""
        pacer = self.pacer
        every = (pacer.w_lo + pacer.w_hi) / 2 if pacer.w_hi < math.inf else 5.0
        if now - self._last_log < max(every, 1.0):
            return
        count = self.refusals - self._logged_refusals
        first = self._logged_refusals == 0
        self._logged_refusals = self.refusals
        self._last_log = now
        LOGGER.warning(
            "Orb is rate limiting %s (%d answer%s 429 without Retry-After%s); pacing to what "
            "it allows (%s %s). Nothing is lost: refused requests are resent with the same "
            "keys.", self._name, count, "" if count == 1 else "s",
            "" if first else " since the last such line", pacer.describe(), self._unit,
        )

    def progressing(self, within: float) -> bool:
        """Whether Orb accepted anything through this limiter in the last `within` seconds."""
        with self._lock:
            return self._clock() - self.last_accepted <= within

    def penalize(self, seconds: float) -> None:
        """Orb asked to wait (Retry-After): pause every sender for `seconds`.

        Args:
            seconds: How long all requests should wait.
        """
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))
