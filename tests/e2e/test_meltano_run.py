"""End to end under Meltano: `meltano install` + `meltano run tap-segment target-orb`.

The project's own meltano.yml and the bundled Segment archive sample are copied into a
session-scoped temporary Meltano project (target-orb's `pip_url: -e .` pointed at this
repository). Meltano installs the real PyPI tap `tap-jsonl` (our inline `tap-segment`) and
target-orb into plugin venvs of its own and runs them against an in-process FakeOrb.

Meltano comes from the `demo` extra (`pip install -e '.[test,demo]'`). Without it these
tests skip locally and FAIL in CI (the `CI` env var is set there).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest

from fake_orb import FakeOrb

REPO = Path(__file__).resolve().parents[2]
MELTANO_YML = REPO / "meltano.yml"
SAMPLE = REPO / "demo" / "segment-archive-sample.jsonl"
STATE_ID = "dev:tap-segment-to-target-orb"
STREAM = "segment_archive"
DEAD_LETTER = Path("output") / "target-orb-dead-letter.jsonl"
GRACE_PERIOD_HOURS = 100000  # same as meltano.yml: the sample is from March 2024

INSTALL_TIMEOUT = 480
RUN_TIMEOUT = 180
CLI_TIMEOUT = 60

UTC_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


def _utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.timezone.utc)


# What must land in Orb, keyed by idempotency key (= the sample's messageId): event name,
# external customer id, instant, and the properties that meltano.yml's properties_mapping
# keeps. Everything else in the sample is not sendable: identify/page/screen/group (type),
# `integrations: {"Orb": false}` and the Engage `Audience Entered` (integrations rule), the
# anonymous API Request (no userId -> dead letter), and a retried copy of the first event.
EXPECTED: dict[str, tuple[str, str, dt.datetime, dict[str, t.Any]]] = {
    "node-next-1709294400123-743be593-7789-4b74-8078-cbcc8894c586": (
        "API Request",
        "user_8841",
        _utc(2024, 3, 1, 12, 0, 0, 123000),
        {"tokens": 1532, "endpoint": "/v1/search", "region": "us-east-1"},
    ),
    "node-next-1709294461877-1f6f0c3e-6a57-4f3d-b0a2-8c1e0f9d2b44": (
        "API Request",
        "user_8841",
        _utc(2024, 3, 1, 12, 1, 1, 877000),
        {"tokens": 211, "endpoint": "/v1/embeddings", "region": "us-east-1"},
    ),
    "node-next-1709296393165-9a4e2d17-3c1b-4e8f-a6d2-51b0c7e8f903": (
        "payment_confirmed",
        "acme-co",
        _utc(2024, 3, 1, 12, 33, 13, 165000),
        {
            "amount": 100.0,
            "currency": "USD",
            "confirmation_time": "2022-05-11T21:33:13.1652304793Z",
        },
    ),
    "ajs-next-1709297020555-2d3c4b5a-6e7f-4a8b-9c0d-e1f2a3b4c5d6": (
        "Report Exported",
        "user_3310",
        _utc(2024, 3, 1, 12, 43, 40, 555000),
        {"pages": 12},
    ),
    "node-next-1709298911402-4c3b2a19-0f8e-4d7c-a6b5-948372615a0b": (
        "Seat Added",
        "acme-co",
        _utc(2024, 3, 1, 13, 15, 11, 402000),
        {"seats": 3},
    ),
    "8F4A1C7E-2B3D-4E5F-9A6B-7C8D9E0F1A2B": (
        "File Uploaded",
        "user_5120",
        _utc(2024, 3, 1, 13, 20, 45, 118000),
        {"bytes": 1048576, "region": "eu-west-2"},
    ),
    # Sent as 14:05:09.400+01:00: must arrive in UTC.
    "go-2f0c9b7e-8d6a-4c5b-9e4f-3a2b1c0d9e8f": (
        "API Request",
        "user_5120",
        _utc(2024, 3, 1, 13, 5, 9, 400000),
        {"tokens": 4096, "endpoint": "/v1/chat/completions", "region": "eu-central-1"},
    ),
    "node-next-1709301245870-b1a2c3d4-e5f6-4789-8a0b-c1d2e3f4a5b6": (
        "payment_confirmed",
        "user_3310",
        _utc(2024, 3, 1, 13, 54, 5, 870000),
        {
            "amount": 49.5,
            "currency": "EUR",
            "confirmation_time": "2024-03-01T13:54:05.8701234567Z",
        },
    ),
    "node-next-1709302000019-c7d6e5f4-a3b2-4c1d-9e0f-a1b2c3d4e5f6": (
        "API Request",
        "user_8841",
        _utc(2024, 3, 1, 14, 6, 40, 19000),
        {"tokens": 77, "endpoint": "/v1/search", "region": "us-east-1"},
    ),
    "node-next-1709302833550-e9f8a7b6-c5d4-4e3f-a2b1-c0d9e8f7a6b5": (
        "API Request",
        "acme-co",
        _utc(2024, 3, 1, 14, 20, 33, 550000),
        {"tokens": 980, "endpoint": "/v1/embeddings", "region": "us-west-2"},
    ),
}
NO_USER_ID = "ajs-next-1709298002210-6b5a4c3d-2e1f-4a0b-9c8d-7e6f5a4b3c2d"
PAYMENT = "node-next-1709296393165-9a4e2d17-3c1b-4e8f-a6d2-51b0c7e8f903"


# ---------------------------------------------------------------------------- helpers


def _find_meltano() -> str | None:
    beside = Path(sys.executable).with_name("meltano")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("meltano")


def _sample() -> list[dict[str, t.Any]]:
    with SAMPLE.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        assert self.returncode == 0, (
            f"{shlex.join(self.args)} exited {self.returncode}\n"
            f"--- stdout (tail) ---\n{self.stdout[-3000:]}\n--- stderr (tail) ---\n"
            f"{self.stderr[-6000:]}"
        )
        return self


@dataclass
class MeltanoProject:
    root: Path
    meltano: str

    def env(self, orb: FakeOrb | None = None) -> dict[str, str]:
        # Nothing from the developer's shell may reach the plugins: no real Orb key or URL,
        # no other Meltano system database.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TARGET_ORB_", "TAP_SEGMENT_", "MELTANO_"))
        }
        env["PATH"] = os.pathsep.join([str(Path(self.meltano).parent), env.get("PATH", "")])
        env["MELTANO_SEND_ANONYMOUS_USAGE_STATS"] = "false"
        env["MELTANO_ENVIRONMENT"] = "dev"
        if orb is not None:
            env["TARGET_ORB_API_URL"] = orb.url
            env["TARGET_ORB_API_KEY"] = orb.api_key
        return env

    def run(self, *args: str, timeout: float, orb: FakeOrb | None = None) -> Result:
        """Run `meltano ARGS` in the project; on timeout kill its whole process group."""
        cmd = [self.meltano, *args]
        proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env=self.env(orb),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group: tap and target die with it
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(
                f"{shlex.join(cmd)} still running after {timeout}s; killed\n"
                f"--- stderr (tail) ---\n{err[-6000:]}"
            )
        return Result(cmd, proc.returncode, out, err)

    def dead_letters(self) -> list[dict[str, t.Any]]:
        path = self.root / DEAD_LETTER
        if not path.exists():
            return []
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def state(self) -> dict[str, t.Any]:
        res = self.run("state", "get", STATE_ID, timeout=CLI_TIMEOUT).check()
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        assert len(lines) == 1, f"`meltano state get` printed no state:\n{res.stdout}\n{res.stderr}"
        return json.loads(lines[0])


@dataclass
class RunSnapshot:
    result: Result
    events: list[dict[str, t.Any]]
    stats: dict[str, t.Any]
    ingest_statuses: list[int | None]
    dead_letters: list[dict[str, t.Any]]
    state: dict[str, t.Any]


def _snapshot(project: MeltanoProject, orb: FakeOrb, result: Result) -> RunSnapshot:
    return RunSnapshot(
        result=result,
        events=copy.deepcopy(orb.events()),
        stats=copy.deepcopy(orb.stats()),
        ingest_statuses=[r["status"] for r in orb.ingest_requests()],
        dead_letters=project.dead_letters(),
        state=project.state(),
    )


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def meltano_project(tmp_path_factory: pytest.TempPathFactory) -> MeltanoProject:
    """A copy of the project's Meltano setup with its plugins installed (once per session)."""
    meltano = _find_meltano()
    if meltano is None:
        reason = (
            "meltano is not installed (next to the interpreter or on PATH); install the demo "
            "extra: pip install -e '.[test,demo]'"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Meltano end-to-end test: {reason}")
        pytest.skip(reason)

    root = tmp_path_factory.mktemp("meltano-project")
    text = MELTANO_YML.read_text(encoding="utf-8")
    assert text.count("pip_url: -e .\n") == 1, "meltano.yml: expected target-orb's `pip_url: -e .`"
    # `-e .` means the project root; the copy lives elsewhere, so point it at this checkout.
    text = text.replace("pip_url: -e .\n", f"pip_url: -e {shlex.quote(str(REPO))}\n")
    (root / "meltano.yml").write_text(text, encoding="utf-8")
    (root / "demo").mkdir()
    shutil.copyfile(SAMPLE, root / "demo" / SAMPLE.name)

    project = MeltanoProject(root=root, meltano=meltano)
    project.run("install", timeout=INSTALL_TIMEOUT).check()
    assert (root / "meltano.yml").read_text(encoding="utf-8") == text, (
        "Meltano rewrote meltano.yml (a missing project_id?)"
    )
    return project


@pytest.fixture(scope="session")
def orb() -> t.Iterator[FakeOrb]:
    fake = FakeOrb(grace_period_hours=GRACE_PERIOD_HOURS).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="session")
