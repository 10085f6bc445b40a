"""What `load_method: upsert` costs next to `append-only`, against the stand-in Orb.

    .venv/bin/python benchmarks/corrections.py [--records 20000] [--changed 200]

Runs the installed `target-orb` as a child process on one generated input, in this order:
append-only (fresh stand-in); upsert, all new (fresh stand-in, fresh SQLite ledger); upsert
replay, all unchanged; upsert with `--changed` rows changed (amendments); upsert with an
empty ledger against an Orb that holds every event (decided by search). Prints wall seconds,
records/s, and the requests each run made, and checks what the stand-in bills.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fake_orb import FakeOrb  # noqa: E402

TARGET = str(Path(sys.executable).with_name("target-orb"))
KEY = "bench-key"
CUSTOMERS = 100


def records(n: int, changed: int, ts: str) -> list[str]:
    schema = {"type": "SCHEMA", "stream": "tracks", "key_properties": [],
              "schema": {"type": "object", "properties": {}}}
    lines = [json.dumps(schema)]
    step = max(1, n // changed) if changed else 0
    for i in range(n):
        tokens = i % 97
        if step and i % step == 0 and i // step < changed:
            tokens += 1000
        rec = {"type": "track", "messageId": f"m{i}", "userId": f"cust_{i % CUSTOMERS}",
               "event": "API Request", "timestamp": ts,
               "properties": {"tokens": tokens, "region": "eu"}}
        lines.append(json.dumps({"type": "RECORD", "stream": "tracks", "record": rec}))
        if i and i % 5000 == 0:
            lines.append(json.dumps({"type": "STATE", "value": {"seq": i}}))
    lines.append(json.dumps({"type": "STATE", "value": {"seq": n}}))
    return lines


def run(orb: FakeOrb, work: Path, name: str, lines: list[str], **config: object) -> dict:
    cfg = {"api_key": KEY, "api_url": orb.url, "external_customer_id_field": "userId",
           "properties_mapping": {"tokens": "tokens", "region": "region"},
           "dead_letter_path": str(work / "dl.jsonl"), "progress_interval_seconds": 0,
           **config}
    (work / f"{name}.json").write_text(json.dumps(cfg))
    (work / f"{name}.singer").write_text("\n".join(lines) + "\n")
    before = len(orb.requests)
    start = time.perf_counter()
    proc = subprocess.run(
        [TARGET, "--config", str(work / f"{name}.json"), "--input", str(work / f"{name}.singer")],
        capture_output=True, text=True, timeout=1800, check=False,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        msg = f"{name} failed"
        raise SystemExit(msg)
    kinds: dict[str, int] = {}
    for r in orb.requests[before:]:
        path = r["path"]
        if path.startswith("/v1/events/m"):
            path = "/v1/events/{key}"
        label = f"{r['method']} {path}"
        kinds[label] = kinds.get(label, 0) + 1
    n = sum(1 for line in lines if '"RECORD"' in line)
    return {"run": name, "seconds": round(seconds, 2), "records_per_s": round(n / seconds),
            "requests": kinds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--changed", type=int, default=200)
    args = p.parse_args()
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=30)
    ts = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # one time for every run: rows keep their time
    base = records(args.records, 0, ts)
    changed = records(args.records, args.changed, ts)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with FakeOrb(api_key=KEY, accept_all=True) as orb:
            (work / "a").mkdir()
            results.append(run(orb, work / "a", "append-only", base))
        with FakeOrb(api_key=KEY, accept_all=True, amend_cap=10**6) as orb:
            for c in range(CUSTOMERS):
                orb.add_customer(f"cust_{c}")
            (work / "u").mkdir()
            results.append(run(orb, work / "u", "upsert-all-new", base, load_method="upsert"))
            results.append(run(orb, work / "u", "upsert-unchanged", base, load_method="upsert"))
            results.append(run(orb, work / "u", "upsert-changed", changed, load_method="upsert"))
            (work / "s").mkdir()
            results.append(run(orb, work / "s", "upsert-empty-ledger", changed,
                               load_method="upsert"))
            billed = {e["idempotency_key"]: orb.amendments(e["idempotency_key"])[-1]
                      for e in orb.events()}
            expected = {
                json.loads(line)["record"]["messageId"]:
                    json.loads(line)["record"]["properties"]["tokens"]
                for line in changed if '"RECORD"' in line
            }
            wrong = [k for k, v in billed.items() if v["properties"]["tokens"] != expected[k]]
            ok = len(billed) == args.records and not wrong
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"landed_keys_ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
