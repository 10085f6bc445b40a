"""`dead_letter_target: state` and `job_name` end to end on the default SQLite store: the
installed `target-orb` against the stand-in, then `target-orb-deadletter --state-url`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import base_config, run_target, singer_lines, track


def _no_customer(n: int) -> dict:
    record = track(n)
    del record["userId"]
    return record


def test_dead_letters_go_to_the_store_and_replay_once(orb, tmp_path):
    records = [track(1), _no_customer(2), track(3), _no_customer(4)]
    config = base_config(orb, tmp_path, dead_letter_target="state", job_name="nightly",
                         invalid_event_policy="dead_letter")
    result = run_target(config, singer_lines(records), tmp_path)
    assert result.returncode == 0, result.stderr
    assert [s["bookmarks"]["tracks"]["seq"] for s in result.states] == [4]
    assert not (tmp_path / "dead-letter.jsonl").exists()
    assert "target-orb job 'nightly'" in result.stderr
    assert "the store at `state_url` sqlite:///" in result.stderr
    metrics = json.loads(result.stderr.split("target-orb metrics: ")[1].splitlines()[0])
    assert metrics["job_name"] == "nightly" and metrics["dead_lettered"] == 2
    store = tmp_path / "target-orb-ledger.sqlite"
    with sqlite3.connect(store) as db:
        rows = list(db.execute("SELECT job_name, stream, source FROM target_orb_dead_letters"))
    assert rows == [("nightly", "tracks", "local")] * 2

    again = run_target(config, singer_lines(records), tmp_path / "again")
    assert again.returncode == 0, again.stderr
    metrics = json.loads(again.stderr.split("target-orb metrics: ")[1].splitlines()[0])
    assert metrics["already_dead_lettered"] == 2 and metrics["dead_lettered"] == 0

    script = str(Path(sys.executable).with_name("target-orb-deadletter"))
    url = f"sqlite:///{store}"
    replay = [script, "--state-url", url, "replay"]
    first = subprocess.run(replay, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    sent = [json.loads(x) for x in first.stdout.splitlines()]
    assert [m["record"]["messageId"] for m in sent if m["type"] == "RECORD"] == ["m2", "m4"]
    second = subprocess.run(replay, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 0 and second.stdout == ""
