"""Backfills on the stand-in: create/list/fetch/close/revert, ingest with ?backfill_id=,
visibility, replacement, double billing, and the request-level Idempotency-Key."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import requests

from fake_orb import FakeOrb, FakeOrbError

from .conftest import NOW, Api, ago, error_type, event, ts

DAY = timedelta(days=1)
W_START = ts(NOW - 10 * DAY)  # a window well past the 12 h grace period
W_END = ts(NOW - 3 * DAY)


def window(**extra: Any) -> dict[str, Any]:
    return {"timeframe_start": W_START, "timeframe_end": W_END, **extra}


def create(api: Api, **body: Any) -> dict[str, Any]:
    resp = api.create_backfill(**window(**body))
    assert resp.status_code == 200, resp.text
    return resp.json()


def keys(events: list[dict[str, Any]]) -> list[str]:
    return [e["idempotency_key"] for e in events]


# --------------------------------------------------------------------------- create


def test_create_defaults_follow_orb(orb: FakeOrb, api: Api) -> None:
    bf = create(api)
    assert bf == {
        "id": bf["id"],
        "status": "pending",
        "created_at": ts(NOW),
        "timeframe_start": W_START,
        "timeframe_end": W_END,
        "events_ingested": 0,
        "close_time": ts(NOW + DAY),  # Orb: one day after creation
        "reverted_at": None,
        "customer_id": None,
        "replace_existing_events": True,  # Orb's default
        "deprecation_filter": None,
    }
    assert api.get(f"/events/backfills/{bf['id']}").json() == bf
    assert orb.backfill(bf["id"]) == bf
    assert orb.backfills() == [bf]


def test_create_scoped_and_explicit(orb: FakeOrb, api: Api) -> None:
    cust = orb.add_customer("acct_1")
    close = ts(NOW + timedelta(hours=2))
    bf = create(
        api,
        external_customer_id="acct_1",
        replace_existing_events=False,
        close_time=close,
    )
    assert bf["customer_id"] == cust["id"]
    assert bf["replace_existing_events"] is False
    assert bf["close_time"] == close
    by_id = api.create_backfill(
        timeframe_start=W_END, timeframe_end=ts(NOW - DAY), customer_id=cust["id"]
    )
    assert by_id.status_code == 200, by_id.text
    assert by_id.json()["customer_id"] == cust["id"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"timeframe_start": W_START}, "timeframe_end"),
        (window(extra=1), "extra"),
        (window(replace_existing_events="false"), "replace_existing_events"),
        (window(deprecation_filter="n > 1", replace_existing_events=False), "replace"),
        (window(deprecation_filter=" "), "deprecation_filter"),
        ({"timeframe_start": W_END, "timeframe_end": W_START}, "before"),
        ({"timeframe_start": W_START, "timeframe_end": W_START}, "before"),
        (
            {"timeframe_start": ts(NOW - 40 * DAY), "timeframe_end": ts(NOW - 9 * DAY + DAY / 2)},
            "31-day",
        ),
        ({"timeframe_start": "2030-01-01T00:00:00", "timeframe_end": W_END}, "date-time"),
        (window(close_time=ts(NOW - timedelta(seconds=1))), "future"),
        (window(customer_id="c", external_customer_id="acct_1"), "not both"),
    ],
)
def test_create_refusals(orb: FakeOrb, api: Api, body: dict[str, Any], fragment: str) -> None:
    orb.add_customer("acct_1")
    resp = api.post("/events/backfills", body)
    assert resp.status_code == 400, resp.text
    assert error_type(resp) == "400-request-validation-errors"
    assert fragment in resp.text
    assert orb.backfills() == []


def test_31_days_is_the_limit(orb: FakeOrb, api: Api) -> None:
    resp = api.create_backfill(timeframe_start=ts(NOW - 40 * DAY), timeframe_end=ts(NOW - 9 * DAY))
    assert resp.status_code == 200, resp.text


def test_scope_needs_a_known_customer(orb: FakeOrb, api: Api) -> None:
    for field in ("external_customer_id", "customer_id"):
        resp = api.create_backfill(**window(**{field: "nobody"}))
        assert resp.status_code == 404
        assert error_type(resp) == "404-resource-not-found"
        assert "nobody" in resp.json()["detail"]


def test_overlap_with_a_pending_backfill_is_refused_naming_it(orb: FakeOrb, api: Api) -> None:
    first = create(api)
    resp = api.create_backfill(
        timeframe_start=ts(NOW - 4 * DAY), timeframe_end=ts(NOW - 2 * DAY)
    )
    assert resp.status_code == 400
    assert error_type(resp) == "400-constraint-violation"
    detail = resp.json()["detail"]
    assert first["id"] in detail and first["close_time"] in detail
    # Touching windows do not overlap (end is exclusive).
    resp = api.create_backfill(timeframe_start=W_END, timeframe_end=ts(NOW - DAY))
    assert resp.status_code == 200, resp.text
    # An account-wide pending backfill blocks every customer's overlapping backfill.
    orb.add_customer("acct_9")
    resp = api.create_backfill(**window(external_customer_id="acct_9"))
    assert resp.status_code == 400
    assert "account-wide" in resp.json()["detail"]
    # Once reflected (or reverted) it no longer blocks.
    assert api.post(f"/events/backfills/{first['id']}/close").status_code == 200
    assert orb.backfill(first["id"])["status"] == "reflected"
    assert api.create_backfill(**window()).status_code == 200
    with pytest.raises(FakeOrbError, match="overlaps"):
        orb.create_backfill(W_START, W_END)


# --------------------------------------------------------------------------- list / fetch


def test_list_is_newest_first_with_cursor_paging(orb: FakeOrb, api: Api) -> None:
    ids = []
    for i in range(5):
        start = NOW - (30 - i) * DAY
        ids.append(orb.create_backfill(ts(start), ts(start + DAY))["id"])
        orb.advance(1)
    page = api.get("/events/backfills", params={"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["pagination_metadata"] == {"has_more": True, "next_cursor": ids[3]}
    seen = [b["id"] for b in page["data"]]
    cursor = page["pagination_metadata"]["next_cursor"]
    while cursor:
        page = api.get("/events/backfills", params={"limit": 2, "cursor": cursor}).json()
        seen += [b["id"] for b in page["data"]]
        cursor = page["pagination_metadata"]["next_cursor"]
    assert seen == ids[::-1]
    assert page["pagination_metadata"] == {"has_more": False, "next_cursor": None}
    default = api.get("/events/backfills").json()
    assert len(default["data"]) == 5
    pending = api.get("/events/backfills", params={"status": "reflected"}).json()
    assert pending["data"] == []


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"cursor": "nope"}, {"page": 2},
     {"status": "open"}],
)
def test_list_refuses_bad_parameters(orb: FakeOrb, api: Api, params: dict[str, Any]) -> None:
    create(api)
    resp = api.get("/events/backfills", params=params)
    assert resp.status_code == 400
    assert error_type(resp) == "400-request-validation-errors"


def test_fetch_unknown_is_resource_not_found(orb: FakeOrb, api: Api) -> None:
    for resp in (
        api.get("/events/backfills/nope"),
        api.post("/events/backfills/nope/close"),
        api.post("/events/backfills/nope/revert"),
    ):
        assert resp.status_code == 404
        assert error_type(resp) == "404-resource-not-found"
    assert error_type(api.get("/events/backfills/x/y")) == "404-url-not-found"


# --------------------------------------------------------------------------- ingest


def test_backfill_events_are_invisible_until_close(orb: FakeOrb, api: Api) -> None:
    bf = create(api, replace_existing_events=False)
    old = [event(f"o{i}", timestamp=ago(days=5, minutes=i)) for i in range(3)]
    # Too old for live ingest...
    assert api.ingest(old[:1]).status_code == 400
    # ...but a backfill takes them.
    resp = api.ingest(old, params={"backfill_id": bf["id"]})
    assert resp.status_code == 200, resp.text
    assert orb.requests[-1]["backfill_id"] == bf["id"]
    assert orb.backfill(bf["id"])["events_ingested"] == 3
    assert keys(orb.backfill_events(bf["id"])) == ["o0", "o1", "o2"]
    assert orb.events() == [] and orb.landed == {}
    assert api.search(["o0"], timeframe_start=W_START).json() == {"data": []}

    closed = api.post(f"/events/backfills/{bf['id']}/close")
    assert closed.status_code == 200
    # Orb reflects asynchronously: the close answer is still pending, closing now.
    assert closed.json()["status"] == "pending"
    assert closed.json()["close_time"] == ts(NOW)
    assert api.get(f"/events/backfills/{bf['id']}").json()["status"] == "reflected"
    assert keys(orb.events()) == ["o0", "o1", "o2"]
    found = api.search(["o0", "o1", "o2"], timeframe_start=W_START).json()["data"]
    assert [e["id"] for e in found] == ["o0", "o1", "o2"]
    # A reflected backfill takes nothing more.
    resp = api.ingest([event("late", timestamp=ago(days=5))], params={"backfill_id": bf["id"]})
    assert resp.status_code == 400
    assert error_type(resp) == "400-constraint-violation"
    assert "reflected" in resp.json()["detail"]
    resp = api.post(f"/events/backfills/{bf['id']}/close")
    assert resp.status_code == 400


def test_auto_close_at_close_time(orb: FakeOrb, api: Api) -> None:
    bf = create(api)
    assert api.ingest([event("a", timestamp=ago(days=4))], params={"backfill_id": bf["id"]}).ok
    orb.advance(DAY.total_seconds() - 1)
    assert orb.backfill(bf["id"])["status"] == "pending"
    assert orb.events() == []
    orb.advance(1)
    assert orb.backfill(bf["id"])["status"] == "reflected"
    assert keys(orb.events()) == ["a"]
    resp = api.ingest([event("b", timestamp=ago(days=4))], params={"backfill_id": bf["id"]})
    assert resp.status_code == 400


def test_per_event_refusals_name_the_key(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("acct_1")
    bf = create(api, external_customer_id="acct_1")
    batch = [
        event("ok", timestamp=ago(days=5)),
        event("before", timestamp=ts(NOW - 10 * DAY - timedelta(seconds=1))),
        event("at_end", timestamp=W_END),  # end is exclusive
        event("other", timestamp=ago(days=5), external_customer_id="acct_2"),
        event("future", timestamp=ts(NOW + timedelta(minutes=6))),
    ]
    resp = api.ingest(batch, params={"backfill_id": bf["id"]})
    assert resp.status_code == 400
    assert error_type(resp) == "400-request-validation-errors"
    items = resp.json()["validation_errors"]
    errors = {e["idempotency_key"]: e["validation_errors"] for e in items}
    assert set(errors) == {"before", "at_end", "other", "future"}
    assert "outside backfill" in errors["before"][0] and "timeframe" in errors["before"][0]
    assert "scope" in errors["other"][0]
    assert any("future" in e for e in errors["future"])
    assert orb.backfill(bf["id"])["events_ingested"] == 0
    # The valid one alone goes in.
    assert api.ingest(batch[:1], params={"backfill_id": bf["id"]}).status_code == 200


def test_unknown_backfill_id_is_resource_not_found(orb: FakeOrb, api: Api) -> None:
    for value in ("nope", ""):
        resp = api.ingest([event()], params={"backfill_id": value})
        assert resp.status_code == 404
        assert error_type(resp) == "404-resource-not-found"
    assert orb.landed == {}


def test_a_key_is_stored_once_per_backfill(orb: FakeOrb, api: Api) -> None:
    bf = create(api)
    ev = event("a", timestamp=ago(days=5))
    for _ in range(2):
        assert api.ingest([ev], params={"backfill_id": bf["id"]}).status_code == 200
    assert api.ingest([dict(ev, properties={"n": 2})], params={"backfill_id": bf["id"]}).ok
    assert orb.backfill(bf["id"])["events_ingested"] == 1
    assert orb.backfill_events(bf["id"]) == [ev]
    assert orb.stats()["duplicates"] == 2


# --------------------------------------------------------------------------- reflect


def test_non_replacing_backfill_double_bills_a_key_orb_already_has(
    orb: FakeOrb, api: Api
) -> None:
    orb.set_now(NOW - 5 * DAY)  # ingest live, five days ago
    live = event("a", timestamp=ago(days=5, minutes=30))
    assert api.ingest([live]).status_code == 200
    orb.set_now(NOW)
    bf = create(api, replace_existing_events=False)
    again = [live, event("b", timestamp=ago(days=5))]
    assert api.ingest(again, params={"backfill_id": bf["id"]}).status_code == 200
    api.post(f"/events/backfills/{bf['id']}/close")
    assert keys(orb.events()) == ["a", "a", "b"]  # billed twice: the worst case
    assert orb.stats()["double_billed"] == 1
    assert orb.landed == {"a": live, "b": again[1]}


def test_replacing_backfill_deprecates_what_it_replaces(orb: FakeOrb, api: Api) -> None:
    orb.add_customer("acct_1")
    orb.set_now(NOW - 5 * DAY)
    existing = [
        event("in_scope", timestamp=ago(days=5, minutes=30)),
        event("same_key", timestamp=ago(days=5, minutes=20)),
        event("other_cust", timestamp=ago(days=5, minutes=10), external_customer_id="acct_2"),
    ]
    assert api.ingest(existing).status_code == 200
    orb.set_now(NOW - DAY)
    outside = event("outside", timestamp=ago(days=1, hours=2))  # after the window
    assert api.ingest([outside]).status_code == 200
    orb.set_now(NOW)

    bf = create(api, external_customer_id="acct_1")  # replace_existing_events: default true
    new = [
        event("same_key", timestamp=ago(days=5, minutes=20), properties={"n": 2}),
        event("fresh", timestamp=ago(days=4)),
    ]
    assert api.ingest(new, params={"backfill_id": bf["id"]}).status_code == 200
    # Nothing changes before close.
    assert keys(orb.events()) == ["in_scope", "same_key", "other_cust", "outside"]
    api.post(f"/events/backfills/{bf['id']}/close")
    assert orb.events() == [existing[2], outside, *new]
    assert orb.stats()["double_billed"] == 0
    found = api.search(["in_scope", "same_key"], timeframe_start=W_START).json()["data"]
    assert [(e["id"], e["deprecated"]) for e in found] == [
        ("in_scope", True),
        ("same_key", True),
        ("same_key", False),
    ]

    # Revert: the backfill's events go, the replaced ones come back.
    resp = api.post(f"/events/backfills/{bf['id']}/revert")
    assert resp.status_code == 200
    assert resp.json()["status"] == "pending_revert"
    fetched = api.get(f"/events/backfills/{bf['id']}").json()
    assert fetched["status"] == "reverted"
    assert fetched["reverted_at"] == ts(NOW)
    assert orb.events() == [*existing, outside]
    assert api.post(f"/events/backfills/{bf['id']}/revert").status_code == 400


def test_revert_pending_is_immediate_and_nothing_lands(orb: FakeOrb, api: Api) -> None:
    bf = create(api)
    assert api.ingest([event("a", timestamp=ago(days=5))], params={"backfill_id": bf["id"]}).ok
    resp = api.post(f"/events/backfills/{bf['id']}/revert")
    assert resp.status_code == 200
    assert resp.json()["status"] == "reverted"
    orb.advance(2 * DAY.total_seconds())  # past close_time: still nothing
    assert orb.events() == []
    assert orb.backfill(bf["id"])["status"] == "reverted"
    assert api.post(f"/events/backfills/{bf['id']}/close").status_code == 400
    assert api.create_backfill(**window()).status_code == 200  # no longer blocks


def test_close_and_revert_take_no_body(orb: FakeOrb, api: Api) -> None:
    bf = create(api)
    resp = api.post(f"/events/backfills/{bf['id']}/close", {"now": True})
    assert resp.status_code == 400
    assert api.post(f"/events/backfills/{bf['id']}/close", {}).status_code == 200


# --------------------------------------------------------------------------- idempotency


def test_idempotency_key_replays_the_create(orb: FakeOrb, api: Api) -> None:
    hdr = {"Idempotency-Key": "create-1"}
    first = api.post("/events/backfills", window(), headers=hdr)
    again = api.post("/events/backfills", window(), headers=hdr)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(orb.backfills()) == 1
    assert orb.requests[-1]["idempotent_replayed"] is True

    other = api.post("/events/backfills", window(replace_existing_events=False), headers=hdr)
    assert other.status_code == 409
    assert error_type(other) == "409-resource-conflict"
    assert "create-1" in other.json()["detail"]

    orb.advance(48 * 3600)  # the key is forgotten after 48 h: a fresh request
    later = api.post("/events/backfills", window(replace_existing_events=False), headers=hdr)
    assert later.status_code == 200, later.text
    assert "Idempotent-Replayed" not in later.headers
    assert len(orb.backfills()) == 2


def test_idempotency_key_on_ingest_and_refusals(orb: FakeOrb, api: Api) -> None:
    hdr = {"Idempotency-Key": "ingest-1"}
    assert api.ingest([event("a")], headers=hdr).status_code == 200
    replay = api.ingest([event("a")], headers=hdr)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert orb.stats()["duplicates"] == 0  # the replay never reached the event store
    assert api.ingest([event("b")], headers=hdr).status_code == 409
    assert api.ingest([event("c")], headers={"Idempotency-Key": "x" * 65}).status_code == 400
    # A refused request is replayed as refused too; a 5xx is not stored.
    orb.script({"status": 500})
    assert api.ingest([event("d")], headers={"Idempotency-Key": "k5"}).status_code == 500
    assert api.ingest([event("d")], headers={"Idempotency-Key": "k5"}).status_code == 200
    assert set(orb.landed) == {"a", "d"}
    unauth = requests.post(
        f"{orb.url}/events/backfills", json=window(), headers={"Idempotency-Key": "u"}, timeout=5
    )
    assert unauth.status_code == 401


def test_control_api_for_backfills(orb: FakeOrb, api: Api) -> None:
    ctl = orb.root_url + "/_fake/backfills"
    with requests.Session() as plain:
        made = plain.post(ctl, json=window(replace_existing_events=False), timeout=5)
        assert made.status_code == 200, made.text
        bf_id = made.json()["id"]
        assert api.ingest([event("a", timestamp=ago(days=5))], params={"backfill_id": bf_id}).ok
        listed = plain.get(ctl, timeout=5).json()
        assert [(b["id"], b["status"], keys(b["events"])) for b in listed] == [
            (bf_id, "pending", ["a"])
        ]
        refused = plain.post(ctl, json=window(), timeout=5)
        assert refused.status_code == 400
        assert "overlaps" in refused.json()["error"]
