"""The cost of target-orb's store (issue 17) in records/s, against the file defaults.

    .venv/bin/python benchmarks/store_cost.py [--records 20000] [--rounds 3]

The installed `target-orb` reads a generated Singer file (`--input`) and sends to the
stand-in Orb (in this process, 127.0.0.1, no added latency); wall time from spawn to exit.
Rounds are interleaved (each round runs every case once). Cases:

- dead letters (a fifth of the records have no customer and are dead-lettered):
  `dead_letter_target: file` (default) | `state` in the default SQLite store | `state` in
  PostgreSQL (a throwaway server, tests/e2e/postgres.py);
- the ledger (`load_method: upsert`, every key new): default SQLite file | PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fake_orb import FakeOrb  # noqa: E402
from tests.e2e import postgres as pg  # noqa: E402

API_KEY = "bench-key"
TARGET = str(Path(sys.executable).with_name("target-orb"))


def _lines(n: int, bad_every: int, prefix: str = "m") -> str:
    out = [json.dumps({"type": "SCHEMA", "stream": "tracks", "key_properties": [],
                       "schema": {"type": "object", "properties": {}}})]
    now = time.time()
    for i in range(n):
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 300 - i % 600))
        record = {"type": "track", "messageId": f"{prefix}{i}", "userId": f"cust_{i % 3}",
                  "event": "API Request", "timestamp": ts, "properties": {"tokens": i}}
        if bad_every and i % bad_every == 0:
            del record["userId"]
        out.append(json.dumps({"type": "RECORD", "stream": "tracks", "record": record}))
    out.append(json.dumps({"type": "STATE", "value": {"bookmarks": {"tracks": {"seq": n}}}}))
    return "\n".join(out) + "\n"


def _run(orb: FakeOrb, work: Path, input_path: Path, **settings: object) -> float:
    work.mkdir(parents=True, exist_ok=True)
    config = {"api_key": API_KEY, "api_url": orb.url, "external_customer_id_field": "userId",
              "properties_mapping": {"tokens": "tokens"}, "progress_interval_seconds": 0,
              "dead_letter_path": str(work / "dl.jsonl"), "invalid_event_policy": "dead_letter",
              **settings}
    (work / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    result = subprocess.run([TARGET, "--config", str(work / "config.json"), "--input",
                             str(input_path)], capture_output=True, text=True, timeout=900,
                            check=False)
    took = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"target-orb failed ({settings}):\n{result.stderr[-3000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.records
    server = pg.PostgresServer(pg.ensure_bindir()).start()
    try:
        with tempfile.TemporaryDirectory() as tmp, FakeOrb(api_key=API_KEY) as orb:
            for c in range(3):
                orb.add_customer(f"cust_{c}")
            root = Path(tmp)
            dl_input, ok_input = root / "dl.singer", root / "ok.singer"
            dl_input.write_text(_lines(n, 5))
            times: dict[str, list[float]] = {}
            for r in range(args.rounds):
                db = server.create_database(f"bench_{r}")
                cases = {
                    "dead letters: file (default)": (dl_input, {}),
                    "dead letters: state, SQLite": (dl_input, {"dead_letter_target": "state"}),
                    "dead letters: state, PostgreSQL": (
                        dl_input, {"dead_letter_target": "state", "state_url": db.url}),
                    "ledger (upsert): SQLite (default)": (ok_input, {"load_method": "upsert"}),
                    "ledger (upsert): PostgreSQL": (
                        ok_input, {"load_method": "upsert", "state_url": db.url}),
                }
                ok_input.write_text(_lines(n, 0, f"r{r}m"))  # new keys each round
                for name, (input_path, settings) in cases.items():
                    work = root / f"r{r}-{len(times.get(name, []))}-{abs(hash(name))}"
                    took = _run(orb, work, input_path, **settings)
                    times.setdefault(name, []).append(took)
                    print(f"round {r + 1} {name}: {n / took:,.0f} records/s", flush=True)
    finally:
        server.stop()
    print(f"\n| case ({n:,} records, {args.rounds} rounds) | records/s (median) | each round |")
    print("|---|---|---|")
    for name, took in times.items():
        rates = [n / x for x in took]
        print(f"| {name} | {statistics.median(rates):,.0f} | "
              f"{', '.join(f'{x:,.0f}' for x in rates)} |")


if __name__ == "__main__":
    main()
