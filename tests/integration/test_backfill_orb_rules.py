"""Issue 15 over real sockets: the installed `target-orb` against the stand-in enforcing Orb's
documented backfill rules (grace boundary for `timeframe_end`, the per-customer overlap rule
or the stricter one-pending-backfill rule, issued invoices), see target_orb/RULES.md.

Every test checks what Orb bills (`FakeOrb.events()`), `stats()["double_billed"]`, the exit
code and the STATE lines.
"""

from __future__ import annotations

import datetime
import json
import typing as t

import pytest
import requests

from fake_orb import FakeOrb
from tests.conftest import API_KEY, assert_no_secret, run_target, singer_lines, track
from tests.integration.test_backfill import (
    DAY,
    UTC,
    ago,
    assert_backfills_sound,
    backfill_config,
    billed,
    history,
    live_ingested_keys,
    parse,
)

HOUR = datetime.timedelta(hours=1)


def metrics_of(stderr: str) -> dict[str, t.Any]:
    return json.loads(stderr.split("target-orb metrics: ")[1].splitlines()[0])


@pytest.fixture
def strict_orb() -> t.Iterator[FakeOrb]:
    """Orb's stricter rule: one pending backfill per account, reflection taking a while."""
    fake = FakeOrb(api_key=API_KEY, one_pending_backfill=True, reflection_delay_requests=2)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def test_late_events_of_this_month_and_both_sides_of_the_boundary_land_once(orb, tmp_path):
    # Yesterday's rows (the daily-sync case), rows just past and just inside the grace
    # boundary, and fresh rows. Before issue 15 this month's backfill ended on the first of
    # next month and Orb refused it: the run failed, and every rerun.
    minute = datetime.timedelta(minutes=1)
    records = [
        track(1, timestamp=ago(DAY)),
        track(2, timestamp=ago(DAY + 3 * HOUR)),
        track(3, timestamp=ago(12 * HOUR + 5 * minute)),  # late, past the backfill boundary
        # Past the boundary by 30 s only (the skew zone, where an event waits up to 2 min for
        # the boundary to pass it, is covered with a fake clock in tests/unit).
        track(4, timestamp=ago(12 * HOUR + 2 * minute + 30 * datetime.timedelta(seconds=1))),
        track(5, timestamp=ago(12 * HOUR - 10 * minute)),  # inside the grace period: live
        track(6),
    ]
    result = run_target(backfill_config(orb, tmp_path), singer_lines(records), tmp_path,
                        timeout=300)
    assert result.returncode == 0, result.stderr
    assert billed(orb) == {f"m{i}": 1 for i in range(1, 7)}
    assert orb.stats()["double_billed"] == 0
    assert live_ingested_keys(orb) == {"m5", "m6"}, "late events never go live"
    backfills = assert_backfills_sound(orb)
    grace = datetime.timedelta(hours=orb.grace_period_hours)
    for bf in backfills:
        assert parse(bf["timeframe_end"]) <= parse(bf["created_at"]) - grace
    assert result.dead_letters == []
    assert [s["bookmarks"]["tracks"]["seq"] for s in result.states][-1] == 6
    assert "Traceback" not in result.stderr


def settle(orb: FakeOrb, requests_needed: int = 3) -> None:
    """Orb reflects a closed backfill asynchronously (here: a few API requests later)."""
    for _ in range(requests_needed):
        requests.get(f"{orb.url}/events/backfills", timeout=5,
                     headers={"Authorization": f"Bearer {API_KEY}"}).raise_for_status()


def test_forty_days_under_the_one_pending_backfill_rule_land_once(strict_orb, tmp_path):
    orb = strict_orb
    records = history(40)
    # Unsorted input: months alternate, so the run meets its own pending backfill again.
    records = records[::2] + records[1::2]
    result = run_target(backfill_config(orb, tmp_path), singer_lines(records), tmp_path,
                        timeout=300)
    assert result.returncode == 0, result.stderr
    settle(orb)
    assert set(billed(orb).values()) == {1} and len(billed(orb)) == len(records)
    assert orb.stats()["double_billed"] == 0
    backfills = assert_backfills_sound(orb)
    assert len(backfills) >= 2
    assert "one backfill pending at a time" in result.stderr
    assert [s["bookmarks"]["tracks"]["seq"] for s in result.states][-1] == len(records)
    rerun = run_target(backfill_config(orb, tmp_path), singer_lines(records), tmp_path / "2")
    assert rerun.returncode == 0, rerun.stderr
    settle(orb)
    assert orb.backfills() == backfills and orb.stats()["double_billed"] == 0


