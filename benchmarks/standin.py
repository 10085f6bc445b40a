"""The benchmark's stand-in Orb: ``fake_orb.FakeOrb`` in its own process.

It runs in a separate process so its CPU is not counted in the target under test (on a
2-core machine it still competes with the target for CPU). The parent drives it with
one JSON command per line on stdin and reads one JSON answer per line on stdout:

- ``{"cmd": "reset"}``: forget everything that landed.
- ``{"cmd": "summary"}``: ``landed`` (unique keys), ``keys_sha256`` (sha256 over the
  sorted landed keys, one per line, as ``generate.py`` computes it), ``resent_keys``
  (keys that arrived more than once), ``conflicting_keys`` (keys that arrived again
  with a different body), ``ingest_requests``, ``non_200``, ``max_events_per_request``
  ``status_429`` (answers 429, with ``--rate-limit-events``) and ``cpu_seconds`` (the
  stand-in's own CPU time so far; ``reset`` returns it too).
- ``{"cmd": "stop"}`` or EOF on stdin: stop and exit.

The first line it prints is ``{"url": "http://127.0.0.1:PORT/v1"}``. It binds only to
127.0.0.1 and exits on its own after ``--max-seconds``.

To keep the stand-in's memory small at 1M events, the body of each landed event is kept
only as a 64-bit digest of its canonical (sorted-key) JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import typing as t

import msgspec

from fake_orb import FakeOrb, RateLimit

_CANONICAL = msgspec.json.Encoder(order="sorted")


class DigestFakeOrb(FakeOrb):
    """FakeOrb that stores a digest per key and notices a key landing with another body."""

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self.conflicting: set[str] = set()

    def _store(self, events: list[dict[str, t.Any]]) -> None:
        digests = [
            (ev["idempotency_key"], hash(_CANONICAL.encode(ev))) for ev in events
        ]
        with self.lock:
            landed = self.landed
            for key, digest in digests:
                old = landed.get(key)
                if old is None:
                    landed[key] = digest  # type: ignore[assignment]
                else:
                    self.duplicates += 1
                    if old != digest:
                        self.conflicting.add(key)

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.conflicting.clear()
            if self.rate_limit is not None:  # each run starts with the window's budget unused
                old = self.rate_limit
                self.rate_limit = RateLimit(
                    events_per_window=old.events_per_window, window_seconds=old.window_seconds,
                    requests_per_second=old.requests_per_second, clock=old.clock,
                )

    def summary(self) -> dict[str, t.Any]:
        with self.lock:
            keys = sorted(self.landed)
            ingest = [r for r in self.requests if r["path"] == "/v1/ingest"]
            resent = sum(1 for n in self.key_send_counts.values() if n > 1)
            out = {
                "landed": len(keys),
                "duplicates": self.duplicates,
                "resent_keys": resent,
                "conflicting_keys": len(self.conflicting),
                "ingest_requests": len(ingest),
                "non_200": sum(1 for r in ingest if r["status"] != 200),
                "status_429": sum(1 for r in ingest if r["status"] == 429),
                "max_events_per_request": max((r["event_count"] for r in ingest), default=0),
            }
        h = hashlib.sha256()
        for k in keys:
            h.update(k.encode() + b"\n")
        out["keys_sha256"] = h.hexdigest()
        out["cpu_seconds"] = _cpu()
        return out


def _cpu() -> float:
    """User + system CPU seconds this process used so far."""
    times = os.times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark stand-in Orb (stdin/stdout control).")
    p.add_argument("--latency-ms", type=float, default=0)
    p.add_argument("--max-seconds", type=float, default=3600)
    p.add_argument("--api-key", default="test-orb-key")
    p.add_argument("--rate-limit-events", type=int, default=None,
                   help="Orb-style fixed window: events per window (429 without Retry-After)")
    p.add_argument("--rate-limit-window-seconds", type=float, default=60.0)
    args = p.parse_args(argv)
    limit = (
        RateLimit(events_per_window=args.rate_limit_events,
                  window_seconds=args.rate_limit_window_seconds)
        if args.rate_limit_events else None
    )
    fake = DigestFakeOrb(
        host="127.0.0.1", port=0, api_key=args.api_key, accept_all=True,
        latency_ms=args.latency_ms, rate_limit=limit,
    )
    # Request records keep every key; that is fine for the benchmark sizes (<= 1M).
    fake.start()
    timer = threading.Timer(args.max_seconds, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    out = sys.stdout

    def answer(obj: dict[str, t.Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    answer({"url": fake.url, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            cmd = json.loads(line).get("cmd")
            if cmd == "reset":
                fake.reset()
                answer({"ok": True, "cpu_seconds": _cpu()})
            elif cmd == "summary":
                answer(fake.summary())
            elif cmd == "stop":
                answer({"ok": True})
                break
            else:
                answer({"error": f"unknown command {cmd!r}"})
    finally:
        fake.stop()
        timer.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
