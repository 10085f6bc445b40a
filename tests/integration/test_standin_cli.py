"""The stand-in with a user's own project (issue 19): the installed `fake-orb` and `target-orb`
console scripts as subprocesses, as the README's "Try the stand-in with your own config" says.

`fake-orb --config-overlay overlay.json -- target-orb --config mine.json --config overlay.json`:
the stand-in writes its URL and key to the overlay, the user's own config file stays as it
is, and the landed events can be read while the stand-in still runs (`--events-out` is
rewritten as events land; `GET /_fake/events`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import singer_lines, track

BIN = Path(sys.executable).parent
FAKE_ORB = str(BIN / "fake-orb")
TARGET_ORB = str(BIN / "target-orb")

# Runs under `fake-orb -- python child.py`: the user's own target-orb run, then a look at what
# landed while the stand-in is still serving.
CHILD = textwrap.dedent(
    """
    import json, os, subprocess, sys, time, urllib.request
    target, mine, overlay, singer, events_out = sys.argv[1:6]
    run = subprocess.run([target, "--config", mine, "--config", overlay, "--input", singer],
                         capture_output=True, text=True, timeout=60)
    print("target exit", run.returncode)
    sys.stderr.write(run.stderr)
    deadline = time.monotonic() + 10
    lines = []
    while time.monotonic() < deadline:
        if os.path.exists(events_out):
            with open(events_out) as fh:
                lines = [json.loads(x) for x in fh if x.strip()]
        if lines:
            break
        time.sleep(0.1)
    print("events file while running:", json.dumps([e["idempotency_key"] for e in lines]))
    root = os.environ["TARGET_ORB_API_URL"].rsplit("/v1", 1)[0]
    with urllib.request.urlopen(root + "/_fake/events", timeout=5) as resp:
        landed = json.load(resp)
    print("control API while running:", json.dumps([e["idempotency_key"] for e in landed]))
    sys.exit(run.returncode)
    """
)


def _mine(tmp_path: Path) -> Path:
    # The user's own config: the real Orb URL and a placeholder key, nothing about the stand-in.
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({
        "api_key": "sk_live_placeholder",
        "external_customer_id_field": "userId",
        "properties_mapping": {"tokens": "tokens"},
        "dead_letter_path": str(tmp_path / "dl.jsonl"),
        "progress_interval_seconds": 0,
    }))
    return mine


def test_the_stand_in_runs_a_users_own_config_through_an_overlay(tmp_path):
    mine = _mine(tmp_path)
    overlay = tmp_path / "fake-orb-overlay.json"
    events_out = tmp_path / "landed.jsonl"
    singer = tmp_path / "in.singer"
    singer.write_text("\n".join(singer_lines([track(1), track(2)])) + "\n")
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    proc = subprocess.run(
        [FAKE_ORB, "--config-overlay", str(overlay), "--events-out", str(events_out),
         "--max-seconds", "90", "--", sys.executable, str(child), TARGET_ORB, str(mine),
         str(overlay), str(singer), str(events_out)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "target exit 0" in proc.stdout
    assert 'events file while running: ["m1", "m2"]' in proc.stdout
    assert 'control API while running: ["m1", "m2"]' in proc.stdout
    assert "events landed: 2" in proc.stdout
    assert "sk_live_placeholder" not in proc.stdout + proc.stderr
    assert json.loads(mine.read_text())["api_key"] == "sk_live_placeholder"  # untouched
    assert not overlay.exists()  # removed with the stand-in: its port is gone
    assert [json.loads(x)["idempotency_key"] for x in events_out.read_text().splitlines()] == [
        "m1", "m2",
    ]


def test_the_overlay_holds_only_what_points_target_orb_at_the_stand_in(tmp_path):
    overlay = tmp_path / "o.json"
    script = (
        "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [FAKE_ORB, "--config-overlay", str(overlay), "--grace-period-hours", "100000",
         "--max-seconds", "30", "--", sys.executable, "-c", script, str(overlay)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    written = json.loads(proc.stdout.splitlines()[0])
    assert set(written) == {"api_url", "api_key", "grace_period_hours"}
    assert written["api_url"].startswith("http://127.0.0.1:")
    assert written["grace_period_hours"] == 100000
    assert f"--config {overlay}" in proc.stderr  # it says how to use it


def test_the_summary_does_not_call_resent_keys_duplicates(tmp_path):
    # target-orb's "duplicates collapsed" are copies inside one request that it never sent;
    # the stand-in counts keys sent again that Orb already had: different words.
    mine = _mine(tmp_path)
    overlay = tmp_path / "o.json"
    singer = tmp_path / "in.singer"
    singer.write_text("\n".join(singer_lines([track(1)])) + "\n")
    run = (
        "import subprocess, sys\n"
        "for _ in range(2):\n"
        "    subprocess.run([sys.argv[1], '--config', sys.argv[2], '--config', sys.argv[3],"
        " '--input', sys.argv[4]], check=True, timeout=60, capture_output=True)\n"
    )
    proc = subprocess.run(
        [FAKE_ORB, "--config-overlay", str(overlay), "--max-seconds", "90", "--",
         sys.executable, "-c", run, TARGET_ORB, str(mine), str(overlay), str(singer)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "duplicates" not in proc.stdout
    assert "keys sent again (Orb kept the first copy): 1" in proc.stdout
