"""Write N realistic Segment Track records as a Singer stream (SCHEMA, RECORDs, ~20 STATEs).

Usage::

    .venv/bin/python benchmarks/generate.py --records 200000 --out /tmp/tracks.singer

Everything is deterministic given ``--seed`` except the timestamps, which are spread
over the hour before ``now`` (so they are inside Orb's 12 h grace window when the
benchmark runs). ``messageId`` is unique by construction (the record index is part of
it). A sidecar ``<out>.meta.json`` records N and the sha256 of the sorted set of
messageIds, which the benchmark compares with what the stand-in received.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import sys
import time
from pathlib import Path

STREAM = "tracks"

SCHEMA = {
    "type": "object",
    "properties": {
        "messageId": {"type": "string"},
        "type": {"type": "string"},
        "event": {"type": "string"},
        "userId": {"type": ["string", "null"]},
        "anonymousId": {"type": ["string", "null"]},
        "channel": {"type": ["string", "null"]},
        "version": {"type": ["integer", "null"]},
        "timestamp": {"type": "string", "format": "date-time"},
        "originalTimestamp": {"type": ["string", "null"], "format": "date-time"},
        "sentAt": {"type": ["string", "null"], "format": "date-time"},
        "receivedAt": {"type": ["string", "null"], "format": "date-time"},
        "integrations": {
            "type": ["object", "null"],
            "properties": {"All": {"type": "boolean"}, "Orb": {"type": "boolean"}},
        },
        "properties": {
            "type": ["object", "null"],
            "properties": {
                "endpoint": {"type": ["string", "null"]},
                "method": {"type": ["string", "null"]},
                "tokens": {"type": ["integer", "null"]},
                "cached": {"type": ["boolean", "null"]},
                "region": {"type": ["string", "null"]},
                "latency_ms": {"type": ["number", "null"]},
                "plan": {"type": ["string", "null"]},
                "tags": {"type": ["array", "null"], "items": {"type": "string"}},
            },
        },
        "context": {
            "type": ["object", "null"],
            "properties": {
                "groupId": {"type": ["string", "null"]},
                "ip": {"type": ["string", "null"]},
                "locale": {"type": ["string", "null"]},
                "library": {
                    "type": ["object", "null"],
                    "properties": {
                        "name": {"type": ["string", "null"]},
                        "version": {"type": ["string", "null"]},
                    },
                },
                "traits": {
                    "type": ["object", "null"],
                    "properties": {"plan": {"type": ["string", "null"]}},
                },
            },
        },
    },
    "required": ["messageId", "type", "event", "timestamp"],
}

EVENTS = ("API Request", "API Request", "API Request", "Tokens Used", "Report Exported",
          "Seat Added", "Storage Written")
ENDPOINTS = ("/v1/search", "/v1/completions", "/v1/embeddings", "/v1/files", "/v1/reports")
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "ap-southeast-2")
PLANS = ("free", "pro", "team", "enterprise")
LIBS = (("@segment/analytics-node", "2.1.0"), ("analytics-python", "2.3.2"),
        ("analytics.js", "next-1.70.0"), ("analytics-go", "3.3.0"))
TAGS = (["beta"], ["batch"], [], ["beta", "internal"], ["sdk"])


def _iso(ts: float) -> str:
    dt = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def make_record(rng: random.Random, i: int, ts: float, prefix: str) -> dict:
    """One Segment Track event; deterministic given the rng state and ts."""
    customer = rng.randrange(5000)
    plan = PLANS[customer % len(PLANS)]
    lib = LIBS[customer % len(LIBS)]
    sent = ts + rng.randrange(50, 900) / 1000
    received = sent + rng.randrange(20, 400) / 1000
    return {
        "type": "track",
        "event": EVENTS[rng.randrange(len(EVENTS))],
        "userId": f"user_{customer:05d}",
        "messageId": f"{prefix}-{i:012x}",
        "timestamp": _iso(ts),
        "sentAt": _iso(sent),
        "receivedAt": _iso(received),
        "integrations": {"All": False, "Orb": True},
        "properties": {
            "endpoint": ENDPOINTS[rng.randrange(len(ENDPOINTS))],
            "tokens": rng.randrange(1, 40000),
            "cached": rng.random() < 0.3,
            "region": REGIONS[rng.randrange(len(REGIONS))],
            "latency_ms": round(rng.uniform(2, 900), 1),
            "plan": plan,
            "tags": TAGS[rng.randrange(len(TAGS))],
        },
        "context": {
            "groupId": f"acct_{customer // 10:04d}",
            "library": {"name": lib[0], "version": lib[1]},
        },
    }


def generate(
    path: Path | str,
    records: int,
    *,
    seed: int = 42,
    states: int = 20,
    now: float | None = None,
    window_seconds: float = 3000.0,
) -> dict:
    """Write the stream; return its metadata (also written to ``<path>.meta.json``).

    Timestamps run evenly from ``now - 3600 s`` to ``now - 3600 s + window_seconds``.
    """
    path = Path(path)
    rng = random.Random(seed)
    # UUID-shaped, 36 characters: a per-seed prefix, then the record index.
    prefix = (f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}"
              f"-{8 + rng.getrandbits(2):x}{rng.getrandbits(12):03x}")
    now = time.time() if now is None else now
    start = now - 3600.0
    step = window_seconds / max(records, 1)
    state_every = max(records // max(states, 1), 1) if states else 0
    enc = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    keys = hashlib.sha256()  # messageIds are generated in sorted order (fixed-width hex)
    n_states = 0
    total_bytes = 0
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        head = enc({"type": "SCHEMA", "stream": STREAM, "schema": SCHEMA,
                    "key_properties": ["messageId"]}) + "\n"
        fh.write(head)
        buf: list[str] = []
        for i in range(records):
            rec = make_record(rng, i, start + i * step, prefix)
            keys.update(rec["messageId"].encode() + b"\n")
            line = enc({"type": "RECORD", "stream": STREAM, "record": rec}) + "\n"
            total_bytes += len(line)
            buf.append(line)
            if state_every and (i + 1) % state_every == 0 and n_states < states:
                n_states += 1
                buf.append(enc({"type": "STATE", "value": {"bookmarks": {STREAM: {
                    "replication_key": "receivedAt",
                    "replication_key_value": rec["receivedAt"]}}}}) + "\n")
            if len(buf) >= 4096:
                fh.write("".join(buf))
                buf.clear()
        fh.write("".join(buf))
    meta = {
        "path": str(path),
        "records": records,
        "states": n_states,
        "seed": seed,
        "stream": STREAM,
        "keys_sha256": keys.hexdigest(),
        "avg_record_line_bytes": round(total_bytes / max(records, 1), 1),
        "file_bytes": path.stat().st_size,
        "first_timestamp": _iso(start),
        "last_timestamp": _iso(start + max(records - 1, 0) * step),
    }
    Path(str(path) + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def keys_digest(keys: list[str] | set[str]) -> str:
    """The digest ``generate`` records: sha256 over the sorted keys, one per line."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode() + b"\n")
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", "-n", type=int, default=200_000)
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--states", type=int, default=20)
    args = p.parse_args(argv)
    meta = generate(args.out, args.records, seed=args.seed, states=args.states)
    print(json.dumps(meta, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
