"""Delivery control flow and response policy with scripted answers, an injected clock and sleep."""

from __future__ import annotations

import itertools
import json

import pytest

from target_orb.errors import DeliveryAbortedError, OrbFatalError, OrbRetryExhaustedError
from target_orb.orb.answers import (
    Outcome,
    classify,
    rejected_keys,
    retry_after_seconds,
)
from target_orb.orb.delivery import Deliverer, Response, TransportError, retry_delays
from target_orb.orb.ratelimit import RateLimiter


def events(n: int) -> list[dict]:
    return [
        {"idempotency_key": f"k{i}", "event_name": "e", "external_customer_id": "c",
         "timestamp": "2024-03-01T12:00:00Z", "properties": {"i": i}}
        for i in range(n)
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.now += seconds
        return False


class Script:
    """A send() that answers from a function of (keys, attempt) and records every call."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []
        self.bodies: list[bytes] = []

    def __call__(self, body: bytes, count: int) -> Response:
        keys = [e["idempotency_key"] for e in json.loads(body)["events"]]
        assert len(keys) == count
        self.calls.append(keys)
        self.bodies.append(body)
        result = self.answer(keys, len(self.calls))
        if isinstance(result, Exception):
            raise result
        return result


def ok(keys=None, attempt=None) -> Response:
    return Response(200, {}, {"validation_failed": []})


def make(answer, *, budget=600.0, clock=None):
    clock = clock or FakeClock()
    script = Script(answer)
    deliverer = Deliverer(
        script, url="http://127.0.0.1:1/v1/ingest", max_retry_seconds=budget,
        clock=clock.clock, sleep=clock.sleep, rand=lambda: 0.5,
    )
    return deliverer, script, clock


# --- classification and headers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.OK), (202, Outcome.OK), (408, Outcome.RETRY), (409, Outcome.RETRY),
        (429, Outcome.RETRY), (500, Outcome.RETRY), (503, Outcome.RETRY), (599, Outcome.RETRY),
        (413, Outcome.SPLIT), (401, Outcome.FATAL), (403, Outcome.FATAL), (404, Outcome.FATAL),
        (400, Outcome.QUARANTINE), (422, Outcome.QUARANTINE),
    ],
)
def test_classify(status, outcome):
    assert classify(status) is outcome


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"Retry-After": "garbage"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers, expected):
    now = 1445412480.0  # 2015-10-21T07:28:00Z
    assert retry_after_seconds(headers, now=now) == expected


def test_backoff_grows_exponentially_with_jitter_and_cap():
    def first(n, rand):
        return list(itertools.islice(retry_delays(rand), n))

    assert first(8, lambda: 1.0) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert first(8, lambda: 0.0) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert first(25, lambda: 1.0)[-1] == 30.0


def test_rejected_keys_objects_and_strings():
    body = {
        "validation_errors": [
            {"idempotency_key": "k1", "validation_errors": ["bad timestamp"]},
            "Event k22 has a nested property",
            {"idempotency_key": "not-in-request", "validation_errors": ["x"]},
        ],
    }
    assert rejected_keys(body, ["k1", "k2", "k22"]) == {
        "k1": ["bad timestamp"],
        "k22": ["Event k22 has a nested property"],
    }
    assert rejected_keys({"type": "constraint"}, ["k1"]) == {}
    assert rejected_keys("not json", ["k1"]) == {}


# --- delivery paths ----------------------------------------------------------------------------


def test_success_sends_once_and_accepts_all():
    deliverer, script, clock = make(ok)
    result = deliverer.deliver(events(3))
    assert sorted(result.accepted) == [0, 1, 2]
    assert result.rejected == []
    assert script.calls == [["k0", "k1", "k2"]]
    assert clock.sleeps == []


@pytest.mark.parametrize(
    "failure",
    [
        Response(500, {}, None), Response(502, {}, "bad gateway"), Response(503, {}, None),
        Response(408, {}, None), Response(409, {}, None), Response(429, {}, None),
        TransportError("read timeout", "ReadTimeout"),
        TransportError("connection error", "ConnectionError"),
    ],
    ids=["500", "502", "503", "408", "409", "429", "read-timeout", "reset"],
)
def test_retryable_failures_resend_identical_body(failure):
    deliverer, script, clock = make(lambda keys, n: failure if n <= 2 else ok())
    result = deliverer.deliver(events(4))
    assert sorted(result.accepted) == [0, 1, 2, 3]
    assert len(script.calls) == 3
    assert script.bodies[0] == script.bodies[1] == script.bodies[2]
    assert clock.sleeps == [0.375, 0.75]  # expo 0.5·2^n with jitter factor 0.75 (rand=0.5)


def test_retry_after_header_is_honoured():
    answers = [Response(429, {"Retry-After": "12"}, None),
               Response(503, {"retry-after-ms": "250"}, None)]
    deliverer, _, clock = make(lambda keys, n: answers[n - 1] if n <= 2 else ok())
    deliverer.deliver(events(1))
    assert clock.sleeps == [12.0, 0.25]


def test_retry_budget_exhausted_fails_naming_status_and_count():
    deliverer, script, clock = make(lambda keys, n: Response(503, {}, None), budget=10)
    with pytest.raises(OrbRetryExhaustedError) as info:
        deliverer.deliver(events(5))
    message = str(info.value)
    assert "HTTP 503" in message
    assert "5 events" in message
    assert "max_retry_seconds" in message
    assert sum(clock.sleeps) <= 10
    assert len(script.calls) >= 4
    assert "k0" not in message  # never the keys


def test_retry_after_beyond_budget_waits_what_the_budget_allows_then_says_what_orb_asked():
    # Issue 10: wait as far as the budget allows, try once more, then name Orb's ask; an
    # absurd value (an hour) is capped.
    deliverer, script, clock = make(
        lambda keys, n: Response(429, {"Retry-After": "3600"}, None), budget=60
    )
    with pytest.raises(OrbRetryExhaustedError) as info:
        deliverer.deliver(events(1))
    assert clock.sleeps == [60.0]
    assert len(script.calls) == 2
    message = str(info.value)
    assert "HTTP 429" in message
    assert "Orb asked to wait 3600 s" in message
    assert "capped at 300 s" in message
    assert "max_retry_seconds" in message


def test_retry_after_longer_than_the_budget_left_then_success_delivers():
    answers = [Response(503, {"Retry-After": "100"}, None)]
    deliverer, _, clock = make(lambda keys, n: answers[0] if n == 1 else ok(), budget=40)
    result = deliverer.deliver(events(2))
    assert sorted(result.accepted) == [0, 1]
    assert clock.sleeps == [40.0]


def test_absurd_retry_after_within_a_large_budget_is_capped():
    answers = [Response(429, {"Retry-After": "7200"}, None)]
    deliverer, _, clock = make(lambda keys, n: answers[0] if n == 1 else ok(), budget=3600)
    deliverer.deliver(events(1))
    assert clock.sleeps == [300.0]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_fatal_statuses_stop_at_once(status):
    deliverer, script, _ = make(lambda keys, n: Response(status, {}, {"title": "nope"}))
    with pytest.raises(OrbFatalError) as info:
        deliverer.deliver(events(2))
    assert len(script.calls) == 1
    assert f"HTTP {status}" in str(info.value)
    assert "127.0.0.1:1/v1/ingest" in str(info.value)


def test_413_splits_in_half_recursively_and_dead_letters_single_oversize():
    def answer(keys, n):
        if "k5" in keys:
            return Response(413, {}, {"title": "too large"}) if len(keys) >= 1 else ok()
        return Response(413, {}, None) if len(keys) > 2 else ok()

    deliverer, script, _ = make(answer)
    result = deliverer.deliver(events(8))
    assert sorted(result.accepted) == [0, 1, 2, 3, 4, 6, 7]
    assert [i for i, _ in result.rejected] == [5]
    assert "413" in result.rejected[0][1]
    sent_ok = [k for call in script.calls for k in call if len(call) <= 2 and "k5" not in call]
    assert sorted(sent_ok) == ["k0", "k1", "k2", "k3", "k4", "k6", "k7"]


def test_400_naming_keys_dead_letters_them_and_resends_rest_unchanged():
    def answer(keys, n):
        bad = [k for k in keys if k in {"k1", "k3"}]
        if bad:
            return Response(400, {}, {"validation_errors": [
                {"idempotency_key": k, "validation_errors": [f"{k} is bad"]} for k in bad]})
        return ok()

    deliverer, script, _ = make(answer)
    result = deliverer.deliver(events(5))
    assert sorted(result.accepted) == [0, 2, 4]
    assert dict(result.rejected) == {
        1: "Orb rejected the event (HTTP 400): k1 is bad",
        3: "Orb rejected the event (HTTP 400): k3 is bad",
    }
    assert script.calls == [["k0", "k1", "k2", "k3", "k4"], ["k0", "k2", "k4"]]


def test_400_naming_no_key_bisects_to_the_bad_event():
    def answer(keys, n):
        if "k6" in keys:
            return Response(400, {}, {"type": "https://x#400-constraint-violation",
                                      "title": "Constraint violation"})
        return ok()

    deliverer, script, _ = make(answer)
    result = deliverer.deliver(events(8))
    assert sorted(result.accepted) == [0, 1, 2, 3, 4, 5, 7]
    assert [i for i, _ in result.rejected] == [6]
    assert "constraint-violation" in result.rejected[0][1]
    assert len(script.calls) <= 1 + 2 * 3  # log2(8) levels, two halves each


def test_200_with_validation_failed_dead_letters_named():
    body = {"validation_failed": [{"idempotency_key": "k0", "validation_errors": ["x"]}]}
    deliverer, _, _ = make(lambda keys, n: Response(200, {}, body))
    result = deliverer.deliver(events(2))
    assert result.accepted == [1]
    assert [i for i, _ in result.rejected] == [0]


def test_abort_while_waiting_raises():
    script = Script(lambda keys, n: Response(503, {}, None))
    deliverer = Deliverer(script, url="u", max_retry_seconds=600, clock=lambda: 0.0,
                          sleep=lambda s: True, rand=lambda: 0.5)
    with pytest.raises(DeliveryAbortedError):
        deliverer.deliver(events(1))
    assert len(script.calls) == 1


# --- rate limiter -----------------------------------------------------------------------------


def test_rate_limiter_caps_requests_and_events_and_pauses_after_429():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=2, events_per_minute=600,
                          clock=clock.clock, sleep=clock.sleep)
    for _ in range(4):
        limiter.acquire(1)
    assert clock.now == pytest.approx(1.0)  # 2 burst, then 2 more at 0.5 s each
    clock2 = FakeClock()
    events_limited = RateLimiter(events_per_minute=600, clock=clock2.clock, sleep=clock2.sleep)
    events_limited.acquire(600)
    events_limited.acquire(300)
    assert clock2.now == pytest.approx(30.0)  # 300 events at 10/s
    clock3 = FakeClock()
    paused = RateLimiter(clock=clock3.clock, sleep=clock3.sleep)
    paused.penalize(5.0)
    paused.acquire(1)
    assert clock3.now == pytest.approx(5.0)


def test_rejection_after_an_ambiguous_attempt_says_orb_may_have_it():
    answers = [Response(500, {}, None), Response(413, {}, None)]
    deliverer, _, _ = make(lambda keys, n: answers[n - 1])
    result = deliverer.deliver(events(1))
    assert result.accepted == []
    assert len(result.rejected) == 1
    assert "Orb may already have this event" in result.rejected[0][1]
    clean, _, _ = make(lambda keys, n: Response(413, {}, None))
    assert "may already" not in clean.deliver(events(1)).rejected[0][1]


def test_rate_limited_retries_do_not_spend_the_budget_while_orb_accepts():
    # Orb accepts one request in three and refuses the others with 429 without
    # Retry-After: far past the budget in time, yet never exhausted (issue 10).
    clock = FakeClock()
    limiter = RateLimiter(clock=clock.clock, sleep=clock.sleep)
    deliverer = Deliverer(
        Script(lambda keys, n: ok() if n % 3 == 0 else Response(429, {}, None)),
        url="u", max_retry_seconds=10, clock=clock.clock, sleep=clock.sleep,
        rand=lambda: 0.5, limiter=limiter,
    )
    for _ in range(12):
        assert deliverer.deliver(events(2)).accepted == [0, 1]
    assert clock.now > 10


def test_a_limit_that_accepts_nothing_still_ends_in_the_budget():
    clock = FakeClock()
    limiter = RateLimiter(clock=clock.clock, sleep=clock.sleep)
    deliverer = Deliverer(
        Script(lambda keys, n: Response(429, {}, None)), url="u", max_retry_seconds=60,
        clock=clock.clock, sleep=clock.sleep, rand=lambda: 0.5, limiter=limiter,
    )
    with pytest.raises(OrbRetryExhaustedError, match="HTTP 429"):
        deliverer.deliver(events(1))
    assert clock.now < 200
