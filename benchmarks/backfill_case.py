"""Benchmark case BF: N late events through Orb backfills, beside the same N live.

Three kinds of run, interleaved per round, each a fresh ``target-orb`` process on a
generated file (``generate.py``) with ``late_event_policy: backfill``:

- ``live``: timestamps in the last hour, all through live ``/ingest``;
- ``late``: timestamps spread over 30 days ending 10 days ago (two calendar-month windows),
  all through backfills: search, create, ingest with ``?backfill_id=``, close;
- ``late replay``: the same late file again right after ``late``, with the same store
  (``state_url``): every key is known there ("already delivered"), nothing is searched or
  ingested;
- ``late replay, new store``: the same again with an empty store: every key is found by
  search ("already in Orb") and nothing is ingested.

Each ``late`` run has a store of its own (a SQLite file, as by default): the stand-in is
reset between rounds, and a store that remembers deliveries to a reset Orb would rightly
send nothing.

The stand-in Orb (``fake_orb.FakeOrb``, strict backfill rules) runs in this
process; the target under test is its own process. After every run the case checks what
landed (exactly the N keys, nothing billed twice, no backfill left pending) and reports
records/s and Orb requests per 1,000 events (every request the stand-in received, ping,
search, backfill calls and ingest included), so the cost of search and window handling
is visible next to the live case.
"""

from __future__ import annotations

import json
import statistics
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

from generate import generate

from fake_orb import FakeOrb

DAY = 86400.0


@dataclass
class BfRun:
    kind: str
    records: int
    seconds: float
    requests: int
    rc: int
    checks: dict[str, t.Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_1000(self) -> float:
        return self.requests * 1000.0 / self.records if self.records else 0.0


def _config(url: str, workdir: Path, name: str, concurrency: int, store: str) -> Path:
    config = {
        "api_key": "test-orb-key",
        "api_url": url,
        "external_customer_id_field": "userId",
        "properties_passthrough": True,
        "batch_size_rows": 500,
        "max_concurrent_requests": concurrency,
        "progress_interval_seconds": 0,
        "late_event_policy": "backfill",
        "dead_letter_path": str(workdir / f"{name}.dead-letter.jsonl"),
        "state_url": f"sqlite:///{workdir / store}",
    }
    path = workdir / f"{name}.config.json"
    path.write_text(json.dumps(config))
    return path


def _checks(fake: FakeOrb, meta: dict[str, t.Any], *, replay: bool) -> dict[str, t.Any]:
    stats = fake.stats()
    backfills = fake.backfills()
    landed = len(fake.landed)
    return {
        "landed": landed,
        "double_billed": stats.get("double_billed", 0),
        "pending": sum(1 for b in backfills if b["status"] in ("pending", "pending_revert")),
        "backfills": len(backfills),
        "exact": landed == meta["records"]
        and stats.get("double_billed", 0) == 0
        and all(b["status"] not in ("pending", "pending_revert") for b in backfills)
        and (not replay or len(fake.ingest_requests()) == 0),
    }


@dataclass
class _Ctx:
    bench: t.Any
    run_child: t.Callable[..., t.Any]
    target_cmd: list[str]
    concurrency: int
    log: t.Callable[[str], None]


def scenario_backfill(
    bench: t.Any,
    *,
    run_child: t.Callable[..., t.Any],
    target_cmd: list[str],
    n: int,
    rounds: int,
    concurrency: int,
    log: t.Callable[[str], None],
) -> dict[str, t.Any]:
    """Run the case; returns runs by kind.

    Args:
        bench: run.py's Bench (names and the work directory).
        run_child: run.py's run_child (wall time, exit code).
        target_cmd: How to start target-orb.
        n: Records per run.
        rounds: Interleaved rounds.
        concurrency: max_concurrent_requests.
        log: Progress log.

    Returns:
        `{"runs": {kind: [BfRun]}, "records": n, "concurrency": c}`.
    """
    now = time.time()
    log(f"BF: generating {n:,} live and {n:,} late records")
    live = generate(bench.workdir / "bf-live.singer", n)
    # 30 days of history ending 10 days ago: two calendar-month windows at most.
    late = generate(
        bench.workdir / "bf-late.singer", n, now=now - 40 * DAY + 3600, window_seconds=30 * DAY
    )
    runs: dict[str, list[BfRun]] = {
        "live": [], "late": [], "late replay": [], "late replay, new store": [],
    }
    ctx = _Ctx(bench, run_child, target_cmd, concurrency, log)
    fake = FakeOrb(host="127.0.0.1", port=0, api_key="test-orb-key")
    fake.start()
    try:
        for r in range(rounds):
            order = ["live", "late"] if r % 2 == 0 else ["late", "live"]
            for kind in order:
                fake.reset()
                meta = live if kind == "live" else late
                store = f"bf-{kind}-{r}.state.sqlite"
                runs[kind].append(_one(ctx, fake, meta, kind, store, replay=False))
                if kind == "late":
                    for again, again_store in (
                        ("late replay", store),
                        ("late replay, new store", f"bf-replay-{r}.state.sqlite"),
                    ):
                        with fake.lock:
                            fake.requests.clear()
                        runs[again].append(_one(ctx, fake, meta, again, again_store,
                                                replay=True))
    finally:
        fake.stop()
    return {"runs": runs, "records": n, "concurrency": concurrency}


def _one(
    ctx: _Ctx, fake: FakeOrb, meta: dict[str, t.Any], kind: str, store: str, *, replay: bool
) -> BfRun:
    bench, log = ctx.bench, ctx.log
    name = bench.name(f"bf-{kind.replace(' ', '-').replace(',', '')}")
    cfg = _config(fake.url, bench.workdir, name, ctx.concurrency, store)
    cmd = [*ctx.target_cmd, "--config", str(cfg), "--input", str(meta["path"])]
    child = ctx.run_child(cmd, timeout=120 + meta["records"] / 500, workdir=bench.workdir,
                          name=name)
    with fake.lock:
        requests = len(fake.requests)
    run = BfRun(kind, meta["records"], child.seconds, requests, child.rc,
                _checks(fake, meta, replay=replay))
    log(f"BF {kind}: {run.rate:,.0f} rec/s, {run.seconds:.2f} s, {run.per_1000:.2f} requests "
        f"per 1,000 events, {run.checks}, rc={run.rc}")
    return run


def report_backfill(result: dict[str, t.Any] | None) -> list[str]:
    """Markdown lines for the report."""
    if not result:
        return []
    n = result["records"]
    out = [
        "",
        f"## BF: {n:,} late events through backfills vs {n:,} live",
        "",
        f"`late_event_policy: backfill`, max_concurrent_requests {result['concurrency']}, "
        "stand-in at 0 ms in the benchmark process. Late events span 30 days ending 10 days "
        "ago (two calendar-month windows); the replays run the late file again (everything "
        "already delivered: decided by the store at state_url, or with a new store by search). "
        "Requests: every request the stand-in received, per 1,000 events.",
        "",
        "| case | records/s (median) | requests / 1,000 events | wall s (median) | exact |",
        "|---|---:|---:|---:|---|",
    ]
    for kind, runs in result["runs"].items():
        if not runs:
            continue
        rate = statistics.median(r.rate for r in runs)
        per = statistics.median(r.per_1000 for r in runs)
        wall = statistics.median(r.seconds for r in runs)
        exact = all(r.checks.get("exact") and r.rc == 0 for r in runs)
        out.append(f"| {kind} | {rate:,.0f} | {per:.2f} | {wall:.2f} | "
                   f"{'yes' if exact else 'NO'} |")
    return out
