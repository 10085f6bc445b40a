"""Tests for the strict local Orb stand-in, ``fake_orb``."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]

try:
    from fake_orb import ERROR_TYPE_BASE, FakeOrb
except ModuleNotFoundError:  # not installed into the venv: run from the checkout
    sys.path.insert(0, str(REPO_ROOT))
    from fake_orb import ERROR_TYPE_BASE, FakeOrb

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
TS = "2030-01-01T11:00:00Z"
KEY = "test-orb-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def fmt(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def event(key: str = "k1", **overrides: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "idempotency_key": key,
        "external_customer_id": "acct_1",
        "event_name": "api_request",
        "timestamp": TS,
        "properties": {"region": "us-east-1", "bytes": 1024, "cached": False, "ratio": 0.5},
    }
    ev.update(overrides)
    return ev


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def make_orb(request: pytest.FixtureRequest) -> Callable[..., FakeOrb]:
    def make(**kwargs: Any) -> FakeOrb:
        kwargs.setdefault("clock", lambda: NOW)
        orb = FakeOrb(**kwargs)
        request.addfinalizer(orb.stop)
        return orb.start()

    return make


@pytest.fixture
def orb(make_orb: Callable[..., FakeOrb]) -> FakeOrb:
    return make_orb()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers.update(AUTH)
        yield s


def ingest(
    http: requests.Session, orb: FakeOrb, events: list[dict[str, Any]], **kwargs: Any
) -> requests.Response:
    kwargs.setdefault("timeout", 5)
    return http.post(f"{orb.url}/ingest", json={"events": events}, **kwargs)


def error_keys(resp: requests.Response) -> dict[str, list[str]]:
    body = resp.json()
    return {
        item["idempotency_key"]: item["validation_errors"]
        for item in body["validation_errors"]
        if isinstance(item, dict)
    }


def assert_validation_400(resp: requests.Response) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["type"] == ERROR_TYPE_BASE + "400-request-validation-errors"
    assert body["status"] == 400
    assert body["title"] and body["detail"]
    assert isinstance(body["validation_errors"], list) and body["validation_errors"]
    return body


# --------------------------------------------------------------------------- server basics


def test_url_port_and_loopback_only(orb: FakeOrb) -> None:
    assert orb.url == f"http://127.0.0.1:{orb.port}/v1"
    assert orb.port > 0
    for host in ("0.0.0.0", "192.0.2.1", "example.com", "::"):
        with pytest.raises(ValueError):
            FakeOrb(host=host)


def test_stop_is_idempotent_and_closes_keepalive(make_orb: Callable[..., FakeOrb]) -> None:
    orb = make_orb()
    with requests.Session() as s:
        assert s.get(f"{orb.url}/ping", headers=AUTH, timeout=5).status_code == 200
        orb.stop()
        orb.stop()
        with pytest.raises(requests.ConnectionError):
            s.get(f"{orb.url}/ping", headers=AUTH, timeout=5)


def test_context_manager() -> None:
    with FakeOrb() as orb:
        assert requests.get(f"{orb.url}/ping", headers=AUTH, timeout=5).json() == {
            "response": "pong"
        }
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{orb.url}/ping", headers=AUTH, timeout=2)


def test_tcp_nodelay_and_keepalive_are_fast(orb: FakeOrb, http: requests.Session) -> None:
    start = time.perf_counter()
    for i in range(40):
        assert ingest(http, orb, [event(f"k{i}")]).status_code == 200
    elapsed = time.perf_counter() - start
    conns = list(orb._server._conns)
    assert len(conns) == 1  # one keep-alive connection served all 40 requests
    assert conns[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert elapsed < 1.5  # a Nagle/delayed-ACK stall would cost ~40 ms per request


def test_ping_auth(orb: FakeOrb) -> None:
    ok = requests.get(f"{orb.url}/ping", headers=AUTH, timeout=5)
    assert ok.status_code == 200
    assert ok.json() == {"response": "pong"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        resp = requests.get(f"{orb.url}/ping", headers=headers, timeout=5)
        assert resp.status_code == 401
        body = resp.json()
        assert body["type"] == ERROR_TYPE_BASE + "401-authentication-error"
        assert body["status"] == 401
        assert {"title", "detail"} <= set(body)


def test_ingest_requires_auth(orb: FakeOrb) -> None:
    resp = requests.post(
        f"{orb.url}/ingest",
        json={"events": [event()]},
        headers={"Authorization": "Bearer wrong"},
        timeout=5,
    )
    assert resp.status_code == 401
    assert resp.json()["type"].endswith("#401-authentication-error")
    assert orb.landed == {}
    assert orb.requests[-1]["authorization_ok"] is False
    assert orb.key_send_counts["k1"] == 1


def test_unknown_routes_404(orb: FakeOrb, http: requests.Session) -> None:
    for method, path in (("GET", "/v1/nope"), ("GET", "/v1/ingest"), ("POST", "/v2/ingest")):
        resp = http.request(method, orb.root_url + path, timeout=5)
        assert resp.status_code == 404
        assert resp.json()["type"] == ERROR_TYPE_BASE + "404-url-not-found"


def test_authorization_value_is_never_recorded(orb: FakeOrb, http: requests.Session) -> None:
    ingest(http, orb, [event()])
    http.get(f"{orb.url}/ping", timeout=5)
    assert KEY not in json.dumps(orb.requests)
    assert all(r["authorization_ok"] for r in orb.requests)


# --------------------------------------------------------------------------- happy path & dedup


def test_valid_event_lands_with_exactly_its_body(orb: FakeOrb, http: requests.Session) -> None:
    ev = event(properties={"n": 2**63 - 1, "m": -(2**63), "f": 1.5, "b": True, "s": ""})
    resp = ingest(http, orb, [ev])
    assert resp.status_code == 200
    assert resp.json() == {"validation_failed": []}
    assert orb.landed == {"k1": ev}
    assert orb.events() == [ev]
    req = orb.requests[-1]
    assert req == {
        "method": "POST",
        "path": "/v1/ingest",
        "status": 200,
        "event_count": 1,
        "keys": ["k1"],
        "authorization_ok": True,
        "backfill_id": None,
        "fault": None,
        "idempotency_header": None,
        "idempotent_replayed": False,
    }


def test_customer_id_alone_and_empty_properties_ok(orb: FakeOrb, http: requests.Session) -> None:
    ev = event(properties={}, customer_id="cus_1")
    del ev["external_customer_id"]
    resp = ingest(
        http, orb, [ev, event("k2", customer_id=None, timestamp="2030-01-01T11:00:00.5Z")]
    )
    assert resp.status_code == 200, resp.text
    assert list(orb.landed) == ["k1", "k2"]


def test_first_body_wins_across_requests(orb: FakeOrb, http: requests.Session) -> None:
    first = event(properties={"v": 1})
    assert ingest(http, orb, [first]).status_code == 200
    resp = ingest(http, orb, [event(properties={"v": 2}), event("k2")])
    assert resp.status_code == 200
    assert orb.landed["k1"] == first
    assert list(orb.landed) == ["k1", "k2"]
    assert orb.duplicates == 1
    assert orb.key_send_counts == {"k1": 2, "k2": 1}


def test_duplicate_key_equal_body_in_one_request_stored_once(
    orb: FakeOrb, http: requests.Session
) -> None:
    resp = ingest(http, orb, [event(), event(), event("k2")])
    assert resp.status_code == 200
    assert list(orb.landed) == ["k1", "k2"]
    assert orb.duplicates == 1
    assert orb.key_send_counts["k1"] == 2


def test_same_key_different_bodies_rejects_whole_request(
    make_orb: Callable[..., FakeOrb], http: requests.Session
) -> None:
    # Even with store_valid_on_400 the entire batch is rejected.
    orb = make_orb(store_valid_on_400=True)
    resp = ingest(http, orb, [event("ok"), event(properties={"v": 1}), event(properties={"v": 2})])
    assert_validation_400(resp)
    assert "k1" in error_keys(resp)
    assert "ok" not in error_keys(resp)
    assert orb.landed == {}
    # 1 vs true vs 1.0 are different bodies, not "equal".
    resp = ingest(http, orb, [event(properties={"v": 1}), event(properties={"v": True})])
    assert resp.status_code == 400
    assert orb.landed == {}


def test_max_events_per_request(orb: FakeOrb, http: requests.Session) -> None:
    resp = ingest(http, orb, [event(f"k{i}") for i in range(501)])
    body = assert_validation_400(resp)
    assert all(isinstance(item, str) for item in body["validation_errors"])
    assert "501" in body["validation_errors"][0]
    assert orb.landed == {}
    assert orb.key_send_counts["k0"] == 1
    assert ingest(http, orb, [event(f"k{i}") for i in range(500)]).status_code == 200
    assert len(orb.landed) == 500


# --------------------------------------------------------------------------- per-event validation


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"customer_id": "cus_1"}, id="both"),
        pytest.param({"external_customer_id": None}, id="neither-null"),
        pytest.param({"external_customer_id": ""}, id="empty-string"),
        pytest.param({"customer_id": "", "external_customer_id": "x"}, id="empty-other"),
        pytest.param({"external_customer_id": 5}, id="wrong-type"),
    ],
)
def test_customer_fields(orb: FakeOrb, http: requests.Session, overrides: dict[str, Any]) -> None:
    resp = ingest(http, orb, [event("good"), event("bad", **overrides)])
    assert_validation_400(resp)
    assert set(error_keys(resp)) == {"bad"}
    assert orb.landed == {}


def test_neither_customer_field_present(orb: FakeOrb, http: requests.Session) -> None:
    ev = event("bad")
    del ev["external_customer_id"]
    resp = ingest(http, orb, [ev])
    assert_validation_400(resp)
    assert "exactly one" in error_keys(resp)["bad"][0]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"a": 1}, id="nested"),
        pytest.param([1, 2], id="list"),
        pytest.param(None, id="null"),
        pytest.param(2**63, id="int64-overflow"),
        pytest.param(-(2**63) - 1, id="int64-underflow"),
    ],
)
def test_properties_must_be_flat_scalars(orb: FakeOrb, http: requests.Session, value: Any) -> None:
    resp = ingest(http, orb, [event("bad", properties={"ok": 1, "p": value}), event("good")])
    assert_validation_400(resp)
    errors = error_keys(resp)
    assert set(errors) == {"bad"}
    assert any("properties.p" in e for e in errors["bad"])
    assert orb.landed == {}


def test_non_finite_numbers_rejected(orb: FakeOrb, http: requests.Session) -> None:
    template = json.dumps({"events": [event(properties={"v": "@V@"})]})
    for raw in ("NaN", "Infinity", "-Infinity", "1e400"):
        resp = http.post(
            f"{orb.url}/ingest",
            data=template.replace('"@V@"', raw),
            headers={"Content-Type": "application/json"},
            timeout=5,
        )
        body = assert_validation_400(resp)
        if raw == "1e400":  # valid JSON, but it parses to an infinite float
            assert error_keys(resp) == {"k1": ["properties.v: number must be finite"]}
        else:
            assert "not valid JSON" in body["validation_errors"][0]
    assert orb.landed == {}
    # The template itself is fine.
    assert (
        http.post(
            f"{orb.url}/ingest",
            data=template.replace('"@V@"', "1e300"),
            headers={"Content-Type": "application/json"},
            timeout=5,
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    "ts",
    [
        "2030-01-01T11:00:00-05:00",
        "2030-01-01T11:00:00+01:00",
        "2030-01-01T11:00:00+0000",
        "2030-01-01T11:00:00",
        "2030-01-01T11:00:00z",
        "2030-01-01 11:00:00Z",
        "2030-01-01",
        "2030-02-30T11:00:00Z",
        "yesterday",
    ],
)
def test_timestamp_must_be_utc_z(orb: FakeOrb, http: requests.Session, ts: str) -> None:
    resp = ingest(http, orb, [event(timestamp=ts)])
    assert_validation_400(resp)
    assert any("timestamp" in e for e in error_keys(resp)["k1"])
    assert orb.landed == {}


def test_timestamp_window(make_orb: Callable[..., FakeOrb], http: requests.Session) -> None:
    orb = make_orb(grace_period_hours=12, future_tolerance_seconds=300)
    edge_old = fmt(NOW - timedelta(hours=12))
    edge_new = fmt(NOW + timedelta(seconds=300))
    assert ingest(http, orb, [event("a", timestamp=edge_old)]).status_code == 200
    assert ingest(http, orb, [event("b", timestamp=edge_new)]).status_code == 200

    too_old = fmt(NOW - timedelta(hours=12, seconds=1))
    resp = ingest(http, orb, [event("old", timestamp=too_old)])
    assert_validation_400(resp)
    assert "grace period" in error_keys(resp)["old"][0]

    too_new = fmt(NOW + timedelta(seconds=301))
    resp = ingest(http, orb, [event("new", timestamp=too_new)])
    assert_validation_400(resp)
    assert "future" in error_keys(resp)["new"][0]

    # The clock is read per request.
    orb.clock = lambda: NOW + timedelta(days=1)
    assert ingest(http, orb, [event("c")]).status_code == 400
    assert list(orb.landed) == ["a", "b"]


def test_extra_top_level_key_rejected_as_plain_string(orb: FakeOrb, http: requests.Session) -> None:
    resp = http.post(f"{orb.url}/ingest", json={"events": [event()], "debug": True}, timeout=5)
    body = assert_validation_400(resp)
    assert all(isinstance(item, str) for item in body["validation_errors"])
    assert any("debug" in item for item in body["validation_errors"])
    assert orb.landed == {}


def test_extra_event_key_names_the_event(orb: FakeOrb, http: requests.Session) -> None:
    resp = ingest(http, orb, [event(userId="u1")])
    assert_validation_400(resp)
    assert "userId" in error_keys(resp)["k1"][0]


def test_missing_or_empty_idempotency_key(orb: FakeOrb, http: requests.Session) -> None:
    ev = event()
    del ev["idempotency_key"]
    for bad in (ev, event(""), event(event_name="")):
        resp = ingest(http, orb, [bad])
        assert resp.status_code == 400, bad
    assert orb.landed == {}


def test_store_valid_on_400(make_orb: Callable[..., FakeOrb], http: requests.Session) -> None:
    orb = make_orb(store_valid_on_400=True)
    resp = ingest(http, orb, [event("good"), event("bad", properties={"x": None})])
    assert resp.status_code == 400
    assert set(error_keys(resp)) == {"bad"}
    assert list(orb.landed) == ["good"]


@pytest.mark.parametrize(
    ("data", "headers", "params"),
    [
        pytest.param(b"{not json", {"Content-Type": "application/json"}, {}, id="bad-json"),
        pytest.param(b'{"events": []}', {"Content-Type": "text/plain"}, {}, id="content-type"),
        pytest.param(
            b'{"events": [], "events": []}', {"Content-Type": "application/json"}, {}, id="dup-key"
        ),
        pytest.param(
            b'{"events": []}', {"Content-Type": "application/json"}, {"debug": "true"}, id="query"
        ),
    ],
)
def test_request_level_rejections(
    orb: FakeOrb, http: requests.Session, data: bytes, headers: dict[str, str], params: dict
) -> None:
    resp = http.post(f"{orb.url}/ingest", data=data, headers=headers, params=params, timeout=5)
    body = assert_validation_400(resp)
    assert all(isinstance(item, str) for item in body["validation_errors"])


def test_gzip_body_and_empty_events(orb: FakeOrb, http: requests.Session) -> None:
    payload = gzip.compress(json.dumps({"events": [event()]}).encode())
    resp = http.post(
        f"{orb.url}/ingest",
        data=payload,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=5,
    )
    assert resp.status_code == 200
    assert ingest(http, orb, []).status_code == 200
    assert list(orb.landed) == ["k1"]


def test_max_body_bytes(make_orb: Callable[..., FakeOrb], http: requests.Session) -> None:
    orb = make_orb(max_body_bytes=400)
    resp = ingest(http, orb, [event(f"k{i}") for i in range(5)])
    assert resp.status_code == 413
    assert resp.json()["type"] == ERROR_TYPE_BASE + "413-request-too-large"
    # The connection stays usable (the body was drained).
    assert ingest(http, orb, [event()]).status_code == 200
    assert list(orb.landed) == ["k1"]


def test_accept_all_mode(make_orb: Callable[..., FakeOrb], http: requests.Session) -> None:
    orb = make_orb(accept_all=True)
    odd = event(properties={"nested": {"a": [1]}}, timestamp="whenever")
    assert ingest(http, orb, [odd, odd]).status_code == 200
    assert orb.landed == {"k1": odd}
    assert orb.duplicates == 1
    assert http.post(f"{orb.url}/ingest", data=b"nope", timeout=5).status_code == 400
    assert ingest(http, orb, [{"no": "key"}]).status_code == 400
    bad_auth = requests.post(f"{orb.url}/ingest", json={"events": [event("k2")]}, timeout=5)
    assert bad_auth.status_code == 401
    assert list(orb.landed) == ["k1"]


def test_latency(make_orb: Callable[..., FakeOrb], http: requests.Session) -> None:
    orb = make_orb(latency_ms=150)
    start = time.perf_counter()
    assert ingest(http, orb, [event()]).status_code == 200
    assert time.perf_counter() - start >= 0.15


def test_concurrent_senders_dedup(orb: FakeOrb) -> None:
    def worker() -> None:
        with requests.Session() as s:
            s.headers.update(AUTH)
            for i in range(10):
                assert ingest(s, orb, [event(f"k{i}"), event(f"k{i + 1}")]).status_code == 200

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(orb.landed) == 11
    assert orb.duplicates == 6 * 20 - 11
    assert sum(orb.key_send_counts.values()) == 120


# --------------------------------------------------------------------------- scripted faults


def test_429_with_retry_after_passes_through(orb: FakeOrb, http: requests.Session) -> None:
    orb.script({"status": 429, "headers": {"Retry-After": "2"}})
    resp = ingest(http, orb, [event()])
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "2"
    assert resp.json()["type"] == ERROR_TYPE_BASE + "429-too-many-requests"
    assert orb.landed == {}
    assert orb.requests[-1]["fault"] == "429"
    assert orb.requests[-1]["status"] == 429
    # Script consumed: back to normal.
    assert ingest(http, orb, [event()]).status_code == 200
    assert list(orb.landed) == ["k1"]
    assert orb.key_send_counts["k1"] == 2


@pytest.mark.parametrize(
    ("status", "suffix"),
    [
        (500, "500-internal-server-error"),
        (502, "502-bad-gateway"),
        (503, "503-service-unavailable"),
        (408, "408-request-timeout"),
        (409, "409-resource-conflict"),
        (401, "401-authentication-error"),
        (403, "403-forbidden"),
        (404, "404-url-not-found"),
        (413, "413-request-too-large"),
    ],
)
def test_status_faults_do_not_store(
    orb: FakeOrb, http: requests.Session, status: int, suffix: str
) -> None:
    orb.script({"status": status})
    resp = ingest(http, orb, [event()])
    assert resp.status_code == status
    body = resp.json()
    assert body["type"] == ERROR_TYPE_BASE + suffix
    assert body["status"] == status
    assert orb.landed == {}


def test_faults_are_fifo_and_custom_body(orb: FakeOrb, http: requests.Session) -> None:
    orb.script({"status": 503, "body": "<html>upstream down</html>"}, {"status": 500})
    assert orb.pending_faults == 2
    first = ingest(http, orb, [event()])
    assert first.status_code == 503
    assert first.text == "<html>upstream down</html>"
    assert ingest(http, orb, [event()]).status_code == 500
    assert ingest(http, orb, [event()]).status_code == 200
    assert [r["fault"] for r in orb.requests] == ["503", "500", None]


def test_failed_auth_does_not_consume_fault(orb: FakeOrb, http: requests.Session) -> None:
    orb.script({"status": 500})
    assert requests.post(
        f"{orb.url}/ingest", json={"events": [event()]}, timeout=5
    ).status_code == (401)
    assert http.get(f"{orb.url}/ping", timeout=5).status_code == 200
    assert ingest(http, orb, [event()]).status_code == 500


def test_500_store_first_stores(orb: FakeOrb, http: requests.Session) -> None:
    orb.script({"status": 500, "store_first": True})
    resp = ingest(http, orb, [event(), event("k2")])
    assert resp.status_code == 500
    assert list(orb.landed) == ["k1", "k2"]
    assert orb.requests[-1]["fault"] == "500+store_first"
    # The retry is a no-op for the already landed keys.
    assert ingest(http, orb, [event(), event("k2")]).status_code == 200
    assert orb.duplicates == 2


def test_hang_times_out_client(orb: FakeOrb, http: requests.Session) -> None:
    orb.script({"action": "hang", "seconds": 1})
    with pytest.raises(requests.ReadTimeout):
        ingest(http, orb, [event()], timeout=0.3)
    assert orb.landed == {}
    assert orb.requests[-1]["status"] is None
    assert orb.requests[-1]["fault"] == "hang"


def test_hang_then_close_without_answer(orb: FakeOrb, http: requests.Session) -> None:
    orb.script({"action": "hang", "seconds": 0.2, "store_first": True})
    start = time.perf_counter()
    with pytest.raises(requests.ConnectionError):
        ingest(http, orb, [event()], timeout=5)
    assert time.perf_counter() - start >= 0.2
    assert list(orb.landed) == ["k1"]


def test_stop_interrupts_hang(make_orb: Callable[..., FakeOrb]) -> None:
    orb = make_orb()
    orb.script({"action": "hang", "seconds": 60})
    errors: list[BaseException] = []

    def client() -> None:
        try:
            requests.post(f"{orb.url}/ingest", json={"events": [event()]}, headers=AUTH, timeout=10)
        except requests.RequestException as exc:
            errors.append(exc)

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 5
    while not orb.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.perf_counter()
    orb.stop()
    t.join(5)
    assert time.perf_counter() - start < 2
    assert not t.is_alive()
    assert errors and isinstance(errors[0], requests.ConnectionError)


@pytest.mark.parametrize("store_first", [False, True])
def test_reset_raises_connection_error(
    orb: FakeOrb, http: requests.Session, store_first: bool
) -> None:
    orb.script({"action": "reset", "store_first": store_first})
    with pytest.raises(requests.ConnectionError):
        ingest(http, orb, [event()])
    assert (orb.landed != {}) is store_first
    assert orb.requests[-1]["fault"] == "reset" + ("+store_first" if store_first else "")
    assert ingest(http, orb, [event("k2")]).status_code == 200


def test_400_bad_keys(make_orb: Callable[..., FakeOrb], http: requests.Session) -> None:
    orb = make_orb()
    orb.script({"status": 400, "bad_keys": {"k2": ["customer does not exist"]}})
    resp = ingest(http, orb, [event(), event("k2")])
    body = assert_validation_400(resp)
    assert body["validation_errors"] == [
        {"idempotency_key": "k2", "validation_errors": ["customer does not exist"]}
    ]
    assert orb.landed == {}

    orb2 = make_orb(store_valid_on_400=True)
    orb2.script({"status": 400, "bad_keys": {"k2": ["nope"]}})
    assert ingest(http, orb2, [event(), event("k2")]).status_code == 400
    assert list(orb2.landed) == ["k1"]


def test_400_bad_keys_as_strings(orb: FakeOrb, http: requests.Session) -> None:
    orb.script({"status": 400, "bad_keys_as_strings": True, "bad_keys": {"k2": ["bad thing"]}})
    body = assert_validation_400(ingest(http, orb, [event(), event("k2")]))
    assert len(body["validation_errors"]) == 1
    item = body["validation_errors"][0]
    assert isinstance(item, str)
    assert "k2" in item and "bad thing" in item
    assert orb.landed == {}


def test_400_constraint_violation_names_no_key(orb: FakeOrb, http: requests.Session) -> None:
    orb.script({"status": 400, "type": "constraint-violation"})
    resp = ingest(http, orb, [event()])
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == ERROR_TYPE_BASE + "400-constraint-violation"
    assert "validation_errors" not in body
    assert orb.landed == {}


def test_invalid_faults_rejected(orb: FakeOrb) -> None:
    for bad in (
        {"status": 200},
        {"status": 500, "stauts": 1},
        {"action": "explode"},
        {"status": 429, "bad_keys": {"k": ["x"]}},
        "429",
    ):
        with pytest.raises(ValueError):
            orb.script(bad)  # type: ignore[arg-type]
    assert orb.pending_faults == 0


def test_set_bad_keys(make_orb: Callable[..., FakeOrb], http: requests.Session) -> None:
    orb = make_orb()
    orb.set_bad_keys({"poison": "customer does not exist"})
    resp = ingest(http, orb, [event(), event("poison"), event("k3")])
    assert_validation_400(resp)
    assert error_keys(resp) == {"poison": ["customer does not exist"]}
    assert orb.landed == {}
    assert orb.requests[-1]["fault"] == "bad_keys"
    # Persistent: the key fails again; a request without it succeeds.
    assert ingest(http, orb, [event("poison")]).status_code == 400
    assert ingest(http, orb, [event(), event("k3")]).status_code == 200
    assert list(orb.landed) == ["k1", "k3"]
    assert orb.key_send_counts["poison"] == 2

    lenient = make_orb(store_valid_on_400=True)
    lenient.set_bad_keys({"poison": "nope"})
    assert ingest(http, lenient, [event(), event("poison")]).status_code == 400
    assert list(lenient.landed) == ["k1"]


def test_set_413_if_events_over(orb: FakeOrb, http: requests.Session) -> None:
    orb.set_413_if_events_over(2)
    resp = ingest(http, orb, [event("a"), event("b"), event("c")])
    assert resp.status_code == 413
    assert resp.json()["type"] == ERROR_TYPE_BASE + "413-request-too-large"
    assert orb.landed == {}
    assert orb.requests[-1]["fault"] == "413_if_events_over"
    assert ingest(http, orb, [event("a"), event("b")]).status_code == 200
    assert ingest(http, orb, [event("c")]).status_code == 200
    assert list(orb.landed) == ["a", "b", "c"]
    orb.set_413_if_events_over(None)
    assert ingest(http, orb, [event(f"x{i}") for i in range(5)]).status_code == 200


def test_reset_clears_everything(orb: FakeOrb, http: requests.Session) -> None:
    ingest(http, orb, [event()])
    orb.script({"status": 500})
    orb.set_bad_keys({"k1": "x"})
    orb.set_413_if_events_over(0)
    orb.reset()
    assert orb.stats() == {
        "landed": 0,
        "requests": 0,
        "duplicates": 0,
        "key_send_counts": {},
        "double_billed": 0,
        "events_in_issued_periods": 0,
        "unevaluated_deprecation_filters": 0,
    }
    assert orb.pending_faults == 0
    assert ingest(http, orb, [event()]).status_code == 200


# --------------------------------------------------------------------------- control API


def test_control_api(orb: FakeOrb, http: requests.Session) -> None:
    ctl = orb.root_url + "/_fake"
    plain = requests.Session()  # no auth on /_fake
    try:
        resp = plain.post(f"{ctl}/script", json=[{"status": 429, "headers": {"Retry-After": "1"}}])
        assert resp.status_code == 200
        assert resp.json()["pending"] == 1
        assert ingest(http, orb, [event()]).status_code == 429
        assert plain.post(f"{ctl}/script", json={"status": 500, "store_first": True}).ok
        assert ingest(http, orb, [event()]).status_code == 500
        assert plain.post(f"{ctl}/bad_keys", json={"poison": "bad"}).ok
        assert ingest(http, orb, [event("poison")]).status_code == 400
        assert plain.post(f"{ctl}/413_if_events_over", json={"n": 1}).ok
        assert ingest(http, orb, [event("a"), event("b")]).status_code == 413

        assert plain.get(f"{ctl}/events").json() == [event()]
        reqs = plain.get(f"{ctl}/requests").json()
        assert [r["status"] for r in reqs] == [429, 500, 400, 413]
        assert [r["fault"] for r in reqs] == [
            "429",
            "500+store_first",
            "bad_keys",
            "413_if_events_over",
        ]
        stats = plain.get(f"{ctl}/stats").json()
        assert stats == {
            "landed": 1,
            "requests": 4,
            "duplicates": 0,
            "key_send_counts": {"k1": 2, "poison": 1, "a": 1, "b": 1},
            "double_billed": 0,
            "events_in_issued_periods": 0,
            "unevaluated_deprecation_filters": 0,
        }

        assert plain.post(f"{ctl}/script", json=[{"status": 200}]).status_code == 400
        assert plain.post(f"{ctl}/script", data=b"{oops").status_code == 400
        assert plain.get(f"{ctl}/nope").status_code == 404

        assert plain.post(f"{ctl}/reset").json() == {"ok": True}
        assert plain.get(f"{ctl}/stats").json()["landed"] == 0
        assert ingest(http, orb, [event("poison"), event("a"), event("b")]).status_code == 200
    finally:
        plain.close()


# --------------------------------------------------------------------------- CLI


CHILD = r"""
import json, os, sys, urllib.request
from datetime import datetime, timezone
ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
ev = {"idempotency_key": "cli-1", "external_customer_id": "acct_9", "event_name": "cli",
      "timestamp": ts, "properties": {"n": 3}}
