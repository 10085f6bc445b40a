"""A strict, local stand-in for Orb's API: ingest, search, backfills, customers,
amend and deprecate, invoices.

It is meant for tests, benchmarks and manual runs of ``target-orb`` (or of any Orb
client, Orb's own ``orb-billing`` included) without a real Orb account. It validates
requests *independently* of the target: it imports only the standard library,
``jsonschema`` and its own modules (``fake_orb_common``, ``fake_orb_resources``), never
another ``target_orb`` module, so a bug in the target's own payload code cannot hide
behind a shared helper. It refuses what Orb does not document.

What it serves (every route but ping needs ``Authorization: Bearer <api_key>``):

- ``GET /v1/ping``.
- ``POST /v1/ingest[?backfill_id=]``, checked in this order:

  1. ``Authorization`` (401 ``401-authentication-error``).
  2. A scripted fault, if one is queued (see :meth:`FakeOrb.script`).
  3. Body size against ``max_body_bytes`` (413 ``413-request-too-large``).
  4. Query parameters (only ``backfill_id`` is allowed), ``Content-Type``
     (``application/json``), and JSON syntax (400).
  5. ``backfill_id``: unknown 404 ``resource-not-found``, not pending 400.
  6. At most ``max_events_per_request`` events (400, whole request).
  7. The persistent ``set_413_if_events_over`` rule (413).
  8. Unless ``accept_all``: the vendored ``IngestRequestBody`` schema (Draft
     2020-12, ``date-time`` format checked), then the rules Orb's spec states only
     in prose: exactly one non-empty customer field, flat ``properties`` (string,
     boolean, int64, finite float), a UTC timestamp (trailing ``Z`` or ``+00:00``;
     other offsets refused) inside ``[now - grace period, now + future tolerance]``
     (a backfill drops the grace rule but must hold the event's timestamp in its
     timeframe and its customer in its scope), non-empty ``idempotency_key`` and
     ``event_name``, a key that was never deprecated, and no two events in one
     request sharing a key with different bodies (the whole request is rejected).
  9. The persistent ``set_bad_keys`` rule (400 naming those keys).

  Accepted live events are stored per idempotency key; the first body ever stored
  for a key wins and later sends of that key are counted as duplicates.
- ``POST /v1/events/search`` (``EventSearchCriteria``): 1-500 case-sensitive ids,
  timeframe default the last 7 days, end exclusive; never finds amended events.
- ``POST``/``GET /v1/events/backfills``, ``GET …/{id}``, ``POST …/{id}/close``,
  ``POST …/{id}/revert``: at most 31 days; ``timeframe_end`` at or before the grace
  boundary (now - grace period) at create time, or at or before now with a
  ``deprecation_filter`` (which needs a replacing backfill, narrows what it deprecates,
  and deprecates matching events that arrive later); no overlap with a pending or
  pending_revert backfill of the same customer or an account-wide one (backfills of
  different customers may overlap), or, with ``one_pending_backfill``, no create at all
  while any backfill is pending; ``replace_existing_events`` default true,
  ``close_time`` default creation + 1 day; events invisible until closed (reflection
  happens by the next request, or ``reflection_delay_requests`` requests later) or until
  the clock passes ``close_time``; a non-replacing backfill re-adding a key Orb already
  holds bills it twice (``stats()["double_billed"]``); events it brings into a period
  whose invoice is issued, paid or synced are recorded
  (``stats()["events_in_issued_periods"]``, :meth:`FakeOrb.issued_period_events`).
- ``GET``/``PUT /v1/customers/external_customer_id/{id}`` for seeded customers
  (``EditCustomer``; metadata ``"key": null`` deletes, ``"metadata": null`` clears).
- ``PUT /v1/events/{id}`` (amend, ``AmendedEvent``) and ``PUT /v1/events/{id}/deprecate``:
  same timestamp and customer, an existing customer, an open billing period (the
  calendar month, or ``set_billing_period``; the previous one during the grace
  period), at most ``amend_cap`` events per customer per 100 days.
- ``GET /v1/invoices`` (``status[]`` default issued/paid/synced, customer, invoice-date
  and amount filters, ``limit`` 1-100 default 20, ``cursor``; newest invoice date first)
  and ``GET /v1/invoices/{id}`` for invoices seeded with :meth:`FakeOrb.add_invoice`,
  ``--invoice`` or ``POST /_fake/invoices``.
- ``Idempotency-Key`` on every POST/PATCH (ignored on PUT and GET): a replay within
  48 h gets the stored answer with ``Idempotent-Replayed: true``; another request under
  the same key gets a 409. Every 5xx carries ``Transient-Error: true``.
- Optional fixed-window rate limits (:class:`RateLimit`): ingest events and requests,
  writes (every other POST/PUT/PATCH/DELETE) and reads (GET); 429 without
  ``Retry-After``.

Each rule, the Orb document it comes from and the test that exercises it are listed in
``fake_orb_RULES.md`` beside this module, with the assumptions the stand-in makes where
Orb's documents are silent.

Every time rule reads the stand-in's clock: :meth:`FakeOrb.set_now`,
:meth:`FakeOrb.advance`, ``POST /_fake/clock`` or ``--now``. The control API under
``/_fake/`` (no key) reads back events, requests, stats, customers, customer updates,
backfills, corrections, invoices and events in issued periods, and sets faults, the
clock, billing periods, invoices and the rules (``/_fake/settings``).

Run it from a shell with ``python -m target_orb.fake_orb --help`` (or the
``fake-orb`` console script); ``fake-orb -- COMMAND ...`` runs COMMAND against a
fresh stand-in with ``TARGET_ORB_API_URL`` / ``TARGET_ORB_API_KEY`` set and
prints what landed, the backfills, the corrected events and the customers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import importlib.resources
import ipaddress
import json
import math
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema

from target_orb.fake_orb_common import (
    _VALIDATION_TITLE,
    _VALIDATION_TYPE,
    ERROR_TYPE_BASE,
    INT64_MAX,
    INT64_MIN,
    _canonical,
    _compact,
    _Outcome,
    _property_problem,
    _Request,
    _timestamp_errors,
    _utcnow,
    error_body,
    fmt_time,
    format_checker,
    parse_datetime,
)
from target_orb.fake_orb_resources import FakeOrbError, OrbResources, parse_when

__all__ = [
    "ERROR_TYPE_BASE", "INT64_MAX", "INT64_MIN", "FakeOrb", "FakeOrbError", "RateLimit", "main",
]

#: "Not given" for :meth:`FakeOrb.configure` (None there means "off").
_UNSET: Any = object()

#: Upper bound for a scripted ``hang`` so a typo can never wedge a test run.
MAX_HANG_SECONDS = 600.0
_DRAIN_CHUNK = 64 * 1024

_FAULT_KEYS = {
    "status",
    "headers",
    "body",
    "store_first",
    "bad_keys",
    "bad_keys_as_strings",
    "type",
    "action",
    "seconds",
}

# --------------------------------------------------------------------------- schema


_SCHEMA_LOCK = threading.Lock()
_SCHEMA_VALIDATOR: jsonschema.Draft202012Validator | None = None


def load_schema() -> dict[str, Any]:
    """The vendored ``IngestRequestBody`` JSON schema."""
    res = importlib.resources.files("target_orb") / "data" / "ingest_request_body.schema.json"
    return json.loads(res.read_text(encoding="utf-8"))


def _validator() -> jsonschema.Draft202012Validator:
    global _SCHEMA_VALIDATOR  # noqa: PLW0603 - lazily built module singleton
    with _SCHEMA_LOCK:
        if _SCHEMA_VALIDATOR is None:
            schema = load_schema()
            jsonschema.Draft202012Validator.check_schema(schema)
            _SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(
                schema, format_checker=format_checker()
            )
        return _SCHEMA_VALIDATOR


# --------------------------------------------------------------------------- helpers


class _DuplicateJSONKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateJSONKeyError(f"duplicate JSON object key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _normalize_fault(fault: Any) -> dict[str, Any]:
    """Validate a scripted fault and give it a ``name`` (raises ValueError)."""
    if not isinstance(fault, dict):
        raise ValueError(f"a fault must be a dict, got {fault!r}")
    unknown = set(fault) - _FAULT_KEYS
    if unknown:
        raise ValueError(f"unknown fault keys {sorted(unknown)} in {fault!r}")
    out = dict(fault)
    store_first = bool(out.get("store_first", False))
    out["store_first"] = store_first
    suffix = "+store_first" if store_first else ""
    if "action" in out:
        action = out["action"]
        if action not in ("hang", "reset"):
            raise ValueError(f"unknown fault action {action!r} (use 'hang' or 'reset')")
        if "status" in out:
            raise ValueError("a fault has either 'action' or 'status', not both")
        if action == "hang":
            seconds = out.get("seconds", 5)
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
                raise ValueError(f"hang seconds must be a non-negative number, got {seconds!r}")
            out["seconds"] = min(float(seconds), MAX_HANG_SECONDS)
        out["name"] = action + suffix
        return out
    status = out.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise ValueError(f"fault status must be an int in 400..599, got {status!r}")
    headers = out.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in headers.items()
    ):
        raise ValueError(f"fault headers must be a dict of str -> str, got {headers!r}")
    out["headers"] = {k: str(v) for k, v in headers.items()}
    if "body" in out and not isinstance(out["body"], dict | list | str):
        raise ValueError("fault body must be a dict, a list or a str")
    name = str(status)
    if "bad_keys" in out:
        if status != 400:
            raise ValueError("bad_keys is only supported with status 400")
        bad = out["bad_keys"]
        if isinstance(bad, list | tuple):
            bad = {k: ["scripted validation failure"] for k in bad}
        if not isinstance(bad, dict) or not bad:
            raise ValueError("bad_keys must be a non-empty dict of key -> [reason, ...]")
        out["bad_keys"] = {
            str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in bad.items()
        }
        name += ":bad_keys" + (":as_strings" if out.get("bad_keys_as_strings") else "")
    if "type" in out:
        if not isinstance(out["type"], str) or not out["type"]:
            raise ValueError("fault type must be a non-empty string")
        t = out["type"]
        if not t.startswith("http") and not t.startswith(f"{status}-"):
            t = f"{status}-{t}"
        out["type"] = t
        name += ":" + t.rsplit("#", 1)[-1]
    out["name"] = name + suffix
    return out


# --------------------------------------------------------------------------- internal types


@dataclass
class _Parsed:
    body: Any = None
    error: str | None = None
    events: list[Any] | None = None


@dataclass
class _Validation:
    key_errors: dict[str, list[str]] = field(default_factory=dict)
    plain_errors: list[str] = field(default_factory=list)
    request_level: bool = False  # the whole request is rejected, store nothing
    valid_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.key_errors or self.plain_errors)


# --------------------------------------------------------------------------- HTTP layer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], family: int, fake: FakeOrb) -> None:
        self.address_family = family
        self.fake = fake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can block on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # Without this, keep-alive request/response pairs stall ~40 ms on
        # Nagle + delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away, or stop() shut the socket: not news
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-orb/1"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and the CLI summary say what happened

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    # ------------------------------------------------------------------

    def _read_body(self, limit: int | None) -> tuple[bytes | None, int]:
        """Read the whole request body (always, to keep the connection in sync).

        Returns (body or None when it exceeded ``limit``, length on the wire).
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunk = self.rfile.read(size)
                self.rfile.readline(65537)
                total += len(chunk)
                if limit is None or total <= limit:
                    chunks.append(chunk)
            if limit is not None and total > limit:
                return None, total
            return b"".join(chunks), total
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if limit is not None and length > limit:
            remaining = length
            while remaining > 0:
                got = self.rfile.read(min(_DRAIN_CHUNK, remaining))
                if not got:
                    break
                remaining -= len(got)
            return None, length
        return self.rfile.read(length) if length else b"", length

    def _dispatch(self) -> None:
        fake = self.server.fake
        try:
            body, body_len = self._read_body(fake.max_body_bytes)
        except ValueError:
            self.close_connection = True
            self._write(_Outcome(400, error_body(400, detail="malformed request body framing")))
            return
        split = urlsplit(self.path)
        req = _Request(self.command, split.path, split.query, self.headers, body, body_len)
        try:
            outcome = fake._process(req)
        except Exception as exc:
            traceback.print_exc()
            outcome = _Outcome(
                500,
                error_body(500, detail=f"fake-orb internal error: {exc!r}"),
                {"Transient-Error": "true"},
            )
        if outcome.delay and fake.latency_ms > 0:
            fake._stopping.wait(fake.latency_ms / 1000.0)
        if outcome.action == "hang":
            fake._stopping.wait(outcome.seconds)
            self.close_connection = True  # the server closes without answering
            return
        if outcome.action == "reset":
            self._reset_connection()
            return
        self._write(outcome)

    def _reset_connection(self) -> None:
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The fd is really closed (with RST, thanks to SO_LINGER 0) once the
        # buffered reader made by makefile() is closed too.
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            sock.close()

    def _write(self, outcome: _Outcome) -> None:
        body = outcome.body
        if body is None:
            payload, ctype = b"", "application/json"
        elif isinstance(body, str):
            payload, ctype = body.encode("utf-8"), "text/plain; charset=utf-8"
        else:
            payload, ctype = json.dumps(body).encode("utf-8"), "application/json"
        assert outcome.status is not None
        self.send_response(outcome.status)
        lower = {k.lower() for k in outcome.headers}
        if "content-type" not in lower:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in outcome.headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        # Headers and body in one write.
        self._headers_buffer.append(b"\r\n")  # type: ignore[attr-defined]
        if self.command != "HEAD":
            self._headers_buffer.append(payload)  # type: ignore[attr-defined]
        self.flush_headers()


