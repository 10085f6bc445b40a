"""Delivery control flow for one request: retry in budget, 413 halving, 400 quarantine/bisect.

I/O is injected (`send`, `clock`, `sleep`, `rand`) so every path is unit-testable with
scripted answers and no real waiting. The delays come from `backoff` (python-backoff, the
library singer-sdk itself uses): its `expo` wait generator gives the exponential schedule,
with an equal jitter. The loop around it is our own rather than the `backoff.on_predicate`
decorator because it honours Retry-After, stops within a per-request time budget on an
injectable clock, and wakes from a wait when the run aborts.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import typing as t
from dataclasses import dataclass, field

import backoff

from target_orb import jsonutil
from target_orb.errors import DeliveryAbortedError, OrbFatalError, OrbRetryExhaustedError
from target_orb.orb.answers import (
    MAX_BACKOFF_SECONDS,
    Outcome,
    classify,
    config_hint,
    orb_error_summary,
    rejected_keys,
    retry_after_seconds,
)

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.delivery")


def equal_jitter(rand: t.Callable[[], float]) -> t.Callable[[float], float]:
    """A `backoff` jitterer that waits between half and all of the computed delay.

    backoff's own `full_jitter` may return almost 0 (a burst of retries against an Orb
    that is already rate-limiting) and draws from the global `random`, which tests cannot
    script; keeping half the delay as a floor avoids both.

    Args:
        rand: Uniform [0, 1).

    Returns:
        value -> a delay in [value / 2, value].
    """

    def jitter(value: float) -> float:
        return value * (0.5 + 0.5 * rand())

    return jitter


def retry_delays(rand: t.Callable[[], float]) -> t.Iterator[float]:
    """The backoff schedule for one request: 0.5, 1, 2, 4 … s capped at 30 s, jittered.

    Args:
        rand: Uniform [0, 1) for the jitter.

    Yields:
        Seconds to wait before each retry, in order.
    """
    schedule = backoff.expo(base=2, factor=0.5, max_value=MAX_BACKOFF_SECONDS)
    next(schedule)  # backoff's generators yield 0 first (its decorators prime them)
    jitter = equal_jitter(rand)
    for cap in schedule:
        yield jitter(cap)


@dataclass(frozen=True, slots=True)
class Response:
    """What came back from Orb."""

    status: int
    headers: t.Mapping[str, str]
    body: t.Any  # decoded JSON, or text when the body is not JSON


class TransportError(Exception):
    """No HTTP answer: connect/read timeout, reset, refused. Always 'maybe ingested'."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


SendFn = t.Callable[[bytes, int], Response]
"""send(body bytes, event count) -> Response; raises TransportError."""


@dataclass(slots=True)
class DeliveryResult:
    """Per-event outcome of delivering one request's events."""

    accepted: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    # Events that were in an attempt with no clear answer (timeout, reset, 5xx): Orb may
    # have stored them even if a later attempt rejected them.
    ambiguous: set[int] = field(default_factory=set)
    requests: int = 0


class Limiter(t.Protocol):
    """Client-side rate limiting shared by all requests (see target_orb.orb.ratelimit)."""

    def acquire(self, events: int, abort: threading.Event | None = None) -> t.Any: ...
    def accepted(self, ticket: t.Any) -> None: ...
    def released(self, ticket: t.Any) -> None: ...
    def refused(self, ticket: t.Any) -> float | None: ...
    def progressing(self, within: float) -> bool: ...
    def penalize(self, seconds: float) -> None: ...


class _NoLimit:
    """No pacing: a 429 without Retry-After is retried with backoff."""

    def acquire(self, events: int, abort: threading.Event | None = None) -> None:
        return None

    def accepted(self, ticket: t.Any) -> None:
        return None

    def released(self, ticket: t.Any) -> None:
        return None

    def refused(self, ticket: t.Any) -> float | None:
        return None

    def progressing(self, within: float) -> bool:
        return False

    def penalize(self, seconds: float) -> None:
        return None


# Retry-After values beyond this are taken as this (hours would stall a run for nothing).
MAX_RETRY_AFTER_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class _Retry:
    """A failed attempt: why, how long to wait, Orb's Retry-After, whether the limiter paces."""

    failure: str
    wait: float
    asked: float | None = None  # Orb's Retry-After (seconds), when it sent one
    paced: bool = False  # pacing to Orb's limit while it accepts requests: not charged


