"""Contract test: target-orb's requests, checked by Prism against Orb's real OpenAPI spec.

Every request the target makes passes through ``prism proxy --errors`` (see
conftest.py), which validates it against the ``/ingest`` and ``/ping``
operations of Orb's own spec (PROVENANCE.md) and the stand-in's answers
against the same operations' responses. A violation shows up three ways, all
checked: Prism answers an error instead of proxying (so the request never
reaches the stand-in and its events do not land), Prism logs an ``error`` line,
and the target sees a non-Orb status.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import requests

from tests.conftest import SEGMENT_SCHEMA

from .conftest import (
    API_KEY,
    PrismProxy,
    pinned_prism_version,
    prism_problems,
    requests_received,
    upstream_statuses,
)

TARGET_BIN = Path(sys.executable).with_name("target-orb")
TARGET_TIMEOUT_S = 60
HTTP_TIMEOUT_S = 10
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PRISM_ERRORS = "https://stoplight.io/prism/errors#"
HEX64 = re.compile(r"^[0-9a-f]{64}$")

STREAM = "segment_tracks"
BATCH_SIZE = 7
PROPERTIES_MAPPING = {
    "plan": "plan",
    "seats": "seat_count",
    "amount": "amount",
    "trial": "is_trial",
    "usage": "usage",  # a nested object: flattened to usage_* keys
    "usage.minutes": "minutes",  # a dotted path into the nested object
}
SCHEMA = SEGMENT_SCHEMA


def _ts(dt: datetime, variant: int) -> str:
    """Segment timestamps in a few spellings, all within the last hour."""
    if variant % 3 == 0:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    if variant % 3 == 1:
        return dt.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="seconds")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def segment_records(now: datetime) -> tuple[list[dict[str, Any]], set[str], int]:
    """~30 Segment Track records.

    Returns:
        (records, the idempotency keys Orb must receive for records that carry a
        messageId, how many sent records carry none and so get a derived key).
    """
    records: list[dict[str, Any]] = []
    expected_keys: set[str] = set()
    derived = 0
    integrations_variants: list[tuple[dict[str, Any] | None, bool]] = [
        (None, True),
        ({"All": True}, True),
        ({"Orb": True}, True),
        ({"All": False, "Orb": True}, True),
        ({"all": True, "Segment.io": False}, True),
        ({"Orb": False}, False),  # skipped by honor_integrations
        ({"All": False}, False),  # skipped: All false and no Orb key
    ]
    for i in range(30):
        when = now - timedelta(minutes=50) + timedelta(seconds=97 * i, microseconds=1000 * i)
        props: dict[str, Any] = {
            "plan": ["free", "pro", "enterprise"][i % 3],
            "seats": i + 1,
            "amount": [12.5, 0.1, 1234.5678, 3, -7.25][i % 5],
            "trial": i % 2 == 0,
            "unmapped_key": "dropped",
        }
        if i % 4 == 0:
            props["usage"] = {"minutes": 12.5 + i, "region": {"name": "eu-west", "zone": i}}
        if i % 6 == 1:
            props["usage"] = {"minutes": i, "tags": ["a", "b"], "cached": False}
        integrations, sent = integrations_variants[i % len(integrations_variants)]
        record: dict[str, Any] = {
            "type": "track",
            "event": ["api_call", "Seat Added", "compute.minutes"][i % 3],
            "userId": f"user-{i % 5}",
            "anonymousId": f"anon-{i}",
            "timestamp": _ts(when, i),
            "properties": props,
            "context": {"library": {"name": "analytics.js", "version": "4.1.0"}},
        }
        if integrations is not None:
            record["integrations"] = integrations
        if i % 8 == 3:
            key = None  # no messageId at all: the target derives a content key
        elif i % 8 == 5:
            record["messageId"] = None
            key = None
        elif i % 10 == 7:
            long_id = f"ajs-next-{i}-" + "f" * 80  # > 64 chars: sent as its sha256 hex
            record["messageId"] = long_id
            key = hashlib.sha256(long_id.encode("utf-8")).hexdigest()
        else:
            record["messageId"] = f"ajs-msg-{i:04d}"
            key = record["messageId"]
        if sent:
            if key is None:
                derived += 1
            else:
                expected_keys.add(key)
        records.append(record)
    return records, expected_keys, derived


def singer_input(records: list[dict[str, Any]], state: dict[str, Any]) -> str:
    lines = [{"type": "SCHEMA", "stream": STREAM, "schema": SCHEMA, "key_properties": []}]
    half = len(records) // 2
    lines += [{"type": "RECORD", "stream": STREAM, "record": r} for r in records[:half]]
    lines.append({"type": "STATE", "value": {"bookmarks": {STREAM: {"half": True}}}})
    lines += [{"type": "RECORD", "stream": STREAM, "record": r} for r in records[half:]]
    lines.append({"type": "STATE", "value": state})
    return "".join(json.dumps(line) + "\n" for line in lines)


def _assert_clean(proxy: PrismProxy, log: str, *, requests_made: int) -> None:
    problems = prism_problems(log)
    assert not problems, "Prism reported violations/errors:\n" + "\n".join(problems)
    assert requests_received(log) == requests_made, log
    statuses = upstream_statuses(log)
    assert len(statuses) == requests_made, log
    assert all(status == 200 for _path, status in statuses), statuses


# --------------------------------------------------------------------------- tests


def test_prism_is_the_pinned_version(prism: PrismProxy) -> None:
    assert prism.version == pinned_prism_version()
    assert re.fullmatch(r"5\.14\.\d+", prism.version)


def test_target_requests_satisfy_orbs_openapi_spec(proxy: PrismProxy, tmp_path: Path) -> None:
    assert TARGET_BIN.exists(), f"target-orb is not installed next to {sys.executable}"
    now = datetime.now(timezone.utc)
    records, expected_keys, derived = segment_records(now)
    state = {"bookmarks": {STREAM: {"replication_key_value": now.isoformat()}}}
    dead_letters = tmp_path / "dead-letter.jsonl"
    config = {
        "api_key": API_KEY,
        "api_url": proxy.url,
        "external_customer_id_field": "userId",
        "properties_mapping": PROPERTIES_MAPPING,
        "dead_letter_path": str(dead_letters),
        "progress_interval_seconds": 0,
        "batch_size_rows": BATCH_SIZE,
        "request_timeout": 10,
        "max_retry_seconds": 5,  # a Prism 500 (response violation) must fail fast
    }
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")

    mark = proxy.mark()
    done = subprocess.run(
        [str(TARGET_BIN), "--config", str(config_path)],
        input=singer_input(records, state).encode("utf-8"),
        capture_output=True,
        timeout=TARGET_TIMEOUT_S,
        cwd=tmp_path,
        check=False,
    )
    stdout = done.stdout.decode("utf-8", "replace")
    stderr = done.stderr.decode("utf-8", "replace")
    log = proxy.log_since(mark)
    context = f"\n--- target stderr ---\n{stderr[-6000:]}\n--- prism log ---\n{log[-6000:]}"
    assert done.returncode == 0, f"target-orb exited {done.returncode}{context}"

    # 1. Prism saw no violation, and every request went through to the stand-in.
    problems = prism_problems(log)
    assert not problems, "Prism reported violations/errors:\n" + "\n".join(problems) + context
    seen = proxy.fake.requests
    ingests = [r for r in seen if r["method"] == "POST" and r["path"] == "/v1/ingest"]
    pings = [r for r in seen if r["path"] == "/v1/ping"]
    assert len(pings) == 1 and pings[0]["status"] == 200, seen
    assert len(ingests) >= 2, f"expected several batches of {BATCH_SIZE}, got {len(ingests)}"
    assert all(r["status"] == 200 and r["authorization_ok"] for r in ingests), ingests
    assert all(r["event_count"] <= BATCH_SIZE for r in ingests), ingests
    _assert_clean(proxy, log, requests_made=len(seen))
    assert upstream_statuses(log).count(("/ping", 200)) == 1

    # 2. What landed is exactly what was meant to be sent.
    landed = {ev["idempotency_key"]: ev for ev in proxy.fake.events()}
    explicit = set(landed) & expected_keys
    assert explicit == expected_keys, f"missing: {sorted(expected_keys - set(landed))}"
    derived_keys = set(landed) - expected_keys
    assert len(derived_keys) == derived, sorted(derived_keys)
    assert all(HEX64.match(k) for k in derived_keys), sorted(derived_keys)
    assert sum(r["event_count"] for r in ingests) == len(landed)
    assert proxy.fake.duplicates == 0
    for ev in landed.values():
        assert ev["timestamp"].endswith("Z"), ev
        assert ev["external_customer_id"].startswith("user-"), ev
        assert "unmapped_key" not in ev["properties"], ev
        assert all(isinstance(v, str | int | float | bool) for v in ev["properties"].values()), ev
    first = landed["ajs-msg-0000"]
    assert first["event_name"] == "api_call"
    assert first["properties"]["amount"] == 12.5
    assert first["properties"]["is_trial"] is True
    assert first["properties"]["seat_count"] == 1
    assert first["properties"]["minutes"] == 12.5
    assert first["properties"]["usage_region_name"] == "eu-west"
    assert not dead_letters.exists() or dead_letters.read_text(encoding="utf-8") == ""

    # 3. STATE: a Singer target writes each state value as one JSON line on stdout,
    # and the last one is the input's final STATE, once everything before it settled.
    out_lines = [line for line in stdout.splitlines() if line.strip()]
    assert out_lines, f"no STATE line on stdout{context}"
    assert json.loads(out_lines[-1]) == state, f"stdout: {stdout!r}{context}"


def test_ping_through_prism(proxy: PrismProxy) -> None:
    mark = proxy.mark()
    r = requests.get(f"{proxy.url}/ping", headers=AUTH, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.json() == {"response": "pong"}
    # A wrong key still satisfies the security scheme (a bearer token is there):
    # Prism forwards it and checks the stand-in's 401 against the spec's 401Error.
    bad = requests.get(
        f"{proxy.url}/ping", headers={"Authorization": "Bearer wrong"}, timeout=HTTP_TIMEOUT_S
    )
    assert bad.status_code == 401, bad.text
    assert not bad.json()["type"].startswith(PRISM_ERRORS), bad.text
    log = proxy.log_since(mark)
    assert not prism_problems(log), log
    assert upstream_statuses(log) == [("/ping", 200), ("/ping", 401)], log
    assert [r["status"] for r in proxy.fake.requests] == [200, 401]


def test_harness_notices_violations(proxy: PrismProxy) -> None:
    """Negative controls: a request or a response that breaks the spec is caught."""
    ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    good = {
        "event_name": "api_call",
        "external_customer_id": "user-1",
        "timestamp": ts,
        "properties": {"n": 1},
        "idempotency_key": "control-ok",
    }
    no_timestamp = {k: v for k, v in good.items() if k != "timestamp"}
    bad_bodies = {
        "extra top-level key": ({"events": [good], "debug": True}, "additionalProperties"),
        "event without timestamp": ({"events": [no_timestamp]}, "required"),
        "extra event key": ({"events": [dict(good, customer="x")]}, "additionalProperties"),
        "timestamp not a date-time": ({"events": [dict(good, timestamp="today")]}, "format"),
    }
    for name, (body, code) in bad_bodies.items():
        mark = proxy.mark()
        r = requests.post(f"{proxy.url}/ingest", json=body, headers=AUTH, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 422, f"{name}: Prism let it through: {r.status_code} {r.text}"
        problem = r.json()
        assert problem["type"] == PRISM_ERRORS + "UNPROCESSABLE_ENTITY", problem
        assert code in {v.get("code") for v in problem["validation"]}, problem
        log = proxy.log_since(mark)
        assert prism_problems(log), f"{name}: the log check would miss it:\n{log}"
    assert proxy.fake.requests == [], "a violating request reached the stand-in"

    # Without a bearer token the security requirement fails before proxying.
    r = requests.post(f"{proxy.url}/ingest", json={"events": [good]}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 401
    assert r.json()["type"] == PRISM_ERRORS + "UNAUTHORIZED", r.text

    # A response that breaks the spec is caught too.
    # (Scripted as a 500 whose body lacks 500Error's required `type`/`status`.)
    proxy.fake.script({"status": 500, "body": {"ok": True}})
    mark = proxy.mark()
    r = requests.post(f"{proxy.url}/ingest", json={"events": [good]}, headers=AUTH, timeout=10)
    assert r.status_code == 500, r.text
    assert r.json()["type"] == PRISM_ERRORS + "VIOLATIONS", r.text
    assert "required property 'type'" in r.headers.get("sl-violations", ""), r.headers
    assert prism_problems(proxy.log_since(mark))

    # And the valid body, for contrast, goes through clean.
    mark = proxy.mark()
    r = requests.post(f"{proxy.url}/ingest", json={"events": [good]}, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"validation_failed": []}
    assert not prism_problems(proxy.log_since(mark))
    assert [ev["idempotency_key"] for ev in proxy.fake.events()] == ["control-ok"]
