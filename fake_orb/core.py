"""The stand-in Orb itself: :class:`FakeOrb`, its lifecycle, rules and request dispatch."""

from __future__ import annotations

import collections
import ipaddress
import math
import socket
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fake_orb.common import (
    _Outcome,
    _Request,
    _utcnow,
    _validator,
    error_body,
    fmt_time,
)
from fake_orb.control import fake_control
from fake_orb.ingest import Ingest, _normalize_fault
from fake_orb.ratelimit import RateLimit
from fake_orb.routes import OrbResources
from fake_orb.server import _Server

#: "Not given" for :meth:`FakeOrb.configure` (None there means "off").
_UNSET: Any = object()


class FakeOrb(Ingest, OrbResources):
    """A strict local Orb (see the package docstring) with fault injection.

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
        return fake_control(self, req)

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
