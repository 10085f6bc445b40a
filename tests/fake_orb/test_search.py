"""``POST /v1/events/search`` on the stand-in (EventSearchCriteria, strictly)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import requests

from fake_orb import FakeOrb

from .conftest import NOW, Api, ago, error_type, event, ts


def test_finds_ingested_events_in_orbs_event_shape(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("acct_1")
    a = event("a", timestamp="2030-01-15T11:00:00.500000+00:00", properties={"n": 1.5})
    b = event("b", external_customer_id="acct_2")
    c = event("c", customer_id="cus_x")
    del c["external_customer_id"]
    assert api.ingest([a, b, c]).status_code == 200

    resp = api.search(["a", "b", "c", "missing"])
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "data": [
            {
                "id": "a",
                "customer_id": "fake_cus_1",
                "external_customer_id": "acct_1",
                "event_name": "api_request",
                "properties": {"n": 1.5},
                "timestamp": "2030-01-15T11:00:00.500000Z",
                "deprecated": False,
            },
            {
                "id": "b",
                "customer_id": None,  # no such customer (yet): Orb still keeps the event
                "external_customer_id": "acct_2",
                "event_name": "api_request",
                "properties": {"region": "eu", "bytes": 10},
                "timestamp": ago(hours=1),
                "deprecated": False,
            },
            {
                "id": "c",
                "customer_id": "cus_x",
                "external_customer_id": None,
                "event_name": "api_request",
                "properties": {"region": "eu", "bytes": 10},
                "timestamp": ago(hours=1),
                "deprecated": False,
            },
        ]
    }


def test_no_match_is_empty_data_and_ids_are_case_sensitive(orb: FakeOrb, api: Api) -> None:
    assert api.ingest([event("Key-1")]).status_code == 200
    resp = api.search(["key-1", "KEY-1"])
    assert resp.status_code == 200
    assert resp.json() == {"data": []}
    assert [e["id"] for e in api.search(["Key-1"]).json()["data"]] == ["Key-1"]


def test_default_timeframe_is_the_last_week_of_the_stand_in_clock(
    orb: FakeOrb, api: Api
) -> None:
    assert api.ingest([event("a", timestamp=ago(hours=1))]).status_code == 200
    orb.advance(7 * 86400 - 3601)  # the event is 1 s short of a week old
    assert [e["id"] for e in api.search(["a"]).json()["data"]] == ["a"]
    orb.advance(2)  # now a week and 1 s
    assert api.search(["a"]).json() == {"data": []}
    explicit = api.search(["a"], timeframe_start=ago(days=1))
    assert [e["id"] for e in explicit.json()["data"]] == ["a"]


def test_timeframe_bounds(orb: FakeOrb, api: Api) -> None:
    at = NOW - timedelta(hours=2)
    assert api.ingest([event("a", timestamp=ts(at))]).status_code == 200

    def found(**frame: Any) -> list[str]:
        resp = api.search(["a"], **frame)
        assert resp.status_code == 200, resp.text
        return [e["id"] for e in resp.json()["data"]]

    assert found(timeframe_start=ts(at)) == ["a"]  # start inclusive
    assert found(timeframe_start=ts(at + timedelta(seconds=1))) == []
    assert found(timeframe_start=ts(at - timedelta(hours=1)), timeframe_end=ts(at)) == []
    assert found(timeframe_end=ts(at + timedelta(seconds=1))) == ["a"]
    assert found(timeframe_start=None, timeframe_end=None) == ["a"]  # null = the default
    # Future timestamps (inside the 5-minute tolerance) need an explicit end.
    soon = ts(NOW + timedelta(minutes=2))
    assert api.ingest([event("f", timestamp=soon)]).status_code == 200
    assert api.search(["f"]).json() == {"data": []}
    resp = api.search(["f"], timeframe_end=ts(NOW + timedelta(hours=1)))
    assert [e["id"] for e in resp.json()["data"]] == ["f"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"event_ids": []},
        {"event_ids": [f"k{i}" for i in range(501)]},
        {"event_ids": ["a", 1]},
        {"event_ids": "a"},
        {"event_ids": ["a"], "limit": 10},
        {"event_ids": ["a"], "timeframe_start": "yesterday"},
        {"event_ids": ["a"], "timeframe_start": "2030-01-01T00:00:00"},
        {"event_ids": ["a"], "timeframe_start": ts(NOW), "timeframe_end": ts(NOW)},
        ["a"],
    ],
)
def test_strict_body_validation(orb: FakeOrb, api: Api, body: Any) -> None:
    resp = api.post("/events/search", body)
    assert resp.status_code == 400, resp.text
    assert error_type(resp) == "400-request-validation-errors"
    assert resp.json()["validation_errors"]


def test_500_ids_is_the_maximum(orb: FakeOrb, api: Api) -> None:
    ids = [f"k{i}" for i in range(500)]
    assert api.ingest([event(k) for k in ids[:3]]).status_code == 200
    resp = api.search(ids)
    assert resp.status_code == 200
    assert [e["id"] for e in resp.json()["data"]] == ["k0", "k1", "k2"]


def test_request_shape_and_auth(orb: FakeOrb, api: Api) -> None:
    resp = api.post("/events/search", data="{}", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 400
    resp = api.post("/events/search", {"event_ids": ["a"]}, params={"x": "1"})
    assert resp.status_code == 400
    assert "unknown query parameter" in resp.json()["detail"]
    dup = '{"event_ids": ["a"], "event_ids": ["b"]}'
    resp = api.post("/events/search", data=dup, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    resp = requests.post(f"{orb.url}/events/search", json={"event_ids": ["a"]}, timeout=5)
    assert resp.status_code == 401
    assert api.get("/events/search").status_code == 404  # POST only
