"""Orb's official Python client (``orb-billing``) against the stand-in.

The stand-in must answer Orb's own client as Orb does, so it stays usable as a local
Orb by anyone: ping, ingest (the client sends timestamps as ``…+00:00``), search,
backfills, customers, amend and deprecate, and the client's typed errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import orb as orb_sdk
import pytest

from fake_orb import FakeOrb

from .conftest import API_KEY, NOW

DAY = timedelta(days=1)


@pytest.fixture
def client(orb: FakeOrb) -> Iterator[orb_sdk.Orb]:
    with orb_sdk.Orb(api_key=API_KEY, base_url=orb.url, max_retries=0, timeout=10) as c:
        yield c


def test_ping_and_ingest(orb: FakeOrb, client: orb_sdk.Orb) -> None:
    assert client.top_level.ping().response == "pong"
    when = NOW - timedelta(minutes=5)
    resp = client.events.ingest(
        events=[
            {
                "event_name": "api_request",
                "idempotency_key": "sdk-1",
                "external_customer_id": "acct_1",
                "timestamp": when,  # a datetime: the client sends when.isoformat()
                "properties": {"tokens": 3, "region": "eu"},
            }
        ]
    )
    assert resp.validation_failed == []
    assert orb.landed["sdk-1"]["timestamp"] == "2030-01-15T11:55:00+00:00"
    # The client sends an Idempotency-Key of its own on every POST.
    assert orb.requests[-1]["idempotency_header"].startswith("stainless-python-retry-")

    with pytest.raises(orb_sdk.RequestValidationError) as err:
        client.events.ingest(
            events=[
                {
                    "event_name": "api_request",
                    "idempotency_key": "sdk-old",
                    "external_customer_id": "acct_1",
                    "timestamp": NOW - 2 * DAY,
                    "properties": {},
                }
            ]
        )
    assert "grace period" in str(err.value.validation_errors)


def test_search(orb: FakeOrb, client: orb_sdk.Orb) -> None:
    orb.add_customer("acct_1")
    client.events.ingest(
        events=[
            {
                "event_name": "api_request",
                "idempotency_key": key,
                "external_customer_id": "acct_1",
                "timestamp": NOW - timedelta(hours=1),
                "properties": {"n": 1},
            }
            for key in ("s1", "s2")
        ]
    )
    found = client.events.search(event_ids=["s1", "s2", "nope"], timeframe_start=NOW - DAY)
    assert [e.id for e in found.data] == ["s1", "s2"]
    first = found.data[0]
    assert first.customer_id == "fake_cus_1"
    assert first.external_customer_id == "acct_1"
    assert first.timestamp == NOW - timedelta(hours=1)
    assert first.deprecated is False
    assert client.events.search(event_ids=["nope"]).data == []


def test_backfills(orb: FakeOrb, client: orb_sdk.Orb) -> None:
    bf = client.events.backfills.create(
        timeframe_start=NOW - 10 * DAY,
        timeframe_end=NOW - 3 * DAY,
        replace_existing_events=False,
        close_time=NOW + timedelta(hours=1),
    )
    assert bf.status == "pending"
    assert bf.timeframe_start == NOW - 10 * DAY
    assert bf.replace_existing_events is False
    resp = client.events.ingest(
        backfill_id=bf.id,
        events=[
            {
                "event_name": "api_request",
                "idempotency_key": "old-1",
                "external_customer_id": "acct_1",
                "timestamp": NOW - 5 * DAY,
                "properties": {"n": 1},
            }
        ],
    )
    assert resp.validation_failed == []
    assert client.events.backfills.fetch(bf.id).events_ingested == 1
    assert orb.events() == []

    with pytest.raises(orb_sdk.ConstraintViolation, match=bf.id):
        client.events.backfills.create(timeframe_start=NOW - 5 * DAY, timeframe_end=NOW - 4 * DAY)

    closed = client.events.backfills.close(bf.id)
    assert closed.close_time == NOW
    assert client.events.backfills.fetch(bf.id).status == "reflected"
    assert [e["idempotency_key"] for e in orb.events()] == ["old-1"]

    second = client.events.backfills.create(
        timeframe_start=NOW - 20 * DAY, timeframe_end=NOW - 15 * DAY
    )
    listed = client.events.backfills.list(limit=1)
    assert [b.id for b in listed.data] == [second.id]
    assert [b.id for b in listed] == [second.id, bf.id]  # the client pages with next_cursor
    assert client.events.backfills.revert(second.id).status == "reverted"
    assert client.events.backfills.revert(bf.id).status == "pending_revert"
    assert client.events.backfills.fetch(bf.id).status == "reverted"
    assert orb.events() == []

    with pytest.raises(orb_sdk.ResourceNotFound):
        client.events.backfills.fetch("nope")


def test_customers(orb: FakeOrb, client: orb_sdk.Orb) -> None:
    orb.add_customer("en/cus/?1500", {"plan": "pro"})
    updated = client.customers.update_by_external_id(
        "en/cus/?1500", metadata={"audience_a": "true", "plan": None}
    )
    assert updated.metadata == {"audience_a": "true"}
    fetched = client.customers.fetch_by_external_id("en/cus/?1500")
    assert fetched.id == "fake_cus_1"
    assert fetched.external_customer_id == "en/cus/?1500"
    assert fetched.metadata == {"audience_a": "true"}
    assert orb.customer_updates()[0]["body"] == {"metadata": {"audience_a": "true", "plan": None}}
    with pytest.raises(orb_sdk.ResourceNotFound):
        client.customers.fetch_by_external_id("ghost")
    with pytest.raises(orb_sdk.ResourceNotFound):
        client.customers.update_by_external_id("ghost", metadata={"a": "b"})


def test_amend_and_deprecate(orb: FakeOrb, client: orb_sdk.Orb) -> None:
    orb.add_customer("acct_1")
    when = NOW - timedelta(hours=1)
    client.events.ingest(
        events=[
            {
                "event_name": "api_request",
                "idempotency_key": key,
                "external_customer_id": "acct_1",
                "timestamp": when,
                "properties": {"n": 1},
            }
            for key in ("e1", "e2")
        ]
    )
    resp = client.events.update(
        "e1",
        event_name="api_request",
        properties={"n": 5},
        timestamp=when,
        external_customer_id="acct_1",
    )
    assert resp.amended == "e1"
    assert client.events.deprecate("e2").deprecated == "e2"
    assert orb.events() == [
        {
            "idempotency_key": "e1",
            "event_name": "api_request",
            "properties": {"n": 5},
            "timestamp": "2030-01-15T11:00:00+00:00",
            "external_customer_id": "acct_1",
        }
    ]
    assert client.events.search(event_ids=["e1", "e2"]).data[0].deprecated is True

    with pytest.raises(orb_sdk.ConstraintViolation, match="timestamp must stay"):
        client.events.update(
            "e1",
            event_name="api_request",
            properties={"n": 6},
            timestamp=when - timedelta(minutes=1),
            external_customer_id="acct_1",
        )
    with pytest.raises(orb_sdk.ResourceNotFound):
        client.events.deprecate("nope")


def test_a_replayed_client_request_gets_the_stored_answer(
    orb: FakeOrb, client: orb_sdk.Orb
) -> None:
    body = {"timeframe_start": NOW - 10 * DAY, "timeframe_end": NOW - 3 * DAY}
    first = client.events.backfills.with_raw_response.create(**body, idempotency_key="same")
    again = client.events.backfills.with_raw_response.create(**body, idempotency_key="same")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.parse().id == first.parse().id
    assert len(orb.backfills()) == 1
    with pytest.raises(orb_sdk.ResourceConflict):
        client.events.backfills.create(
            timeframe_start=NOW - 20 * DAY, timeframe_end=NOW - 15 * DAY, idempotency_key="same"
        )
