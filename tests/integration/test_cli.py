"""The installed `target-orb` command over real sockets against the strict stand-in Orb."""

from __future__ import annotations

import json

from tests.conftest import (
    API_KEY,
    assert_no_secret,
    base_config,
    recent,
    run_target,
    singer_lines,
    track,
)


def test_segment_destination_example_lands_with_contract_body(orb, tmp_path):
    ts = recent(10)
    record = {
        "type": "track",
        "messageId": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
        "event": "payment_confirmed",
        "userId": "external_customer_id",
        "timestamp": ts,
        "properties": {
            "amount": 100.00,
            "currency": "USD",
            "confirmation_time": "2022-05-11T21:33:13.1652304793Z",
            "internal_note": "never sent",
        },
        "context": {"library": {"name": "analytics.js"}},
    }
    config = base_config(
        orb, tmp_path,
        properties_mapping={"amount": "amount", "currency": "currency",
                            "confirmation_time": "confirmation_time"},
    )
    result = run_target(config, singer_lines([record]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert orb.events() == [
        {
            "idempotency_key": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
            "event_name": "payment_confirmed",
            "external_customer_id": "external_customer_id",
            "timestamp": ts,
            "properties": {
                "amount": 100.0,
                "currency": "USD",
                "confirmation_time": "2022-05-11T21:33:13.1652304793Z",
            },
        },
    ]
    assert result.states == [{"bookmarks": {"tracks": {"seq": 1}}}]
    assert "target-orb summary" in result.stderr


def test_decimal_is_sent_as_json_number_not_string(orb, tmp_path):
    # The reader parses floats to Decimal; they must reach Orb as numbers.
    record = track(1, properties={"tokens": 12.5, "region": "eu"})
    result = run_target(base_config(orb, tmp_path), singer_lines([record]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert orb.events()[0]["properties"] == {"tokens": 12.5, "region": "eu"}


def test_stdin_input_batches_state_and_dead_letters(orb, tmp_path):
    records = [track(i) for i in range(1, 26)]
    records[4]["userId"] = None  # m5: no customer
    records[9]["timestamp"] = "not a time"  # m10
    records[14]["type"] = "identify"  # m15: skipped by type
    records[19]["integrations"] = {"Orb": False}  # m20: skipped by integrations
    config = base_config(orb, tmp_path, batch_size_rows=7)
    result = run_target(config, singer_lines(records, state_every=10), tmp_path,
                        use_input_flag=False)
    assert result.returncode == 0, result.stderr
    landed = {e["idempotency_key"] for e in orb.events()}
    expected = {f"m{i}" for i in range(1, 26)} - {"m5", "m10", "m15", "m20"}
    assert landed == expected
    assert all(r["event_count"] <= 7 for r in orb.ingest_requests())
    # stdout carries only STATE lines, and the last one covers everything.
    assert result.states[-1] == {"bookmarks": {"tracks": {"seq": 25}}}
    letters = result.dead_letters
    assert sorted(d["record"]["messageId"] for d in letters) == ["m10", "m5"]
    assert {d["source"] for d in letters} == {"local"}
    assert all(d["stream"] == "tracks" and d["reason"] for d in letters)
    reasons = {d["record"]["messageId"]: d["reason"] for d in letters}
    assert "userId" in reasons["m5"]
    assert "timestamp" in reasons["m10"]
    assert "skipped:               2 (integrations: 1, type: 1)" in result.stderr
    assert "invalid:               2 (bad_timestamp: 1, missing_customer: 1)" in result.stderr
    assert f"dead-lettered:         2 -> {config['dead_letter_path']}" in result.stderr


def test_authorization_header_and_ping(orb, tmp_path):
    result = run_target(base_config(orb, tmp_path), singer_lines([track(1)]), tmp_path)
    assert result.returncode == 0, result.stderr
    paths = [(r["method"], r["path"], r["authorization_ok"]) for r in orb.requests]
    assert paths[0] == ("GET", "/v1/ping", True)
    assert ("POST", "/v1/ingest", True) in paths
    assert_no_secret(result.stdout, result.stderr)


def test_dry_run_sends_nothing_and_writes_no_state(orb, tmp_path):
    config = base_config(orb, tmp_path, dry_run=True)
    result = run_target(config, singer_lines([track(1), track(2)], state_every=1), tmp_path)
    assert result.returncode == 0, result.stderr
    assert orb.requests == []  # not even the ping
    assert result.stdout == ""
    assert "DRY RUN: would POST" in result.stderr
    assert '"idempotency_key":"m1"' in result.stderr
    assert "DRY RUN" in result.stderr.split("target-orb summary")[1]
    assert_no_secret(result.stderr)


def test_wrong_api_key_fails_fast_at_ping_with_clear_message(orb, tmp_path):
    config = base_config(orb, tmp_path, api_key="wrong-key-SECRET-0123456789")
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"HTTP 401 to GET {orb.url}/ping" in result.stderr
    assert "`api_key`" in result.stderr
    assert "Traceback" not in result.stderr
    assert not orb.ingest_requests()
    assert "wrong-key" not in result.stderr
    assert_no_secret(result.stderr)


def test_404_url_is_fatal_naming_the_setting(orb, tmp_path):
    config = base_config(orb, tmp_path, api_url=orb.url.replace("/v1", "/v2"))
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr
    assert "`api_url`" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_are_reported_together_without_traceback(orb, tmp_path):
    config = {
        "api_key": API_KEY,
        "api_url": "http://orb.example.com/v1",
        "batch_size_rows": 900,
        "properties_mapping": {"a": 5},
        "nested_properties": "explode",
        "dead_letter_path": str(tmp_path / "dl.jsonl"),
    }
    result = run_target(config, singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    for name in ("external_customer_id_field", "batch_size_rows", "properties_mapping",
                 "nested_properties", "api_url"):
        assert name in result.stderr, name
    assert "Traceback" not in result.stderr
    assert orb.requests == []
    assert_no_secret(result.stderr)


def test_server_errors_never_count_as_delivered(orb, tmp_path):
    orb.script(*[{"status": 503}] * 50)
    config = base_config(orb, tmp_path, max_retry_seconds=2)
    result = run_target(config, singer_lines([track(1), track(2)]), tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""  # no STATE past undelivered events
    assert orb.events() == []
    assert "HTTP 503" in result.stderr
    assert "max_retry_seconds" in result.stderr
    assert "Traceback" not in result.stderr


def test_decimal_in_upstream_state_does_not_crash(orb, tmp_path):
    lines = singer_lines([track(1)], final_state=False)
    lines.append('{"type": "STATE", "value": {"bookmarks": {"tracks": {"ratio": 0.5, "n": 1}}}}')
    result = run_target(base_config(orb, tmp_path), lines, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.states == [{"bookmarks": {"tracks": {"ratio": 0.5, "n": 1}}}]


def test_not_segment_shaped_stream_is_dead_lettered_not_a_crash(orb, tmp_path):
    schema = {"type": "object", "properties": {"id": {"type": "integer"},
                                               "fruits": {"type": "array"}}}
    lines = singer_lines([{"id": 1, "fruits": ["apple"]}], stream="fruit", schema=schema)
    result = run_target(base_config(orb, tmp_path), lines, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [d["record"] for d in result.dead_letters] == [{"id": 1, "fruits": ["apple"]}]
    assert "event name" in result.dead_letters[0]["reason"]
    assert result.states == [{"bookmarks": {"fruit": {"seq": 1}}}]


def test_invalid_event_policy_fail_stops_without_state(orb, tmp_path):
    records = [track(1), track(2, userId="")]
    config = base_config(orb, tmp_path, invalid_event_policy="fail")
    result = run_target(config, singer_lines(records), tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "invalid_event_policy" in result.stderr
    assert "Traceback" not in result.stderr
    assert not result.dead_letter_path.exists()


def test_invalid_event_policy_skip_counts_without_dead_letter(orb, tmp_path):
    records = [track(1), track(2, userId="")]
    config = base_config(orb, tmp_path, invalid_event_policy="skip")
    result = run_target(config, singer_lines(records), tmp_path)
    assert result.returncode == 0, result.stderr
    assert [e["idempotency_key"] for e in orb.events()] == ["m1"]
    assert not result.dead_letter_path.exists()
    assert "missing_customer: 1" in result.stderr


def test_duplicate_keys_in_one_request_collapsed_or_dead_lettered(orb, tmp_path):
    first = track(1)
    same = dict(first)
    changed = {**first, "properties": {"tokens": 999, "region": "eu"}}
    result = run_target(base_config(orb, tmp_path), singer_lines([first, same, changed]),
                        tmp_path)
    assert result.returncode == 0, result.stderr
    assert orb.events() == [
        {"idempotency_key": "m1", "event_name": "API Request", "external_customer_id": "cust_1",
         "timestamp": first["timestamp"], "properties": {"tokens": 1, "region": "eu"}},
    ]
    assert [r["event_count"] for r in orb.ingest_requests()] == [1]
    assert len(result.dead_letters) == 1
    assert result.dead_letters[0]["record"]["properties"]["tokens"] == 999
    assert "duplicates collapsed:  1" in result.stderr


def test_env_config_and_python_module_entry_point(orb, tmp_path):
    import subprocess
    import sys

    lines = "\n".join(singer_lines([track(1)])) + "\n"
    env = {
        "TARGET_ORB_API_KEY": API_KEY,
        "TARGET_ORB_API_URL": orb.url,
        "TARGET_ORB_EXTERNAL_CUSTOMER_ID_FIELD": "userId",
        "TARGET_ORB_BATCH_SIZE_ROWS": "10",
        "TARGET_ORB_DEAD_LETTER_PATH": str(tmp_path / "dl.jsonl"),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "target_orb", "--config", "ENV"], input=lines, text=True,
        capture_output=True, env=env, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [e["idempotency_key"] for e in orb.events()] == ["m1"]
    assert_no_secret(proc.stderr)


def test_about_with_a_config_never_shows_the_api_key(orb, tmp_path):
    import subprocess

    from tests.conftest import TARGET_ORB

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(base_config(orb, tmp_path)))
    for fmt in ("json", "markdown"):
        proc = subprocess.run(
            [TARGET_ORB, "--config", str(config_path), "--about", "--format", fmt],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "api_key" in proc.stdout
        assert_no_secret(proc.stdout, proc.stderr)
    assert orb.requests == []


def test_progress_line_on_long_runs(tmp_path):
    from fake_orb import FakeOrb

    slow = FakeOrb(api_key=API_KEY, latency_ms=400)
    slow.start()
    try:
        records = [track(i) for i in range(1, 41)]
        config = base_config(slow, tmp_path, batch_size_rows=5, max_concurrent_requests=1,
                             progress_interval_seconds=1)
        result = run_target(config, singer_lines(records), tmp_path)
        quiet = run_target({**config, "progress_interval_seconds": 0},
                           singer_lines(records[:10]), tmp_path / "quiet")
    finally:
        slow.stop()
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "Progress:" in line]
    assert progress, result.stderr
    assert all(
        all(part in line for part in ("records read", "events accepted", "/s)", "pending",
                                      "retries", "dead-lettered"))
        for line in progress
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "Progress:" not in quiet.stderr


def test_malformed_singer_input_fails_clearly_without_traceback(orb, tmp_path):
    lines = singer_lines([track(1)], final_state=False)
    lines.append('{"type": "RECORD", "stream": "tracks", "record": {"messageId": "m2"')
    result = run_target(base_config(orb, tmp_path), lines, tmp_path)
    assert result.returncode == 1
    assert "Input line 3 is not a JSON Singer message" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""

    before_schema = ['{"type": "RECORD", "stream": "tracks", "record": {"messageId": "m1"}}']
    result = run_target(base_config(orb, tmp_path), before_schema, tmp_path / "b")
    assert result.returncode == 1
    assert "encountered before a corresponding schema" in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_dead_letter_file_fails_without_state(orb, tmp_path):
    records = [track(1), track(2, userId=None)]
    config = base_config(orb, tmp_path, dead_letter_path=str(tmp_path))  # a directory
    result = run_target(config, singer_lines(records), tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""  # the invalid record could not be durably set aside: no STATE
    assert "`dead_letter_path`" in result.stderr
    assert "is a directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert orb.requests == []  # found at start, before the ping


def test_schema_drift_with_validation_on_is_logged_not_fatal(orb, tmp_path):
    schema = {
        "type": "object",
        "properties": {
            "messageId": {"type": "string"}, "userId": {"type": "string"},
            "event": {"type": "string"}, "timestamp": {"type": "string"},
            "properties": {"type": "object", "properties": {"tokens": {"type": "integer"}}},
        },
    }
    records = [track(1), track(2, properties={"tokens": "N/A", "region": "eu"})]
    config = base_config(orb, tmp_path, validate_records=True)
    result = run_target(config, singer_lines(records, schema=schema), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "does not match the stream schema" in result.stderr
    assert sorted(e["idempotency_key"] for e in orb.events()) == ["m1", "m2"]
    assert [e["properties"]["tokens"] for e in orb.events() if e["idempotency_key"] == "m2"] == [
        "N/A"
    ]
    assert "Traceback" not in result.stderr


def test_stdout_closed_by_the_reader_fails_once_with_a_state_message(orb, tmp_path):
    # A STATE write that fails (the orchestrator stopped reading) is its own error: one
    # message about stdout, not an "I/O error ... dead_letter_path" about the wrong file.
    import os
    import subprocess

    from tests.conftest import TARGET_ORB

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(base_config(orb, tmp_path)))
    input_path = tmp_path / "input.singer"
    input_path.write_text("\n".join(singer_lines([track(i) for i in range(1, 6)])) + "\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads target-orb's stdout
    try:
        proc = subprocess.run(
            [TARGET_ORB, "--config", str(config_path), "--input", str(input_path)],
            stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            timeout=60, check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("Could not write STATE to stdout") == 1, proc.stderr
    assert "dead_letter_path" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(orb.events()) == 5  # delivered before the STATE that failed


def _deadletter_cli(*args: str) -> list[list[str]]:
    import sys
    from pathlib import Path

    script = str(Path(sys.executable).with_name("target-orb-deadletter"))
    return [[script, *args], [sys.executable, "-m", "target_orb.deadletter", *args]]


def test_deadletter_console_script_and_module_replay_the_same_stream(tmp_path):
    import subprocess

    path = tmp_path / "dl.jsonl"
    lines = [
        {"stream": "tracks", "record": {"messageId": "m1", "n": 1.5}, "reason": "r",
         "source": "orb"},
        {"stream": "pages", "record": {"messageId": "m2"}, "reason": "r", "source": "local"},
        {"stream": "tracks", "record": {"messageId": "m3"}, "reason": "r", "source": "local"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    outputs = []
    for cmd in _deadletter_cli("replay", str(path)):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1]
    messages = [json.loads(line) for line in outputs[0].splitlines()]
    assert [(m["type"], m["stream"]) for m in messages] == [
        ("SCHEMA", "tracks"), ("RECORD", "tracks"), ("SCHEMA", "pages"), ("RECORD", "pages"),
        ("RECORD", "tracks"),
    ]
    assert [m["record"] for m in messages if m["type"] == "RECORD"] == [
        line["record"] for line in lines
    ]


def test_deadletter_console_script_refuses_a_foreign_file_clearly(tmp_path):
    import subprocess

    path = tmp_path / "not-dead-letters.jsonl"
    path.write_text('{"stream": "tracks", "record": {}}\nnot json\n')
    cmd = _deadletter_cli("replay", str(path))[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert "line 2 is not JSON" in proc.stderr
    assert "dead_letter_path" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = subprocess.run([*cmd[:-1], str(tmp_path / "absent.jsonl")], capture_output=True,
                             text=True, timeout=30, check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    help_text = subprocess.run([cmd[0], "--help"], capture_output=True, text=True, timeout=30,
                               check=False).stdout
    assert "target-orb-deadletter" in help_text


def test_a_rerun_over_the_same_input_adds_no_dead_letter_line(orb, tmp_path):
    # A scheduled rerun of a JSON Lines tap re-reads the whole file: the record that had no
    # customer is the same dead letter, for the same reason, and must not be appended again.
    records = [track(1), track(2, userId=None), track(3, timestamp="not a time")]
    config = base_config(orb, tmp_path)
    first = run_target(config, singer_lines(records), tmp_path)
    assert first.returncode == 0, first.stderr
    assert len(first.dead_letters) == 2
    second = run_target(config, singer_lines(records), tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.dead_letters == first.dead_letters
    assert "already dead-lettered: 2" in second.stderr
    metrics = json.loads(second.stderr.split("target-orb metrics: ")[1].splitlines()[0])
    assert (metrics["dead_lettered"], metrics["already_dead_lettered"]) == (0, 2)
    assert second.states == first.states  # STATE still passes them
    # A new bad record is still appended.
    third = run_target(config, singer_lines([*records, track(4, userId=None)]), tmp_path)
    assert len(third.dead_letters) == 3
    assert "dead-lettered:         1 ->" in third.stderr


def test_an_unwritable_dead_letter_folder_is_reported_with_the_path_the_user_set(orb, tmp_path):
    (tmp_path / "not-a-folder").write_text("a file where a folder should be")
    dead_letter_path = str(tmp_path / "not-a-folder" / "dl.jsonl")
    for policy in ("reject", "backfill"):
        config = base_config(orb, tmp_path, dead_letter_path=dead_letter_path,
                             late_event_policy=policy)
        result = run_target(config, singer_lines([track(1)]), tmp_path / policy)
        assert result.returncode == 1, policy
        assert f"`dead_letter_path` {dead_letter_path!r} cannot be written" in result.stderr
        assert "not-a-folder' is not a folder" in result.stderr
        assert ".backfills.json" not in result.stderr, policy
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
    assert orb.requests == []  # found at start, before the ping
