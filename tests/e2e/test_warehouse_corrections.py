"""Corrections end to end (issue 12, item 7): a row of a real PostgreSQL table is UPDATED between
two `meltano run tap-warehouse target-orb-warehouse`s under `load_method: upsert`, and the
stand-in Orb receives the correction as an amendment of the event under the row's key.

Once with the default SQLite ledger (next to the dead-letter file) and once with `ledger_url`
pointing at a database in the same PostgreSQL server. Every row is fresh (inside the grace
period), so no backfill is involved.
"""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest

from fake_orb import FakeOrb
from tests.e2e import warehouse as wh

if t.TYPE_CHECKING:
    from tests.e2e.postgres import PostgresServer

CUSTOMER = "acct_corr"
KEYS = ("corr-1", "corr-2", "corr-3")


def _ingest_sends(orb: FakeOrb) -> dict[str, int]:
    return dict(orb.stats()["key_send_counts"])


def _writes(orb: FakeOrb, since: int) -> list[tuple[str, str]]:
    """Requests after the first `since` that could change billing data (anything but GET)."""
    return [(r["method"], r["path"]) for r in orb.requests[since:] if r["method"] != "GET"]


@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"])
def test_an_updated_row_reaches_orb_as_one_amendment(
    postgres: PostgresServer, warehouse_pipeline: t.Callable[..., t.Any], ledger: str
) -> None:
    db = postgres.create_database(f"corrections_{ledger}", timezone=wh.READ_TIMEZONE)
    wh.create_tracks_table(db)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    wh.insert_rows(
        db,
        [
            wh.segment_row(
                key,
                now - dt.timedelta(minutes=10 + n),  # fresh: well inside the 12-hour grace
                user_id=CUSTOMER,
                event="api_request",
                event_text="API Request",
                loaded=now - dt.timedelta(seconds=60 - n),
                tokens=n,
            )
            for n, key in enumerate(KEYS, start=1)
        ],
    )
    env = {"TARGET_ORB_WAREHOUSE_LOAD_METHOD": "upsert"}
    ledger_db = None
    if ledger == "postgresql":
        ledger_db = postgres.create_database("corrections_ledger")
        env["TARGET_ORB_WAREHOUSE_LEDGER_URL"] = ledger_db.url

    with FakeOrb() as orb:
        orb.add_customer(CUSTOMER)  # Orb amends only events of a customer it knows
        pipeline = warehouse_pipeline(db, orb, target_env=env)

        pipeline.run().check()
        assert _ingest_sends(orb) == dict.fromkeys(KEYS, 1)
        assert not orb.corrections()

        assert wh.update_rows(db, "corr-1", {"tokens": 100}) == 1
        before = len(orb.requests)
        result = pipeline.run().check()
        # Billed: the updated value for corr-1, the others as they were, each once.
        billed = {e["idempotency_key"]: e["properties"] for e in orb.events()}
        assert billed == {
            "corr-1": {"tokens": 100},
            "corr-2": {"tokens": 2},
            "corr-3": {"tokens": 3},
        }
        assert len(orb.events()) == len(KEYS)
        # The history of corr-1: the body first stored, then exactly one amendment.
        history = orb.amendments("corr-1")
        assert [v["properties"] for v in history] == [{"tokens": 1}, {"tokens": 100}]
        assert [c["id"] for c in orb.corrections()] == ["corr-1"]
        # Nothing went twice: no key ingested again (corr-3, re-read at the tap's `>=`
        # bookmark, is unchanged and skipped), and the only write is the one amendment.
        assert _ingest_sends(orb) == dict.fromkeys(KEYS, 1)
        assert _writes(orb, before) == [("PUT", "/v1/events/corr-1")], _writes(orb, before)
        assert not pipeline.dead_letters()

        before = len(orb.requests)
        pipeline.run().check()  # no change in the warehouse: nothing to send
        assert _writes(orb, before) == []
        assert _ingest_sends(orb) == dict.fromkeys(KEYS, 1)
        assert len(orb.amendments("corr-1")) == 2
        assert not pipeline.dead_letters()

    sqlite_files = list(pipeline.workdir.rglob("*.sqlite"))
    if ledger_db is None:
        assert [p.name for p in sqlite_files] == ["target-orb-ledger.sqlite"]
    else:
        assert sqlite_files == []  # nothing fell back to a local file
        assert postgres.password not in result.stderr
        assert (
            ledger_db.scalar(
                "SELECT amended::text || ' ' || (body::json->'properties'->>'tokens') "
                "FROM target_orb_ledger WHERE idempotency_key = 'corr-1'"
            )
            == "true 100"
        )
