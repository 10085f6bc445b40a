"""Amend (PUT /v1/events/{id}) and deprecate (PUT /v1/events/{id}/deprecate) on the
stand-in, with Orb's rules: same timestamp and customer, an existing customer, an open
billing period, and the per-customer cap."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
import requests

from fake_orb import FakeOrb

from .conftest import NOW, Api, ago, error_type, event, ts

DAY = timedelta(days=1)


def amended(ev: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """An AmendedEvent body for ``ev`` (no idempotency_key), with changes."""
    body = {k: v for k, v in ev.items() if k != "idempotency_key"}
    body.update(changes)
    return body


def amend(api: Api, key: str, body: Any) -> requests.Response:
    return api.put("/events/" + quote(key, safe=""), body)


def deprecate(api: Api, key: str, **kw: Any) -> requests.Response:
    return api.put("/events/" + quote(key, safe="") + "/deprecate", **kw)


@pytest.fixture
def held(orb: FakeOrb, api: Api) -> list[dict[str, Any]]:
    """acct_1 exists; events a, b, c of acct_1 landed an hour ago."""
    orb.add_customer("acct_1")
    evs = [event(k, properties={"n": i}) for i, k in enumerate("abc")]
    assert api.ingest(evs).status_code == 200
    return evs


def test_amend_replaces_the_billed_version_and_keeps_history(
    orb: FakeOrb, api: Api, held: list[dict[str, Any]]
) -> None:
    a = held[0]
    v1 = amended(a, properties={"n": 10})
    resp = amend(api, "a", v1)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"amended": "a"}
    v2 = amended(a, properties={"n": 20}, event_name="api_request_v2")
    assert amend(api, "a", v2).json() == {"amended": "a"}

    assert orb.events()[0] == {"idempotency_key": "a", **v2}  # the latest counts
    assert orb.events()[1:] == held[1:]
    assert orb.amendments("a") == [
        a,
        {"idempotency_key": "a", **v1},
        {"idempotency_key": "a", **v2},
    ]
    assert orb.landed["a"] == a  # the original stays stored
    # Search finds only events that were never amended.
    found = api.search(["a", "b"]).json()["data"]
    assert [e["id"] for e in found] == ["b"]
    corrections = orb.corrections()
    assert [(c["id"], c["deprecated"], len(c["versions"])) for c in corrections] == [("a", None, 3)]


def test_same_instant_and_same_customer_in_other_spellings(
    orb: FakeOrb, api: Api, held: list[dict[str, Any]]
) -> None:
    plus = held[0]["timestamp"].replace("Z", "+00:00")
    assert amend(api, "a", amended(held[0], timestamp=plus)).status_code == 200
    by_id = amended(held[1], customer_id="fake_cus_1")
    del by_id["external_customer_id"]
    assert amend(api, "b", by_id).status_code == 200, "the seeded customer's Orb id is the same"


def test_refusals_in_orbs_order(orb: FakeOrb, api: Api, held: list[dict[str, Any]]) -> None:
    a = held[0]
    resp = amend(api, "zzz", amended(a))
    assert resp.status_code == 404
    assert error_type(resp) == "404-resource-not-found"

    resp = amend(api, "a", amended(a, timestamp=ago(hours=2)))
    assert resp.status_code == 400
    assert error_type(resp) == "400-constraint-violation"
    assert "timestamp must stay" in resp.json()["detail"]

    resp = amend(api, "a", amended(a, external_customer_id="acct_2"))
    assert resp.status_code == 400
    assert "same customer" in resp.json()["detail"]
    assert orb.amendments("a") == [a]


def test_the_customer_must_exist(orb: FakeOrb, api: Api) -> None:
    ev = event("x", external_customer_id="ghost")
    assert api.ingest([ev]).status_code == 200  # ingest does not need the customer
    for resp in (amend(api, "x", amended(ev)), deprecate(api, "x")):
        assert resp.status_code == 400
        assert error_type(resp) == "400-constraint-violation"
        assert "'ghost'" in resp.json()["detail"] and "does not exist" in resp.json()["detail"]
    assert orb.events() == [ev]


def test_closed_billing_period(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("acct_1")
    orb.set_now(NOW - DAY)
    ev = event("old", timestamp=ts(NOW - DAY - timedelta(hours=1)))
    assert api.ingest([ev]).status_code == 200
    orb.set_now(NOW)
    # The period started after the event: previous period, grace (12 h) still running.
    orb.set_billing_period("acct_1", NOW - timedelta(hours=6), NOW + 30 * DAY)
    assert amend(api, "old", amended(ev, properties={"n": 1})).status_code == 200
    # Grace over: the previous period is closed.
    orb.set_billing_period("acct_1", NOW - timedelta(hours=13), NOW + 30 * DAY)
    for resp in (amend(api, "old", amended(ev, properties={"n": 2})), deprecate(api, "old")):
        assert resp.status_code == 400
        assert error_type(resp) == "400-constraint-violation"
        detail = resp.json()["detail"]
        assert "closed" in detail and "credit note" in detail and "acct_1" in detail
    # Older than the previous period: closed at once.
    orb.set_billing_period("acct_1", NOW - timedelta(hours=6), NOW - timedelta(hours=5))
    assert amend(api, "old", amended(ev)).status_code == 400
    orb.set_billing_period("acct_1", None)  # back to the calendar month: January 2030
    assert amend(api, "old", amended(ev, properties={"n": 3})).status_code == 200


def test_default_period_is_the_calendar_month_with_previous_month_grace(
    make_orb: Any,
) -> None:
    start = NOW.replace(month=2, day=1, hour=0)
    orb = make_orb(now=start - timedelta(hours=1))
    orb.add_customer("acct_1")
    with requests.Session() as s:
        s.headers["Authorization"] = "Bearer test-orb-key"
        api = Api(orb, s)
        ev = event("jan", timestamp=ts(start - timedelta(hours=2)))
        assert api.ingest([ev]).status_code == 200
        orb.set_now(start + timedelta(hours=11, minutes=59))
        assert amend(api, "jan", amended(ev, properties={"n": 1})).status_code == 200
        orb.set_now(start + timedelta(hours=12))
        resp = amend(api, "jan", amended(ev, properties={"n": 2}))
        assert resp.status_code == 400
        assert "2030-02-01T12:00:00Z" in resp.json()["detail"]


def test_per_customer_cap(make_orb: Any) -> None:
    orb = make_orb(amend_cap=2)
    orb.add_customer("acct_1")
    orb.add_customer("acct_2")
    orb.set_billing_period("acct_1", NOW - 300 * DAY, NOW + 300 * DAY)
    with requests.Session() as s:
        s.headers["Authorization"] = "Bearer test-orb-key"
        api = Api(orb, s)
        evs = [event(k) for k in "abc"] + [event("d", external_customer_id="acct_2")]
        assert api.ingest(evs).status_code == 200
        assert amend(api, "a", amended(evs[0], properties={"n": 1})).status_code == 200
        assert deprecate(api, "b").status_code == 200
        resp = amend(api, "c", amended(evs[2], properties={"n": 1}))
        assert resp.status_code == 400
        assert error_type(resp) == "400-constraint-violation"
        assert "last 100 days" in resp.json()["detail"]
        assert deprecate(api, "c").status_code == 400
        # An event already counted can be amended again; another customer has its own cap.
        assert amend(api, "a", amended(evs[0], properties={"n": 2})).status_code == 200
        assert deprecate(api, "d").status_code == 200
        orb.advance(100 * 86400)
        assert amend(api, "c", amended(evs[2], properties={"n": 1})).status_code == 200


@pytest.mark.parametrize(
    "change",
    [
        {"idempotency_key": "a"},
        {"properties": {"nested": {"x": 1}}},
        {"properties": {"n": None}},
        {"timestamp": "2030-01-15T06:00:00-05:00"},
        {"customer_id": "fake_cus_1"},  # both customer fields
        {"external_customer_id": None},  # neither
        {"event_name": ""},
        {"extra": 1},
    ],
)
def test_strict_amended_event_validation(
    orb: FakeOrb, api: Api, held: list[dict[str, Any]], change: dict[str, Any]
) -> None:
    resp = amend(api, "a", amended(held[0], **change))
    assert resp.status_code == 400, resp.text
    assert error_type(resp) == "400-request-validation-errors"
    assert orb.amendments("a") == [held[0]]


def test_missing_fields_and_shape(orb: FakeOrb, api: Api, held: list[dict[str, Any]]) -> None:
    body = amended(held[0])
    del body["properties"]
    assert amend(api, "a", body).status_code == 400
    resp = api.put("/events/a", data="{}", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 400
    assert api.put("/events/a", amended(held[0]), params={"x": 1}).status_code == 400
    assert requests.put(f"{orb.url}/events/a", json=amended(held[0]), timeout=5).status_code == 401
    assert error_type(api.put("/events/a/b/c", {})) == "404-url-not-found"


def test_deprecate(orb: FakeOrb, api: Api, held: list[dict[str, Any]]) -> None:
    resp = deprecate(api, "b")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"deprecated": "b"}
    assert [e["idempotency_key"] for e in orb.events()] == ["a", "c"]
    assert orb.landed["b"] == held[1]
    found = api.search(["b"]).json()["data"]
    assert [(e["id"], e["deprecated"]) for e in found] == [("b", True)]
    assert deprecate(api, "b").json() == {"deprecated": "b"}  # a retry is fine
    # A deprecated event cannot be amended, nor its key ingested again, live or backfilled.
    resp = amend(api, "b", amended(held[1]))
    assert resp.status_code == 400 and "deprecated" in resp.json()["detail"]
    resp = api.ingest([held[1]])
    assert resp.status_code == 400
    (item,) = resp.json()["validation_errors"]
    assert item["idempotency_key"] == "b" and "deprecated" in item["validation_errors"][0]
    # (A deprecation_filter lets the backfill's timeframe reach now, past the grace boundary.)
    bf = orb.create_backfill(ts(NOW - 2 * DAY), ts(NOW), deprecation_filter="n = 0")
    resp = api.ingest([held[1]], params={"backfill_id": bf["id"]})
    assert resp.status_code == 400
    assert "deprecated" in resp.json()["validation_errors"][0]["validation_errors"][0]
    assert orb.corrections()[0]["deprecated"] == "api"
    # deprecate takes no body; an empty object is tolerated
    assert deprecate(api, "a", json={"reason": "x"}).status_code == 400
    assert deprecate(api, "a", json={}).status_code == 200
    resp = deprecate(api, "nope")
    assert resp.status_code == 404 and error_type(resp) == "404-resource-not-found"


def test_events_in_a_pending_backfill_cannot_be_corrected(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("acct_1")
    bf = orb.create_backfill(ts(NOW - 2 * DAY), ago(hours=12), replace_existing_events=False)
    ev = event("p", timestamp=ago(hours=20))
    assert api.ingest([ev], params={"backfill_id": bf["id"]}).status_code == 200
    assert amend(api, "p", amended(ev)).status_code == 404
    assert deprecate(api, "p").status_code == 404
    assert api.post(f"/events/backfills/{bf['id']}/close").ok
    assert amend(api, "p", amended(ev, properties={"n": 9})).status_code == 200
    assert orb.events() == [{"idempotency_key": "p", **amended(ev, properties={"n": 9})}]


@pytest.mark.parametrize("key", ["a/b", "a b", "ü?x#1", "100%"])
def test_event_ids_are_url_decoded(orb: FakeOrb, api: Api, key: str) -> None:
    orb.add_customer("acct_1")
    ev = event(key)
    assert api.ingest([ev]).status_code == 200
    resp = amend(api, key, amended(ev, properties={"n": 1}))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"amended": key}
    assert deprecate(api, key).json() == {"deprecated": key}


def test_control_api_shows_corrections(orb: FakeOrb, api: Api, held: list[dict[str, Any]]) -> None:
    amend(api, "a", amended(held[0], properties={"n": 5}))
    deprecate(api, "c")
    with requests.Session() as plain:
        got = plain.get(orb.root_url + "/_fake/corrections", timeout=5).json()
    assert [(c["id"], c["deprecated"], c["versions"][-1]["properties"]) for c in got] == [
        ("a", None, {"n": 5}),
        ("c", "api", {"n": 2}),
    ]
    with requests.Session() as plain:
        resp = plain.post(
            orb.root_url + "/_fake/billing_period",
            json={
                "external_customer_id": "acct_1",
                "start": ts(NOW + DAY),
                "end": ts(NOW + 2 * DAY),
            },
            timeout=5,
        )
    assert resp.status_code == 200
    assert amend(api, "b", amended(held[1])).status_code == 400
