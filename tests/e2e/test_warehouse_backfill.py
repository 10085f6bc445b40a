"""A real warehouse in CI: PostgreSQL -> `meltano run tap-warehouse target-orb-warehouse` -> Orb.

A Segment-shaped `web_app.tracks` table in a throwaway PostgreSQL (tests/e2e/postgres.py),
loaded with the rows of `warehouse.nasty_scenario()` (history from ~40 days ago across a UTC
month start, fresh rows, duplicate ids, null columns and JSONB values, numeric(38,10) amounts,
timestamps written under Asia/Kolkata and read under America/New_York), is read by the PyPI tap
`meltanolabs-tap-postgres` (Meltano plugin `tap-warehouse`, bookmark on `uuid_ts`) and loaded
by this checkout's target-orb (`target-orb-warehouse`: `record_preset: segment_warehouse`,
`late_event_policy: backfill`, as in meltano.yml) into the stand-in Orb, which already holds a
few events.

Asserted: what Orb bills afterwards, exactly (each key once); which backfill holds which
events (one closed, non-replacing backfill per UTC calendar month with late events); that the
pre-existing events are untouched; each nasty row's outcome; that the same `meltano run` again
(from Meltano's bookmark) and a `--full-refresh` replay of the whole table land nothing new and
leave no backfill pending.
"""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import typing as t
from dataclasses import dataclass

import pytest
import requests

from fake_orb import FakeOrb
from tests.e2e import warehouse as wh
from tests.e2e.conftest import TIMINGS
from tests.e2e.meltano_harness import Result, WarehousePipeline

if t.TYPE_CHECKING:
    from tests.e2e.meltano_harness import MeltanoProject
    from tests.e2e.postgres import Database, PostgresServer

GRACE = dt.timedelta(hours=12)  # README "Loading history": late when older than now - grace


def goes_to_backfill(row: wh.Row, now: dt.datetime) -> bool:
    return row.timestamp < now - GRACE


def invoiced_customer(sc: wh.Scenario) -> tuple[str, dt.datetime, dt.datetime]:
    """The oldest month of the history, and a customer with late rows in it: the stand-in
    marks that customer's invoice for the month issued (Orb does not re-bill it;
    issued_period_policy)."""
    late = sorted(
        (r for r in sc.rows if r.outcome == "event" and goes_to_backfill(r, sc.now)
         and r.id not in _preexisting_keys(sc)),
        key=lambda r: r.timestamp,
    )
    assert late, "the scenario has no late row"
    oldest = late[0]
    assert oldest.event is not None
    start, end = (
        dt.datetime.fromisoformat(v.replace("Z", "+00:00")) for v in month_window(oldest.timestamp)
    )
    return oldest.event["external_customer_id"], start, end


def issued_rows(sc: wh.Scenario) -> list[wh.Row]:
    customer, start, end = invoiced_customer(sc)
    return [
        r for r in sc.rows
        if r.outcome == "event" and goes_to_backfill(r, sc.now) and start <= r.timestamp < end
        and r.event is not None and r.event["external_customer_id"] == customer
        and r.id not in _preexisting_keys(sc)
    ]


def month_window(when: dt.datetime) -> tuple[str, str]:
    """The UTC calendar month holding `when`, as the stand-in prints backfill timeframes."""
    utc = when.astimezone(dt.timezone.utc)
    start = dt.datetime(utc.year, utc.month, 1, tzinfo=dt.timezone.utc)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.strftime("%Y-%m-%dT%H:%M:%SZ"), end.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scenario() -> wh.Scenario:
    return wh.nasty_scenario()


@pytest.fixture(scope="module")
def warehouse(postgres: PostgresServer, scenario: wh.Scenario) -> Database:
    db = postgres.create_database("segment_backfill", timezone=wh.READ_TIMEZONE)
    wh.create_tracks_table(db)
    wh.insert_rows(db, [r.columns for r in scenario.rows], write_timezone=wh.WRITE_TIMEZONE)
    return db


@dataclass
class Snapshot:
    result: Result
    landed: dict[str, dict[str, t.Any]]  # first stored body per key
    billed: list[dict[str, t.Any]]  # what Orb bills (a key twice = billed twice)
    backfills: list[dict[str, t.Any]]
    backfill_events: dict[str, list[dict[str, t.Any]]]
    stats: dict[str, t.Any]
    metrics: dict[str, t.Any]  # target-orb's own end-of-run metrics
    dead_letters: list[dict[str, t.Any]]
    state: dict[str, t.Any] | None


def settle(orb: FakeOrb, requests_needed: int = 3) -> None:
    """Orb reflects a closed backfill asynchronously (here: a few API requests later)."""
    for _ in range(requests_needed):
        answer = requests.get(f"{orb.url}/events/backfills", timeout=5,
                              headers={"Authorization": f"Bearer {orb.api_key}"})
        answer.raise_for_status()


