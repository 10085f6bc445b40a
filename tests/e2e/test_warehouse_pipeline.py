"""A real warehouse in CI: PostgreSQL -> `meltano run tap-warehouse target-orb-warehouse` -> Orb.

A Segment-shaped `web_app.tracks` table in a throwaway PostgreSQL (tests/e2e/postgres.py),
loaded with the rows of `warehouse.nasty_scenario()` (history from ~40 days ago across a UTC
month start, fresh rows, duplicate ids, nulls, numeric(38,10), JSONB, timestamps written under
Asia/Kolkata and read under America/New_York), is read by the PyPI tap
`meltanolabs-tap-postgres` and loaded by this checkout's target-orb into the stand-in Orb,
which already holds a few events. Every row's outcome is asserted, then the same `meltano run`
again (from Meltano's bookmark) and a `--full-refresh` replay of the whole table must land
nothing new.

`late_event_policy: reject` here: history is dead-lettered as late.
"""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import re
import threading
import typing as t
from dataclasses import dataclass

import pytest
import requests

from target_orb.fake_orb import FakeOrb
from tests.e2e import warehouse as wh
from tests.e2e.conftest import TIMINGS
from tests.e2e.meltano_harness import TARGET_ENV, Result, WarehousePipeline

if t.TYPE_CHECKING:
    from tests.e2e.postgres import Database, PostgresServer

READ_TIMEZONE = "America/New_York"  # the database's default: what the tap's session sees
WRITE_TIMEZONE = "Asia/Kolkata"  # the loader's session zone when the rows were inserted
GRACE = dt.timedelta(hours=12)
UTC_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?Z$")


# ---------------------------------------------------------------------------- helpers