def first_run(meltano_project: MeltanoProject, orb: FakeOrb) -> RunSnapshot:
    result = meltano_project.run("run", "tap-segment", "target-orb", timeout=RUN_TIMEOUT, orb=orb)
    return _snapshot(meltano_project, orb, result.check())


@pytest.fixture(scope="session")
def second_run(
    meltano_project: MeltanoProject, orb: FakeOrb, first_run: RunSnapshot
) -> RunSnapshot:
    """The same `meltano run` again, with the state Meltano stored after the first one."""
    result = meltano_project.run("run", "tap-segment", "target-orb", timeout=RUN_TIMEOUT, orb=orb)
    return _snapshot(meltano_project, orb, result.check())


# ---------------------------------------------------------------------------- tests


def test_sample_is_what_the_expectations_assume() -> None:
    rows = _sample()
    assert 15 <= len(rows) <= 30
    ids = {r["messageId"] for r in rows}
    assert set(EXPECTED) | {NO_USER_ID} <= ids
    kinds = {r["type"] for r in rows}
    assert {"track", "identify", "page"} <= kinds
    sendable = {
        r["messageId"]
        for r in rows
        if r["type"] == "track"
        and r.get("userId")
        and r.get("integrations", {}).get("Orb", r.get("integrations", {}).get("All", True))
        and r["event"] not in {"Audience Entered", "Audience Exited", "Trait Computed"}
    }
    assert sendable == set(EXPECTED)