def snapshot(pipeline: WarehousePipeline, result: Result) -> Snapshot:
    orb = pipeline.orb
    settle(orb)
    backfills = copy.deepcopy(orb.backfills())
    return Snapshot(
        result=result,
        landed={k: wh.comparable(e) for k, e in copy.deepcopy(orb.landed).items()},
        billed=[wh.comparable(e) for e in copy.deepcopy(orb.events())],
        backfills=backfills,
        backfill_events={
            bf["id"]: [wh.comparable(e) for e in orb.backfill_events(bf["id"])] for bf in backfills
        },
        stats=copy.deepcopy(orb.stats()),
        metrics=wh.target_metrics(result.stderr),
        dead_letters=pipeline.dead_letters(),
        state=pipeline.state(),
    )


@dataclass
class Runs:
    before: dict[str, dict[str, t.Any]]
    first: Snapshot
    second: Snapshot
    replay: Snapshot


@pytest.fixture(scope="module")
def runs(
    warehouse: Database,
    scenario: wh.Scenario,
    warehouse_project: MeltanoProject,
    tmp_path_factory: pytest.TempPathFactory,
) -> t.Iterator[Runs]:
    # Orb's default 12 h grace period, and Orb's stricter rule: one pending backfill per
    # account, reflection taking a few requests (Orb's support pages).
    with FakeOrb(one_pending_backfill=True, reflection_delay_requests=2) as orb:
        wh.seed_orb(orb, scenario.preexisting)
        customer, last_month, this_month = invoiced_customer(scenario)
        orb.add_invoice(customer, last_month, this_month, status="issued")
        before = {e["idempotency_key"]: wh.comparable(e) for e in orb.events()}
        # meltano.yml's own target-orb-warehouse settings: nothing overridden but where to.
        pipeline = WarehousePipeline(
            project=warehouse_project,
            db=warehouse,
            orb=orb,
            workdir=tmp_path_factory.mktemp("backfill"),
            name="backfill",
        )
        first = snapshot(pipeline, pipeline.run().check())
        second = snapshot(pipeline, pipeline.run().check())
        replay = snapshot(pipeline, pipeline.run(full_refresh=True).check())
        for label, run in zip(
            ("first", "second", "full-refresh replay"), pipeline.runs, strict=True
        ):
            TIMINGS[f"meltano run (backfill, {label})"] = run.seconds
        yield Runs(before, first, second, replay)


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
    assert (amount["numeric_precision"], amount["numeric_scale"]) == (38, 10)
    rows = warehouse.query('SELECT id, "timestamp", amount FROM web_app.tracks')
    assert len(rows) == len(scenario.rows)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) - 3  # three ids appear twice
    # Written as Kolkata wall-clock times, read back (New York session) as the same instants.
    by_id = {r.id: r for r in scenario.rows}
    for got in rows:
        when = dt.datetime.fromisoformat(got["timestamp"])
        assert when == by_id[got["id"]].timestamp
        assert when.utcoffset() in (dt.timedelta(hours=-5), dt.timedelta(hours=-4))
    huge = [r["amount"] for r in rows if r["id"] == "wh-huge-amount"]
    assert huge == [decimal.Decimal("100000000000000000000.0000000000")]


def test_history_spans_two_month_windows_and_fresh_rows_exist(scenario: wh.Scenario) -> None:
    late = [r for r in scenario.rows if goes_to_backfill(r, scenario.now)]
    fresh = [r for r in scenario.rows if not goes_to_backfill(r, scenario.now)]
    assert min(r.timestamp for r in late) <= scenario.now - dt.timedelta(days=40)
    assert len({month_window(r.timestamp) for r in late if r.outcome == "event"}) >= 2
    before = scenario.row("10 min before a UTC month start (local date is already the next day)")
    after = scenario.row("10 min after a UTC month start")
    assert month_window(before.timestamp) != month_window(after.timestamp)
    local = before.timestamp.astimezone(wh.ZoneInfo(wh.WRITE_TIMEZONE))
    assert local.date() == after.timestamp.date()  # the writer's date is the next month's
    assert len(fresh) >= 4


# ---------------------------------------------------------------------------- expectations


def _preexisting_keys(sc: wh.Scenario) -> set[str]:
    return {e["idempotency_key"] for e in sc.preexisting}


def expected_backfills(sc: wh.Scenario) -> dict[tuple[str, str], list[dict[str, t.Any]]]:
    """Month window -> the events its backfill must hold (keys Orb had are left out)."""
    out: dict[tuple[str, str], list[dict[str, t.Any]]] = {}
    for row in sc.rows:
        if row.outcome != "event" or not goes_to_backfill(row, sc.now):
            continue
        if row.id in _preexisting_keys(sc):
            continue
        assert row.event is not None
        out.setdefault(month_window(row.timestamp), []).append(wh.orb_format(row.event))
    return out


