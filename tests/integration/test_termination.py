"""Kill and rerun: STATE never runs ahead of delivery, and a rerun from the last STATE completes.

The installed `target-orb` is started with `subprocess.Popen` against the stand-in Orb, its
STATE lines are read as they come, and it is stopped with SIGTERM or SIGKILL mid-run.

target-orb offers STATE from the SDK's drain_all, which runs every
`_MAX_RECORD_AGE_IN_MINUTES` (1 min) and at the end of the input; the long-run tests lower
that age (the same CLI, started through `python -c`) so a run of a few seconds writes STATE
lines mid-run.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest

from fake_orb import FakeOrb
from tests.conftest import (
    API_KEY,
    SEGMENT_SCHEMA,
    TARGET_ORB,
    assert_no_secret,
    base_config,
    singer_lines,
    track,
)
from tests.integration.test_faults import expected_event, seq_of

N_RECORDS = 2000
STATE_EVERY = 100
DRAIN_AGE_MINUTES = 0.005  # the SDK drains (and offers STATE) every 0.3 s
_FAST_DRAIN = (
    "import sys; from target_orb.target import TargetOrb; "
    "TargetOrb._MAX_RECORD_AGE_IN_MINUTES = float(sys.argv.pop(1)); TargetOrb.cli()"
)


def resume_lines(records: list[dict], start: int) -> list[str]:
    """The tap's rerun: records[start:] with STATE seq numbered from the original stream."""
    lines = [json.dumps({"type": "SCHEMA", "stream": "tracks", "schema": SEGMENT_SCHEMA,
                         "key_properties": []})]
    for seq, record in enumerate(records[start:], start=start + 1):
        lines.append(json.dumps({"type": "RECORD", "stream": "tracks", "record": record}))
        if seq % STATE_EVERY == 0 or seq == len(records):
            lines.append(json.dumps(
                {"type": "STATE", "value": {"bookmarks": {"tracks": {"seq": seq}}}},
            ))
    return lines


