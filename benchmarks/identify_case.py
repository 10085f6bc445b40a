"""Benchmark case ID: an Engage-style first sync of N Identify calls through customer metadata.

`python benchmarks/identify_case.py --records 2000 [--repeat 4]`: N Identify calls for N/repeat
customers (each customer's calls `N/repeat` records apart, so with `--repeat` > 1 they fall
into different batches and are sent one after the other, in order) go through a fresh
`target-orb` process against the in-process stand-in Orb. Reports identifies/s and customer
PUTs, and checks that every customer ends with exactly the last value its calls carried.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fake_orb import FakeOrb

TARGET_ORB = str(Path(sys.executable).with_name("target-orb"))
API_KEY = "bench-key"


def run(records: int, repeat: int, concurrency: int) -> dict:
    customers = max(1, records // repeat)
    with FakeOrb(api_key=API_KEY) as orb, tempfile.TemporaryDirectory() as tmp:
        for n in range(customers):
            orb.add_customer(f"cus_{n}")
        lines = [json.dumps({"type": "SCHEMA", "stream": "engage", "key_properties": [],
                             "schema": {"type": "object", "properties": {}}})]
        last: dict[str, str] = {}
        for n in range(records):
            customer = f"cus_{n % customers}"
            last[customer] = str(n)
            lines.append(json.dumps({"type": "RECORD", "stream": "engage", "record": {
                "type": "identify", "userId": customer,
                "traits": {"audience_n": n, "email": f"user{n}@example.com"}}}))
        lines.append(json.dumps({"type": "STATE", "value": {"n": records}}))
        config = {"api_key": API_KEY, "api_url": orb.url, "external_customer_id_field": "userId",
                  "identify_policy": "customer_metadata", "traits_mapping": {"audience_n": "n"},
                  "max_concurrent_requests": concurrency, "progress_interval_seconds": 0,
                  "dead_letter_path": str(Path(tmp) / "dl.jsonl")}
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        (Path(tmp) / "in.singer").write_text("\n".join(lines) + "\n")
        started = time.monotonic()
        proc = subprocess.run(
            [TARGET_ORB, "--config", str(Path(tmp) / "config.json"), "--input",
             str(Path(tmp) / "in.singer")],
            capture_output=True, text=True, timeout=900, check=False,
        )
        seconds = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr[-2000:]
        wrong = [c for c, n in last.items() if orb.customer(c)["metadata"] != {"n": n}]
        assert not wrong, f"{len(wrong)} customers ended with the wrong metadata"
        assert "example.com" not in json.dumps(orb.customer_updates())
        return {"records": records, "customers": customers, "seconds": round(seconds, 2),
                "identifies_per_s": round(records / seconds), "puts": len(orb.customer_updates())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1, help="Identify calls per customer")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(run(args.records, args.repeat, args.concurrency)))


if __name__ == "__main__":
    main()
