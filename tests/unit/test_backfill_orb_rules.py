"""Backfills as real Orb takes them (issue 15), against the in-memory `ScriptedOrb`.

Each rule comes from Orb's own documents:
- a backfill's `timeframe_end` is at or before now - grace period unless it has a
  `deprecation_filter` (orb-billing 4.90 `events/backfills.py`, create);
- a new backfill cannot be created while another is still pending or being reflected
  (Orb's support pages; the strict mode `ScriptedOrb.one_pending`);
- a closed backfill does not change an issued invoice (Orb's support pages), so events of
  issued periods follow `issued_period_policy`;
- search does not find amended events (orb-billing `events/events.py`, search), so keys
  target-orb delivered are remembered in the store at `state_url`.
"""

from __future__ import annotations

import datetime

import pytest

from target_orb.errors import OrbFatalError
from target_orb.pipeline.stats import RunStats
from target_orb.state.ledger import Ledger
from tests.unit.test_backfill import (
    APRIL,
    MARCH,
    NOW,
    UTC,
    ScriptedOrb,
    billed_twice,
    event,
    load,
    make_manager,
    parse,
)

GRACE = datetime.timedelta(hours=12)
BOUNDARY = NOW - GRACE  # Orb's grace boundary at NOW


def created(orb: ScriptedOrb) -> list[dict]:
    return [c[2] for c in orb.calls_to("POST", "/events/backfills") if c[1] == "/events/backfills"]


# ----------------------------------------------------------------------------- the boundary


def test_a_late_event_of_the_current_month_goes_into_a_backfill_ending_at_the_boundary(tmp_path):
    # The commonest history case: a daily sync carrying yesterday's rows. Before issue 15
    # the window ran to the first of next month and Orb refused the create.
    orb = ScriptedOrb()
    manager = make_manager(orb, tmp_path)
    yesterday = NOW - datetime.timedelta(days=1)
    result = load(manager, [event(1, yesterday), event(2, yesterday - datetime.timedelta(hours=3))])
    manager.finish(failed=False)
    assert result.accepted == 2 and not result.rejected
    (payload,) = created(orb)
    end = parse(payload["timeframe_end"])
    assert end <= BOUNDARY, "never past the grace boundary at the create"
    assert BOUNDARY - end <= datetime.timedelta(minutes=5), "ends at the boundary (less skew)"
    assert payload["timeframe_start"] == "2024-05-01T00:00:00Z"
    assert end.microsecond == 0
    assert set(orb.live) == {"k1", "k2"} and not billed_twice(orb)
    assert not orb.pending()


def test_months_wholly_past_the_boundary_keep_their_stable_calendar_windows(tmp_path):
    orb = ScriptedOrb()
    manager = make_manager(orb, tmp_path)
    load(manager, [event(1, MARCH), event(2, APRIL)])
    manager.finish(failed=False)
    windows = sorted((p["timeframe_start"], p["timeframe_end"]) for p in created(orb))
    assert windows == [
        ("2024-03-01T00:00:00Z", "2024-04-01T00:00:00Z"),
        ("2024-04-01T00:00:00Z", "2024-05-01T00:00:00Z"),
    ]


def test_an_event_newer_than_the_boundary_is_held_until_a_backfill_can_take_it(tmp_path):
    # Late by our clock (older than now - grace) but inside the skew margin: no backfill can
    # hold it yet. It is held (its job waits, so STATE waits) and then loaded, never
    # dead-lettered and never put into a backfill that would refuse it.
    orb = ScriptedOrb()
    stats = RunStats()
    manager = make_manager(orb, tmp_path, stats=stats, orb_clock=True)
    ev = event(1, BOUNDARY - datetime.timedelta(seconds=30))
    result = load(manager, [ev])
    manager.finish(failed=False)
    assert result.accepted == 1 and not result.rejected
    assert stats.late_held == 1
    (payload,) = created(orb)
    assert parse(payload["timeframe_end"]) > parse(ev["timestamp"])
    assert orb.now - NOW <= datetime.timedelta(minutes=3), "held about the skew margin only"
    assert set(orb.live) == {"k1"}


def test_a_window_continues_in_the_next_backfill_when_an_event_is_newer_than_its_end(tmp_path):
    orb = ScriptedOrb()
    manager = make_manager(orb, tmp_path)
    first = event(1, NOW - datetime.timedelta(days=2))
    assert load(manager, [first]).accepted == 1
    (payload,) = created(orb)
    end = parse(payload["timeframe_end"])
    # An hour later the boundary has moved on; an event after the first backfill's end.
    orb.now = NOW + datetime.timedelta(hours=1)
    later = event(2, end + datetime.timedelta(minutes=10))
    assert load(manager, [later]).accepted == 1
    manager.finish(failed=False)
    _first_payload, second_payload = created(orb)
    assert parse(second_payload["timeframe_end"]) > parse(later["timestamp"])
    assert parse(second_payload["timeframe_end"]) <= orb.now - GRACE
    assert set(orb.live) == {"k1", "k2"} and not billed_twice(orb)
    assert not orb.pending()
    rows = manager._stats.backfills
    assert [r["events"] for r in rows] == [1, 1]


