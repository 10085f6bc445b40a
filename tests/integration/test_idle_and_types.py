"""Issue 10: a quiet tap has its events in Orb and its bookmark saved; `event_types` any case."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import typing as t
from pathlib import Path

from tests.conftest import (
    TARGET_ORB,
    base_config,
    run_target,
    singer_lines,
    track,
)


class QuietTap:
    """target-orb fed through a pipe that the test writes to and keeps open."""

    def __init__(self, config: dict[str, t.Any], tmp_path: Path) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_ORB_")}
        self.stderr_path = tmp_path / "stderr.log"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [TARGET_ORB, "--config", str(config_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
        )
        self.states: queue.Queue[dict] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:  # closed once the target's output ends
            for line in self.proc.stdout:
                if line.strip():
                    self.states.put(json.loads(line))

    def send(self, lines: list[str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(("\n".join(lines) + "\n").encode())
        self.proc.stdin.flush()

    def next_state(self, timeout: float) -> dict | None:
        try:
            return self.states.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self, timeout: float = 30) -> int:
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._reader.join(5)
            self._stderr.close()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def test_quiet_tap_gets_its_partial_batch_sent_and_state_saved_within_seconds(orb, tmp_path):
    config = base_config(orb, tmp_path, flush_interval_seconds=1)
    tap = QuietTap(config, tmp_path)
    try:
        lines = singer_lines([track(n) for n in range(1, 12)])  # 11 records, then STATE
        started = time.monotonic()
        tap.send(lines)
        state = tap.next_state(timeout=15)  # stdin stays open: only the idle flush sends
        waited = time.monotonic() - started
        assert state == {"bookmarks": {"tracks": {"seq": 11}}}, tap.stderr
        assert waited < 10, waited
        assert sorted(e["idempotency_key"] for e in orb.events()) == sorted(
            f"m{n}" for n in range(1, 12)
        )
        # The tap goes on after the pause: later records batch and flush the same way.
        tap.send([json.dumps({"type": "RECORD", "stream": "tracks", "record": track(12)}),
                  json.dumps({"type": "STATE", "value": {"bookmarks": {"tracks": {"seq": 12}}}})])
        assert tap.next_state(timeout=15) == {"bookmarks": {"tracks": {"seq": 12}}}
        assert len(orb.events()) == 12
        # A quiet tap with nothing new does not make the target repeat itself.
        assert tap.next_state(timeout=2.5) is None
    finally:
        rc = tap.close()
    assert rc == 0, tap.stderr
    assert "No input for 1 s: sending" in tap.stderr
    assert "Traceback" not in tap.stderr


def test_flush_interval_zero_turns_the_idle_flush_off(orb, tmp_path):
    tap = QuietTap(base_config(orb, tmp_path, flush_interval_seconds=0), tmp_path)
    try:
        tap.send(singer_lines([track(1), track(2)]))
        assert tap.next_state(timeout=3) is None
        assert orb.events() == []
    finally:
        rc = tap.close()
    assert rc == 0, tap.stderr
    assert len(orb.events()) == 2


def test_flush_interval_out_of_range_is_a_config_error(orb, tmp_path):
    result = run_target(
        base_config(orb, tmp_path, flush_interval_seconds=-1), singer_lines([track(1)]), tmp_path
    )
    assert result.returncode == 1
    # Reported once, by the config schema (its range lives there).
    assert "-1 is less than the minimum of 0 in config['flush_interval_seconds']" in result.stderr
    assert "Traceback" not in result.stderr


def test_event_types_are_case_insensitive_on_both_sides(orb, tmp_path):
    records = [
        track(1, type="track"),
        track(2, type="TRACK"),
        track(3, type="Track"),
        track(4, type="page"),
        track(5, type="Screen"),
        track(6, type=None),  # no type counts as track
    ]
    config = base_config(orb, tmp_path, event_types=["Track", "SCREEN"])
    result = run_target(config, singer_lines(records), tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(e["idempotency_key"] for e in orb.events()) == ["m1", "m2", "m3", "m5", "m6"]
    assert result.dead_letters == []
