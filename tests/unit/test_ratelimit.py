"""The pacer against a simulated Orb fixed window, in virtual time (no sleeping, no sockets).

Each case runs several senders sharing one `WindowPacer` against a server that allows
`per_window` units per fixed window at a random phase, with random latencies, and checks
the issue's bar over twenty or more windows: at least 95% of the allowed rate and at most
one 429 per four accepted requests.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
import time

import pytest

from target_orb.errors import DeliveryAbortedError
from target_orb.orb.ratelimit import RateLimiter, Ticket, WindowPacer


def simulate(*, window: float, per_window: int, batch: int, total: int, senders: int = 4,
             seed: int = 0, latency: tuple[float, float] = (0.005, 0.03)):
    rng = random.Random(seed)
    phase = rng.uniform(0, window)
    pacer = WindowPacer()
    used: dict[int, int] = {}

    def server(at: float) -> bool:
        k = math.floor((at + phase) / window)
        if used.get(k, 0) + batch > per_window:
            return False
        used[k] = used.get(k, 0) + batch
        return True

    requests = total // batch
    queue: list[tuple[float, int, str, int, object]] = []
    seq = 0

    def push(at: float, kind: str, sender: int, data: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(queue, (at, seq, kind, sender, data))

    holding: dict[int, int] = {}
    next_request = refused = accepted = 0
    first = None
    for sender in range(senders):
        push(0.0, "try", sender)
    now = 0.0
    while queue:
        now, _, kind, sender, data = heapq.heappop(queue)
        if kind == "try":
            if sender not in holding:
                if next_request >= requests:
                    continue
                holding[sender] = next_request
                next_request += 1
            admitted = pacer.reserve(now, batch)
            if isinstance(admitted, Ticket):
                first = now if first is None else first
                arrival = now + rng.uniform(*latency) / 2
                push(arrival + rng.uniform(*latency) / 2, "answer", sender,
                     (admitted, server(arrival)))
            else:
                push(now + min(admitted, 1.0), "try", sender)
        else:
            ticket, ok = data  # type: ignore[misc]
            if ok:
                pacer.accepted_answer(ticket, now)
                accepted += 1
                del holding[sender]
                push(now, "try", sender)
            else:
                refused += 1
                push(now + pacer.refused_answer(ticket, now), "try", sender)
    return total / (now - (first or 0.0)) / (per_window / window), refused / accepted


@pytest.mark.parametrize(
    ("window", "per_window", "batch", "total"),
    [
        (5.0, 2500, 500, 2500 * 24),  # the window, 24 windows
        (1.0, 100, 20, 100 * 30),  # the integration test's scale
        (60.0, 10_000, 500, 10_000 * 20),  # Orb's live per-minute default
    ],
)
def test_pacer_reaches_the_allowed_rate_with_few_429s(window, per_window, batch, total):
    results = [simulate(window=window, per_window=per_window, batch=batch, total=total,
                        seed=seed) for seed in range(8)]
    for efficiency, refusals in results:
        assert efficiency >= 0.95, results
        assert refusals <= 0.25, results


def test_probe_gate_lets_one_request_ask_while_others_wait():
    pacer = WindowPacer()
    first = pacer.reserve(0.0, 10)
    assert isinstance(first, Ticket)
    pacer.accepted_answer(first, 0.01)
    second = pacer.reserve(0.02, 10)
    assert isinstance(second, Ticket)
    wait = pacer.refused_answer(second, 0.03)
    assert wait > 0.5  # no hammering: the next probe is scheduled
    assert pacer.budget == 10
    probe = pacer.reserve(0.03 + wait, 10)
    assert isinstance(probe, Ticket) and probe.probe
    assert not isinstance(pacer.reserve(0.03 + wait, 10), Ticket)  # the gate is closed
    pacer.released(probe)  # no answer (a timeout): the gate opens again
    assert pacer.probe_out is False


def test_rate_limiter_summarises_429s_once_a_window(caplog):
    clock = [0.0]
    limiter = RateLimiter(
        clock=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)
    )
    with caplog.at_level("WARNING", logger="target_orb.ratelimit"):
        for _ in range(20):
            ticket = limiter.acquire(10)
            limiter.refused(ticket)
            clock[0] += 0.1
    lines = [r for r in caplog.records if "Orb is rate limiting" in r.getMessage()]
    # One line per 5 s while the window is unknown, never one per answer.
    assert 1 <= len(lines) <= clock[0] / 5 + 1
    assert len(lines) < limiter.refusals == 20


def test_a_rate_limit_wait_ends_when_the_run_aborts():
    """The limiter's waits watch the run's abort signal, as retry waits do (issue 16)."""
    limiter = RateLimiter(requests_per_second=1, name="ingest", unit="events")
    abort = threading.Event()
    limiter.acquire(1, abort)  # the bucket's one token
    timer = threading.Timer(0.05, abort.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(DeliveryAbortedError, match="rate limit"):
        limiter.acquire(1, abort)  # would wait ~1 s for the next token
    assert time.monotonic() - started < 0.5
    timer.join()
