"""Fixtures for the stand-in Orb's tests: a started FakeOrb with a frozen clock, and an
authorised HTTP session. (test_fake_orb.py keeps fixtures of its own.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests

from fake_orb import FakeOrb

#: Mid-month, so the default billing period (this calendar month) is open around it.
NOW = datetime(2030, 1, 15, 12, 0, 0, tzinfo=timezone.utc)
API_KEY = "test-orb-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(**delta: float) -> str:
    """A `…Z` timestamp this long before NOW."""
    return ts(NOW - timedelta(**delta))


def event(key: str = "k1", **overrides: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "idempotency_key": key,
        "external_customer_id": "acct_1",
        "event_name": "api_request",
        "timestamp": ago(hours=1),
        "properties": {"region": "eu", "bytes": 10},
    }
    ev.update(overrides)
    return ev


def error_type(resp: requests.Response) -> str:
    return resp.json()["type"].rsplit("#", 1)[-1]


class Api:
    """Thin helpers over a requests session for the stand-in's Orb endpoints."""

    def __init__(self, orb: FakeOrb, session: requests.Session) -> None:
        self.orb = orb
        self.s = session

    def post(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 5)
        if body is not None:
            kw["json"] = body
        return self.s.post(self.orb.url + path, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 5)
        if body is not None:
            kw["json"] = body
        return self.s.put(self.orb.url + path, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 5)
        return self.s.get(self.orb.url + path, **kw)

    def ingest(self, events: list[dict[str, Any]], **kw: Any) -> requests.Response:
        return self.post("/ingest", {"events": events}, **kw)

    def search(self, ids: list[str], **extra: Any) -> requests.Response:
        return self.post("/events/search", {"event_ids": ids, **extra})

    def create_backfill(self, **body: Any) -> requests.Response:
        return self.post("/events/backfills", body)


@pytest.fixture
def make_orb(request: pytest.FixtureRequest) -> Callable[..., FakeOrb]:
    def make(now: datetime | None = NOW, **kwargs: Any) -> FakeOrb:
        orb = FakeOrb(**kwargs)
        request.addfinalizer(orb.stop)
        orb.start()
        if now is not None:
            orb.set_now(now)
        return orb

    return make


@pytest.fixture
def orb(make_orb: Callable[..., FakeOrb]) -> FakeOrb:
    return make_orb()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers.update(AUTH)
        yield s


@pytest.fixture
def api(orb: FakeOrb, http: requests.Session) -> Api:
    return Api(orb, http)
