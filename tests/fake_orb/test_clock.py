"""The stand-in's clock (set_now / advance / control API / --now) and UTC timestamps."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from fake_orb import FakeOrb

from .conftest import NOW, Api, ago, event, ts

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "stamp",
    ["2030-01-15T11:00:00+00:00", "2030-01-15T11:00:00.123456+00:00", "2030-01-15T11:00:00Z"],
)
def test_utc_offset_zero_is_utc_and_stored_verbatim(
    orb: FakeOrb, api: Api, stamp: str
) -> None:
    ev = event(timestamp=stamp)
    resp = api.ingest([ev])
    assert resp.status_code == 200, resp.text
    assert orb.landed == {"k1": ev}  # the body exactly as sent


@pytest.mark.parametrize(
    "stamp",
    [
        "2030-01-15T11:00:00-00:00",  # RFC 3339: "offset unknown", not UTC
        "2030-01-15T12:00:00+01:00",
        "2030-01-15T06:00:00-05:00",
        "2030-01-15T11:00:00+0000",
        "2030-01-15T11:00:00",
    ],
)
def test_other_offsets_are_refused(orb: FakeOrb, api: Api, stamp: str) -> None:
    resp = api.ingest([event(timestamp=stamp)])
    assert resp.status_code == 400
    (item,) = resp.json()["validation_errors"]
    assert item["idempotency_key"] == "k1"
    assert "timestamp" in item["validation_errors"][0]
    assert orb.landed == {}


def test_plus_zero_offset_obeys_the_grace_window(orb: FakeOrb, api: Api) -> None:
    old = (NOW - timedelta(hours=12, seconds=1)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    edge = (NOW - timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    resp = api.ingest([event("old", timestamp=old)])
    assert resp.status_code == 400
    assert "grace period" in resp.json()["validation_errors"][0]["validation_errors"][0]
    assert api.ingest([event("edge", timestamp=edge)]).status_code == 200


def test_set_now_freezes_and_advance_moves(make_orb: Callable[..., FakeOrb]) -> None:
    orb = make_orb(now=None)
    real = datetime.now(timezone.utc)
    assert abs(orb.now() - real) < timedelta(seconds=5)

    orb.set_now(NOW)
    assert orb.now() == NOW
    time.sleep(0.01)
    assert orb.now() == NOW  # frozen
    assert orb.advance(90) == NOW + timedelta(seconds=90)
    assert orb.now() == NOW + timedelta(seconds=90)

    orb.set_now(None)  # back to the real clock, offset forgotten
    assert abs(orb.now() - datetime.now(timezone.utc)) < timedelta(seconds=5)
    orb.advance(-3 * 86400)  # a ticking clock shifted three days back
    assert abs(orb.now() - (datetime.now(timezone.utc) - timedelta(days=3))) < timedelta(
        seconds=5
    )

    with pytest.raises(ValueError):
        orb.set_now(datetime(2030, 1, 1))  # naive
    with pytest.raises(ValueError):
        orb.advance("10")  # type: ignore[arg-type]


def test_grace_window_follows_the_clock(orb: FakeOrb, api: Api) -> None:
    three_days = ago(days=3)
    assert api.ingest([event("a", timestamp=three_days)]).status_code == 400
    orb.advance(-3 * 86400 + 3600)  # now = the event's time + 1 h
    assert api.ingest([event("a", timestamp=three_days)]).status_code == 200
    orb.set_now(NOW)
    future = ts(NOW + timedelta(minutes=6))
    assert api.ingest([event("f", timestamp=future)]).status_code == 400
    orb.advance(120)
    assert api.ingest([event("f", timestamp=future)]).status_code == 200
    assert list(orb.landed) == ["a", "f"]


def test_clock_control_endpoint(orb: FakeOrb, api: Api) -> None:
    ctl = orb.root_url + "/_fake/clock"
    with requests.Session() as plain:  # the control API needs no key
        assert plain.get(ctl, timeout=5).json() == {"now": "2030-01-15T12:00:00Z", "frozen": True}
        got = plain.post(ctl, json={"advance_seconds": 3600}, timeout=5).json()
        assert got == {"now": "2030-01-15T13:00:00Z", "frozen": True}
        assert orb.now() == NOW + timedelta(hours=1)
        got = plain.post(ctl, json={"now": "2031-06-01T00:00:00+02:00"}, timeout=5).json()
        assert got["now"] == "2031-05-31T22:00:00Z"
        got = plain.post(ctl, json={"now": None}, timeout=5).json()
        assert got["frozen"] is False
        assert abs(orb.now() - datetime.now(timezone.utc)) < timedelta(seconds=5)
        for bad in ({"now": "tomorrow"}, {"advance": 1}, [1], {"advance_seconds": "x"}):
            resp = plain.post(ctl, json=bad, timeout=5)
            assert resp.status_code == 400, bad
            assert resp.json()["ok"] is False


CHILD = textwrap.dedent(
    """
    import json, os, urllib.request
    root = os.environ["TARGET_ORB_API_URL"].rsplit("/v1", 1)[0]
    with urllib.request.urlopen(root + "/_fake/clock", timeout=10) as resp:
        print("clock", json.load(resp)["now"], flush=True)
    """
)


def test_cli_now_and_customer_flags() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fake_orb",
            "--now",
            "2030-02-03T04:05:06Z",
            "--customer",
            "acct/1",
            "--customer",
            "acct 2",
            "--",
            sys.executable,
            "-c",
            CHILD,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "clock 2030-02-03T04:05:06Z" in proc.stdout
    assert "customers: 2 (0 update(s))" in proc.stdout
    assert "  acct/1 (fake_cus_1) metadata {}" in proc.stdout
    assert "  acct 2 (fake_cus_2) metadata {}" in proc.stdout


def test_cli_refuses_a_bad_now() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fake_orb", "--now", "2030-02-03", "--max-seconds", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert "RFC 3339" in proc.stderr