# --------------------------------------------------------------------------- rate limit


class RateLimit:
    """Orb-style fixed-window rate limits (Orb's rate-limit page, docs.withorb.com
    "Rate limits"; see ``fake_orb_RULES.md``).

    - Ingest (``POST /v1/ingest``): at most ``events_per_window`` events per
      ``window_seconds`` window and ``requests_per_second`` requests per second.
    - Writes: every other POST/PUT/PATCH/DELETE (search, backfill create/close/revert,
      amend, deprecate, customer update), at most ``writes_per_second`` per second. Orb's
      page counts all of them as write actions (live 50/s, test 5/s, trial 1/s).
    - Reads: every GET (ping, backfill list/fetch, invoices, customer fetch), at most
      ``reads_per_second`` per second (live 100/s, test 50/s, trial 10/s).

    Every budget is off (None) unless given. Windows are fixed (aligned to the clock,
    not to the client). A request over a budget is refused whole with 429
    ``429-too-many-requests`` and no ``Retry-After`` (Orb documents none) and counts
    against nothing.
    """

    def __init__(
        self,
        *,
        events_per_window: int | None = None,
        window_seconds: float = 60.0,
        requests_per_second: int | None = None,
        writes_per_second: int | None = None,
        reads_per_second: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        for name, value in (
            ("events_per_window", events_per_window),
            ("requests_per_second", requests_per_second),
            ("writes_per_second", writes_per_second),
            ("reads_per_second", reads_per_second),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        self.events_per_window = events_per_window
        self.window_seconds = window_seconds
        self.requests_per_second = requests_per_second
        self.writes_per_second = writes_per_second
        self.reads_per_second = reads_per_second
        self.clock = clock
        self.refused = 0  # ingest requests refused
        self.refused_writes = 0
        self.refused_reads = 0
        self._lock = threading.Lock()
        self._window = self._second = None
        self._events = self._requests = 0
        self._counts: dict[str, tuple[int, int]] = {}  # kind -> (second, requests)

    def admit(self, events: int) -> bool:
        """Count an ingest request of ``events`` events, or refuse it (False)."""
        with self._lock:
            now = self.clock()
            window, second = math.floor(now / self.window_seconds), math.floor(now)
            if window != self._window:
                self._window, self._events = window, 0
            if second != self._second:
                self._second, self._requests = second, 0
            if (
                self.events_per_window is not None
                and self._events + events > self.events_per_window
            ) or (
                self.requests_per_second is not None
                and self._requests + 1 > self.requests_per_second
            ):
                self.refused += 1
                return False
            self._events += events
            self._requests += 1
            return True

    def _admit_one(self, kind: str, budget: int | None) -> bool:
        if budget is None:
            return True
        with self._lock:
            second = math.floor(self.clock())
            at, used = self._counts.get(kind, (second, 0))
            if at != second:
                used = 0
            if used + 1 > budget:
                if kind == "write":
                    self.refused_writes += 1
                else:
                    self.refused_reads += 1
                return False
            self._counts[kind] = (second, used + 1)
            return True

    def admit_write(self) -> bool:
        """Count a write request (POST/PUT/PATCH/DELETE other than ingest), or refuse it."""
        return self._admit_one("write", self.writes_per_second)

    def admit_read(self) -> bool:
        """Count a read request (GET/HEAD), or refuse it."""
        return self._admit_one("read", self.reads_per_second)

    def settings(self) -> dict[str, Any]:
        return {
            "events_per_window": self.events_per_window,
            "window_seconds": self.window_seconds,
            "requests_per_second": self.requests_per_second,
            "writes_per_second": self.writes_per_second,
            "reads_per_second": self.reads_per_second,
        }


# --------------------------------------------------------------------------- FakeOrb


class FakeOrb(OrbResources):
    """A strict local Orb (see the module docstring) with fault injection.

    ``with FakeOrb() as orb: ...`` starts it on a free loopback port; ``orb.url``
    is the API base (``http://127.0.0.1:PORT/v1``).

    ``grace_period_hours`` is Orb's event reporting grace period, for live ingest and for
    the grace boundary a backfill must end at. ``one_pending_backfill``: refuse any
    backfill create while another backfill is pending or pending_revert (Orb's support
    pages), instead of only an overlapping one of the same customer or an account-wide
    one (Orb's client docstring). ``reflection_delay_requests``: a closed backfill stays
    ``pending`` for this many further API requests before it is reflected (0: by the next
    request). :meth:`configure` changes these and the rate limits of a running stand-in.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "test-orb-key",
        grace_period_hours: float = 12,
        future_tolerance_seconds: float = 300,
        latency_ms: float = 0,
        accept_all: bool = False,
        max_body_bytes: int | None = None,
        max_events_per_request: int = 500,
        store_valid_on_400: bool = False,
        clock: Callable[[], datetime] | None = None,
        amend_cap: int = 100,
        rate_limit: RateLimit | None = None,
        one_pending_backfill: bool = False,
        reflection_delay_requests: int = 0,
    ) -> None:
        bind_host, family = self._loopback(host)
        self.host = bind_host
        self.api_key = api_key
        self.grace_period_hours = grace_period_hours
        self.future_tolerance_seconds = future_tolerance_seconds
        self.latency_ms = latency_ms
        self.accept_all = accept_all
        self.max_body_bytes = max_body_bytes
        self.max_events_per_request = max_events_per_request
        self.store_valid_on_400 = store_valid_on_400
        self.clock: Callable[[], datetime] = clock or _utcnow
        self.rate_limit = rate_limit

        self.lock = threading.RLock()
        self.landed: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.key_send_counts: collections.Counter[str] = collections.Counter()
        self.duplicates = 0
        self.fail_keys: dict[str, str] = {}
        self.events_over_413: int | None = None
        self._script: collections.deque[dict[str, Any]] = collections.deque()
        self._init_resources(
            amend_cap,
            one_pending_backfill=one_pending_backfill,
            reflection_delay_requests=reflection_delay_requests,
        )

        if not accept_all:
            _validator()  # fail fast if the vendored schema is missing or broken
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._server = _Server((bind_host, port), family, self)

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _loopback(host: str) -> tuple[str, int]:
        if host == "localhost":
            return "127.0.0.1", socket.AF_INET
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"FakeOrb binds only to a loopback IP address, not {host!r}") from None
        if not addr.is_loopback:
            raise ValueError(f"FakeOrb binds only to loopback, refusing {host!r}")
        return str(addr), socket.AF_INET6 if addr.version == 6 else socket.AF_INET

    def start(self) -> FakeOrb:
        """Serve in a daemon thread. Returns self."""
        if self._stopped:
            raise RuntimeError("this FakeOrb was stopped; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-orb:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()  # wakes hanging / latency-sleeping handlers
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.close_connections()
        self._server.server_close()

    def __enter__(self) -> FakeOrb:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the control API lives under ``/_fake/``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The Orb API base URL, ``http://127.0.0.1:PORT/v1``."""
        return self.root_url + "/v1"

    # ------------------------------------------------------------------ state / control

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "landed": len(self.landed),
                "requests": len(self.requests),
                "duplicates": self.duplicates,
                "key_send_counts": dict(self.key_send_counts),
                **self._resource_stats(),
            }

    def configure(
        self,
        *,
        grace_period_hours: float | None = None,
        one_pending_backfill: bool | None = None,
        reflection_delay_requests: int | None = None,
        rate_limit: Any = _UNSET,
    ) -> dict[str, Any]:
        """Change the rules of a running stand-in (None: leave as is); returns
        :meth:`settings`. ``rate_limit=None`` turns every rate limit off."""
        if grace_period_hours is not None and (
            isinstance(grace_period_hours, bool)
            or not isinstance(grace_period_hours, int | float)
            or not math.isfinite(grace_period_hours)
            or grace_period_hours < 0
        ):
            raise ValueError(
                f"grace_period_hours must be a non-negative number, got {grace_period_hours!r}"
            )
        if one_pending_backfill is not None and not isinstance(one_pending_backfill, bool):
            raise ValueError(
                f"one_pending_backfill must be a boolean, got {one_pending_backfill!r}"
            )
        if reflection_delay_requests is not None and (
            isinstance(reflection_delay_requests, bool)
            or not isinstance(reflection_delay_requests, int)
            or reflection_delay_requests < 0
        ):
            raise ValueError(
                "reflection_delay_requests must be a non-negative int, got "
                f"{reflection_delay_requests!r}"
            )
        if rate_limit is not _UNSET and rate_limit is not None and not isinstance(
            rate_limit, RateLimit
        ):
            raise ValueError(f"rate_limit must be a RateLimit or None, got {rate_limit!r}")
        with self.lock:
            if grace_period_hours is not None:
                self.grace_period_hours = grace_period_hours
            if one_pending_backfill is not None:
                self.one_pending_backfill = one_pending_backfill
            if reflection_delay_requests is not None:
                self.reflection_delay_requests = reflection_delay_requests
            if rate_limit is not _UNSET:
                self.rate_limit = rate_limit
        return self.settings()

    def settings(self) -> dict[str, Any]:
        """The rules in force: grace period (and the grace boundary it gives now),
        backfill rules and rate limits (None: off)."""
        with self.lock:
            limit = self.rate_limit
            return {
                "grace_period_hours": self.grace_period_hours,
                "grace_boundary": fmt_time(self.grace_boundary()),
                "future_tolerance_seconds": self.future_tolerance_seconds,
                "one_pending_backfill": self.one_pending_backfill,
                "reflection_delay_requests": self.reflection_delay_requests,
                "max_events_per_request": self.max_events_per_request,
                "rate_limit": None if limit is None else limit.settings(),
            }

    def reset(self) -> None:
        """Forget what was received: events, backfills, corrections, customer updates,
        idempotency keys, requests, counters, script and rules. The set-up stays: seeded
        customers (back to their seeded metadata), billing periods and the clock."""
        with self.lock:
            self.landed.clear()
            self.requests.clear()
            self.key_send_counts.clear()
            self.duplicates = 0
            self.fail_keys = {}
            self.events_over_413 = None
            self._script.clear()
        self._reset_resources()

    def script(self, *faults: dict[str, Any]) -> None:
        """Queue faults, consumed one per authorised ``POST /v1/ingest`` (FIFO)."""
        normalized = [_normalize_fault(f) for f in faults]
        with self.lock:
            self._script.extend(normalized)

    @property
    def pending_faults(self) -> int:
        with self.lock:
            return len(self._script)

    def set_bad_keys(self, bad_keys: dict[str, str] | None) -> None:
        """Persistently reject these idempotency keys (key -> reason); replaces the set."""
        bad = dict(bad_keys or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in bad.items()):
            raise ValueError("bad keys must be a dict of str -> str")
        with self.lock:
            self.fail_keys = bad

    def set_413_if_events_over(self, n: int | None) -> None:
        """Answer 413 to any ingest request with more than ``n`` events (None: off)."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"n must be a non-negative int or None, got {n!r}")
        with self.lock:
            self.events_over_413 = n

    def ingest_requests(self) -> list[dict[str, Any]]:
        """Recorded ``POST /v1/ingest`` requests."""
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST" and r["path"] == "/v1/ingest"]

    # ------------------------------------------------------------------ request processing

    def _control(self, req: _Request) -> _Outcome:
        return _fake_control(self, req)

    def _auth_ok(self, headers: Any) -> bool:
        value = headers.get("Authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and token.strip() == self.api_key and bool(self.api_key)

    def _process(self, req: _Request) -> _Outcome:
        if req.path == "/_fake" or req.path.startswith("/_fake/"):
            return self._control(req)
        outcome = self._process_api(req)
        if outcome.status is not None and outcome.status >= 500:
            # Orb's idempotency page: transient 5xx answers carry `Transient-Error: true`.
            if not any(k.lower() == "transient-error" for k in outcome.headers):
                outcome.headers = {**outcome.headers, "Transient-Error": "true"}
        return outcome

    def _rate_limited(self, req: _Request, record: dict[str, Any]) -> _Outcome | None:
        """The write/read budget's 429 for an authorised non-ingest request, if over."""
        limit = self.rate_limit
        if limit is None or not record["authorization_ok"]:
            return None
        if req.method in ("GET", "HEAD"):
            if limit.admit_read():
                return None
            detail = (
                f"Rate limit exceeded: at most {limit.reads_per_second} read requests (GET) "
                "per second"
            )
        else:
            if limit.admit_write():
                return None
            detail = (
                f"Rate limit exceeded: at most {limit.writes_per_second} write requests "
                "(POST/PUT/PATCH/DELETE other than ingest) per second"
            )
        record["rate_limited"] = True
        return _Outcome(429, error_body(429, detail=detail))

    def _process_api(self, req: _Request) -> _Outcome:
        self._tick(api_request=True)
        record: dict[str, Any] = {
            "method": req.method,
            "path": req.path,
            "status": None,
            "event_count": 0,
            "keys": [],
            "authorization_ok": self._auth_ok(req.headers),
            "backfill_id": None,
            "fault": None,
            "idempotency_header": req.headers.get("Idempotency-Key"),
            "idempotent_replayed": False,
        }
        limited = None
        if not (req.path == "/v1/ingest" and req.method == "POST"):
            limited = self._rate_limited(req, record)
        if limited is not None:
            outcome = limited
        elif req.path == "/v1/ping" and req.method in ("GET", "HEAD"):
            if record["authorization_ok"]:
                outcome = _Outcome(200, {"response": "pong"})
            else:
                outcome = _Outcome(401, error_body(401, detail="Missing or invalid API key"))
        elif req.path == "/v1/ingest" and req.method == "POST":
            outcome = self._idempotent(req, record, self._ingest)
        else:
            outcome = self._idempotent(req, record, self._resource_request)
        record["status"] = outcome.status if outcome.action is None else None
        with self.lock:
            self.requests.append(record)
        return outcome

    def _parse(self, req: _Request) -> _Parsed:
        if req.body is None:
            return _Parsed(error="body too large")
        raw = req.body
        encoding = (req.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                raw = gzip.decompress(raw)
            elif encoding == "deflate":
                raw = zlib.decompress(raw)
            elif encoding != "identity":
                return _Parsed(error=f"unsupported Content-Encoding {encoding!r}")
        except (OSError, EOFError, zlib.error) as exc:
            return _Parsed(error=f"cannot decode {encoding} body: {exc}")
        try:
            text = raw.decode("utf-8")
            if self.accept_all:
                body = json.loads(text, parse_constant=_reject_constant)
            else:
                body = json.loads(
                    text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
                )
        except (UnicodeDecodeError, ValueError) as exc:
            return _Parsed(error=f"request body is not valid JSON: {exc}")
        events = body.get("events") if isinstance(body, dict) else None
        return _Parsed(body=body, events=events if isinstance(events, list) else None)

    def _ingest(self, req: _Request, record: dict[str, Any]) -> _Outcome:
        query = parse_qs(req.query, keep_blank_values=True)
        if query.get("backfill_id"):
            record["backfill_id"] = query["backfill_id"][-1]
        parsed = self._parse(req)
        if parsed.events is not None:
            keys = [
                ev["idempotency_key"]
                for ev in parsed.events
                if isinstance(ev, dict) and isinstance(ev.get("idempotency_key"), str)
            ]
            record["event_count"] = len(parsed.events)
            record["keys"] = keys
            with self.lock:
                self.key_send_counts.update(keys)
        if not record["authorization_ok"]:
            return _Outcome(401, error_body(401, detail="Missing or invalid API key"), delay=True)
        if self.rate_limit is not None and not self.rate_limit.admit(record["event_count"]):
            record["rate_limited"] = True
            return _Outcome(429, error_body(429, detail="Rate limit exceeded"), delay=True)
        with self.lock:
            fault = self._script.popleft() if self._script else None
        if fault is None:
            return self._ingest_normal(req, query, parsed, record)
        outcome = self._apply_fault(fault, req, query, parsed, record)
        record["fault"] = fault["name"]
        return outcome

    def _apply_fault(
        self,
        fault: dict[str, Any],
        req: _Request,
        query: dict[str, list[str]],
        parsed: _Parsed,
        record: dict[str, Any],
    ) -> _Outcome:
        if fault["store_first"]:
            # Process (validate + store) exactly as a normal request would,
            # then throw the real answer away.
            self._ingest_normal(req, query, parsed, record)
        action = fault.get("action")
        if action == "hang":
            return _Outcome(None, action="hang", seconds=fault["seconds"])
        if action == "reset":
            return _Outcome(None, action="reset")
        status = fault["status"]
        headers = fault["headers"]
        if "bad_keys" in fault:
            bad: dict[str, list[str]] = fault["bad_keys"]
            if self.store_valid_on_400 and not fault["store_first"] and parsed.events is not None:
                if self.accept_all:
                    candidates = self._accept_all_events(parsed.events) or []
                else:
                    candidates = self._validate(parsed.body).valid_events
                self._store([ev for ev in candidates if ev["idempotency_key"] not in bad])
            body = fault.get("body") or self._validation_body(
                bad, [], as_strings=bool(fault.get("bad_keys_as_strings"))
            )
            return _Outcome(status, body, headers, delay=True)
        if "body" in fault:
            body = fault["body"]
        else:
            body = error_body(status, fault.get("type"), detail=f"scripted fault ({fault['name']})")
        return _Outcome(status, body, headers, delay=True)

    def _ingest_normal(
        self,
        req: _Request,
        query: dict[str, list[str]],
        parsed: _Parsed,
        record: dict[str, Any],
    ) -> _Outcome:
        if req.body is None:
            return _Outcome(
                413,
                error_body(
                    413,
                    detail=f"request body of {req.body_len} bytes exceeds {self.max_body_bytes}",
                ),
                delay=True,
            )
        unknown = sorted(set(query) - {"backfill_id"})
        if unknown:
            return self._reject([f"unknown query parameter(s): {', '.join(unknown)}"])
        ctype = (req.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return self._reject([f"Content-Type must be application/json, got {ctype!r}"])
        if parsed.error is not None:
            return self._reject([parsed.error])
        backfill = None
        if "backfill_id" in query:
            found = self._backfill_for_ingest(query["backfill_id"][-1])
            if isinstance(found, _Outcome):
                found.delay = True
                return found
            backfill = found
        events = parsed.events
        if events is not None and len(events) > self.max_events_per_request:
            return self._reject(
                [
                    f"too many events in one request: {len(events)} > "
                    f"{self.max_events_per_request}; the whole request was rejected"
                ]
            )
        with self.lock:
            over = self.events_over_413
            fail_keys = dict(self.fail_keys)
        if over is not None and events is not None and len(events) > over:
            record["fault"] = "413_if_events_over"
            return _Outcome(
                413,
                error_body(413, detail=f"{len(events)} events exceeds the limit of {over}"),
                delay=True,
            )
        if self.accept_all:
            accepted = self._accept_all_events(events)
            if accepted is None:
                return self._reject(
                    [
                        "body must be an object whose 'events' is a list of objects "
                        "with a string idempotency_key"
                    ]
                )
            result = _Validation(valid_events=accepted)
        else:
            result = self._validate(parsed.body, backfill)
        hit = [k for k in dict.fromkeys(record["keys"]) if k in fail_keys]
        if hit:
            record["fault"] = "bad_keys"
            for k in hit:
                result.key_errors.setdefault(k, []).append(fail_keys[k])
            result.valid_events = [
                ev for ev in result.valid_events if ev["idempotency_key"] not in fail_keys
            ]
        if result.failed:
            if self.store_valid_on_400 and not result.request_level:
                self._store_into(backfill, result.valid_events)
            return _Outcome(
                400, self._validation_body(result.key_errors, result.plain_errors), delay=True
            )
        self._store_into(backfill, result.valid_events)
        return _Outcome(200, {"validation_failed": []}, delay=True)

    def _reject(self, plain: list[str]) -> _Outcome:
        return _Outcome(400, self._validation_body({}, plain), delay=True)

    @staticmethod
    def _validation_body(
        key_errors: dict[str, list[str]], plain: list[str], *, as_strings: bool = False
    ) -> dict[str, Any]:
        items: list[Any]
        if as_strings:
            items = [f"{k}: {'; '.join(v)}" for k, v in key_errors.items()]
        else:
            items = [{"idempotency_key": k, "validation_errors": v} for k, v in key_errors.items()]
        items.extend(plain)
        n = len(key_errors)
        detail = f"{n} event(s) failed validation" if n else "The request failed validation"
        if plain and n:
            detail += f"; {len(plain)} other error(s)"
        return error_body(
            400, _VALIDATION_TYPE, title=_VALIDATION_TITLE, detail=detail, validation_errors=items
        )

    @staticmethod
    def _accept_all_events(events: list[Any] | None) -> list[dict[str, Any]] | None:
        if events is None:
            return None
        for ev in events:
            if not isinstance(ev, dict) or not isinstance(ev.get("idempotency_key"), str):
                return None
        return events

    def _store(self, events: list[dict[str, Any]]) -> None:
        with self.lock:
            for ev in events:
                key = ev["idempotency_key"]
                if key in self.landed:
                    self.duplicates += 1
                else:
                    self._hold(ev, None)

    def _store_into(self, backfill: dict[str, Any] | None, events: list[dict[str, Any]]) -> None:
        if backfill is None:
            self._store(events)
        else:
            self._store_backfill(backfill, events)

    # ------------------------------------------------------------------ validation

    def _validate(self, body: Any, backfill: dict[str, Any] | None = None) -> _Validation:
        result = _Validation()
        events: list[Any] = []
        if isinstance(body, dict) and isinstance(body.get("events"), list):
            events = body["events"]
        keys: list[str | None] = []
        for ev in events:
            k = ev.get("idempotency_key") if isinstance(ev, dict) else None
            keys.append(k if isinstance(k, str) and k else None)
        bad_idx: set[int] = set()

        def add(index: int | None, reason: str) -> None:
            if index is None:
                result.plain_errors.append(reason)
                result.request_level = True
                return
            bad_idx.add(index)
            key = keys[index]
            if key is None:
                result.plain_errors.append(f"events[{index}]: {reason}")
            else:
                result.key_errors.setdefault(key, []).append(reason)

        for err in _validator().iter_errors(body):
            path = list(err.absolute_path)
            if len(path) >= 2 and path[0] == "events" and isinstance(path[1], int):
                where = ".".join(str(p) for p in path[2:])
                add(path[1], f"{where}: {err.message}" if where else err.message)
            else:
                where = "/".join(str(p) for p in path)
                add(None, f"{where}: {err.message}" if where else err.message)

        now = self.now()
        # A backfill takes events older than the grace period (not future ones).
        oldest = None if backfill else now - timedelta(hours=self.grace_period_hours)
        newest = now + timedelta(seconds=self.future_tolerance_seconds)
        bodies: dict[str, set[str]] = {}
        for i, ev in enumerate(events):
            if not isinstance(ev, dict):
                continue
            for reason in self._prose_errors(ev, oldest, newest):
                add(i, reason)
            for reason in self._backfill_event_errors(backfill, ev) if backfill else ():
                add(i, reason)
            deprecated = self._deprecated_key_error(keys[i])
            if deprecated:
                add(i, deprecated)
            if keys[i] is not None:
                bodies.setdefault(keys[i], set()).add(_canonical(ev))  # type: ignore[arg-type]
        for key, variants in bodies.items():
            if len(variants) > 1:
                result.key_errors.setdefault(key, []).append(
                    "idempotency_key appears more than once in this request with different "
                    "event bodies; the entire request is rejected"
                )
                result.request_level = True
        result.valid_events = [
            ev
            for i, ev in enumerate(events)
            if i not in bad_idx and keys[i] is not None and keys[i] not in result.key_errors
        ]
        return result

    @staticmethod
    def _prose_errors(
        ev: dict[str, Any], oldest: datetime | None, newest: datetime
    ) -> Iterator[str]:
        customer_fields = ("customer_id", "external_customer_id")
        given = [f for f in customer_fields if ev.get(f) not in (None, "")]
        for f in customer_fields:
            if ev.get(f) == "":
                yield f"{f} must not be an empty string"
        if not given:
            yield f"exactly one of {' or '.join(customer_fields)} must be specified (neither was)"
        elif len(given) > 1:
            yield f"exactly one of {' or '.join(customer_fields)} must be specified (both were)"

        if ev.get("idempotency_key") == "":
            yield "idempotency_key must not be empty"
        name = ev.get("event_name")
        if isinstance(name, str) and not name.strip():
            yield "event_name must not be empty"

        props = ev.get("properties")
        if isinstance(props, dict):
            for k, v in props.items():
                problem = _property_problem(v)
                if problem:
                    yield f"properties.{k}: {problem}"

        ts = ev.get("timestamp")
        if isinstance(ts, str):
            yield from _timestamp_errors(ts, oldest, newest)


# --------------------------------------------------------------------------- control API


def _control_response(status: int, body: Any) -> _Outcome:
    return _Outcome(status, body)


def _fake_control(fake: FakeOrb, req: _Request) -> _Outcome:
    route = (req.method, req.path.rstrip("/"))
    resource = fake._resource_control(req)
    if resource is not None:
        return resource
    if route == ("GET", "/_fake/events"):
        return _control_response(200, fake.events())
    if route == ("GET", "/_fake/requests"):
        with fake.lock:
            return _control_response(200, [dict(r) for r in fake.requests])
    if route == ("GET", "/_fake/stats"):
        return _control_response(200, fake.stats())
    if route == ("GET", "/_fake/settings"):
        return _control_response(200, fake.settings())
    if route == ("POST", "/_fake/settings"):
        try:
            data = json.loads((req.body or b"null").decode("utf-8") or "null")
            allowed = {
                "grace_period_hours", "one_pending_backfill", "reflection_delay_requests",
                "rate_limit",
            }
            if not isinstance(data, dict) or not set(data) <= allowed:
                raise ValueError(
                    "expected an object with some of " + ", ".join(sorted(allowed))
                    + ' (rate_limit: null, or {"events_per_window", "window_seconds", '
                    '"requests_per_second", "writes_per_second", "reads_per_second"})'
                )
            kwargs = {k: v for k, v in data.items() if k != "rate_limit"}
            if "rate_limit" in data:
                limit = data["rate_limit"]
                if limit is not None and not isinstance(limit, dict):
                    raise ValueError("rate_limit must be null or an object")
                kwargs["rate_limit"] = None if limit is None else RateLimit(**limit)
            return _control_response(200, fake.configure(**kwargs))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            return _control_response(400, {"ok": False, "error": str(exc)})
    if route == ("POST", "/_fake/reset"):
        fake.reset()
        return _control_response(200, {"ok": True})
    if req.method == "POST" and route[1] in (
        "/_fake/script",
        "/_fake/bad_keys",
        "/_fake/413_if_events_over",
    ):
        try:
            data = json.loads((req.body or b"null").decode("utf-8") or "null")
            if route[1] == "/_fake/script":
                faults = data if isinstance(data, list) else [data]
                fake.script(*faults)
                return _control_response(200, {"ok": True, "pending": fake.pending_faults})
            if route[1] == "/_fake/bad_keys":
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object of key -> reason")
                fake.set_bad_keys(data)
                return _control_response(200, {"ok": True, "bad_keys": sorted(data)})
            n = data.get("n") if isinstance(data, dict) else data
            fake.set_413_if_events_over(n)
            return _control_response(200, {"ok": True, "n": n})
        except (ValueError, UnicodeDecodeError) as exc:
            return _control_response(400, {"ok": False, "error": str(exc)})
    return _control_response(
        404, error_body(404, detail=f"No control route {req.method} {req.path}")
    )


# --------------------------------------------------------------------------- CLI


def _summary(fake: FakeOrb) -> str:
    ingest = fake.ingest_requests()
    statuses = collections.Counter(
        "no-answer" if r["status"] is None else str(r["status"]) for r in ingest
    )
    events = fake.events()
    lines = [
        "=== fake-orb summary ===",
        f"ingest requests: {len(ingest)}",
        "responses: " + (", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())) or "none"),
        f"events landed: {len(events)}",
        # Not "duplicates": target-orb's summary counts "duplicates collapsed" (copies inside
        # one request it never sent); these are keys that reached Orb again and were dropped.
        f"keys sent again (Orb kept the first copy): {fake.duplicates}",
    ]
    if fake.double_billed:
        lines.append(
            f"double billed (a key billed twice by a non-replacing backfill): {fake.double_billed}"
        )
    lines.extend(_compact(ev) for ev in events)
    backfills = fake.backfills()
    if backfills:
        lines.append(f"backfills: {len(backfills)}")
        lines.extend(
            f"  {bf['id']} {bf['status']} {bf['timeframe_start']}..{bf['timeframe_end']} "
            f"events={bf['events_ingested']} replace={str(bf['replace_existing_events']).lower()} "
            f"customer_id={bf['customer_id']} close_time={bf['close_time']}"
            for bf in backfills
        )
    corrections = fake.corrections()
    if corrections:
        lines.append(f"corrected events: {len(corrections)}")
        for c in corrections:
            state = f"deprecated ({c['deprecated']})" if c["deprecated"] else "amended"
            lines.append(
                f"  {c['id']}: {state}, {len(c['versions']) - 1} amendment(s); "
                f"current {_compact(c['versions'][-1])}"
            )
    invoices = fake.invoices()
    if invoices:
        lines.append(f"invoices: {len(invoices)}")
        lines.extend(
            f"  {inv['id']} {inv['status']} {inv['customer']['external_customer_id']} "
            f"{inv['line_items'][0]['start_date']}..{inv['line_items'][0]['end_date']} "
            f"invoice_date={inv['invoice_date']}"
            for inv in invoices
        )
    issued = fake.issued_period_events()
    if issued:
        lines.append(
            f"events a backfill brought into an issued invoice's period (Orb does not "
            f"re-issue it): {len(issued)}"
        )
        lines.extend(
            f"  {e['idempotency_key']} ({e['external_customer_id']}, {e['timestamp']}) "
            f"backfill {e['backfill_id']} invoice {e['invoice_id']} {e['invoice_status']}"
            for e in issued
        )
    customers = fake.customers()
    if customers:
        lines.append(f"customers: {len(customers)} ({len(fake.customer_updates())} update(s))")
        lines.extend(
            f"  {c['external_customer_id']} ({c['id']}) metadata {_compact(c['metadata'])}"
            for c in customers
        )
    return "\n".join(lines)


def _write_events(fake: FakeOrb, path: str, previous: str | None = None) -> str:
    """Replace `path` with the landed events (atomically, so a reader never sees half).

    Returns the text written; nothing is written when it equals `previous`.
    """
    text = "".join(_compact(ev) + "\n" for ev in fake.events())
    if text != previous:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return text


def _keep_events_file(fake: FakeOrb, path: str, stop: threading.Event) -> None:
    """Rewrite `--events-out` as events land, so it can be read while the stand-in runs."""
    written: str | None = None
    while not stop.wait(0.2):
        with contextlib.suppress(OSError):
            written = _write_events(fake, path, written)


def _write_overlay(fake: FakeOrb, path: str, grace_period_hours: float | None) -> None:
    """The config overlay: what points target-orb at this stand-in, as a second --config."""
    overlay: dict[str, Any] = {"api_url": fake.url, "api_key": fake.api_key}
    if grace_period_hours is not None:  # the stand-in's window, so both agree on "late"
        overlay["grace_period_hours"] = (
            int(grace_period_hours) if grace_period_hours == int(grace_period_hours)
            else grace_period_hours
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(overlay, fh, indent=2)
        fh.write("\n")
    print(
        f"fake-orb: wrote {path} (api_url, api_key"
        + (", grace_period_hours" if grace_period_hours is not None else "")
        + f"); run target-orb --config YOUR_CONFIG.json --config {path}",
        file=sys.stderr, flush=True,
    )


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


@contextlib.contextmanager
def _signal_handlers(handler: Callable[[int, Any], None], *signums: int) -> Iterator[None]:
    previous: dict[int, Any] = {}
    try:
        for signum in signums:
            try:
                previous[signum] = signal.signal(signum, handler)
            except (ValueError, OSError):  # not the main thread / unsupported
                pass
        yield
    finally:
        for signum, old in previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, old)


def _run_command(fake: FakeOrb, cmd: list[str], max_seconds: float) -> int:
    env = dict(os.environ, TARGET_ORB_API_URL=fake.url, TARGET_ORB_API_KEY=fake.api_key)
    posix = os.name == "posix"
    try:
        # Own process group, so a timeout can take down the whole tree
        # (e.g. `meltano run` and its tap/target children).
        proc = subprocess.Popen(cmd, env=env, start_new_session=posix)
    except OSError as exc:
        print(f"fake-orb: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
        return 127

    def send(sig: int) -> None:
        with contextlib.suppress(OSError):
            if posix:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    def forward(signum: int, _frame: Any) -> None:
        send(signum)

    with _signal_handlers(forward, signal.SIGINT, signal.SIGTERM):
        try:
            return _exit_code(proc.wait(timeout=max_seconds))
        except subprocess.TimeoutExpired:
            print(
                f"fake-orb: command still running after --max-seconds {max_seconds:g}; killing it",
                file=sys.stderr,
            )
            send(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                send(signal.SIGKILL if posix else signal.SIGTERM)
                proc.kill()
                proc.wait()
            return 124


def _serve(fake: FakeOrb, max_seconds: float) -> int:
    print(fake.url, flush=True)
    print(
        f"fake-orb: serving Orb's ping, ingest, events/search, events/backfills, "
        f"customers, event amend/deprecate and invoices at {fake.url} "
        f"(api key {fake.api_key!r}); control API at {fake.root_url}/_fake/; "
        "Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    done = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        done.set()

    with _signal_handlers(on_signal, signal.SIGTERM):
        try:
            done.wait(max_seconds)
        except KeyboardInterrupt:
            pass
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fake-orb",
        description="A strict local stand-in for Orb's API: GET /v1/ping, POST /v1/ingest "
        "(with ?backfill_id=), POST /v1/events/search, /v1/events/backfills "
        "(create/list/fetch/close/revert), GET/PUT /v1/customers/external_customer_id/ID, "
        "PUT /v1/events/ID (amend), PUT /v1/events/ID/deprecate, GET /v1/invoices and "
        "GET /v1/invoices/ID, each validated against Orb's spec and documented rules "
        "(target_orb/fake_orb_RULES.md); a request-level Idempotency-Key on POST/PATCH "
        "replays for 48 h. Control API (no key) under /_fake/: events, requests, stats, "
        "reset, script, bad_keys, 413_if_events_over, clock, customers, customer_updates, "
        "billing_period, backfills, corrections, invoices, issued_period_events, settings. "
        "Without COMMAND it serves until Ctrl-C/SIGTERM; "
        "with `-- COMMAND ...` it runs COMMAND with "
        "TARGET_ORB_API_URL and TARGET_ORB_API_KEY pointing at itself and exits with "
        "COMMAND's exit code.",
        usage="%(prog)s [options] [-- COMMAND ...]",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    p.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    p.add_argument("--api-key", default="test-orb-key")
    p.add_argument(
        "--grace-period-hours", type=float, default=None, metavar="H",
        help="Orb's event reporting grace period (default 12): live ingest takes events "
        "from now - H on, and a backfill without deprecation_filter must end at or before "
        "now - H (the grace boundary); also written to --config-overlay",
    )
    p.add_argument(
        "--one-pending-backfill", action="store_true",
        help="refuse any backfill create while another backfill is pending or being "
        "reflected (Orb's support pages), not only an overlapping one of the same customer "
        "or an account-wide one (Orb's client docstring, the default)",
    )
    p.add_argument(
        "--reflection-delay-requests", type=int, default=0, metavar="N",
        help="a closed backfill stays pending for N more API requests before it is "
        "reflected (default 0: by the next request)",
    )
    p.add_argument("--future-tolerance-seconds", type=float, default=300)
    p.add_argument("--latency-ms", type=float, default=0, help="delay before each ingest answer")
    p.add_argument(
        "--accept-all",
        action="store_true",
        help="skip schema/prose validation (auth, JSON, dedup and counting still apply)",
    )
    p.add_argument(
        "--rate-limit-events", type=int, metavar="N",
        help="Orb-style fixed-window limit: at most N ingested events per window (429 "
        "without Retry-After beyond it)",
    )
    p.add_argument(
        "--rate-limit-window-seconds", type=float, default=60.0, metavar="S",
        help="window of --rate-limit-events (default 60, Orb's per-minute limit)",
    )
    p.add_argument(
        "--rate-limit-rps", type=int, metavar="N",
        help="at most N ingest requests per one-second window",
    )
    p.add_argument(
        "--rate-limit-writes-per-second", type=int, metavar="N",
        help="at most N write requests per one-second window: every POST/PUT/PATCH/DELETE "
        "but ingest (search, backfills, amend, deprecate, customer updates), as Orb counts "
        "them (live 50, test 5, trial 1); 429 without Retry-After beyond it",
    )
    p.add_argument(
        "--rate-limit-reads-per-second", type=int, metavar="N",
        help="at most N GET requests per one-second window (Orb: live 100, test 50, trial 10)",
    )
    p.add_argument(
        "--invoice",
        metavar="EXT,START,END[,STATUS[,INVOICE_DATE]]",
        action="append",
        default=[],
        help="seed an invoice of customer EXT (created if unknown) for the service period "
        "START..END (RFC 3339 or YYYY-MM-DD), STATUS draft|issued|paid|synced|void (default "
        "issued), INVOICE_DATE default END (repeatable)",
    )
    p.add_argument(
        "--events-out", metavar="FILE",
        help="landed events as JSON lines, rewritten as they land (read it while the "
        "stand-in runs; also GET /_fake/events) and once more at exit",
    )
    p.add_argument(
        "--config-overlay", metavar="FILE",
        help="write a target-orb config overlay here ({api_url, api_key} of this stand-in, "
        "and grace_period_hours when --grace-period-hours is given) and remove it at exit; "
        "use your own config with it: target-orb --config mine.json --config FILE",
    )
    p.add_argument(
        "--now",
        metavar="ISO",
        help="freeze the stand-in's clock at this RFC 3339 time (e.g. 2030-01-31T12:00:00Z); "
        "move it later with POST /_fake/clock",
    )
    p.add_argument(
        "--customer",
        metavar="ID",
        action="append",
        default=[],
        help="seed a customer with this external_customer_id (repeatable); the customer "
        "endpoints, customer-scoped backfills, amend and deprecate need one",
    )
    p.add_argument(
        "--amend-cap",
        type=int,
        default=100,
        help="events amended or deprecated per customer per 100 days (Orb's default 100)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=3600,
        help="serve at most this long / kill COMMAND after this long (exit 124)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--" in args_in:
        cut = args_in.index("--")
        opts, cmd = args_in[:cut], args_in[cut + 1 :]
    else:
        opts, cmd = args_in, []
    parser = _parser()
    args = parser.parse_args(opts)
    if "--" in args_in and not cmd:
        parser.error("no COMMAND after --")
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    try:
        fake = FakeOrb(
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            grace_period_hours=12 if args.grace_period_hours is None else args.grace_period_hours,
            future_tolerance_seconds=args.future_tolerance_seconds,
            latency_ms=args.latency_ms,
            accept_all=args.accept_all,
            amend_cap=args.amend_cap,
            rate_limit=(
                RateLimit(
                    events_per_window=args.rate_limit_events or None,
                    window_seconds=args.rate_limit_window_seconds,
                    requests_per_second=args.rate_limit_rps or None,
                    writes_per_second=args.rate_limit_writes_per_second,
                    reads_per_second=args.rate_limit_reads_per_second,
                )
                if any(
                    v is not None
                    for v in (
                        args.rate_limit_events or None,
                        args.rate_limit_rps or None,
                        args.rate_limit_writes_per_second,
                        args.rate_limit_reads_per_second,
                    )
                )
                else None
            ),
            one_pending_backfill=args.one_pending_backfill,
            reflection_delay_requests=args.reflection_delay_requests,
        )
        if args.now:
            fake.set_now(parse_datetime(args.now))
        for ext in args.customer:
            fake.add_customer(ext)
        for spec in args.invoice:
            parts = spec.split(",")
            if not 3 <= len(parts) <= 5:
                raise ValueError(
                    f"--invoice {spec!r}: expected EXT,START,END[,STATUS[,INVOICE_DATE]]"
                )
            fake.add_invoice(
                parts[0],
                parse_when(parts[1]),
                parse_when(parts[2]),
                parts[3] if len(parts) > 3 and parts[3] else "issued",
                parse_when(parts[4]) if len(parts) > 4 and parts[4] else None,
            )
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    fake.start()
    stop = threading.Event()
    keeper: threading.Thread | None = None
    try:
        if args.config_overlay:
            try:
                _write_overlay(fake, args.config_overlay, args.grace_period_hours)
            except OSError as exc:
                print(f"fake-orb: cannot write --config-overlay: {exc}", file=sys.stderr)
                return 2
        if args.events_out:
            keeper = threading.Thread(
                target=_keep_events_file, args=(fake, args.events_out, stop),
                name="fake-orb-events-out", daemon=True,
            )
            keeper.start()
        if cmd:
            print(f"fake-orb: {fake.url} -> {' '.join(cmd)}", file=sys.stderr, flush=True)
            rc = _run_command(fake, cmd, args.max_seconds)
        else:
            rc = _serve(fake, args.max_seconds)
    finally:
        stop.set()
        if keeper is not None:
            keeper.join(timeout=5)
        fake.stop()
        if args.config_overlay:
            with contextlib.suppress(OSError):
                os.remove(args.config_overlay)
    if args.events_out:
        _write_events(fake, args.events_out)
    print(_summary(fake), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
