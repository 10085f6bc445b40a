"""Orb's documented backfill, idempotency and rate-limit rules on the stand-in, driven by
Orb's official client (``orb-billing``) wherever the route is Orb's.

Each rule and its Orb source is listed in ``fake_orb/RULES.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import orb as orb_sdk
import pytest
import requests

from fake_orb import FakeOrb, FakeOrbError, RateLimit

from .conftest import API_KEY, AUTH, NOW, Api, ago, error_type, event, ts

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
#: The grace boundary at NOW with the default 12 h grace period.
BOUNDARY = NOW - 12 * HOUR


def sdk(orb: FakeOrb, **kw: Any) -> orb_sdk.Orb:
    kw.setdefault("max_retries", 0)
    return orb_sdk.Orb(api_key=API_KEY, base_url=orb.url, timeout=10, **kw)


@pytest.fixture
def client(orb: FakeOrb) -> Iterator[orb_sdk.Orb]:
    with sdk(orb) as c:
        yield c


def ingest(client: orb_sdk.Orb, key: str, when: Any, backfill_id: str | None = None,
           **extra: Any) -> None:
    ev = {
        "event_name": "api_request",
        "idempotency_key": key,
        "external_customer_id": "acct_1",
        "timestamp": when,
        "properties": {"n": 1},
    }
    ev.update(extra)
    kw = {"backfill_id": backfill_id} if backfill_id else {}
    assert client.events.ingest(events=[ev], **kw).validation_failed == []  # type: ignore[list-item]


# --------------------------------------------------------------------------- grace boundary


def test_timeframe_end_past_the_grace_boundary_is_refused(
    orb: FakeOrb, client: orb_sdk.Orb
) -> None:
    with pytest.raises(orb_sdk.RequestValidationError) as err:
        client.events.backfills.create(
            timeframe_start=NOW - 5 * DAY, timeframe_end=BOUNDARY + timedelta(seconds=1)
        )
    detail = err.value.body["detail"]  # type: ignore[index]
    assert "past the event reporting grace boundary 2030-01-15T00:00:00Z" in detail
    assert "timeframe_end 2030-01-15T00:00:01Z" in detail
    # The commonest history case: this month's window ending at the first of next month.
    with pytest.raises(orb_sdk.RequestValidationError, match="grace boundary"):
        client.events.backfills.create(
            timeframe_start=NOW.replace(day=1, hour=0),
            timeframe_end=NOW.replace(month=2, day=1, hour=0),
        )
    assert orb.backfills() == []
    with pytest.raises(FakeOrbError, match="grace boundary"):
        orb.create_backfill(NOW - DAY, NOW)


def test_timeframe_end_at_the_grace_boundary_is_accepted(
    orb: FakeOrb, client: orb_sdk.Orb
) -> None:
    bf = client.events.backfills.create(
        timeframe_start=NOW.replace(day=1, hour=0), timeframe_end=BOUNDARY,
        replace_existing_events=False,
    )
    assert bf.timeframe_end == BOUNDARY
    ingest(client, "just-old", BOUNDARY - timedelta(seconds=1), bf.id)
    # An event at the boundary is still live: live ingest takes it.
    ingest(client, "live", BOUNDARY)


def test_grace_period_is_one_setting_for_ingest_and_backfills(
    make_orb: Callable[..., FakeOrb],
) -> None:
    orb = make_orb(grace_period_hours=1)
    api = Api(orb, requests.Session())
    api.s.headers.update(AUTH)
    assert orb.settings()["grace_boundary"] == ts(NOW - HOUR)
    assert api.ingest([event("a", timestamp=ago(minutes=59))]).status_code == 200
    assert api.ingest([event("b", timestamp=ago(minutes=61))]).status_code == 400
    assert api.create_backfill(timeframe_start=ago(days=1), timeframe_end=ago(hours=1)).ok
    # Changed while running: by configure() ...
    orb.configure(grace_period_hours=48)
    assert api.ingest([event("c", timestamp=ago(hours=47))]).status_code == 200
    resp = api.create_backfill(timeframe_start=ago(days=4), timeframe_end=ago(days=2, hours=-1))
    assert resp.status_code == 400 and "2030-01-13T12:00:00Z" in resp.json()["detail"]
    # ... and by the control API.
    with requests.Session() as plain:
        got = plain.post(orb.root_url + "/_fake/settings", json={"grace_period_hours": 6},
                         timeout=5)
        assert got.status_code == 200, got.text
        assert got.json()["grace_boundary"] == ts(NOW - 6 * HOUR)
        assert plain.get(orb.root_url + "/_fake/settings", timeout=5).json()[
            "grace_period_hours"
        ] == 6
        bad = plain.post(orb.root_url + "/_fake/settings", json={"grace_period_hours": -1},
                         timeout=5)
        assert bad.status_code == 400
    assert orb.grace_period_hours == 6
    resp = api.create_backfill(timeframe_start=ago(days=3), timeframe_end=ago(hours=5))
    assert resp.status_code == 400 and ts(NOW - 6 * HOUR) in resp.json()["detail"]
    api.s.close()


# --------------------------------------------------------------------------- deprecation_filter


def test_deprecation_filter_is_accepted_and_may_reach_now(
    orb: FakeOrb, client: orb_sdk.Orb
) -> None:
    bf = client.events.backfills.create(
        timeframe_start=NOW - 2 * DAY, timeframe_end=NOW, deprecation_filter="region = 'eu'"
    )
    assert bf.deprecation_filter == "region = 'eu'"
    assert bf.replace_existing_events is True
    assert client.events.backfills.fetch(bf.id).deprecation_filter == "region = 'eu'"
    assert orb.backfill(bf.id)["deprecation_filter"] == "region = 'eu'"
    # Not past now, though.
    client.events.backfills.revert(bf.id)
    with pytest.raises(orb_sdk.RequestValidationError, match="may extend to now"):
        client.events.backfills.create(
            timeframe_start=NOW - DAY, timeframe_end=NOW + HOUR, deprecation_filter="n > 1"
        )
    # Only on a replacing backfill (Orb documents it for replace_existing_events true).
    with pytest.raises(orb_sdk.RequestValidationError, match="replace_existing_events"):
        client.events.backfills.create(
            timeframe_start=NOW - 3 * DAY, timeframe_end=NOW - 2 * DAY,
            deprecation_filter="n > 1", replace_existing_events=False,
        )


def test_deprecation_filter_narrows_what_a_replacing_backfill_deprecates(
    orb: FakeOrb, client: orb_sdk.Orb
) -> None:
    orb.set_now(NOW - 3 * HOUR)
    ingest(client, "eu-old", NOW - 4 * HOUR, properties={"region": "eu", "n": 1})
    ingest(client, "us-old", NOW - 4 * HOUR, properties={"region": "us", "n": 1})
    ingest(client, "no-region", NOW - 4 * HOUR, properties={"n": 1})
    orb.set_now(NOW)
    bf = client.events.backfills.create(
        timeframe_start=NOW - DAY, timeframe_end=NOW, deprecation_filter="region = 'eu'"
    )
    ingest(client, "eu-new", NOW - 4 * HOUR, bf.id, properties={"region": "eu", "n": 2})
    client.events.backfills.close(bf.id)
    assert client.events.backfills.fetch(bf.id).status == "reflected"
    billed = {e["idempotency_key"] for e in orb.events()}
    assert billed == {"us-old", "no-region", "eu-new"}
    # "Matching events that arrive later with timestamps inside the timeframe will also be
    # deprecated."
    ingest(client, "eu-late", NOW - HOUR, properties={"region": "eu", "n": 3})
    ingest(client, "us-late", NOW - HOUR, properties={"region": "us", "n": 3})
    billed = {e["idempotency_key"] for e in orb.events()}
    assert billed == {"us-old", "no-region", "eu-new", "us-late"}
    found = client.events.search(event_ids=["eu-late"], timeframe_start=NOW - DAY).data
    assert [(e.id, e.deprecated) for e in found] == [("eu-late", True)]
    # Revert brings them all back and takes the backfill's own out.
    client.events.backfills.revert(bf.id)
    assert client.events.backfills.fetch(bf.id).status == "reverted"
    billed = {e["idempotency_key"] for e in orb.events()}
    assert billed == {"eu-old", "us-old", "no-region", "eu-late", "us-late"}
    assert orb.stats()["unevaluated_deprecation_filters"] == 0


def test_a_filter_the_stand_in_cannot_read_is_stored_and_deprecates_all(
    orb: FakeOrb, api: Api
) -> None:
    assert api.ingest([event("a", timestamp=ago(hours=2))]).ok
    resp = api.create_backfill(
        timeframe_start=ago(days=1), timeframe_end=ts(NOW), deprecation_filter="lower(x) = 'y'"
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["deprecation_filter"] == "lower(x) = 'y'"
    assert orb.stats()["unevaluated_deprecation_filters"] == 1
    api.post(f"/events/backfills/{resp.json()['id']}/close")
    assert orb.events() == []


# --------------------------------------------------------------------------- overlap


def test_backfills_of_different_customers_may_overlap(orb: FakeOrb, client: orb_sdk.Orb) -> None:
    orb.add_customer("acct_1")
    orb.add_customer("acct_2")
    window = {"timeframe_start": NOW - 10 * DAY, "timeframe_end": NOW - 3 * DAY}
    one = client.events.backfills.create(**window, external_customer_id="acct_1")
    two = client.events.backfills.create(**window, external_customer_id="acct_2")
    assert {one.customer_id, two.customer_id} == {"fake_cus_1", "fake_cus_2"}
    # The same customer again (by either id) overlaps its own pending backfill.
    with pytest.raises(orb_sdk.ConstraintViolation, match=one.id):
        client.events.backfills.create(
            timeframe_start=NOW - 5 * DAY, timeframe_end=NOW - 4 * DAY, customer_id="fake_cus_1"
        )
    # An account-wide backfill overlaps every customer's.
    with pytest.raises(orb_sdk.ConstraintViolation, match="overlaps backfill"):
        client.events.backfills.create(timeframe_start=NOW - 5 * DAY, timeframe_end=NOW - 4 * DAY)
    # Not overlapping in time: fine for anyone.
    wide = client.events.backfills.create(
        timeframe_start=NOW - 20 * DAY, timeframe_end=NOW - 10 * DAY
    )
    assert wide.customer_id is None
    with pytest.raises(orb_sdk.ConstraintViolation, match=wide.id) as err:
        client.events.backfills.create(
            timeframe_start=NOW - 15 * DAY, timeframe_end=NOW - 14 * DAY,
            external_customer_id="acct_2",
        )
    assert "account-wide" in err.value.body["detail"]  # type: ignore[index]
    assert len(orb.backfills()) == 3


def test_one_pending_backfill_mode_refuses_any_create_naming_the_blocker(
    make_orb: Callable[..., FakeOrb],
) -> None:
    orb = make_orb(one_pending_backfill=True)
    orb.add_customer("acct_1")
    orb.add_customer("acct_2")
    with sdk(orb) as client:
        first = client.events.backfills.create(
            timeframe_start=NOW - 10 * DAY, timeframe_end=NOW - 9 * DAY,
            external_customer_id="acct_1",
        )
        # Another customer, another month: still refused while the first is pending.
        with pytest.raises(orb_sdk.ConstraintViolation) as err:
            client.events.backfills.create(
                timeframe_start=NOW - 40 * DAY, timeframe_end=NOW - 35 * DAY,
                external_customer_id="acct_2",
            )
        assert err.value.status_code == 400
        body = err.value.body
        assert isinstance(body, dict)
        assert body["type"].endswith("#400-constraint-violation")
        assert body["detail"].startswith(f"Backfill {first.id} (")
        assert "one pending backfill per account" in body["detail"]
        # The blocker is also what a client finds by listing pending backfills.
        assert [b.id for b in client.events.backfills.list(status="pending")] == [first.id]
        client.events.backfills.close(first.id)
        assert client.events.backfills.fetch(first.id).status == "reflected"
        second = client.events.backfills.create(
            timeframe_start=NOW - 40 * DAY, timeframe_end=NOW - 35 * DAY,
            external_customer_id="acct_2",
        )
        # pending_revert blocks too (the stand-in finishes a revert by the next request).
        client.events.backfills.close(second.id)
        assert client.events.backfills.revert(second.id).status == "pending_revert"
    assert orb.settings()["one_pending_backfill"] is True


def test_one_pending_backfill_mode_can_be_switched_on_and_off(orb: FakeOrb, api: Api) -> None:
    assert api.create_backfill(timeframe_start=ago(days=10), timeframe_end=ago(days=9)).ok
    with requests.Session() as plain:
        resp = plain.post(orb.root_url + "/_fake/settings", json={"one_pending_backfill": True},
                          timeout=5)
        assert resp.json()["one_pending_backfill"] is True
    refused = api.create_backfill(timeframe_start=ago(days=30), timeframe_end=ago(days=29))
    assert refused.status_code == 400
    assert error_type(refused) == "400-constraint-violation"
    assert "fake_bf_1" in refused.json()["detail"]
    orb.configure(one_pending_backfill=False)
    assert api.create_backfill(timeframe_start=ago(days=30), timeframe_end=ago(days=29)).ok


def test_a_closed_backfill_can_take_requests_to_reflect(
    make_orb: Callable[..., FakeOrb],
) -> None:
    orb = make_orb(one_pending_backfill=True, reflection_delay_requests=2)
    with sdk(orb) as client:
        bf = client.events.backfills.create(
            timeframe_start=NOW - 10 * DAY, timeframe_end=NOW - 9 * DAY
        )
        assert client.events.backfills.close(bf.id).status == "pending"
        assert client.events.backfills.fetch(bf.id).status == "pending"  # being reflected
        with pytest.raises(orb_sdk.ConstraintViolation, match=bf.id):
            client.events.backfills.create(
                timeframe_start=NOW - 30 * DAY, timeframe_end=NOW - 29 * DAY
            )
        assert client.events.backfills.fetch(bf.id).status == "reflected"
        client.events.backfills.create(timeframe_start=NOW - 30 * DAY, timeframe_end=NOW - 29 * DAY)


# --------------------------------------------------------------------------- idempotency


def test_put_ignores_the_idempotency_key(orb: FakeOrb, client: orb_sdk.Orb) -> None:
    orb.add_customer("acct_1")
    when = NOW - HOUR
    ingest(client, "e1", when)
    for n in (2, 3):  # the same key on two different amendments: both applied, no 409
        raw = client.events.with_raw_response.update(
            "e1", event_name="api_request", properties={"n": n}, timestamp=when,
            external_customer_id="acct_1", idempotency_key="same-put",
        )
        assert raw.status_code == 200
        assert "Idempotent-Replayed" not in raw.headers
    assert orb.events()[0]["properties"] == {"n": 3}
    assert len(orb.amendments("e1")) == 3
    # A key Orb would refuse on POST (too long) is ignored on PUT too.
    raw = client.customers.with_raw_response.update_by_external_id(
        "acct_1", metadata={"a": "1"}, idempotency_key="x" * 65
    )
    assert raw.status_code == 200
    # POST still replays.
    first = client.events.with_raw_response.search(event_ids=["e1"], idempotency_key="p1")
    again = client.events.with_raw_response.search(event_ids=["e1"], idempotency_key="p1")
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"


def test_transient_5xx_answers_say_so(orb: FakeOrb, api: Api) -> None:
    orb.script({"status": 503}, {"status": 500, "headers": {"Transient-Error": "false"}})
    resp = api.ingest([event()])
    assert resp.status_code == 503 and resp.headers["Transient-Error"] == "true"
    resp = api.ingest([event()])
    assert resp.status_code == 500 and resp.headers["Transient-Error"] == "false"
    ok = api.ingest([event()])
    assert ok.status_code == 200 and "Transient-Error" not in ok.headers
    orb.script({"status": 429})
    limited = api.ingest([event()])
    assert "Transient-Error" not in limited.headers
    # Orb documents no x-should-retry (the official client would obey one): none is sent.
    assert "x-should-retry" not in limited.headers and "x-should-retry" not in resp.headers


# --------------------------------------------------------------------------- rate limits


def test_ingest_budget_counts_events_and_requests(make_orb: Callable[..., FakeOrb]) -> None:
    clock = [60.0]
    limit = RateLimit(events_per_window=3, window_seconds=60, requests_per_second=2,
                      clock=lambda: clock[0])
    orb = make_orb(rate_limit=limit)
    api = Api(orb, requests.Session())
    api.s.headers.update(AUTH)
    assert api.ingest([event("a"), event("b")]).status_code == 200
    over = api.ingest([event("c"), event("d")])  # 4 events > 3 in this window
    assert over.status_code == 429 and error_type(over) == "429-too-many-requests"
    assert "Retry-After" not in over.headers
    assert api.ingest([event("c")]).status_code == 200
    clock[0] += 60
    assert api.ingest([event("d")]).status_code == 200
    assert api.ingest([event("e")]).status_code == 200
    assert api.ingest([event("f")]).status_code == 429  # a third request in this second
    assert limit.refused == 2
    assert set(orb.landed) == {"a", "b", "c", "d", "e"}
    api.s.close()


def test_write_budget_429_for_search(make_orb: Callable[..., FakeOrb]) -> None:
    clock = [1000.0]
    limit = RateLimit(writes_per_second=2, clock=lambda: clock[0])
    orb = make_orb(rate_limit=limit)
    with sdk(orb) as client:
        client.events.search(event_ids=["a"])
        client.events.backfills.create(timeframe_start=NOW - 10 * DAY, timeframe_end=NOW - 9 * DAY)
        with pytest.raises(orb_sdk.RateLimitError) as err:
            client.events.search(event_ids=["a"])
        assert err.value.status_code == 429
        body = err.value.body
        assert isinstance(body, dict)
        assert body["type"].endswith("#429-too-many-requests")
        assert body["detail"] == (
            "Rate limit exceeded: at most 2 write requests (POST/PUT/PATCH/DELETE other than "
            "ingest) per second"
        )
        assert "retry-after" not in err.value.response.headers
        # Ingest has its own budget; reads are not writes.
        ingest(client, "live", NOW - HOUR)
        assert client.top_level.ping().response == "pong"
        assert client.events.backfills.list().data
        with pytest.raises(orb_sdk.RateLimitError):
            client.customers.update_by_external_id("acct_1", metadata={})
        clock[0] += 1  # the next fixed window
        client.events.search(event_ids=["a"])
    assert limit.refused_writes == 2
    assert orb.requests[-2]["rate_limited"] is True


def test_read_budget_429_and_off_by_default(make_orb: Callable[..., FakeOrb]) -> None:
    clock = [5.0]
    orb = make_orb()
    assert orb.settings()["rate_limit"] is None
    with sdk(orb) as client:
        for _ in range(20):
            client.events.search(event_ids=["a"])
            client.events.backfills.list()
        orb.configure(rate_limit=RateLimit(reads_per_second=1, clock=lambda: clock[0]))
        client.events.backfills.list()
        with pytest.raises(orb_sdk.RateLimitError, match="read requests"):
            client.invoices.list()
        client.events.search(event_ids=["a"])  # writes are not limited here
    with requests.Session() as plain:
        resp = plain.post(
            orb.root_url + "/_fake/settings",
            json={"rate_limit": {"writes_per_second": 0}},
            timeout=5,
        )
        assert resp.json()["rate_limit"]["writes_per_second"] == 0
        assert plain.post(orb.url + "/events/search", json={"event_ids": ["a"]}, headers=AUTH,
                          timeout=5).status_code == 429
        plain.post(orb.root_url + "/_fake/settings", json={"rate_limit": None}, timeout=5)
        assert plain.post(orb.url + "/events/search", json={"event_ids": ["a"]}, headers=AUTH,
                          timeout=5).status_code == 200