class Deliverer:
    """Delivers lists of Orb events; thread-safe (no per-call state on self)."""

    def __init__(
        self,
        send: SendFn,
        *,
        url: str,
        max_retry_seconds: float,
        clock: t.Callable[[], float] = time.monotonic,
        abort: threading.Event | None = None,
        sleep: t.Callable[[float], bool] | None = None,
        rand: t.Callable[[], float] = random.random,
        limiter: Limiter | None = None,
        on_retry: t.Callable[[], None] | None = None,
        on_sent: t.Callable[[int], None] | None = None,
    ) -> None:
        """Wire the deliverer.

        Args:
            send: Posts one request body.
            url: The ingest URL, for messages.
            max_retry_seconds: Time budget for retrying one request.
            clock: Monotonic seconds.
            abort: The run's abort signal (shared with the pipeline): a retry wait ends
                at once, with DeliveryAbortedError, when it is set.
            sleep: Waits; returns True when delivery must abort. Default: `abort.wait`
                (or a plain sleep without `abort`); tests inject a fake clock's.
            rand: Uniform [0, 1) for jitter.
            limiter: Shared client-side rate limiter.
            on_retry: Called once per retry (for counters).
            on_sent: Called once per `deliver` with the number of events going to Orb: the
                run's `events_sent` is counted here (an event Orb refused live as too old is
                taken back when it is rerouted, and counts again in its backfill's request).
        """
        self._send = send
        self._url = url
        self._budget = max_retry_seconds
        self._clock = clock
        self._abort = abort
        if sleep is None:
            sleep = (abort or threading.Event()).wait
        self._sleep = sleep
        self._rand = rand
        self._limiter = limiter or _NoLimit()
        self._on_retry = on_retry
        self._on_sent = on_sent

    def deliver(self, events: t.Sequence[dict[str, t.Any]]) -> DeliveryResult:
        """Deliver events until each is accepted or rejected with a reason.

        Args:
            events: Orb events with unique idempotency keys.

        Returns:
            Accepted indexes and rejected (index, reason) pairs.

        Raises:
            OrbFatalError: 401/403/404: configuration must be fixed.
            OrbRetryExhaustedError: The retry budget ran out; nothing after it is acknowledged.
            DeliveryAbortedError: Shutdown was requested while waiting to retry.
        """
        result = DeliveryResult()
        if events and self._on_sent is not None:
            self._on_sent(len(events))
        stack: list[list[int]] = [list(range(len(events)))] if events else []
        while stack:
            part = stack.pop()
            response = self._send_with_retries(events, part, result)
            outcome = classify(response.status)
            if outcome is Outcome.OK:
                named = rejected_keys(response.body, [events[i]["idempotency_key"] for i in part])
                for i in part:
                    reasons = named.get(events[i]["idempotency_key"])
                    if reasons:
                        result.rejected.append((i, self._orb_reason(response, reasons)))
                    else:
                        result.accepted.append(i)
            elif outcome is Outcome.SPLIT:
                if len(part) == 1:
                    result.rejected.append(
                        (part[0], f"Orb answered 413 (request too large) to this event alone: "
                                  f"{orb_error_summary(response.body)}"),
                    )
                else:
                    LOGGER.warning(
                        "Orb answered 413 to %d events; splitting the request in half.", len(part)
                    )
                    half = len(part) // 2
                    stack.extend((part[half:], part[:half]))
            elif outcome is Outcome.FATAL:
                raise OrbFatalError(self._fatal_message(response, len(part)))
            else:  # QUARANTINE: 400 and other non-retryable 4xx
                self._quarantine(events, part, response, result, stack)
        if result.ambiguous and result.rejected:
            note = (
                " (an earlier attempt got no clear answer, so Orb may already have this "
                "event under the same key)"
            )
            result.rejected = [
                (i, reason + note if i in result.ambiguous else reason)
                for i, reason in result.rejected
            ]
        return result

    def _quarantine(
        self,
        events: t.Sequence[dict[str, t.Any]],
        part: list[int],
        response: Response,
        result: DeliveryResult,
        stack: list[list[int]],
    ) -> None:
        named = rejected_keys(response.body, [events[i]["idempotency_key"] for i in part])
        if named:
            rest = []
            for i in part:
                reasons = named.get(events[i]["idempotency_key"])
                if reasons:
                    result.rejected.append((i, self._orb_reason(response, reasons)))
                else:
                    rest.append(i)
            LOGGER.warning(
                "Orb rejected %d of %d events (HTTP %d); re-sending the other %d unchanged.",
                len(part) - len(rest), len(part), response.status, len(rest),
            )
            if rest:
                stack.append(rest)
        elif len(part) == 1:
            result.rejected.append((part[0], self._orb_reason(response, [])))
        else:
            LOGGER.warning(
                "Orb answered %d naming no event (%s) to %d events; bisecting to isolate the "
                "bad ones.", response.status, orb_error_summary(response.body, 120), len(part),
            )
            half = len(part) // 2
            stack.extend((part[half:], part[:half]))

    @staticmethod
    def _orb_reason(response: Response, reasons: list[str]) -> str:
        detail = "; ".join(reasons) if reasons else orb_error_summary(response.body)
        return f"Orb rejected the event (HTTP {response.status}): {detail}"

    def _fatal_message(self, response: Response, count: int) -> str:
        status = response.status
        hint = config_hint(
            status,
            forbidden="The API key (`api_key`) is not allowed to ingest events; check its "
            "permissions in Orb.",
            other="",
        )
        return (
            f"Orb answered HTTP {status} to POST {self._url} "
            f"({orb_error_summary(response.body, 160)}). {hint} {count} events were not "
            "delivered and no STATE was written past them; rerun after fixing the setting."
        )

    def _send_with_retries(
        self, events: t.Sequence[dict[str, t.Any]], part: list[int], result: DeliveryResult
    ) -> Response:
        """Send one ingest request, retrying retryable failures inside the time budget."""
        body = jsonutil.dumps({"events": [events[i] for i in part]})
        send = self._send
        count = len(part)

        def attempt() -> Response:
            result.requests += 1
            return send(body, count)

        def ambiguous() -> None:
            result.ambiguous.update(part)

        return self._retrying(
            attempt,
            what=f"POST {self._url}",
            items=f"{count} events",
            limiter=self._limiter,
            weight=count,
            on_ambiguous=ambiguous,
            on_retry=self._on_retry,
        )

    def request(
        self,
        send_once: t.Callable[[], Response],
        *,
        what: str,
        limiter: Limiter | None = None,
    ) -> Response:
        """Send one request other than ingest (backfills, search, customers, amendments).

        Same rules as ingest: connection errors, timeouts, 408/409/429/5xx are retried with
        backoff and jitter inside `max_retry_seconds`, Retry-After is honoured; the first
        answer that is not retryable is returned for the caller to interpret.

        Args:
            send_once: Makes one attempt (raises TransportError when no answer came).
            what: `METHOD URL` for messages (no secrets, no personal data).
            limiter: The client-side budget this request draws from (one unit per attempt).

        Returns:
            The first non-retryable response.

        Raises:
            OrbRetryExhaustedError: The retry budget ran out.
            DeliveryAbortedError: Shutdown was requested while waiting to retry.
        """
        return self._retrying(
            send_once,
            what=what,
            items="the request",
            limiter=limiter or _NoLimit(),
            weight=0,
            on_ambiguous=None,
            on_retry=self._on_retry,
        )

    def _retrying(
        self,
        send_once: t.Callable[[], Response],
        *,
        what: str,
        items: str,
        limiter: Limiter,
        weight: int,
        on_ambiguous: t.Callable[[], None] | None,
        on_retry: t.Callable[[], None] | None,
    ) -> Response:
        """Send until an answer that is not retryable, inside the `max_retry_seconds` budget.

        Waiting for Orb's rate limit (a 429 without Retry-After, paced by the limiter) is not
        charged to the budget while Orb keeps accepting requests through that limiter: a
        run is never failed merely because Orb is rate limiting. A Retry-After is honoured
        (capped at MAX_RETRY_AFTER_SECONDS) as far as the budget allows, then one last
        attempt is made.
        """
        started = self._clock()
        uncharged = 0.0  # seconds spent pacing to Orb's limit while it accepts requests
        attempt = 0
        last_try = False
        orb_asked: float | None = None
        delays = retry_delays(self._rand)
        while True:
            before = self._clock()
            ticket = limiter.acquire(weight, self._abort)
            if limiter.progressing(self._budget):
                uncharged += self._clock() - before
            answer = self._attempt(send_once, ticket, limiter, delays, on_ambiguous)
            if isinstance(answer, Response):
                return answer
            if answer.asked is not None:
                orb_asked = answer.asked
            wait = answer.wait
            elapsed = self._clock() - started - uncharged
            remaining = self._budget - elapsed
            if not answer.paced and (last_try or wait > remaining):
                if answer.asked is not None and not last_try and remaining > 1.0:
                    wait = remaining  # wait what the budget allows, then one last attempt
                    last_try = True
                else:
                    raise OrbRetryExhaustedError(
                        self._exhausted(
                            items, what, failure=answer.failure, attempt=attempt,
                            elapsed=elapsed, asked=orb_asked,
                        ),
                    )
            if answer.paced:
                uncharged += wait
            self._wait_to_retry(answer, wait, f"{items} ({what}, attempt {attempt + 1})", on_retry)
            attempt += 1

    def _wait_to_retry(
        self, answer: _Retry, wait: float, where: str, on_retry: t.Callable[[], None] | None
    ) -> None:
        """Say why (unless only pacing to Orb's limit), count the retry, then wait.

        Raises:
            DeliveryAbortedError: The run aborted during the wait.
        """
        if not answer.paced:
            LOGGER.warning(
                "Orb request failed: %s for %s; retrying in %.2f s.", answer.failure, where, wait,
            )
        if on_retry is not None:
            on_retry()
        if self._sleep(wait):
            msg = "delivery aborted while waiting to retry"
            raise DeliveryAbortedError(msg)

    def _attempt(
        self,
        send_once: t.Callable[[], Response],
        ticket: t.Any,
        limiter: Limiter,
        delays: t.Iterator[float],
        on_ambiguous: t.Callable[[], None] | None,
    ) -> Response | _Retry:
        """Send once: the response when it is final, else what the next retry needs.

        The retry schedule (`delays`) advances on every failed attempt, whichever wait is
        used; the limiter gets the ticket back with the answer.
        """
        try:
            response = send_once()
        except TransportError as exc:
            limiter.released(ticket)
            wait = next(delays)
            if on_ambiguous is not None:
                on_ambiguous()
            return _Retry(f"{exc.kind} ({exc.detail})", wait)
        if classify(response.status) is not Outcome.RETRY:
            limiter.accepted(ticket)
            return response
        failure = f"HTTP {response.status}"
        if response.status >= 500 and on_ambiguous is not None:
            on_ambiguous()
        asked = retry_after_seconds(response.headers)
        scheduled = next(delays)
        pacing = limiter.refused(ticket) if response.status == 429 and asked is None else None
        if asked is not None:
            limiter.released(ticket)
            wait = min(asked, MAX_RETRY_AFTER_SECONDS)
            if response.status == 429:
                limiter.penalize(wait)
            return _Retry(failure, wait, asked=asked)
        if pacing is not None:
            return _Retry(failure, pacing, paced=limiter.progressing(self._budget))
        limiter.released(ticket)
        return _Retry(failure, scheduled)

    def _exhausted(
        self,
        items: str,
        what: str,
        *,
        failure: str,
        attempt: int,
        elapsed: float,
        asked: float | None,
    ) -> str:
        hint = ""
        if asked is not None:
            capped = (
                f", capped at {MAX_RETRY_AFTER_SECONDS:g} s"
                if asked > MAX_RETRY_AFTER_SECONDS else ""
            )
            hint = (
                f" Orb asked to wait {asked:.0f} s (Retry-After{capped}), longer than the "
                "budget had left: raise `max_retry_seconds` or rerun later."
            )
        return (
            f"Orb did not accept {items} after {attempt + 1} attempts over {elapsed:.0f} s "
            f"(last: {failure} from {what}); the retry budget `max_retry_seconds` "
            f"({self._budget:g} s) is spent.{hint} Nothing after this point is acknowledged "
            "and no STATE was written past it; rerun to resend (same idempotency keys)."
        )