req = urllib.request.Request(
    os.environ["TARGET_ORB_API_URL"] + "/ingest",
    data=json.dumps({"events": [ev]}).encode(),
    headers={"Authorization": "Bearer " + os.environ["TARGET_ORB_API_KEY"],
             "Content-Type": "application/json"},
    method="POST",
)
with urllib.request.urlopen(req, timeout=10) as resp:
    print("child got", resp.status, flush=True)
sys.exit(3)
"""


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("TARGET_ORB_API_URL", None)
    env.pop("TARGET_ORB_API_KEY", None)
    return env


def _fake_orb_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fake_orb", *args]


def _run_fake_orb(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the fake-orb CLI to completion (bounded), capturing its output as text."""
    return subprocess.run(
        _fake_orb_cmd(*args),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        env=_cli_env(),
    )


def test_cli_runs_command_and_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    proc = _run_fake_orb(
        "--api-key", "cli-key", "--events-out", str(out), "--", sys.executable, "-c", CHILD
    )
    assert proc.returncode == 3, proc.stderr
    assert "child got 200" in proc.stdout
    assert "ingest requests: 1" in proc.stdout
    assert "events landed: 1" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    landed = json.loads(lines[0])
    assert landed["idempotency_key"] == "cli-1"
    assert landed["properties"] == {"n": 3}
    assert lines[0] == json.dumps(landed, separators=(",", ":"))
    assert [json.loads(x) for x in out.read_text().splitlines()] == [landed]