def expected_billed(sc: wh.Scenario) -> dict[str, dict[str, t.Any]]:
    """Every event Orb must bill after the run, by key: pre-existing + every landing row."""
    out = {e["idempotency_key"]: wh.orb_format(e) for e in sc.preexisting}
    for row in sc.rows:
        if row.outcome == "event":
            assert row.event is not None
            out.setdefault(row.id, wh.orb_format(row.event))
    return out


def _by_key(events: list[dict[str, t.Any]]) -> dict[str, dict[str, t.Any]]:
    keyed = {e["idempotency_key"]: e for e in events}
    assert len(keyed) == len(events), "a key is billed twice"
    return keyed


# ---------------------------------------------------------------------------- first run


def test_first_run_bills_exactly_every_landing_row_once(runs: Runs, scenario: wh.Scenario) -> None:
    assert _by_key(runs.first.billed) == expected_billed(scenario)
    assert runs.first.stats["double_billed"] == 0


def test_history_went_through_one_closed_non_replacing_backfill_per_month(
    runs: Runs, scenario: wh.Scenario
) -> None:
    want = {start: events for (start, _), events in expected_backfills(scenario).items()}
    ends = {start: end for start, end in expected_backfills(scenario)}
    got = {bf["timeframe_start"]: bf for bf in runs.first.backfills}
    assert sorted(got) == sorted(want)
    assert len(got) >= 2
    for window, bf in got.items():
        # A month wholly past the grace boundary is the calendar month; this month's backfill
        # ends at the boundary of its creation (orb-billing events/backfills.py, create).
        end = dt.datetime.fromisoformat(bf["timeframe_end"].replace("Z", "+00:00"))
        created = dt.datetime.fromisoformat(bf["created_at"].replace("Z", "+00:00"))
        assert bf["timeframe_end"] == ends[window] or end <= created - GRACE, bf
        assert bf["status"] == "reflected", bf  # closed by the run, nothing pending
        assert bf["replace_existing_events"] is False
        assert bf["customer_id"] is None  # unscoped, and additive
        events = runs.first.backfill_events[bf["id"]]
        assert sorted(events, key=lambda e: e["idempotency_key"]) == sorted(
            want[window], key=lambda e: e["idempotency_key"]
        ), window
    # Under Orb's one-pending-backfill rule the second month's create was refused while the
    # first month's backfill was pending: target-orb closed its own and went on.
    assert "one backfill pending at a time" in runs.first.result.stderr
    # The summary lists each backfill it created, with its events.
    listed = {b["id"]: b for b in runs.first.metrics["backfills"]}
    assert set(listed) == {bf["id"] for bf in runs.first.backfills}
    assert runs.first.metrics["events_backfilled"] == sum(len(v) for v in want.values())


def test_last_months_issued_invoice_is_reported_per_customer_not_silently_loaded(
    runs: Runs, scenario: wh.Scenario
) -> None:
    customer, _, _ = invoiced_customer(scenario)
    rows = runs.first.metrics["issued_periods"]
    assert [(r["customer"], r["action"]) for r in rows] == [(customer, "loaded")]
    assert rows[0]["events"] == len(issued_rows(scenario)) >= 1
    assert "already issued" in runs.first.result.stderr
    assert runs.first.stats["events_in_issued_periods"] == len(issued_rows(scenario))
    assert runs.second.metrics.get("issued_periods", []) == []  # nothing new: nothing to report


def test_fresh_rows_went_live_never_into_a_backfill(runs: Runs, scenario: wh.Scenario) -> None:
    in_backfills = {
        e["idempotency_key"] for evs in runs.first.backfill_events.values() for e in evs
    }
    fresh = {r.id for r in scenario.rows if not goes_to_backfill(r, scenario.now)}
    assert not fresh & in_backfills
    landed_live = {k for k in fresh if k in runs.first.landed}
    assert landed_live == {r.id for r in scenario.rows if r.outcome == "event" and r.id in fresh}


def test_every_preexisting_event_is_untouched(runs: Runs, scenario: wh.Scenario) -> None:
    assert sorted(runs.before) == sorted(_preexisting_keys(scenario))
    for snap in (runs.first, runs.second, runs.replay):
        billed = _by_key(snap.billed)
        assert {k: billed[k] for k in runs.before} == runs.before


def test_late_key_already_in_orb_was_left_out_and_counted(runs: Runs) -> None:
    # wh-api-40d was in Orb before the run (same body): search found it, it was not sent.
    assert runs.first.metrics["already_in_orb"] == 1
    assert all(
        e["idempotency_key"] != "wh-api-40d"
        for evs in runs.first.backfill_events.values()
        for e in evs
    )


