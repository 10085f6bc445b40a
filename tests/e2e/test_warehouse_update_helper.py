"""The helper issue 12 (corrections) builds on: a warehouse row changed between two runs.

`postgres.create_database`, `warehouse.create_tracks_table` / `insert_rows` / `update_rows`
and the `warehouse_pipeline` fixture: after `update_rows`, the next incremental `meltano run`
reads exactly the changed row again and target-orb sends it under the same key. What Orb then
keeps is the corrections feature's business; under the default `load_method: append-only` it is
the first body (Orb deduplicates on the key), as here.
"""

from __future__ import annotations

import datetime as dt
import typing as t

from fake_orb import FakeOrb
from tests.e2e import warehouse as wh

if t.TYPE_CHECKING:
    from tests.e2e.postgres import PostgresServer


def test_an_updated_row_is_read_and_sent_again_under_its_key(
    postgres: PostgresServer, warehouse_pipeline: t.Callable[..., t.Any]
) -> None:
    db = postgres.create_database("update_helper", timezone=wh.READ_TIMEZONE)
    wh.create_tracks_table(db)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    rows = [
        wh.segment_row(
            f"upd-{n}",
            now - dt.timedelta(minutes=10 + n),
            user_id="acct_upd",
            event="api_request",
            event_text="API Request",
            loaded=now - dt.timedelta(seconds=60 - n),
            tokens=n,
        )
        for n in (1, 2, 3)
    ]
    wh.insert_rows(db, rows)
    with FakeOrb() as orb:
        pipeline = warehouse_pipeline(db, orb)
        pipeline.run().check()
        assert orb.stats()["key_send_counts"] == {"upd-1": 1, "upd-2": 1, "upd-3": 1}

        assert wh.update_rows(db, "upd-1", {"tokens": 100}) == 1
        (changed,) = db.query("SELECT tokens, uuid_ts FROM web_app.tracks WHERE id = 'upd-1'")
        assert changed["tokens"] == 100
        assert dt.datetime.fromisoformat(changed["uuid_ts"]) > max(r["uuid_ts"] for r in rows)

        pipeline.run().check()
        # Read again: the changed row, and the row at the old bookmark (`>=`), nothing else.
        assert orb.stats()["key_send_counts"] == {"upd-1": 2, "upd-2": 1, "upd-3": 2}
        (landed,) = [e for e in orb.events() if e["idempotency_key"] == "upd-1"]
        assert landed["properties"] == {"tokens": 1}  # append-only: Orb keeps the first body