def test_first_run_lands_exactly_the_sendable_tracks(first_run: RunSnapshot) -> None:
    events = first_run.events
    keys = [ev["idempotency_key"] for ev in events]
    assert sorted(keys) == sorted(EXPECTED)
    assert all(status == 200 for status in first_run.ingest_statuses), first_run.ingest_statuses
    # The archive's retried copy was collapsed by target-orb, never sent twice.
    assert first_run.stats["duplicates"] == 0
    assert set(first_run.stats["key_send_counts"].values()) == {1}
    for ev in events:
        name, customer, when, props = EXPECTED[ev["idempotency_key"]]
        assert set(ev) == {
            "idempotency_key",
            "event_name",
            "external_customer_id",
            "timestamp",
            "properties",
        }, ev
        assert ev["event_name"] == name
        assert ev["external_customer_id"] == customer
        assert UTC_Z.match(ev["timestamp"]), ev["timestamp"]
        assert dt.datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")) == when
        assert ev["properties"] == props, ev
        assert not [k for k in ev["properties"] if k.startswith("_sdc_")]


def test_payment_confirmed_body_exactly(first_run: RunSnapshot) -> None:
    """The Orb destination's own example, end to end."""
    (landed,) = [e for e in first_run.events if e["idempotency_key"] == PAYMENT]
    ev = dict(landed)
    timestamp = ev.pop("timestamp")
    assert ev == {
        "idempotency_key": PAYMENT,
        "event_name": "payment_confirmed",
        "external_customer_id": "acme-co",
        "properties": {
            "amount": 100.0,
            "currency": "USD",
            "confirmation_time": "2022-05-11T21:33:13.1652304793Z",
        },
    }
    assert isinstance(ev["properties"]["amount"], (int, float))
    assert UTC_Z.match(timestamp) and timestamp.startswith("2024-03-01T12:33:13.165")


