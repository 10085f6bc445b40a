"""The real warehouse under `late_event_policy: reject`: history is dead-lettered, not lost.

The same Segment-shaped table and stand-in as tests/e2e/test_warehouse_backfill.py (see there),
one `meltano run tap-warehouse target-orb-warehouse` with the policy overridden to `reject`:
the fresh rows land live, every late row is in the dead-letter file with the reason a user can
act on, and the rows that are bad whatever their age are dead-lettered for that reason.
"""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import typing as t
from dataclasses import dataclass

import pytest

from fake_orb import FakeOrb
from tests.e2e import warehouse as wh
from tests.e2e.conftest import TIMINGS
from tests.e2e.meltano_harness import TARGET_ENV, WarehousePipeline

if t.TYPE_CHECKING:
    from tests.e2e.meltano_harness import MeltanoProject
    from tests.e2e.postgres import Database, PostgresServer

GRACE = dt.timedelta(hours=12)


def is_late(row: wh.Row, now: dt.datetime) -> bool:
    return row.timestamp < now - GRACE


@pytest.fixture(scope="module")
def scenario() -> wh.Scenario:
    return wh.nasty_scenario()


@pytest.fixture(scope="module")
def warehouse(postgres: PostgresServer, scenario: wh.Scenario) -> Database:
    db = postgres.create_database("segment_reject", timezone=wh.READ_TIMEZONE)
    wh.create_tracks_table(db)
    wh.insert_rows(db, [r.columns for r in scenario.rows], write_timezone=wh.WRITE_TIMEZONE)
    return db


@dataclass
class Outcome:
    before: dict[str, dict[str, t.Any]]
    landed: dict[str, dict[str, t.Any]]
    billed: list[dict[str, t.Any]]
    stats: dict[str, t.Any]
    dead_letters: list[dict[str, t.Any]]


@pytest.fixture(scope="module")
def outcome(
    warehouse: Database,
    scenario: wh.Scenario,
    warehouse_project: MeltanoProject,
    tmp_path_factory: pytest.TempPathFactory,
) -> t.Iterator[Outcome]:
    with FakeOrb() as orb:  # Orb's default 12 h grace period
        wh.seed_orb(orb, scenario.preexisting)
        before = {e["idempotency_key"]: wh.comparable(e) for e in orb.events()}
        pipeline = WarehousePipeline(
            project=warehouse_project,
            db=warehouse,
            orb=orb,
            workdir=tmp_path_factory.mktemp("reject"),
            name="reject",
            target_env={f"{TARGET_ENV}_LATE_EVENT_POLICY": "reject"},
        )
        result = pipeline.run().check()
        TIMINGS["meltano run (reject)"] = result.seconds
        yield Outcome(
            before=before,
            landed={e["idempotency_key"]: wh.comparable(e) for e in orb.landed.values()},
            billed=copy.deepcopy(orb.events()),
            stats=copy.deepcopy(orb.stats()),
            dead_letters=pipeline.dead_letters(),
        )


def test_only_the_fresh_rows_land(outcome: Outcome, scenario: wh.Scenario) -> None:
    want = {e["idempotency_key"]: wh.orb_format(e) for e in scenario.preexisting}
    for row in scenario.rows:
        if row.outcome == "event" and not is_late(row, scenario.now):
            assert row.event is not None
            want.setdefault(row.id, wh.orb_format(row.event))
    assert outcome.landed == want
    assert len(outcome.billed) == len(want)  # each once
    assert outcome.stats["double_billed"] == 0


def test_preexisting_events_are_untouched(outcome: Outcome, scenario: wh.Scenario) -> None:
    assert sorted(outcome.before) == sorted(e["idempotency_key"] for e in scenario.preexisting)
    assert {k: outcome.landed[k] for k in outcome.before} == outcome.before


def test_history_is_dead_lettered_as_late_and_bad_rows_by_their_reason(
    outcome: Outcome, scenario: wh.Scenario
) -> None:
    want = []
    for row in scenario.rows:
        if is_late(row, scenario.now) and row.reason_if_late_rejected:
            want.append((row.id, row.reason_if_late_rejected))
        elif row.outcome == "dead_letter":
            assert row.reason is not None
            want.append((row.id, row.reason))
    want.sort()
    got = sorted((e["record"]["id"], e["reason"]) for e in outcome.dead_letters)
    assert [i for i, _ in got] == [i for i, _ in want], got
    for (got_id, got_reason), (_, substring) in zip(got, want, strict=True):
        assert substring in got_reason, (got_id, got_reason)
    for entry in outcome.dead_letters:
        assert entry["source"] == "local"
        assert entry["stream"] == wh.STREAM


def test_a_fresh_key_already_in_orb_is_not_billed_twice(outcome: Outcome) -> None:
    counts = outcome.stats["key_send_counts"]
    assert counts["wh-api-5m"] == 2  # the seed, then target-orb: Orb kept the first
    assert counts["wh-fresh-dup"] == 1  # two rows, one event: collapsed by target-orb
    assert outcome.stats["duplicates"] == 1


def test_amounts_arrive_as_exact_numbers(outcome: Outcome) -> None:
    props = outcome.landed["wh-precise-1h"]["properties"]
    assert props["amount"] == float(decimal.Decimal("1234567.1234567891"))
    assert outcome.landed["wh-order-2h"]["properties"] == {"amount": 0.1, "currency": "EUR"}
