"""How fast the strict stand-in serves a history load: search + ingest into a backfill.

Run from the repository root: ``python -m tests.fake_orb.bench_standin [N]`` (default
100,000 events in requests of 500: one search and one ingest per batch, then close,
then N/500 searches over everything held). Prints one line of timings. Not a test.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone

import requests

from fake_orb import FakeOrb

NOW = datetime(2030, 1, 15, 12, tzinfo=timezone.utc)
FRAME = {"timeframe_start": "2029-12-01T00:00:00Z", "timeframe_end": "2030-01-15T00:00:00Z"}


def main(n: int = 100_000) -> str:
    with FakeOrb() as orb, requests.Session() as s:
        orb.set_now(NOW)
        s.headers["Authorization"] = "Bearer test-orb-key"
        bf = orb.create_backfill(
            NOW - timedelta(days=31), NOW - timedelta(days=1), replace_existing_events=False
        )
        started = time.perf_counter()
        for b in range(n // 500):
            events = [
                {
                    "idempotency_key": f"k{b}-{i}",
                    "external_customer_id": "c",
                    "event_name": "e",
                    "timestamp": (NOW - timedelta(days=2, seconds=b * 500 + i)).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    ),
                    "properties": {"n": i},
                }
                for i in range(500)
            ]
            ids = [e["idempotency_key"] for e in events]
            found = s.post(f"{orb.url}/events/search", json={"event_ids": ids, **FRAME}, timeout=60)
            assert found.ok and found.json() == {"data": []}, found.text
            resp = s.post(
                f"{orb.url}/ingest",
                params={"backfill_id": bf["id"]},
                json={"events": events},
                timeout=60,
            )
            assert resp.ok, resp.text
        load = time.perf_counter() - started
        assert s.post(f"{orb.url}/events/backfills/{bf['id']}/close", timeout=60).ok
        started = time.perf_counter()
        held = len(orb.events())
        reflect = time.perf_counter() - started
        started = time.perf_counter()
        for b in range(n // 500):
            ids = [f"k{b}-{i}" for i in range(500)]
            found = s.post(f"{orb.url}/events/search", json={"event_ids": ids, **FRAME}, timeout=60)
            assert len(found.json()["data"]) == 500
        search = time.perf_counter() - started
    return (
        f"{n} events (search + backfill ingest per 500): {load:.1f} s, {n / load:.0f} events/s; "
        f"reflect {held}: {reflect:.2f} s; {n // 500} searches of 500 ids over {held} held: "
        f"{search:.1f} s"
    )


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