class Running:
    """A target-orb process whose STATE lines are read (and checked against Orb) as they come."""

    def __init__(
        self, orb: FakeOrb, config: dict, lines: list[str], tmp_path: Path, *,
        drain_age_minutes: float | None = None,
    ) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(config))
        input_path = tmp_path / "input.singer"
        input_path.write_text("\n".join(lines) + "\n")
        cmd = [TARGET_ORB] if drain_age_minutes is None else [
            sys.executable, "-c", _FAST_DRAIN, str(drain_age_minutes)]
        cmd += ["--config", str(config_path), "--input", str(input_path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_ORB_")}
        self.orb = orb
        self.stderr_path = tmp_path / "stderr.log"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, env=env,
        )
        # (STATE value, keys Orb had stored when the line was read)
        self.states: list[tuple[dict, set[str]]] = []
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                with self.orb.lock:
                    known = set(self.orb.landed)
                state = json.loads(line)
                self.states.append((state, known))
                self._queue.put(state)
        self._queue.put(None)

    def wait_for_states(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.states) < count:
            try:
                if self._queue.get(timeout=max(0.0, deadline - time.monotonic())) is None:
                    break
            except queue.Empty:
                break
        assert len(self.states) >= count, (
            f"only {len(self.states)} STATE lines within {timeout} s:\n{self.stderr()}"
        )

    def finish(self, timeout: float) -> int:
        returncode = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        return returncode

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def assert_states_never_ahead(run: Running, records: list[dict]) -> None:
    """When each STATE line was read, Orb had stored every record it covers."""
    for state, known in run.states:
        ahead = [r["messageId"] for r in records[: seq_of(state)] if r["messageId"] not in known]
        assert not ahead, f"STATE {state} was written before {ahead[:5]}... landed"


@pytest.fixture
def slow_orb() -> t.Iterator[FakeOrb]:
    fake = FakeOrb(api_key=API_KEY, latency_ms=20)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_mid_run_then_rerun_from_last_state_lands_everything_once(
    slow_orb, tmp_path, signum,
):
    orb = slow_orb
    records = [track(i) for i in range(1, N_RECORDS + 1)]
    config = base_config(orb, tmp_path, batch_size_rows=10, max_concurrent_requests=2)
    run = Running(orb, config, singer_lines(records, state_every=STATE_EVERY),
                  tmp_path / "run1", drain_age_minutes=DRAIN_AGE_MINUTES)
    try:
        run.wait_for_states(2, timeout=20)
        run.proc.send_signal(signum)
        returncode = run.finish(timeout=15)
        stderr = run.stderr()
    finally:
        run.close()

    if signum == signal.SIGTERM:
        assert returncode == 128 + signal.SIGTERM, stderr
        assert "Stopped by signal 15" in stderr
        assert "Traceback" not in stderr
        assert_no_secret(stderr)
    else:
        assert returncode == -signal.SIGKILL
    assert len(orb.landed) < N_RECORDS, "the run finished before the signal; slow it down"
    # STATE never ahead of delivery: checked when each line was read, and at the end.
    assert_states_never_ahead(run, records)
    seqs = [seq_of(state) for state, _ in run.states]
    assert seqs == sorted(seqs)
    last = seqs[-1]
    assert last < N_RECORDS
    for record in records[:last]:
        assert orb.landed[record["messageId"]] == expected_event(record)

    # Rerun as an at-least-once tap would: from its last emitted state, replaying 50 before it.
    start = max(0, last - 50)
    rerun_dir = tmp_path / "run2"
    config2 = {**config, "batch_size_rows": 500, "max_concurrent_requests": 4,
               "dead_letter_path": str(rerun_dir / "dead-letter.jsonl")}
    rerun = Running(orb, config2, resume_lines(records, start), rerun_dir)
    try:
        assert rerun.finish(timeout=60) == 0, rerun.stderr()
    finally:
        rerun.close()
    assert [seq_of(s) for s, _ in rerun.states] == [N_RECORDS]
    assert_states_never_ahead(rerun, records)
    assert len(orb.landed) == N_RECORDS
    for record in records:
        # One body per key: the stand-in keeps the first and counts later sends as duplicates.
        assert orb.landed[record["messageId"]] == expected_event(record)
        assert orb.key_send_counts[record["messageId"]] >= 1
    for record in records[start:last]:
        assert orb.key_send_counts[record["messageId"]] >= 2  # the replayed overlap
    assert not (tmp_path / "run1" / "dead-letter.jsonl").exists()
    assert not (rerun_dir / "dead-letter.jsonl").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_a_batch_is_in_flight_writes_no_state_and_rerun_delivers(
    orb, tmp_path, signum,
):
    records = [track(i) for i in range(1, 6)]
    orb.script({"action": "hang", "seconds": 30})
    config = base_config(orb, tmp_path)
    lines = singer_lines(records, state_every=1)
    run = Running(orb, config, lines, tmp_path / "run1")
    try:
        deadline = time.monotonic() + 15
        while not orb.ingest_requests() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert orb.ingest_requests(), run.stderr()
        started = time.monotonic()
        run.proc.send_signal(signum)
        returncode = run.finish(timeout=15)
        took = time.monotonic() - started
        stderr = run.stderr()
    finally:
        run.close()
    assert returncode == 128 + signum, stderr
    assert took < 10, f"took {took:.1f} s to stop"
    assert run.states == []  # no STATE for the batch in flight
    assert orb.landed == {}
    assert dict(orb.key_send_counts) == {f"m{i}": 1 for i in range(1, 6)}
    assert f"Stopped by signal {int(signum)}. 5 events in flight were not acknowledged" in stderr
    assert "Traceback" not in stderr

    # No STATE was emitted, so the tap sends everything again: it all lands once.
    rerun_dir = tmp_path / "run2"
    rerun = Running(orb, config, lines, rerun_dir)
    try:
        assert rerun.finish(timeout=30) == 0, rerun.stderr()
    finally:
        rerun.close()
    assert [seq_of(s) for s, _ in rerun.states] == [5]
    assert_states_never_ahead(rerun, records)
    assert orb.events() == [expected_event(r) for r in records]
    assert dict(orb.key_send_counts) == {f"m{i}": 2 for i in range(1, 6)}
    assert orb.duplicates == 0