def invoiced_history(orb: FakeOrb) -> tuple[list[dict], set[str]]:
    """Rows of last month (cust_1's invoice for it is issued) and of this month."""
    now = datetime.datetime.now(UTC)
    this_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_month = (this_month - DAY).replace(day=1)
    orb.add_invoice("cust_1", last_month, this_month, status="issued")
    orb.add_invoice("cust_2", last_month, this_month, status="draft")
    when = (last_month + 3 * DAY).strftime("%Y-%m-%dT%H:%M:%SZ")
    records = [track(n, timestamp=when) for n in range(1, 7)]  # cust_1: m1, m4
    records.append(track(7, timestamp=ago(40 * DAY)))  # older: no invoice of ours covers it
    return records, {"m1", "m4"}


def test_issued_invoice_events_are_loaded_and_reported_by_default(orb, tmp_path):
    records, invoiced = invoiced_history(orb)
    result = run_target(backfill_config(orb, tmp_path), singer_lines(records), tmp_path)
    assert result.returncode == 0, result.stderr
    assert set(billed(orb)) == {r["messageId"] for r in records}
    rows = metrics_of(result.stderr)["issued_periods"]
    assert [(r["customer"], r["events"], r["action"]) for r in rows] == [("cust_1", 2, "loaded")]
    assert "already issued" in result.stderr and "cust_1" in result.stderr
    assert orb.stats()["events_in_issued_periods"] == len(invoiced)


def test_issued_invoice_events_are_dead_lettered_naming_the_invoice(orb, tmp_path):
    records, invoiced = invoiced_history(orb)
    config = backfill_config(orb, tmp_path, issued_period_policy="dead_letter")
    result = run_target(config, singer_lines(records), tmp_path)
    assert result.returncode == 0, result.stderr
    assert set(billed(orb)) == {r["messageId"] for r in records} - invoiced
    letters = result.dead_letters
    assert {d["record"]["messageId"] for d in letters} == invoiced
    (invoice,) = [i for i in orb.invoices() if i["status"] == "issued"]
    for line in letters:
        assert line["source"] == "orb" and invoice["id"] in line["reason"]
    assert orb.stats()["events_in_issued_periods"] == 0
    assert [s["bookmarks"]["tracks"]["seq"] for s in result.states][-1] == len(records)


def test_issued_invoice_events_stop_the_run_under_fail(orb, tmp_path):
    records, _ = invoiced_history(orb)
    config = backfill_config(orb, tmp_path, issued_period_policy="fail")
    result = run_target(config, singer_lines(records), tmp_path)
    assert result.returncode == 1
    assert "issued_period_policy" in result.stderr and "cust_1" in result.stderr
    assert not {"m1", "m4"} & set(billed(orb))
    assert all(s["bookmarks"]["tracks"]["seq"] < 1 for s in result.states)
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_an_amended_key_is_never_sent_again_on_replay(orb, tmp_path):
    for n in range(3):
        orb.add_customer(f"cust_{n}")
    records = [track(n, timestamp=ago(2 * DAY + n * HOUR)) for n in range(1, 5)]
    config = backfill_config(orb, tmp_path)
    first = run_target(config, singer_lines(records), tmp_path / "one")
    assert first.returncode == 0, first.stderr
    # Someone corrects m1 in Orb: search no longer returns it (Orb's search docstring).
    amended = dict(records[0])
    body = {"event_name": "API Request", "external_customer_id": amended["userId"],
            "timestamp": parse(billed_event(orb, "m1")["timestamp"]).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"),
            "properties": {"tokens": 999, "region": "eu"}}
    answer = requests.put(f"{orb.url}/events/m1", json=body, timeout=5,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 200, answer.text
    with orb.lock:
        orb.requests.clear()
    second = run_target(config, singer_lines(records), tmp_path / "two")
    assert second.returncode == 0, second.stderr
    assert orb.ingest_requests() == [], "nothing sent again"
    assert orb.stats()["double_billed"] == 0
    assert metrics_of(second.stderr)["already_delivered"] == len(records)


def billed_event(orb: FakeOrb, key: str) -> dict:
    (event,) = [e for e in orb.events() if e["idempotency_key"] == key]
    return event