def test_an_event_far_newer_than_the_boundary_fails_with_the_clock_named(tmp_path):
    # Orb refused it as too old, but our clock says it is well inside the grace period: a
    # clock or grace-period mismatch a user must fix; nothing is lost (no STATE past it).
    orb = ScriptedOrb()
    manager = make_manager(orb, tmp_path, budget=30.0)
    with pytest.raises(OrbFatalError, match="clock") as info:
        load(manager, [event(1, NOW - datetime.timedelta(hours=1))])
    assert "grace_period_hours" in str(info.value)
    assert not created(orb)


def test_an_event_orb_refuses_live_as_too_old_is_backfilled_past_orbs_own_boundary(tmp_path):
    # The account's grace period (1 h) is shorter than `grace_period_hours` (12): a 3-hour-old
    # event looks live to target-orb and Orb refuses it. Orb's refusal shows its boundary has
    # passed the event, so the backfill ends just after it; nothing is lost or dead-lettered.
    orb = ScriptedOrb()
    orb.grace = datetime.timedelta(hours=1)
    stats = RunStats()
    manager = make_manager(orb, tmp_path, stats=stats, orb_clock=True)
    ev = event(1, NOW - datetime.timedelta(hours=3, minutes=7))
    result = manager.live_job("tracks", [ev], [{"rec": 1}])()
    manager.finish(failed=False)
    assert result.accepted == 1 and not result.rejected
    assert stats.late_rerouted == 1
    (payload,) = created(orb)
    end = parse(payload["timeframe_end"])
    assert parse(ev["timestamp"]) < end <= orb.now - orb.grace
    assert set(orb.live) == {"k1"} and not billed_twice(orb)


# ----------------------------------------------------------------------------- one pending


def test_under_orbs_one_pending_backfill_rule_the_run_closes_its_own_and_goes_on(tmp_path):
    orb = ScriptedOrb()
    orb.one_pending = True
    stats = RunStats()
    manager = make_manager(orb, tmp_path, stats=stats)
    assert load(manager, [event(1, MARCH)]).accepted == 1
    assert load(manager, [event(2, APRIL)]).accepted == 1, "refused create: ours closed, retried"
    # Back to March: April's backfill is closed first (no second refused create needed).
    assert load(manager, [event(3, MARCH + datetime.timedelta(days=1))]).accepted == 1
    manager.finish(failed=False)
    assert set(orb.live) == {"k1", "k2", "k3"} and not billed_twice(orb)
    assert not orb.pending()
    refused = [c for c in orb.calls_to("POST", "/events/backfills") if c[1] == "/events/backfills"]
    assert len(refused) == 4, "3 backfills, one create refused once"
    assert len([r for r in stats.backfills if r["events"]]) == 3


def test_a_foreign_pending_backfill_that_blocks_a_create_stops_the_run_naming_it(tmp_path):
    orb = ScriptedOrb()
    orb.one_pending = True
    foreign = orb.add_backfill(
        datetime.datetime(2024, 1, 1, tzinfo=UTC), datetime.datetime(2024, 1, 20, tzinfo=UTC),
        close_time=NOW + datetime.timedelta(hours=5),
    )
    manager = make_manager(orb, tmp_path)
    with pytest.raises(OrbFatalError, match=foreign) as info:
        load(manager, [event(1, MARCH)])
    assert "did not create" in str(info.value)
    assert orb.backfills[foreign]["status"] == "pending", "another's backfill is never closed"
    assert not orb.live


# ----------------------------------------------------------------------------- issued invoices


def march_invoiced(orb: ScriptedOrb) -> None:
    # Four invoices, one a page; only c1's March invoice is issued and covers March.
    orb.invoice_page = 1
    orb.add_invoice("c4", datetime.datetime(2024, 2, 1, tzinfo=UTC),
                    datetime.datetime(2024, 3, 1, tzinfo=UTC), status="paid")
    orb.add_invoice("c1", datetime.datetime(2024, 3, 1, tzinfo=UTC),
                    datetime.datetime(2024, 4, 1, tzinfo=UTC), number="INV-7")
    orb.add_invoice("c2", datetime.datetime(2024, 3, 1, tzinfo=UTC),
                    datetime.datetime(2024, 4, 1, tzinfo=UTC), status="draft")
    orb.add_invoice("c3", datetime.datetime(2024, 1, 1, tzinfo=UTC),
                    datetime.datetime(2024, 2, 1, tzinfo=UTC))


