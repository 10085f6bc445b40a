"""Pacing at Orb's rate limit (issue 10) against the stand-in's Orb-style fixed window."""

from __future__ import annotations

import threading
import time
import typing as t

import pytest

from fake_orb import FakeOrb, RateLimit
from tests.conftest import API_KEY, base_config, run_target, singer_lines, track


class RecordingLimit(RateLimit):
    """The stand-in's limit, noting when each request was admitted or refused."""

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self.admitted: list[float] = []
        self.refused_at: list[float] = []
        self._record = threading.Lock()

    def admit(self, events: int) -> bool:
        ok = super().admit(events)
        with self._record:
            (self.admitted if ok else self.refused_at).append(time.monotonic())
        return ok


def test_stand_in_rate_limit_is_a_fixed_window_without_retry_after():
    now = [10.0]
    limit = RateLimit(events_per_window=100, window_seconds=5, requests_per_second=3,
                      clock=lambda: now[0])
    assert limit.admit(60) and limit.admit(40)
    assert not limit.admit(1)  # the window's events are spent
    now[0] = 15.0  # next window
    assert limit.admit(10) and limit.admit(10) and limit.admit(10)
    assert not limit.admit(10)  # 3 requests this second
    now[0] = 16.0
    assert limit.admit(10)
    assert limit.refused == 2
    with FakeOrb(api_key=API_KEY, rate_limit=RateLimit(events_per_window=1)) as orb:
        import requests

        ok = requests.post(orb.url + "/ingest", json={"events": []},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
        body = {"events": [{"idempotency_key": "a", "event_name": "e",
                            "external_customer_id": "c", "timestamp": "2020-01-01T00:00:00Z",
                            "properties": {}}] * 2}
        refused = requests.post(orb.url + "/ingest", json=body,
                                headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert ok.status_code == 200
    assert refused.status_code == 429
    assert refused.json()["type"].endswith("#429-too-many-requests")
    assert "Retry-After" not in refused.headers and "retry-after-ms" not in refused.headers


@pytest.mark.parametrize("window", [1.0])
def test_without_client_limits_target_orb_paces_to_orbs_limit(tmp_path, window):
    per_window, batch, windows = 100, 20, 22
    n = per_window * windows
    limit = RecordingLimit(events_per_window=per_window, window_seconds=window,
                           requests_per_second=50)
    with FakeOrb(api_key=API_KEY, rate_limit=limit, accept_all=True) as orb:
        config = base_config(
            orb, tmp_path, batch_size_rows=batch,
            # Far less than the run takes: waiting for Orb's limit must not spend it.
            max_retry_seconds=5,
        )
        result = run_target(config, singer_lines([track(i) for i in range(n)]), tmp_path,
                            timeout=120)
        landed = len(orb.events())
    assert result.returncode == 0, result.stderr[-3000:]
    assert landed == n
    accepted, refused = len(limit.admitted), len(limit.refused_at)
    elapsed = limit.admitted[-1] - min(limit.admitted[0], *limit.refused_at[:1])
    achieved = n / elapsed
    allowed = per_window / window
    assert achieved >= 0.95 * allowed, (achieved, allowed, refused, accepted)
    assert refused <= accepted / 4, (refused, accepted)
    # Repeated 429s are summarised (about one line per window), never one line per answer.
    assert "Orb request failed: HTTP 429" not in result.stderr
    summaries = result.stderr.count("Orb is rate limiting")
    assert 1 <= summaries <= elapsed / window + 2, summaries
