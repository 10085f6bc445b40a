"""target-orb's store in a real PostgreSQL (issue 17, "Nothing lost in a container").

The installed `target-orb` against the stand-in Orb on 127.0.0.1, with `state_url` in the
session's throwaway PostgreSQL and `dead_letter_target: state`:
- a history load killed with SIGKILL mid-backfill, its working directory deleted, rerun from
  a new empty directory with the same store: every event lands once, nothing is pending,
  the dead letters of both runs are in the store and are replayed once;
- two jobs (different `job_name`) sharing the store and the Orb account, with overlapping
  late windows, run at the same time: both finish, every event lands once.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from fake_orb import FakeOrb
from tests.conftest import API_KEY, RunResult, run_target, singer_lines, track
from tests.integration.test_backfill import backfill_config, history, start_target


def _invalid(n: int) -> dict:
    """A record with no customer: dead-lettered (`source: local`)."""
    record = track(n)
    del record["userId"]
    return record


def _deadletter_cli(*args: str) -> subprocess.CompletedProcess:
    script = str(Path(sys.executable).with_name("target-orb-deadletter"))
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def _billed(orb: FakeOrb) -> Counter[str]:
    return Counter(e["idempotency_key"] for e in orb.events())


def test_killed_history_load_rerun_on_an_empty_disk_loses_nothing(postgres, tmp_path):
    db = postgres.create_database("orb_store_kill")
    fake = FakeOrb(api_key=API_KEY, latency_ms=60)
    fake.start()
    try:
        late = history(40, per_day=15)  # 600 late records over two months
        first_bad = [_invalid(5000 + n) for n in range(3)]
        records = first_bad + late
        config1 = backfill_config(
            fake, tmp_path / "run1", state_url=db.url, dead_letter_target="state",
            invalid_event_policy="dead_letter", batch_size_rows=10, max_concurrent_requests=2,
        )
        proc = start_target(config1, singer_lines(records, state_every=20), tmp_path / "run1")
        assert proc.stdout is not None
        reader = threading.Thread(target=proc.stdout.read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            b["events_ingested"] >= 30 for b in fake.backfills()
        ):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        reader.join(10)
        proc.stdout.close()
        assert any(b["status"] == "pending" for b in fake.backfills()), "killed mid-backfill"
        assert db.scalar("SELECT count(*) FROM target_orb_dead_letters") == "3"
        shutil.rmtree(tmp_path / "run1")  # the container's disk is gone

        # The tap reruns from the start, with three new bad records of its own.
        second_bad = [_invalid(6000 + n) for n in range(3)]
        config2 = {**config1, "dead_letter_path": str(tmp_path / "run2" / "dead-letter.jsonl")}
        rerun = run_target(config2, singer_lines(records + second_bad), tmp_path / "run2",
                           timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert "created by an earlier target-orb run" in rerun.stderr
        assert postgres.password not in rerun.stderr + rerun.stdout

        counts = _billed(fake)
        assert set(counts) == {r["messageId"] for r in late}
        assert set(counts.values()) == {1}, "every event billed once"
        assert fake.stats()["double_billed"] == 0
        assert all(b["status"] != "pending" for b in fake.backfills())
        assert db.scalar(
            "SELECT count(*) FROM target_orb_backfills WHERE state <> 'closed'"
        ) == "0"
        assert not list((tmp_path / "run2").glob("dead-letter*"))  # nothing on the disk

        exported = _deadletter_cli("export", "--state-url", db.url)
        assert exported.returncode == 0, exported.stderr
        entries = [json.loads(x) for x in exported.stdout.splitlines()]
        ids = [e["record"]["messageId"] for e in entries]
        assert ids == [r["messageId"] for r in first_bad + second_bad]
        first = _deadletter_cli("replay", "--state-url", db.url)
        assert first.returncode == 0, first.stderr
        replayed = [json.loads(x) for x in first.stdout.splitlines()]
        assert len([m for m in replayed if m["type"] == "RECORD"]) == 6
        again = _deadletter_cli("replay", "--state-url", db.url)
        assert again.returncode == 0 and again.stdout == ""
        assert postgres.password not in exported.stderr + first.stderr + again.stderr
    finally:
        fake.stop()


def test_two_jobs_sharing_the_store_with_overlapping_windows_both_finish(postgres, tmp_path):
    db = postgres.create_database("orb_store_two_jobs")
    fake = FakeOrb(api_key=API_KEY, latency_ms=20)
    fake.start()
    try:
        jobs = {
            "job-a": history(35, per_day=6, start=1),
            "job-b": history(35, per_day=6, start=10_001),
        }
        results: dict[str, RunResult] = {}

        def run(name: str) -> None:
            config = backfill_config(
                fake, tmp_path / name, state_url=db.url, dead_letter_target="state",
                job_name=name, batch_size_rows=20, max_retry_seconds=120,
            )
            results[name] = run_target(config, singer_lines(jobs[name]), tmp_path / name,
                                       timeout=400)

        threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
        for th in threads:
            th.start()
        for th in threads:
            th.join(420)
        for name, result in results.items():
            problems = [ln for ln in result.stderr.splitlines() if "ERROR" in ln]
            assert result.returncode == 0, (name, problems, result.stderr[-3000:])
            assert f"target-orb job '{name}'" in result.stderr
            assert "did not create it" not in result.stderr
        assert len(results) == 2
        # They met: one waited for the other's backfill instead of stopping as "foreign".
        assert any("shares this store; waiting" in r.stderr for r in results.values()), (
            "\n".join(r.stderr for r in results.values())
        )
        counts = _billed(fake)
        expected = {r["messageId"] for records in jobs.values() for r in records}
        assert set(counts) == expected
        assert set(counts.values()) == {1}
        assert fake.stats()["double_billed"] == 0
        assert all(b["status"] != "pending" for b in fake.backfills())
        owners = db.scalar(
            "SELECT string_agg(DISTINCT job_name, ',' ORDER BY job_name) FROM target_orb_backfills"
        )
        assert owners == "job-a,job-b"
    finally:
        fake.stop()
