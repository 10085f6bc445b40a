"""Shared test harness: a loopback stand-in Orb and a runner for the installed `target-orb`."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest

from fake_orb import FakeOrb

API_KEY = "test-orb-key-SECRET-0123456789"
TARGET_ORB = str(Path(sys.executable).with_name("target-orb"))

SEGMENT_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"type": ["string", "null"]},
        "messageId": {"type": ["string", "null"]},
        "userId": {"type": ["string", "null"]},
        "anonymousId": {"type": ["string", "null"]},
        "event": {"type": ["string", "null"]},
        "timestamp": {"type": ["string", "null"], "format": "date-time"},
        "properties": {"type": ["object", "null"]},
        "context": {"type": ["object", "null"]},
        "integrations": {"type": ["object", "null"]},
    },
}


def recent(minutes: float = 5.0) -> str:
    """An ISO timestamp `minutes` ago (inside Orb's grace window)."""
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=minutes)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def track(n: int, **fields: t.Any) -> dict[str, t.Any]:
    """A valid raw Segment Track record with messageId `m<n>`."""
    record = {
        "type": "track",
        "messageId": f"m{n}",
        "userId": f"cust_{n % 3}",
        "event": "API Request",
        "timestamp": recent(),
        "properties": {"tokens": n, "region": "eu"},
    }
    record.update(fields)
    return record


def _state_line(stream: str, seq: int) -> str:
    return json.dumps({"type": "STATE", "value": {"bookmarks": {stream: {"seq": seq}}}})


def singer_lines(
    records: t.Iterable[dict[str, t.Any]],
    *,
    stream: str = "tracks",
    schema: dict | None = None,
    state_every: int | None = None,
    final_state: bool = True,
    key_properties: list[str] | None = None,
) -> list[str]:
    """SCHEMA, RECORDs, and STATE lines `{"bookmarks": {stream: {"seq": i}}}`."""
    lines = [
        json.dumps(
            {
                "type": "SCHEMA",
                "stream": stream,
                "schema": schema or SEGMENT_SCHEMA,
                "key_properties": key_properties or [],
            },
        ),
    ]
    count = 0
    for count, record in enumerate(records, start=1):
        lines.append(json.dumps({"type": "RECORD", "stream": stream, "record": record}))
        if state_every and count % state_every == 0:
            lines.append(_state_line(stream, count))
    if final_state:
        lines.append(_state_line(stream, count))
    return lines


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    dead_letter_path: Path

    @property
    def states(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    @property
    def dead_letters(self) -> list[dict]:
        if not self.dead_letter_path.exists():
            return []
        return [json.loads(line) for line in self.dead_letter_path.read_text().splitlines()]


def base_config(orb: FakeOrb, tmp_path: Path, **overrides: t.Any) -> dict[str, t.Any]:
    config = {
        "api_key": API_KEY,
        "api_url": orb.url,
        "external_customer_id_field": "userId",
        "properties_mapping": {"tokens": "tokens", "region": "region"},
        "dead_letter_path": str(tmp_path / "dead-letter.jsonl"),
        "progress_interval_seconds": 0,
        "max_retry_seconds": 20,
        "request_timeout": 5,
    }
    config.update(overrides)
    return config


def run_target(
    config: dict[str, t.Any],
    lines: list[str] | str,
    tmp_path: Path,
    *,
    timeout: float = 120,
    use_input_flag: bool = True,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run the installed `target-orb` command as a subprocess."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    text = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
    input_path = tmp_path / "input.singer"
    input_path.write_text(text)
    cmd = [TARGET_ORB, "--config", str(config_path)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_ORB_")}
    full_env.update(env or {})
    if use_input_flag:
        cmd += ["--input", str(input_path)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=full_env, check=False,
            stdin=subprocess.DEVNULL,
        )
    else:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=full_env, check=False,
            input=text,
        )
    return RunResult(
        proc.returncode, proc.stdout, proc.stderr,
        Path(config.get("dead_letter_path") or tmp_path / "target-orb-dead-letter.jsonl"),
    )


@pytest.fixture
def orb() -> t.Iterator[FakeOrb]:
    fake = FakeOrb(api_key=API_KEY)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert API_KEY not in text
        assert "SECRET-0123456789" not in text
