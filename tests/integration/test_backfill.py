"""`late_event_policy: backfill` over real sockets: the installed `target-orb` against the stand-in.

Every test checks what Orb bills (`FakeOrb.events()`: live events plus reflected backfills,
a key billed twice appears twice), `stats()["double_billed"]`, the backfills Orb holds and
their status, the requests the target made, the exit code and the STATE lines
(README "Loading history"; Orb API reference: event backfills, event search).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import typing as t
from collections import Counter
from pathlib import Path

import pytest
import requests

from fake_orb import FakeOrb
from fake_orb.common import _Outcome
from tests.conftest import (
    API_KEY,
    assert_no_secret,
    base_config,
    run_target,
    singer_lines,
    track,
)

UTC = datetime.timezone.utc
DAY = datetime.timedelta(days=1)


def ago(delta: datetime.timedelta) -> str:
    return (datetime.datetime.now(UTC) - delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def history(days: int, per_day: int = 2, start: int = 1) -> list[dict]:
    """`per_day` records a day for `days` days, the newest 1 day old."""
    out = []
    n = start
    for day in range(1, days + 1):
        for j in range(per_day):
            out.append(track(n, timestamp=ago(day * DAY + j * datetime.timedelta(minutes=7))))
            n += 1
    return out


def backfill_config(orb: FakeOrb, tmp_path: Path, **overrides: t.Any) -> dict:
    return base_config(orb, tmp_path, late_event_policy="backfill", **overrides)


def billed(orb: FakeOrb) -> Counter[str]:
    return Counter(e["idempotency_key"] for e in orb.events())


def live_ingested_keys(orb: FakeOrb) -> set[str]:
    """Keys sent in live /ingest requests (no backfill_id)."""
    with orb.lock:
        return {
            k for r in orb.requests
            if r["path"] == "/v1/ingest" and not r.get("backfill_id") for k in r["keys"]
        }


def parse(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def assert_backfills_sound(orb: FakeOrb) -> list[dict]:
    """Every backfill: non-replacing, unscoped, from a UTC midnight to a UTC midnight or to the
    grace boundary at its creation (orb-billing events/backfills.py), at most 31 days, not
    pending."""
    backfills = orb.backfills()
    grace = datetime.timedelta(hours=orb.grace_period_hours)
    for bf in backfills:
        start, end = parse(bf["timeframe_start"]), parse(bf["timeframe_end"])
        assert bf["replace_existing_events"] is False
        assert bf["customer_id"] is None
        assert start.time() == datetime.time(0)
        assert end.time() == datetime.time(0) or end <= parse(bf["created_at"]) - grace, bf
        assert end - start <= 31 * DAY
        assert bf["status"] == "reflected", bf
    return backfills


class CaptureOrb(FakeOrb):
    """The stand-in, keeping the bodies of backfill creates and faults to script on them."""

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self.creates: list[tuple[dict, str | None]] = []
        self.create_faults: list[str] = []

    def _process(self, req):  # the stand-in's private hook
        if req.method == "POST" and req.path == "/v1/events/backfills":
            with self.lock:
                self.creates.append(
                    (json.loads(req.body or b"null"), req.headers.get("Idempotency-Key"))
                )
                fault = self.create_faults.pop(0) if self.create_faults else None
            if fault == "503":
                return _Outcome(503, {"type": "x#500", "status": 503, "detail": "busy"})
            if fault == "reset_after":  # Orb made it; the answer is lost
                super()._process(req)
                return _Outcome(None, action="reset")
        return super()._process(req)


@pytest.fixture
def capture_orb() -> t.Iterator[CaptureOrb]:
    fake = CaptureOrb(api_key=API_KEY)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


# ----------------------------------------------------------------------------- history


def test_forty_days_land_once_through_closed_non_replacing_backfills(capture_orb, tmp_path):
    orb = capture_orb
    # An event Orb already bills, loaded earlier by someone through a closed backfill.
    day = ago(2 * DAY)[:10]
    earlier = track(9000, timestamp=f"{day}T00:00:01Z")
    pre = orb.create_backfill(f"{day}T00:00:00Z", f"{ago(1 * DAY)[:10]}T00:00:00Z",
                              replace_existing_events=False)["id"]
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {API_KEY}"
    body = {"events": [{"idempotency_key": earlier["messageId"], "event_name": earlier["event"],
                        "external_customer_id": earlier["userId"],
                        "timestamp": earlier["timestamp"], "properties": {"tokens": 9000,
                                                                          "region": "eu"}}]}
    assert session.post(f"{orb.url}/ingest", params={"backfill_id": pre}, json=body,
                        timeout=5).status_code == 200
    assert session.post(f"{orb.url}/events/backfills/{pre}/close", timeout=5).ok
    assert orb.backfill(pre)["status"] == "reflected"
    session.close()
    old = history(40)
    fresh = [track(500 + i) for i in range(5)]
    records = [*old[:30], *fresh, *old[30:], earlier]

    result = run_target(backfill_config(orb, tmp_path), singer_lines(records), tmp_path)

    assert result.returncode == 0, result.stderr
    counts = billed(orb)
    assert set(counts) == {r["messageId"] for r in records}
    assert set(counts.values()) == {1}, "every event billed exactly once"
    assert orb.stats()["double_billed"] == 0
    assert not live_ingested_keys(orb) & {r["messageId"] for r in old}, "late event sent live"
    assert live_ingested_keys(orb) == {r["messageId"] for r in fresh}
    backfills = [b for b in assert_backfills_sound(orb) if b["id"] != pre]
    assert 2 <= len(backfills) <= 3  # 40 days span two or three calendar months
    for body, key in orb.creates:
        assert body["replace_existing_events"] is False and "close_time" in body
        assert key and key.startswith("target-orb-backfill-")
    assert sum(len(orb.backfill_events(b["id"])) for b in backfills) == len(old)
    assert [s["bookmarks"]["tracks"]["seq"] for s in result.states] == [len(records)]
    assert result.dead_letters == []
    for bf in backfills:
        assert f"backfill {bf['id']}: {bf['timeframe_start']}..{bf['timeframe_end']}" in (
            result.stderr
        )
    assert "already in Orb:        1" in result.stderr
    metrics = json.loads(result.stderr.split("target-orb metrics: ")[1].splitlines()[0])
    assert metrics["already_in_orb"] == 1
    assert sorted(b["id"] for b in metrics["backfills"]) == sorted(b["id"] for b in backfills)
    assert all(b["status"] == "reflected" for b in metrics["backfills"])
    # The ownership record is in the store at `state_url` (issue 17), not beside the file.
    assert not (tmp_path / "dead-letter.backfills.json").exists()
    with sqlite3.connect(tmp_path / "target-orb-ledger.sqlite") as db:
        rows = db.execute("SELECT backfill_id, job_name, state FROM target_orb_backfills")
        record = list(rows)
    assert {r[0] for r in record} == {b["id"] for b in backfills}
    assert {(r[1], r[2]) for r in record} == {("target-orb", "closed")}
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_a_replay_lands_nothing_new_and_counts_already_in_orb(orb, tmp_path):
    records = history(40, per_day=3)
    config = backfill_config(orb, tmp_path)
    first = run_target(config, singer_lines(records), tmp_path / "one")
    assert first.returncode == 0, first.stderr
    before = billed(orb)
    backfills = orb.backfills()
    with orb.lock:
        orb.requests.clear()

    second = run_target(config, singer_lines(records), tmp_path / "two")

    assert second.returncode == 0, second.stderr
    assert billed(orb) == before and set(before.values()) == {1}
    assert orb.stats()["double_billed"] == 0
    assert orb.backfills() == backfills, "a replay creates no backfill"
    assert orb.ingest_requests() == []
    # The store at state_url (default: beside the dead-letter file) knows every key: no
    # search, nothing sent.
    assert f"already delivered:     {len(records)}" in second.stderr
    assert not [r for r in orb.requests if r["path"] == "/v1/events/search"]
    assert [s["bookmarks"]["tracks"]["seq"] for s in second.states] == [len(records)]

    # With a new, empty store, Orb's search finds them all.
    fresh_store = dict(config, state_url=f"sqlite:///{tmp_path / 'fresh.sqlite'}")
    third = run_target(fresh_store, singer_lines(records), tmp_path / "three")
    assert third.returncode == 0, third.stderr
    assert billed(orb) == before and orb.ingest_requests() == []
    assert orb.backfills() == backfills
    assert f"already in Orb:        {len(records)}" in third.stderr


@pytest.mark.parametrize("fault", ["503", "reset_after"])
def test_a_retried_create_makes_one_backfill(capture_orb, tmp_path, fault):
    orb = capture_orb
    orb.create_faults = [fault]
    records = history(3)
    result = run_target(backfill_config(orb, tmp_path), singer_lines(records), tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(orb.backfills()) == 1
    assert len(orb.creates) == 2
    assert orb.creates[0] == orb.creates[1], "the retry sends the same body and key"
    assert_backfills_sound(orb)
    assert set(billed(orb).values()) == {1} and len(billed(orb)) == len(records)
    assert "retrying" in result.stderr


# ----------------------------------------------------------------------------- overlaps


def test_a_foreign_pending_backfill_stops_before_anything_of_its_window_is_sent(orb, tmp_path):
    now = datetime.datetime.now(UTC)
    month_start = (now - 3 * DAY).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    close = now + datetime.timedelta(hours=6)
    foreign = orb.create_backfill(month_start, month_start + 5 * DAY, close_time=close,
                                  replace_existing_events=False)
    in_window = [track(i, timestamp=(month_start + datetime.timedelta(hours=i)).isoformat())
                 for i in range(1, 4)]
    other = [track(100, timestamp=ago(70 * DAY))]  # another month: loads, then closes
    records = [*other, *in_window]

    result = run_target(backfill_config(orb, tmp_path), singer_lines(records), tmp_path)

    assert result.returncode == 1
    assert foreign["id"] in result.stderr
    assert foreign["close_time"] in result.stderr
    assert f"/v1/events/backfills/{foreign['id']}/close" in result.stderr
    assert "did not create" in result.stderr and "rerun" in result.stderr
    window_keys = {r["messageId"] for r in in_window}
    with orb.lock:
        sent = {k for r in orb.requests for k in r["keys"]}
    assert not sent & window_keys, "nothing of that window was sent"
    assert orb.backfill_events(foreign["id"]) == []
    assert orb.backfill(foreign["id"])["status"] == "pending", "left as it was"
    assert result.states == []
    mine = [b for b in orb.backfills() if b["id"] != foreign["id"]]
    assert all(b["status"] != "pending" for b in mine), "ours is closed on failure too"
    assert "Traceback" not in result.stderr


def test_boundary_events_orb_rejects_as_too_old_go_to_a_backfill(tmp_path):
    # Orb's grace period is shorter than the setting says: events 3 h old look live to
    # target-orb, and Orb refuses them as too old.
    fake = FakeOrb(api_key=API_KEY, grace_period_hours=1)
    fake.start()
    try:
        records = [track(i, timestamp=ago(datetime.timedelta(hours=3, minutes=i)))
                   for i in range(1, 6)]
        records.append(track(6))  # fresh
        result = run_target(backfill_config(fake, tmp_path), singer_lines(records), tmp_path)
        assert result.returncode == 0, result.stderr
        assert set(billed(fake).values()) == {1} and len(billed(fake)) == 6
        assert result.dead_letters == []
        assert "(+5 Orb rejected as too old)" in result.stderr
        (bf,) = assert_backfills_sound(fake)
        assert sorted(e["idempotency_key"] for e in fake.backfill_events(bf["id"])) == [
            f"m{i}" for i in range(1, 6)
        ]
    finally:
        fake.stop()


def test_dry_run_prints_the_plan_and_makes_no_request(orb, tmp_path):
    records = [*history(40), track(999)]
    result = run_target(backfill_config(orb, tmp_path, dry_run=True), singer_lines(records),
                        tmp_path)
    assert result.returncode == 0, result.stderr
    with orb.lock:
        assert orb.requests == []
    assert "DRY RUN: backfill plan" in result.stderr
    assert "Nothing was created" in result.stderr
    plan = json.loads(result.stderr.split("target-orb metrics: ")[1].splitlines()[0])
    assert sum(w["events"] for w in plan["backfill_plan"]) == 80
    assert result.states == []
    assert not (tmp_path / "dead-letter.backfills.json").exists()


# ----------------------------------------------------------------------------- kill and rerun


_FAST_DRAIN = (
    "import sys; from target_orb.target import TargetOrb; "
    "TargetOrb._MAX_RECORD_AGE_IN_MINUTES = float(sys.argv.pop(1)); TargetOrb.cli()"
)


def start_target(config: dict, lines: list[str], workdir: Path) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "input.singer").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_ORB_")}
    # The child keeps its own copy of the stderr file; this process closes its own at once.
    with (workdir / "stderr").open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", _FAST_DRAIN, "0.002", "--config",
             str(workdir / "config.json"), "--input", str(workdir / "input.singer")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            text=True, env=env,
        )


def held_keys(orb: FakeOrb) -> set[str]:
    """Keys Orb bills or holds in any backfill (pending ones included)."""
    keys = set(billed(orb))
    for bf in orb.backfills():
        keys |= {e["idempotency_key"] for e in orb.backfill_events(bf["id"])}
    return keys


def watch_states(proc: subprocess.Popen, orb: FakeOrb, out: list[tuple[dict, set[str]]]) -> None:
    assert proc.stdout is not None
    with proc.stdout:  # closed at the end of the output (the run ended or was killed)
        for line in proc.stdout:
            if line.strip():
                out.append((json.loads(line), held_keys(orb)))


def assert_states_honest(states: list[tuple[dict, set[str]]], records: list[dict]) -> None:
    """When each STATE line was read, every record it covers was in Orb or in a backfill."""
    for state, known in states:
        covered = records[: state["bookmarks"]["tracks"]["seq"]]
        ahead = [r["messageId"] for r in covered if r["messageId"] not in known]
        assert not ahead, f"STATE {state} written before {ahead[:5]} were in Orb or a backfill"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_run_stopped_mid_backfill_then_rerun_lands_everything_once(tmp_path, signum):
    fake = FakeOrb(api_key=API_KEY, latency_ms=60)
    fake.start()
    try:
        records = history(40, per_day=15)  # 600 late records
        lines = singer_lines(records, state_every=20)
        config = backfill_config(fake, tmp_path, batch_size_rows=10, max_concurrent_requests=2)
        proc = start_target(config, lines, tmp_path / "run1")
        states: list[tuple[dict, set[str]]] = []
        reader = threading.Thread(target=watch_states, args=(proc, fake, states), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            b["events_ingested"] >= 30 for b in fake.backfills()
        ):
            time.sleep(0.05)
        proc.send_signal(signum)
        code = proc.wait(30)
        reader.join(10)
        stderr = (tmp_path / "run1" / "stderr").read_text()
        assert any(b["events_ingested"] for b in fake.backfills()), stderr
        assert len(held_keys(fake)) < len(records), "the run finished before the signal"
        assert_states_honest(states, records)
        first = fake.backfills()
        if signum == signal.SIGKILL:
            assert code == -signal.SIGKILL
            assert any(b["status"] == "pending" for b in first), "a killed run leaves it pending"
        else:
            assert code == 128 + signal.SIGTERM, stderr
            assert all(b["status"] != "pending" for b in first), "closed on SIGTERM"
            assert "Traceback" not in stderr

        # The tap reruns from its last STATE (at-least-once): here from the start.
        rerun = run_target(config, lines, tmp_path / "run2")

        assert rerun.returncode == 0, rerun.stderr
        counts = billed(fake)
        assert set(counts) == {r["messageId"] for r in records}
        assert set(counts.values()) == {1}, "everything billed once"
        assert fake.stats()["double_billed"] == 0
        assert_backfills_sound(fake)
        assert [s["bookmarks"]["tracks"]["seq"] for s in rerun.states][-1] == len(records)
    finally:
        fake.stop()


def test_state_moves_only_past_late_events_held_in_a_backfill(tmp_path):
    fake = FakeOrb(api_key=API_KEY, latency_ms=30)
    fake.start()
    try:
        records = history(20, per_day=10)
        lines = singer_lines(records, state_every=10)
        config = backfill_config(fake, tmp_path, batch_size_rows=10, max_concurrent_requests=3)
        proc = start_target(config, lines, tmp_path)
        states: list[tuple[dict, set[str]]] = []
        watch_states(proc, fake, states)
        assert proc.wait(60) == 0, (tmp_path / "stderr").read_text()
        assert len(states) >= 3, "STATE lines written mid-run"
        assert_states_honest(states, records)
        assert states[-1][0]["bookmarks"]["tracks"]["seq"] == len(records)
        assert set(billed(fake).values()) == {1} and len(billed(fake)) == len(records)
    finally:
        fake.stop()