def test_fresh_key_already_in_orb_was_not_billed_twice(runs: Runs) -> None:
    counts = runs.first.stats["key_send_counts"]
    assert counts["wh-api-5m"] == 2  # the seed, then target-orb live: Orb kept the first
    assert counts["wh-fresh-dup"] == 1  # two rows, one event: collapsed by target-orb


@pytest.mark.parametrize(
    "name",
    [r.name for r in wh.nasty_scenario().rows if r.outcome == "dead_letter"],
)
def test_each_bad_row_is_dead_lettered_with_its_reason(
    runs: Runs, scenario: wh.Scenario, name: str
) -> None:
    row = scenario.row(name)
    assert row.reason is not None
    mine = [
        e
        for e in runs.first.dead_letters
        if e["record"]["id"] == row.id and _same_row(e["record"], row)
    ]
    assert len(mine) == 1, runs.first.dead_letters
    assert row.reason in mine[0]["reason"]
    assert mine[0]["source"] == "local"
    assert mine[0]["stream"] == wh.STREAM


def _same_row(record: dict[str, t.Any], row: wh.Row) -> bool:
    """The dead-lettered record is this row (duplicated ids differ in a property column)."""
    return record.get("tokens") == row.columns.get("tokens")


def test_nothing_else_is_dead_lettered(runs: Runs, scenario: wh.Scenario) -> None:
    bad = sorted(r.id for r in scenario.rows if r.outcome == "dead_letter")
    assert sorted(e["record"]["id"] for e in runs.first.dead_letters) == bad


def test_amounts_arrive_as_exact_numbers(runs: Runs) -> None:
    billed = _by_key(runs.first.billed)
    assert billed["wh-precise-1h"]["properties"]["amount"] == float(
        decimal.Decimal("1234567.1234567891")
    )
    assert billed["wh-order-38d"]["properties"] == {"amount": 19.99, "currency": "USD"}


# ---------------------------------------------------------------------------- reruns


def _sends(snap: Snapshot) -> dict[str, int]:
    return dict(snap.stats["key_send_counts"])


def test_second_identical_run_lands_nothing_and_leaves_no_backfill_pending(
    runs: Runs, scenario: wh.Scenario
) -> None:
    assert runs.second.billed == runs.first.billed
    assert runs.second.backfills == runs.first.backfills  # no new backfill, all reflected
    # The tap resumed from its bookmark (`uuid_ts >= bookmark`): only the last-loaded row
    # (the second copy of wh-fresh-dup) was read and sent again; Orb kept its first copy.
    assert runs.second.state is not None
    bookmark = runs.second.state["singer_state"]["bookmarks"][wh.STREAM]
    assert bookmark["replication_key"] == "uuid_ts"
    last = max(r.columns["uuid_ts"] for r in scenario.rows)
    assert dt.datetime.fromisoformat(bookmark["replication_key_value"]) == last
    assert f"Starting incremental sync of '{wh.STREAM}' with bookmark value: " in (
        runs.second.result.stderr
    )
    first, second = _sends(runs.first), _sends(runs.second)
    assert {k: second[k] - first.get(k, 0) for k in second if second[k] != first.get(k)} == {
        "wh-fresh-dup": 1
    }
    assert runs.second.dead_letters == runs.first.dead_letters


def test_full_refresh_replay_lands_nothing_and_creates_no_backfill(
    runs: Runs, scenario: wh.Scenario
) -> None:
    assert runs.replay.billed == runs.first.billed
    assert runs.replay.stats["double_billed"] == 0
    assert runs.replay.backfills == runs.first.backfills
    # Every late key that landed is now found by search and left out.
    late_keys = {
        r.id for r in scenario.rows if r.outcome == "event" and goes_to_backfill(r, scenario.now)
    }
    # Keys target-orb delivered are known to its store (state_url); the pre-existing ones are
    # found by search.
    replay = runs.replay.metrics
    assert replay["already_in_orb"] + replay["already_delivered"] == len(late_keys)
    assert replay["already_in_orb"] == len(late_keys & _preexisting_keys(scenario))
    assert runs.replay.metrics.get("events_backfilled", 0) == 0
    assert runs.replay.metrics.get("backfills", []) == []
    # Fresh keys were sent live again; Orb counted each as a duplicate.
    fresh = {
        r.id
        for r in scenario.rows
        if r.outcome == "event" and not goes_to_backfill(r, scenario.now)
    }
    second, replay = _sends(runs.second), _sends(runs.replay)
    assert {k for k in replay if replay[k] != second.get(k)} == fresh
    # The bad rows meet the same reasons again: already in the dead-letter file, so counted,
    # not appended (issue 19).
    assert runs.replay.dead_letters == runs.first.dead_letters
    assert runs.replay.metrics["already_dead_lettered"] == len(runs.first.dead_letters) > 0