def test_first_run_dead_letters_the_record_without_user_id(first_run: RunSnapshot) -> None:
    (entry,) = first_run.dead_letters
    assert entry["stream"] == STREAM
    assert entry["source"] == "local"
    assert "userId" in entry["reason"], entry["reason"]
    record = entry["record"]
    assert record["messageId"] == NO_USER_ID
    # The record as the tap sent it: the raw Segment message plus tap-jsonl's `_sdc_*`.
    (raw,) = [r for r in _sample() if r["messageId"] == NO_USER_ID]
    assert {k: v for k, v in record.items() if not k.startswith("_sdc_")} == raw
    assert record["_sdc_stream"] == STREAM


def _bookmark(state: dict[str, t.Any]) -> dict[str, t.Any]:
    (partition,) = state["singer_state"]["bookmarks"][STREAM]["partitions"]
    return partition


def test_meltano_stored_the_final_state(
    meltano_project: MeltanoProject, first_run: RunSnapshot
) -> None:
    partition = _bookmark(first_run.state)
    sample = meltano_project.root / "demo" / SAMPLE.name
    assert Path(partition["context"]["_sdc_filename"]).resolve() == sample.resolve()
    assert partition["replication_key"] == "_sdc_last_modified"
    mtime = dt.datetime.fromtimestamp(sample.stat().st_mtime, tz=dt.timezone.utc)
    assert partition["replication_key_value"] == mtime.replace(microsecond=0).isoformat()


def test_second_run_lands_nothing_new_only_duplicates(
    first_run: RunSnapshot, second_run: RunSnapshot
) -> None:
    # Meltano hands the stored bookmark to the tap ...
    value = _bookmark(first_run.state)["replication_key_value"]
    log = second_run.result.stderr + second_run.result.stdout
    assert f"Starting incremental sync with bookmark value: {value}" in log
    # ... but tap-jsonl 0.3.1 never skips a file it has read (it looks the bookmark up as
    # `_sdc_last_modified` in the partition state, where the SDK writes
    # `replication_key_value`), so the whole sample is sent again. Orb keeps the first copy
    # of each idempotency key: the rerun lands nothing new, only duplicates.
    assert second_run.events == first_run.events  # same keys, same bodies
    assert len(second_run.ingest_statuses) > len(first_run.ingest_statuses)
    assert all(status == 200 for status in second_run.ingest_statuses)
    assert second_run.stats["duplicates"] == len(EXPECTED)
    assert second_run.stats["key_send_counts"] == {key: 2 for key in EXPECTED}
    # The same record, for the same reason, is already in the dead-letter file: the rerun
    # counts it as already dead-lettered and does not append a copy (issue 19).
    assert second_run.dead_letters == first_run.dead_letters
    assert "already dead-lettered: 1" in second_run.result.stderr
    assert second_run.state == first_run.state


def test_job_name_defaults_to_the_meltano_state_id(first_run: RunSnapshot) -> None:
    # Meltano 4 does not hand the loader its state ID; target-orb rebuilds it from
    # MELTANO_ENVIRONMENT, MELTANO_EXTRACTOR_NAME and MELTANO_LOADER_NAME (issue 17).
    assert f"target-orb job '{STATE_ID}'" in first_run.result.stderr