def test_cli_command_timeout_and_missing_command() -> None:
    slow = _run_fake_orb(
        "--max-seconds", "0.5", "--", sys.executable, "-c", "import time; time.sleep(30)"
    )
    assert slow.returncode == 124
    assert "events landed: 0" in slow.stdout
    missing = _run_fake_orb("--", "definitely-not-a-command-xyz")
    assert missing.returncode == 127


def test_cli_serve_mode_until_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        _fake_orb_cmd("--max-seconds", "30", "--events-out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=_cli_env(),
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        resp = requests.post(
            f"{url}/ingest",
            json={"events": [event(timestamp=fmt(datetime.now(timezone.utc)))]},
            headers=AUTH,
            timeout=5,
        )
        assert resp.status_code == 200
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "ingest requests: 1" in stdout
    assert "events landed: 1" in stdout
    assert json.loads(out.read_text())["idempotency_key"] == "k1"


def test_cli_serve_mode_max_seconds() -> None:
    proc = _run_fake_orb("--max-seconds", "0.2")
    assert proc.returncode == 0
    assert proc.stdout.startswith("http://127.0.0.1:")
    assert "events landed: 0" in proc.stdout


def test_cli_forwards_sigint_to_command() -> None:
    child = "import time; print('ready', flush=True); time.sleep(30)"
    proc = subprocess.Popen(
        _fake_orb_cmd("--", sys.executable, "-c", child),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=_cli_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT
    assert "events landed: 0" in stdout