class ShiftableClock:
    """The stand-in's clock; `shifted(delta)` moves it back for pre-existing old events."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)
        self.lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        with self.lock:
            return dt.datetime.now(dt.timezone.utc) + self.offset


def orb_format(event: dict[str, t.Any]) -> dict[str, t.Any]:
    """An expected event as the stand-in stores it (UTC `Z`, JSON numbers)."""
    out = copy.deepcopy(event)
    out["timestamp"] = (
        event["timestamp"].astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    )
    out["properties"] = {
        k: float(v) if isinstance(v, decimal.Decimal) else v for k, v in event["properties"].items()
    }
    return out


def comparable(event: dict[str, t.Any]) -> dict[str, t.Any]:
    """A landed event with its timestamp normalised to 6 fraction digits."""
    out = copy.deepcopy(event)
    ts = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    out["timestamp"] = ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return out


def seed_orb(orb: FakeOrb, clock: ShiftableClock, events: list[dict[str, t.Any]]) -> None:
    """Ingest events live, each at a stand-in time 1 minute after its own timestamp."""
    for event in events:
        body = orb_format(event)
        with clock.lock:
            clock.offset = (event["timestamp"] + dt.timedelta(minutes=1)) - dt.datetime.now(
                dt.timezone.utc
            )
        try:
            res = requests.post(
                f"{orb.url}/ingest",
                json={"events": [body]},
                headers={"Authorization": f"Bearer {orb.api_key}"},
                timeout=10,
            )
        finally:
            with clock.lock:
                clock.offset = dt.timedelta(0)
        assert res.status_code == 200, res.text
        assert not res.json().get("validation_failed"), res.text


@dataclass
class Snapshot:
    result: Result
    landed: dict[str, dict[str, t.Any]]
    stats: dict[str, t.Any]
    dead_letters: list[dict[str, t.Any]]
    state: dict[str, t.Any] | None


def snapshot(pipeline: WarehousePipeline, result: Result) -> Snapshot:
    orb = pipeline.orb
    return Snapshot(
        result=result,
        landed={e["idempotency_key"]: comparable(e) for e in copy.deepcopy(orb.events())},
        stats=copy.deepcopy(orb.stats()),
        dead_letters=pipeline.dead_letters(),
        state=pipeline.state(),
    )


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scenario() -> wh.Scenario:
    return wh.nasty_scenario()


@pytest.fixture(scope="module")
def warehouse(postgres: PostgresServer, scenario: wh.Scenario) -> Database:
    db = postgres.create_database("segment_reject", timezone=READ_TIMEZONE)
    wh.create_tracks_table(db)
    wh.insert_rows(db, [r.columns for r in scenario.rows], write_timezone=WRITE_TIMEZONE)
    return db


@pytest.fixture(scope="module")
def orb(scenario: wh.Scenario) -> t.Iterator[FakeOrb]:
    clock = ShiftableClock()
    fake = FakeOrb(clock=clock).start()  # Orb's default 12 h grace period
    try:
        seed_orb(fake, clock, scenario.preexisting)
        yield fake
    finally:
        fake.stop()


@dataclass
class Runs:
    pipeline: WarehousePipeline
    before: dict[str, dict[str, t.Any]]
    first: Snapshot
    second: Snapshot
    replay: Snapshot


@pytest.fixture(scope="module")
def runs(
    warehouse: Database,
    orb: FakeOrb,
    warehouse_project: t.Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Runs:
    pipeline = WarehousePipeline(
        project=warehouse_project,
        db=warehouse,
        orb=orb,
        workdir=tmp_path_factory.mktemp("reject"),
        name="reject",
        target_env={f"{TARGET_ENV}_LATE_EVENT_POLICY": "reject"},
    )
    before = {e["idempotency_key"]: comparable(e) for e in orb.events()}
    first = snapshot(pipeline, pipeline.run().check())
    second = snapshot(pipeline, pipeline.run().check())
    replay = snapshot(pipeline, pipeline.run(full_refresh=True).check())
    for label, run in zip(("first", "second", "full-refresh replay"), pipeline.runs, strict=True):
        TIMINGS[f"meltano run (reject, {label})"] = run.seconds
    return Runs(pipeline, before, first, second, replay)


def is_late(row: wh.Row, now: dt.datetime) -> bool:
    return row.timestamp < now - GRACE


# ---------------------------------------------------------------------------- the table


def test_the_table_is_segment_shaped(warehouse: Database, scenario: wh.Scenario) -> None:
    cols = warehouse.query(
        "SELECT column_name, data_type, numeric_precision, numeric_scale "
        "FROM information_schema.columns WHERE table_schema = 'web_app' "
        "AND table_name = 'tracks' ORDER BY ordinal_position"
    )
    types = {c["column_name"]: c["data_type"] for c in cols}
    assert list(types) == list(wh.COLUMNS)
    for name in wh.TIMESTAMP_COLUMNS:
        assert types[name] == "timestamp with time zone"
    assert types["properties"] == "jsonb"
    (amount,) = [c for c in cols if c["column_name"] == "amount"]
    assert (amount["data_type"], amount["numeric_precision"], amount["numeric_scale"]) == (
        "numeric",
        38,
        10,
    )
    rows = warehouse.query('SELECT id, "timestamp", amount FROM web_app.tracks')
    assert len(rows) == len(scenario.rows)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) - 3  # three duplicated ids
    # Written as Kolkata wall-clock times, read back (New York session) as the same instants.
    by_id = {r.id: r for r in scenario.rows}
    for got in rows:
        when = dt.datetime.fromisoformat(got["timestamp"])
        assert when == by_id[got["id"]].timestamp
        assert when.utcoffset() in (dt.timedelta(hours=-5), dt.timedelta(hours=-4))
    huge = [r["amount"] for r in rows if r["id"] == "wh-huge-amount"]
    assert huge == [decimal.Decimal("100000000000000000000.0000000000")]


def test_history_spans_two_month_windows_and_fresh_rows_exist(scenario: wh.Scenario) -> None:
    late = [r for r in scenario.rows if is_late(r, scenario.now)]
    fresh = [r for r in scenario.rows if not is_late(r, scenario.now)]
    assert min(r.timestamp for r in late) <= scenario.now - dt.timedelta(days=40)
    months = {(r.timestamp.year, r.timestamp.month) for r in late}
    assert len(months) >= 2
    assert (
        scenario.row(
            "10 min before a UTC month start (local date is already the next day)"
        ).timestamp.month
        != scenario.month_start.month
    )
    assert len(fresh) >= 4


# ---------------------------------------------------------------------------- reject policy


def _expected_landed(sc: wh.Scenario) -> dict[str, dict[str, t.Any]]:
    """Under `reject`: the pre-existing events plus every fresh row that must land."""
    out = {e["idempotency_key"]: orb_format(e) for e in sc.preexisting}
    for row in sc.rows:
        if row.outcome == "event" and not is_late(row, sc.now):
            assert row.event is not None
            out.setdefault(row.id, orb_format(row.event))
    return out


def _dead_letter_reasons(sc: wh.Scenario) -> list[tuple[str, str]]:
    """(id, reason substring) of every row that must be dead-lettered under `reject`."""
    out = []
    for row in sc.rows:
        if is_late(row, sc.now) and row.reason_if_late_rejected:
            out.append((row.id, row.reason_if_late_rejected))
        elif row.outcome == "dead_letter":
            assert row.reason is not None
            out.append((row.id, row.reason))
    return sorted(out)


def test_first_run_lands_exactly_the_fresh_rows(runs: Runs, scenario: wh.Scenario) -> None:
    assert runs.first.landed == _expected_landed(scenario)
    for event in runs.first.landed.values():
        assert UTC_Z.match(event["timestamp"]), event


def test_every_preexisting_event_is_untouched(runs: Runs, scenario: wh.Scenario) -> None:
    keys = [e["idempotency_key"] for e in scenario.preexisting]
    assert sorted(runs.before) == sorted(keys)
    for snap in (runs.first, runs.second, runs.replay):
        assert {k: snap.landed[k] for k in keys} == runs.before


def test_first_run_dead_letters_history_as_late_and_the_rest_by_reason(
    runs: Runs, scenario: wh.Scenario
) -> None:
    got = sorted((e["record"]["id"], e["reason"]) for e in runs.first.dead_letters)
    want = _dead_letter_reasons(scenario)
    assert [i for i, _ in got] == [i for i, _ in want], got
    for (got_id, got_reason), (_, substring) in zip(got, want, strict=True):
        assert substring in got_reason, (got_id, got_reason)
    for entry in runs.first.dead_letters:
        assert entry["source"] == "local"
        assert entry["stream"] == wh.STREAM


def test_the_fresh_duplicate_already_in_orb_was_not_billed_twice(runs: Runs) -> None:
    # Sent once (Orb answered it was a duplicate of the pre-existing event), body unchanged.
    counts = runs.first.stats["key_send_counts"]
    assert counts["wh-api-5m"] == 2  # the seed, then target-orb
    assert counts["wh-fresh-dup"] == 1  # two rows, one event: collapsed by target-orb
    assert runs.first.stats["duplicates"] == 1


def test_amounts_arrive_as_exact_numbers(runs: Runs) -> None:
    props = runs.first.landed["wh-precise-1h"]["properties"]
    assert props["amount"] == float(decimal.Decimal("1234567.1234567891"))
    assert runs.first.landed["wh-order-2h"]["properties"] == {"amount": 0.1, "currency": "EUR"}


def _sends(snap: Snapshot) -> dict[str, int]:
    return dict(snap.stats["key_send_counts"])


def test_second_identical_run_lands_nothing_new(runs: Runs, scenario: wh.Scenario) -> None:
    assert runs.second.landed == runs.first.landed
    state = runs.second.state
    assert state is not None
    bookmark = state["singer_state"]["bookmarks"][wh.STREAM]
    assert bookmark["replication_key"] == "uuid_ts"
    last = max(r.columns["uuid_ts"] for r in scenario.rows)
    assert dt.datetime.fromisoformat(bookmark["replication_key_value"]) == last
    # The tap resumed from its bookmark (`uuid_ts >= bookmark`): only the last-loaded row
    # (the second copy of wh-fresh-dup) was read again and sent again; Orb kept its first copy.
    log = runs.second.result.stderr
    assert f"Starting incremental sync of '{wh.STREAM}' with bookmark value: " in log
    first, second = _sends(runs.first), _sends(runs.second)
    assert {k: second[k] - first.get(k, 0) for k in second if second[k] != first.get(k)} == {
        "wh-fresh-dup": 1
    }
    assert runs.second.dead_letters == runs.first.dead_letters  # nothing new dead-lettered


def test_full_refresh_replay_lands_nothing_new(runs: Runs, scenario: wh.Scenario) -> None:
    assert runs.replay.landed == runs.first.landed
    # Every fresh event was sent again under its key; Orb counted each as a duplicate.
    fresh = {r.id for r in scenario.rows if r.outcome == "event" and not is_late(r, scenario.now)}
    second, replay = _sends(runs.second), _sends(runs.replay)
    assert {k for k in replay if replay[k] != second.get(k)} == fresh
    assert all(replay[k] == second[k] + 1 for k in fresh)
    # The replay dead-letters the same rows for the same reasons again (appended).
    n = len(runs.first.dead_letters)
    again = runs.replay.dead_letters[n:]
    assert sorted((e["record"]["id"], e["reason"]) for e in again) == sorted(
        (e["record"]["id"], e["reason"]) for e in runs.first.dead_letters
    )