def test_issued_period_events_are_loaded_and_reported_by_default(tmp_path):
    orb = ScriptedOrb()
    march_invoiced(orb)
    stats = RunStats()
    manager = make_manager(orb, tmp_path, stats=stats)
    events = [event(1, MARCH, "c1"), event(2, MARCH, "c2"), event(3, APRIL, "c1")]
    result = load(manager, events)
    manager.finish(failed=False)
    assert result.accepted == 3 and not result.rejected
    assert set(orb.live) == {"k1", "k2", "k3"}
    rows = stats.as_dict()["issued_periods"]
    assert len(rows) == 1
    (row,) = rows
    assert row["customer"] == "c1" and row["events"] == 1 and row["action"] == "loaded"
    assert "INV-7" in row["invoice"] and row["window"].startswith("2024-03-01")
    summary = stats.summary(dead_letter_path=None, dry_run=False, failed=False)
    assert "customer c1" in summary and "INV-7" in summary
    # Invoices are reads: every page was asked for, with Orb's issued statuses.
    asked = orb.calls_to("GET", "/invoices")
    assert asked and all(c[3]["status[]"] == ["issued", "paid", "synced"] for c in asked)
    assert any(c[3].get("cursor") for c in asked), "paginated"


def test_issued_period_events_are_dead_lettered_naming_the_invoice(tmp_path):
    orb = ScriptedOrb()
    march_invoiced(orb)
    stats = RunStats()
    manager = make_manager(orb, tmp_path, stats=stats, issued_policy="dead_letter")
    result = load(manager, [event(1, MARCH, "c1"), event(2, MARCH, "c2")])
    manager.finish(failed=False)
    assert result.accepted == 1
    (line,) = result.rejected
    assert line["source"] == "orb" and line["event"]["idempotency_key"] == "k1"
    assert "INV-7" in line["reason"] and "issued" in line["reason"]
    assert set(orb.live) == {"k2"}, "the invoiced event is not loaded"
    assert stats.as_dict()["issued_periods"][0]["action"] == "dead-lettered"


def test_issued_period_events_stop_the_run_under_fail(tmp_path):
    orb = ScriptedOrb()
    march_invoiced(orb)
    manager = make_manager(orb, tmp_path, issued_policy="fail")
    with pytest.raises(OrbFatalError, match="INV-7") as info:
        load(manager, [event(1, MARCH, "c1")])
    assert "issued_period_policy" in str(info.value)
    manager.finish(failed=True)
    assert not orb.live


def test_events_already_in_orb_never_count_as_issued_period_events(tmp_path):
    orb = ScriptedOrb()
    march_invoiced(orb)
    orb.live["k1"] = event(1, MARCH, "c1")
    manager = make_manager(orb, tmp_path, issued_policy="fail")
    result = load(manager, [event(1, MARCH, "c1")])  # a replay: nothing to decide
    manager.finish(failed=False)
    assert result.accepted == 0 and not result.rejected


# ----------------------------------------------------------------------------- delivered keys


def test_a_key_target_orb_delivered_is_never_resent_even_when_search_cannot_see_it(tmp_path):
    store = Ledger(f"sqlite:///{tmp_path / 'state.sqlite'}")
    store.open()
    try:
        orb = ScriptedOrb()
        manager = make_manager(orb, tmp_path, ledger=store)
        assert load(manager, [event(1, MARCH), event(2, MARCH)]).accepted == 2
        manager.finish(failed=False)
        # k1 is amended in Orb: search no longer finds it (orb-billing events.py, search).
        del orb.live["k1"]
        stats = RunStats()
        rerun = make_manager(orb, tmp_path, ledger=store, stats=stats)
        result = load(rerun, [event(1, MARCH), event(2, MARCH), event(3, MARCH)])
        rerun.finish(failed=False)
        assert result.accepted == 1
        sent = [
            e["idempotency_key"]
            for c in orb.calls_to("POST", "/ingest") for e in c[2]["events"]
        ]
        assert sent.count("k1") == 1, "the amended key was not sent again"
        assert stats.already_delivered == 2
        searched = [k for c in orb.calls_to("POST", "/events/search") for k in c[2]["event_ids"]]
        assert "k1" not in searched[2:], "keys the store knows are not searched again"
    finally:
        store.close()


def test_keys_delivered_live_are_remembered_too(tmp_path):
    store = Ledger(f"sqlite:///{tmp_path / 'state.sqlite'}")
    store.open()
    try:
        orb = ScriptedOrb()
        manager = make_manager(orb, tmp_path, ledger=store)
        fresh = event(1, NOW - datetime.timedelta(hours=1))
        result = manager.live_job("tracks", [fresh], [{"rec": 1}])()
        assert result.accepted == 1
        known = store.lookup(["k1"])
        assert known["k1"].digest is not None
    finally:
        store.close()
