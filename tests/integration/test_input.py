"""Input tolerance (issue 10): what Python's `json` reads is read, poison values are dead-lettered.

Every test runs the installed `target-orb` over real sockets against the stand-in, with the
input written as raw bytes (a tap's stdout is bytes, not always UTF-8).
"""

from __future__ import annotations

import json
import os
import subprocess
import typing as t
from pathlib import Path

import pytest

from tests.conftest import (
    TARGET_ORB,
    RunResult,
    assert_no_secret,
    base_config,
    singer_lines,
    track,
)


def run_bytes(
    config: dict[str, t.Any], data: bytes, tmp_path: Path, *, stdin: bool = False
) -> RunResult:
    """Run `target-orb` on raw input bytes (through `--input` or stdin)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    input_path = tmp_path / "input.singer"
    input_path.write_bytes(data)
    cmd = [TARGET_ORB, "--config", str(config_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_ORB_")}
    if stdin:
        proc = subprocess.run(
            cmd, input=data, capture_output=True, timeout=120, env=env, check=False
        )
    else:
        proc = subprocess.run(
            [*cmd, "--input", str(input_path)], stdin=subprocess.DEVNULL,
            capture_output=True, timeout=120, env=env, check=False,
        )
    return RunResult(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
        Path(config["dead_letter_path"]),
    )


def record_line(record_json: str, stream: str = "tracks") -> bytes:
    return f'{{"type": "RECORD", "stream": "{stream}", "record": {record_json}}}'.encode()


def poison_feed() -> bytes:
    """SCHEMA, 6 good records, and one NaN, one lone surrogate, one latin-1 byte record."""
    lines = singer_lines([track(n) for n in range(1, 7)], final_state=False)
    head = [line.encode() for line in lines[:4]]  # SCHEMA + m1..m3
    tail = [line.encode() for line in lines[4:]]  # m4..m6
    nan = json.dumps(track(100)).replace('"tokens": 100', '"tokens": NaN')
    assert "NaN" in nan
    surrogate = json.dumps(track(101, properties={"tokens": 1, "region": "\ud800"}))
    assert "\\ud800" in surrogate
    latin1 = json.dumps(track(102, properties={"tokens": 2, "region": "caf\u00e9"}))
    latin1_bytes = latin1.replace("\\u00e9", "\u00e9").encode("latin-1")
    assert b"caf\xe9" in latin1_bytes
    state = b'{"type": "STATE", "value": {"bookmarks": {"tracks": {"seq": 9}}}}'
    return b"\n".join(
        [*head, record_line(nan), record_line(surrogate), b"   \t", b"",
         b'{"type": "RECORD", "stream": "tracks", "record": ' + latin1_bytes + b"}",
         *tail, state],
    ) + b"\n"


@pytest.mark.parametrize("stdin", [False, True], ids=["input-flag", "stdin"])
def test_nan_surrogate_and_latin1_records_are_dead_lettered_and_the_rest_land(
    orb, tmp_path, stdin
):
    result = run_bytes(base_config(orb, tmp_path), poison_feed(), tmp_path, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(e["idempotency_key"] for e in orb.events()) == [f"m{n}" for n in range(1, 7)]
    assert result.states == [{"bookmarks": {"tracks": {"seq": 9}}}]
    # The dead-letter file is valid JSON Lines for a strict parser (no NaN, no lone surrogate).
    raw = result.dead_letter_path.read_bytes()
    raw.decode("utf-8")  # strict
    entries = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in dead letters"))
        for line in raw.decode().splitlines()
    ]
    by_key = {e["record"]["messageId"]: e for e in entries}
    assert sorted(by_key) == ["m100", "m101", "m102"]
    for e in entries:
        assert e["source"] == "local"
        assert e["stream"] == "tracks"
        for text in json.dumps(e):
            assert not 0xD800 <= ord(text) <= 0xDFFF
    assert "NaN" in by_key["m100"]["reason"]
    assert "properties.tokens" in by_key["m100"]["reason"]
    assert by_key["m100"]["record"]["properties"]["tokens"] == "NaN"
    assert "surrogate" in by_key["m101"]["reason"]
    assert by_key["m101"]["record"]["properties"]["region"] == "\\ud800"
    assert "UTF-8" in by_key["m102"]["reason"]
    assert by_key["m102"]["record"]["properties"]["region"] == "caf\\xe9"
    assert_no_secret(result.stderr, raw.decode())


def test_infinity_and_minus_infinity_anywhere_in_the_record_make_it_invalid(orb, tmp_path):
    lines = [line.encode() for line in singer_lines([track(1)], final_state=False)]
    inf = json.dumps(track(2, context={"a": [1, float("inf")]}))
    minus = json.dumps(track(3)).replace('"tokens": 3', '"tokens": -Infinity')
    assert "Infinity" in inf and "-Infinity" in minus
    data = b"\n".join([*lines, record_line(inf), record_line(minus)]) + b"\n"
    result = run_bytes(base_config(orb, tmp_path), data, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [e["idempotency_key"] for e in orb.events()] == ["m1"]
    reasons = {e["record"]["messageId"]: e["reason"] for e in result.dead_letters}
    assert "context.a[1] is Infinity" in reasons["m2"]
    assert "properties.tokens is -Infinity" in reasons["m3"]
    assert "invalid by reason" in result.stderr or "invalid" in result.stderr


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (b"[1, 2]", "is not a JSON object"),
        (b"42", "is not a JSON object"),
        (b'"RECORD"', "is not a JSON object"),
        (b"null", "is not a JSON object"),
        (b"{not json", "is not a JSON Singer message"),
        (b"\xff\xfe{", "is not a JSON Singer message"),
        (b"[" * 100_000, "is not a JSON Singer message"),
        (b'{"stream": "tracks"}', "has no message type"),
        (b'{"type": ["RECORD"]}', "has no message type"),
        (b'{"type": "NOPE"}', "unknown message type"),
        (b'{"type": "RECORD", "record": {}}', "Input line 3"),
        (b'{"type": "RECORD", "stream": "tracks", "record": [1]}', "Input line 3"),
        (b'{"type": "RECORD", "stream": ["x"], "record": {}}', "Input line 3"),
        (b'{"type": "SCHEMA", "stream": "other"}', "Input line 3"),
        (b'{"type": "STATE", "value": NaN}', "Input line 3"),
    ],
)
def test_a_line_that_is_not_a_singer_message_fails_with_its_number_and_no_traceback(
    orb, tmp_path, line, shown
):
    lines = [x.encode() for x in singer_lines([track(1)], final_state=False)]
    data = b"\n".join([*lines, line]) + b"\n"
    result = run_bytes(base_config(orb, tmp_path), data, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert shown in result.stderr
    if b"[" * 1000 not in line:
        assert "Input line 3" in result.stderr
    assert result.stdout == ""


def test_whitespace_only_lines_and_crlf_are_ignored(orb, tmp_path):
    lines = [x.encode() for x in singer_lines([track(1), track(2)])]
    data = b"\r\n".join([b"", lines[0], b"   ", lines[1], b"\t", lines[2], lines[3]]) + b"\r\n\n"
    result = run_bytes(base_config(orb, tmp_path), data, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(e["idempotency_key"] for e in orb.events()) == ["m1", "m2"]
    assert result.dead_letters == []
