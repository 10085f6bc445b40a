"""Backfill ownership in the store (issue 17): a pending backfill another job sharing the
store created is waited for, never written into or closed; one of this job's killed runs is
closed and continued; one in no store still stops the run."""

from __future__ import annotations

import datetime

import pytest

from target_orb.backfill.ownership import StoreOwnershipRecord
from target_orb.errors import OrbFatalError
from target_orb.state.backfills import BackfillRows
from target_orb.state.ledger import Ledger
from tests.unit.test_backfill import (
    API,
    MARCH,
    NOW,
    ScriptedOrb,
    event,
    load,
    make_manager,
    ts,
)

DAY = datetime.timedelta(days=1)
M_START = datetime.datetime(2024, 3, 1, tzinfo=datetime.timezone.utc)
M_END = datetime.datetime(2024, 4, 1, tzinfo=datetime.timezone.utc)


@pytest.fixture
def store(tmp_path):
    led = Ledger(f"sqlite:///{tmp_path / 'store.sqlite'}")
    led.open()
    yield led
    led.close()


def _record(store, job, tmp_path) -> StoreOwnershipRecord:
    record = StoreOwnershipRecord(
        BackfillRows(store), api_url=API, job_name=job,
        legacy_path=str(tmp_path / "dl.backfills.json"),
    )
    record.load()
    return record


def _on_store(manager, store, job, tmp_path):
    manager.record = _record(store, job, tmp_path)
    return manager


def _claim(store, job, bid, tmp_path):
    """`job` created `bid` (its entry in the store, answered)."""
    rec = _record(store, job, tmp_path)
    payload = {"timeframe_start": ts(M_START), "timeframe_end": ts(M_END),
               "close_time": ts(NOW + DAY)}
    rec.add_intent(payload, f"key-{bid}", NOW)
    rec.update(f"key-{bid}", NOW, id=bid, state="pending")


def test_another_jobs_backfill_is_waited_for_and_never_closed(store, tmp_path):
    orb = ScriptedOrb()
    bid = orb.add_backfill(M_START, M_END, close_time=NOW + DAY, bid="bf_other")
    _claim(store, "job-b", bid, tmp_path)
    manager = _on_store(make_manager(orb, tmp_path), store, "job-a", tmp_path)
    waits = []

    def other_job_finishes(seconds):
        waits.append(seconds)
        if len(waits) == 2:  # job-b's run ends: it closes its backfill, Orb reflects it
            orb.backfills[bid]["status"] = "closing"
            orb.settle()

    manager._sleep = other_job_finishes
    done = load(manager, [event(1, MARCH), event(2, MARCH + DAY)])
    manager.finish(failed=False)
    orb.settle()
    assert done.accepted == 2 and waits
    assert not orb.calls_to("POST", f"/events/backfills/{bid}/close")
    assert not [c for c in orb.calls_to("POST", "/ingest") if (c[3] or {}).get("backfill_id")
                == bid]
    assert orb.billed == {"k1": 1, "k2": 1}
    assert [e["state"] for e in manager.record.entries()] == ["closed"]


def test_this_jobs_leftover_is_closed_and_the_window_continued(store, tmp_path):
    orb = ScriptedOrb()
    bid = orb.add_backfill(M_START, M_END, close_time=NOW + DAY, bid="bf_mine")
    _claim(store, "job-a", bid, tmp_path)
    manager = _on_store(make_manager(orb, tmp_path), store, "job-a", tmp_path)
    assert load(manager, [event(1, MARCH)]).accepted == 1
    manager.finish(failed=False)
    orb.settle()
    assert orb.calls_to("POST", f"/events/backfills/{bid}/close")
    assert orb.billed == {"k1": 1}


def test_a_backfill_in_no_store_still_stops_the_run(store, tmp_path):
    orb = ScriptedOrb()
    orb.add_backfill(M_START, M_END, close_time=NOW + DAY)
    manager = _on_store(make_manager(orb, tmp_path), store, "job-a", tmp_path)
    with pytest.raises(OrbFatalError, match="target-orb did not create it"):
        load(manager, [event(1, MARCH)])
