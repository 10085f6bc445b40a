"""Orb's resources beyond ingest, for the stand-in Orb (``target_orb.fake_orb``).

:class:`OrbResources` is a mixin of :class:`target_orb.fake_orb.FakeOrb`. It holds the
stand-in's clock and event store and serves, strictly after Orb's spec
(``orb-openapi.json``) and reference notes (orb-api.md §3-§5):

- ``POST /v1/events/search``;
- ``POST``/``GET /v1/events/backfills``, ``GET /v1/events/backfills/{id}``,
  ``POST /v1/events/backfills/{id}/close`` and ``…/revert``, and the backfill side of
  ``POST /v1/ingest?backfill_id=``;
- ``GET``/``PUT /v1/customers/external_customer_id/{id}``;
- ``PUT /v1/events/{event_id}`` (amend) and ``PUT /v1/events/{event_id}/deprecate``;
- the request-level ``Idempotency-Key`` header on every POST/PUT.

It imports nothing from ``target_orb`` except the stand-in's own modules.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, unquote

from target_orb.fake_orb_common import (
    _Outcome,
    _property_problem,
    _Request,
    constraint_violation,
    error_body,
    fmt_time,
    parse_datetime,
    parse_event_timestamp,
    resource_not_found,
    schema_errors,
    url_not_found,
    validation_failed,
)

#: Orb keeps a request-level Idempotency-Key for 48 hours (orb-api.md §1).
IDEMPOTENCY_WINDOW = timedelta(hours=48)
IDEMPOTENCY_KEY_MAX = 64
#: Orb: "By default, Orb allows backfills up to 31 days in duration at a time."
BACKFILL_MAX = timedelta(days=31)
#: Orb: a backfill's close_time defaults to 1 day after its creation.
BACKFILL_DEFAULT_CLOSE = timedelta(days=1)
#: Orb: search looks back one week unless given a timeframe_start.
SEARCH_DEFAULT_LOOKBACK = timedelta(days=7)
#: Orb: at most 100 events amended per customer in a 100-day period (by default).
AMEND_WINDOW = timedelta(days=100)

_CUSTOMERS_PREFIX = "/v1/customers/external_customer_id/"
_BACKFILLS = "/v1/events/backfills"
_EVENTS_PREFIX = "/v1/events/"


@dataclass
class _Record:
    """One event Orb holds (ingested live, or reflected from a backfill)."""

    seq: int
    key: str
    original: dict[str, Any]
    backfill_id: str | None  # None: ingested live
    versions: list[dict[str, Any]] = field(default_factory=list)  # amendments, oldest first
    deprecated: str | None = None  # None | "api" | "backfill:<id>"
    double_billed: bool = False

    @property
    def current(self) -> dict[str, Any]:
        return self.versions[-1] if self.versions else self.original


@dataclass
class _IdempotencyEntry:
    fingerprint: str
    at: datetime
    what: str
    outcome: _Outcome | None = None  # None while the first request is still running


class FakeOrbError(ValueError):
    """A Python-API call the stand-in refuses, with the detail Orb's answer would carry."""


def _month_start(when: datetime) -> datetime:
    return datetime(when.year, when.month, 1, tzinfo=timezone.utc)


def _next_month(start: datetime) -> datetime:
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


def _prev_month(start: datetime) -> datetime:
    return (
        start.replace(year=start.year - 1, month=12)
        if start.month == 1
        else start.replace(month=start.month - 1)
    )


def _aware(when: datetime, what: str) -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {when!r}")
    return when.astimezone(timezone.utc)


class OrbResources:
    """Clock, event store, backfills, search, customers, amend/deprecate, idempotency."""

    # Provided by FakeOrb.
    lock: threading.RLock
    clock: Callable[[], datetime]
    grace_period_hours: float
    future_tolerance_seconds: float
    landed: dict[str, dict[str, Any]]
    duplicates: int

    def _init_resources(self, amend_cap: int) -> None:
        if isinstance(amend_cap, bool) or not isinstance(amend_cap, int) or amend_cap < 0:
            raise ValueError(f"amend_cap must be a non-negative int, got {amend_cap!r}")
        self.amend_cap = amend_cap
        self._fixed_now: datetime | None = None
        self._clock_offset = timedelta(0)
        self._records: list[_Record] = []
        self._by_key: dict[str, list[_Record]] = {}
        self._seq = 0
        self.double_billed = 0
        self._backfills: dict[str, dict[str, Any]] = {}
        self._backfill_seq = 0
        self._customers: dict[str, dict[str, Any]] = {}
        self._customer_seeds: dict[str, dict[str, str]] = {}
        self._customer_seq = 0
        self._customer_updates: list[dict[str, Any]] = []
        self._billing_periods: dict[str, tuple[datetime, datetime]] = {}
        self._amend_log: dict[str, dict[str, datetime]] = {}
        self._idempotency: dict[str, _IdempotencyEntry] = {}

    def _reset_resources(self) -> None:
        """Forget events, backfills, amendments, updates and idempotency keys.

        Seeded customers stay (back to their seeded metadata), as do billing periods
        and the clock: they are the stand-in's set-up, not what it received.
        """
        with self.lock:
            self._records.clear()
            self._by_key.clear()
            self.double_billed = 0
            self._backfills.clear()
            self._customer_updates.clear()
            self._amend_log.clear()
            self._idempotency.clear()
            for ext, seed in self._customer_seeds.items():
                self._customers[ext]["metadata"] = dict(seed)

    # ------------------------------------------------------------------ clock

    def now(self) -> datetime:
        """The stand-in's current time (aware UTC): ``clock()``, or as set/advanced."""
        with self.lock:
            if self._fixed_now is not None:
                return self._fixed_now
            return self.clock() + self._clock_offset

    def set_now(self, when: datetime | None) -> None:
        """Freeze the stand-in's clock at ``when`` (aware); None: back to ``clock()``."""
        with self.lock:
            if when is None:
                self._fixed_now = None
                self._clock_offset = timedelta(0)
            else:
                self._fixed_now = _aware(when, "now")

    def advance(self, seconds: float) -> datetime:
        """Move the stand-in's clock by ``seconds`` (a frozen clock stays frozen there)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError(f"seconds must be a number, got {seconds!r}")
        delta = timedelta(seconds=seconds)
        with self.lock:
            if self._fixed_now is not None:
                self._fixed_now += delta
            else:
                self._clock_offset += delta
            return self.now()

    def _tick(self) -> None:
        """Let time act: auto-close backfills past close_time, finish pending reverts."""
        now = self.now()
        with self.lock:
            for bf in self._backfills.values():
                if bf["status"] == "pending" and bf["_close"] <= now:
                    self._reflect(bf)
                elif bf["status"] == "pending_revert":
                    self._finish_revert(bf, now)

    # ------------------------------------------------------------------ event store

    def _hold(self, ev: dict[str, Any], backfill_id: str | None) -> _Record:
        """Make ``ev`` an event Orb holds (caller holds the lock)."""
        self._seq += 1
        rec = _Record(self._seq, ev["idempotency_key"], ev, backfill_id)
        self._records.append(rec)
        self._by_key.setdefault(rec.key, []).append(rec)
        self.landed.setdefault(rec.key, ev)
        return rec

    def _active(self, key: str) -> list[_Record]:
        return [r for r in self._by_key.get(key, []) if r.deprecated is None]

    def events(self) -> list[dict[str, Any]]:
        """The events Orb bills, in landing order: ingested live or reflected from a
        backfill, not deprecated, each in its latest (amended) version. A key a
        non-replacing backfill added again appears twice (it is billed twice)."""
        self._tick()
        with self.lock:
            return [r.current for r in self._records if r.deprecated is None]

    def amendments(self, key: str) -> list[dict[str, Any]]:
        """The history of event ``key``: the body as first stored, then each amendment."""
        with self.lock:
            recs = self._by_key.get(key) or []
            return [recs[0].original, *recs[0].versions] if recs else []

    def corrections(self) -> list[dict[str, Any]]:
        """Every event that was amended or deprecated: id, deprecated, versions."""
        with self.lock:
            return [
                {
                    "id": r.key,
                    "deprecated": r.deprecated,
                    "versions": [r.original, *r.versions],
                }
                for r in self._records
                if r.versions or r.deprecated is not None
            ]

    def _resource_stats(self) -> dict[str, Any]:
        return {"double_billed": self.double_billed}

    def _deprecated_key_error(self, key: str | None) -> str | None:
        if key is None:
            return None
        with self.lock:
            recs = self._by_key.get(key)
            if recs and all(r.deprecated is not None for r in recs):
                return (
                    f"event {key!r} was deprecated; Orb refuses to ingest a deprecated "
                    "event's id again: send the corrected event under a new idempotency_key"
                )
        return None

    # ------------------------------------------------------------------ customers

    def add_customer(
        self,
        external_customer_id: str,
        metadata: dict[str, str] | None = None,
        *,
        name: str | None = None,
        email: str | None = None,
    ) -> dict[str, Any]:
        """Seed a customer Orb knows (by its external id); returns the Customer object."""
        if not isinstance(external_customer_id, str) or not external_customer_id:
            raise ValueError("external_customer_id must be a non-empty string")
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("customer metadata must be a dict of str -> str")
        with self.lock:
            if external_customer_id in self._customers:
                raise ValueError(f"customer {external_customer_id!r} already exists")
            self._customer_seq += 1
            n = self._customer_seq
            self._customers[external_customer_id] = {
                "id": f"fake_cus_{n}",
                "external_customer_id": external_customer_id,
                "metadata": meta,
                "name": name or external_customer_id,
                "email": email or f"customer-{n}@example.com",
                "timezone": "UTC",
                "payment_provider_id": None,
                "payment_provider": None,
                "created_at": fmt_time(self.now()),
                "shipping_address": None,
                "billing_address": None,
                "balance": "0.00",
                "currency": None,
                "tax_id": None,
                "auto_collection": False,
                "exempt_from_automated_tax": None,
                "email_delivery": True,
                "auto_issuance": None,
                "additional_emails": [],
                "portal_url": None,
                "hierarchy": {"children": [], "parent": None},
                "accounting_sync_configuration": None,
                "reporting_configuration": None,
                "payment_configuration": None,
            }
            self._customer_seeds[external_customer_id] = dict(meta)
            return self._customer_view(self._customers[external_customer_id])

    @staticmethod
    def _customer_view(cust: dict[str, Any]) -> dict[str, Any]:
        out = dict(cust)
        out["metadata"] = dict(cust["metadata"])
        return out

    def customer(self, external_customer_id: str) -> dict[str, Any] | None:
        """The Customer object for this external id, or None."""
        with self.lock:
            cust = self._customers.get(external_customer_id)
            return None if cust is None else self._customer_view(cust)

    def customers(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._customer_view(c) for c in self._customers.values()]

    def customer_updates(self) -> list[dict[str, Any]]:
        """Every customer PUT with a JSON body: ``{external_customer_id, body, status}``
        (the answer's status: 200, 400 or 404)."""
        with self.lock:
            return [dict(u) for u in self._customer_updates]

    def _customer_by_id(self, customer_id: str) -> dict[str, Any] | None:
        for cust in self._customers.values():
            if cust["id"] == customer_id:
                return cust
        return None

    def _who(self, ev: dict[str, Any]) -> tuple[str | None, str | None]:
        """(Orb customer id, external id) of an event body, resolved via known customers."""
        ext = ev.get("external_customer_id") or None
        cid = ev.get("customer_id") or None
        if ext is not None:
            cust = self._customers.get(ext)
            return (cust["id"] if cust else None), ext
        if cid is not None:
            cust = self._customer_by_id(cid)
            return cid, (cust["external_customer_id"] if cust else None)
        return None, None

    @staticmethod
    def _same_customer(a: tuple[str | None, str | None], b: tuple[str | None, str | None]) -> bool:
        return (a[0] is not None and a[0] == b[0]) or (a[1] is not None and a[1] == b[1])

    @staticmethod
    def _describe(who: tuple[str | None, str | None]) -> str:
        return f"external_customer_id {who[1]!r}" if who[1] else f"customer_id {who[0]!r}"

    # ------------------------------------------------------------------ billing periods

    def set_billing_period(
        self, external_customer_id: str, start: datetime | None, end: datetime | None = None
    ) -> None:
        """Set this customer's current billing period [start, end); the previous one is
        taken as [start - (end - start), start). ``start=None``: back to the default
        (the current calendar month, UTC)."""
        with self.lock:
            if start is None:
                self._billing_periods.pop(external_customer_id, None)
                return
            if end is None:
                raise ValueError("end is required with start")
            s, e = _aware(start, "start"), _aware(end, "end")
            if not s < e:
                raise ValueError(f"billing period start {start} must be before end {end}")
            self._billing_periods[external_customer_id] = (s, e)

    def billing_period(self, external_customer_id: str) -> tuple[datetime, datetime, datetime]:
        """(previous period start, current period start, current period end)."""
        with self.lock:
            period = self._billing_periods.get(external_customer_id)
        if period is not None:
            start, end = period
            return start - (end - start), start, end
        start = _month_start(self.now())
        return _prev_month(start), start, _next_month(start)

    def _period_refusal(self, ext: str, when: datetime, ts: str, verb: str) -> str | None:
        prev_start, start, end = self.billing_period(ext)
        grace_end = start + timedelta(hours=self.grace_period_hours)
        if start <= when < end:
            return None
        if prev_start <= when < start and self.now() < grace_end:
            return None
        return (
            f"Cannot {verb} event at {ts}: that billing period of customer {ext!r} is closed "
            f"(open: the current period {fmt_time(start)} to {fmt_time(end)}, and the previous "
            f"period from {fmt_time(prev_start)} only until {fmt_time(grace_end)}). Orb "
            "refuses corrections in a closed period: it needs a credit note or an Orb backfill."
        )

    # ------------------------------------------------------------------ backfills

    def _backfill_view(self, bf: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in bf.items() if not k.startswith("_")} | {
            "events_ingested": len(bf["_events"])
        }

    def backfills(self) -> list[dict[str, Any]]:
        """Every backfill as Orb shows it (``Backfill`` objects), newest first."""
        self._tick()
        with self.lock:
            return [self._backfill_view(bf) for bf in reversed(self._backfills.values())]

    def backfill(self, backfill_id: str) -> dict[str, Any] | None:
        self._tick()
        with self.lock:
            bf = self._backfills.get(backfill_id)
            return None if bf is None else self._backfill_view(bf)

    def backfill_events(self, backfill_id: str) -> list[dict[str, Any]]:
        """The events ingested into this backfill (whatever its status), in order."""
        with self.lock:
            bf = self._backfills.get(backfill_id)
            if bf is None:
                raise KeyError(backfill_id)
            return list(bf["_events"].values())

    def create_backfill(
        self,
        timeframe_start: datetime | str,
        timeframe_end: datetime | str,
        *,
        close_time: datetime | str | None = None,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        replace_existing_events: bool = True,
    ) -> dict[str, Any]:
        """Create a backfill as a person or another tool would (same rules as the API).

        Raises :class:`FakeOrbError` with Orb's detail when the API would refuse it.
        """

        def text(v: datetime | str) -> str:
            return fmt_time(_aware(v, "time")) if isinstance(v, datetime) else v

        body: dict[str, Any] = {
            "timeframe_start": text(timeframe_start),
            "timeframe_end": text(timeframe_end),
            "replace_existing_events": replace_existing_events,
        }
        if close_time is not None:
            body["close_time"] = text(close_time)
        if customer_id is not None:
            body["customer_id"] = customer_id
        if external_customer_id is not None:
            body["external_customer_id"] = external_customer_id
        self._tick()
        result = self._new_backfill(body)
        if isinstance(result, _Outcome):
            raise FakeOrbError(result.body["detail"])
        return result

    def _new_backfill(self, body: Any) -> dict[str, Any] | _Outcome:
        errors = schema_errors("NewBackfill", body)
        if errors:
            return validation_failed(errors)
        try:
            start = parse_datetime(body["timeframe_start"])
            end = parse_datetime(body["timeframe_end"])
            close = (
                parse_datetime(body["close_time"]) if body.get("close_time") is not None else None
            )
        except ValueError as exc:
            return validation_failed([str(exc)])
        if body.get("deprecation_filter") is not None:
            return validation_failed(
                [
                    "deprecation_filter: the stand-in does not model Orb's computed-property "
                    "filters; leave it out"
                ]
            )
        if not start < end:
            return validation_failed(
                [
                    f"timeframe_start {body['timeframe_start']} must be before timeframe_end "
                    f"{body['timeframe_end']}"
                ]
            )
        if end - start > BACKFILL_MAX:
            return validation_failed(
                [
                    f"the timeframe {fmt_time(start)} to {fmt_time(end)} is longer than Orb's "
                    "31-day limit for one backfill; split it into several backfills"
                ]
            )
        cid, ext = body.get("customer_id"), body.get("external_customer_id")
        if cid is not None and ext is not None:
            return validation_failed(
                ["give at most one of customer_id and external_customer_id, not both"]
            )
        now = self.now()
        if close is not None and close <= now:
            return validation_failed(
                [f"close_time {body['close_time']} is not in the future ({fmt_time(now)})"]
            )
        with self.lock:
            scope: tuple[str | None, str | None] = (None, None)
            if cid is not None or ext is not None:
                cust = self._customers.get(ext) if ext is not None else self._customer_by_id(cid)
                if cust is None:
                    what = f"external_customer_id {ext!r}" if ext else f"customer_id {cid!r}"
                    return resource_not_found(
                        f"No customer with {what}: Orb needs the customer before a backfill "
                        "can be scoped to it (seed it in the stand-in with --customer / "
                        "add_customer)"
                    )
                scope = (cust["id"], cust["external_customer_id"])
            for other in self._backfills.values():
                if other["status"] not in ("pending", "pending_revert"):
                    continue
                if start < other["_end"] and other["_start"] < end:
                    return constraint_violation(
                        f"The timeframe {fmt_time(start)} to {fmt_time(end)} overlaps backfill "
                        f"{other['id']} ({other['timeframe_start']} to {other['timeframe_end']}, "
                        f"status {other['status']}, closes at {other['close_time']}). Orb allows "
                        "no two pending backfills with overlapping timeframes: close or revert "
                        f"{other['id']}, or wait until it is reflected, then retry."
                    )
            self._backfill_seq += 1
            bf_id = f"fake_bf_{self._backfill_seq}"
            close = close or now + BACKFILL_DEFAULT_CLOSE
            bf = {
                "id": bf_id,
                "status": "pending",
                "created_at": fmt_time(now),
                "timeframe_start": fmt_time(start),
                "timeframe_end": fmt_time(end),
                "close_time": fmt_time(close),
                "reverted_at": None,
                "customer_id": scope[0],
                "replace_existing_events": body.get("replace_existing_events", True),
                "deprecation_filter": None,
                "_start": start,
                "_end": end,
                "_close": close,
                "_scope": scope,
                "_events": {},
            }
            self._backfills[bf_id] = bf
            return self._backfill_view(bf)

    def _in_backfill(self, bf: dict[str, Any], ev: dict[str, Any]) -> bool:
        try:
            when = parse_event_timestamp(ev["timestamp"])
        except (ValueError, KeyError, TypeError):
            return False
        if not bf["_start"] <= when < bf["_end"]:
            return False
        return bf["_scope"] == (None, None) or self._same_customer(bf["_scope"], self._who(ev))

    def _reflect(self, bf: dict[str, Any]) -> None:
        """Close time reached: the backfill's events become Orb's (caller holds the lock)."""
        bf["status"] = "reflected"
        if bf["replace_existing_events"]:
            for rec in self._records:
                if rec.deprecated is None and self._in_backfill(bf, rec.current):
                    rec.deprecated = f"backfill:{bf['id']}"
        for ev in bf["_events"].values():
            already = bool(self._active(ev["idempotency_key"]))
            rec = self._hold(ev, bf["id"])
            if already:
                # Undocumented in Orb; the stand-in assumes the worst: a second billed copy.
                rec.double_billed = True
                self.double_billed += 1

    def _finish_revert(self, bf: dict[str, Any], now: datetime) -> None:
        tag = f"backfill:{bf['id']}"
        self._records = [r for r in self._records if r.backfill_id != bf["id"]]
        for rec in self._records:
            if rec.deprecated == tag:
                rec.deprecated = None
        self._by_key.clear()
        self.landed.clear()
        for rec in self._records:
            self._by_key.setdefault(rec.key, []).append(rec)
            self.landed.setdefault(rec.key, rec.original)
        bf["status"] = "reverted"
        bf["reverted_at"] = fmt_time(now)

    def _backfill_for_ingest(self, backfill_id: str) -> dict[str, Any] | _Outcome:
        with self.lock:
            bf = self._backfills.get(backfill_id)
            if bf is None:
                return resource_not_found(
                    f"No backfill with id {backfill_id!r}: create one with "
                    "POST /v1/events/backfills and pass its id"
                )
            if bf["status"] != "pending":
                return constraint_violation(
                    f"Backfill {backfill_id} is {bf['status']} (close time "
                    f"{bf['close_time']}); only a pending backfill takes events. Create a new "
                    "backfill for these events."
                )
            return bf

    def _backfill_event_errors(self, bf: dict[str, Any], ev: dict[str, Any]) -> list[str]:
        out = []
        ts = ev.get("timestamp")
        try:
            when = parse_event_timestamp(ts) if isinstance(ts, str) else None
        except ValueError:
            when = None  # the timestamp rules already name this event
        if when is not None and not bf["_start"] <= when < bf["_end"]:
            out.append(
                f"timestamp {ts!r} is outside backfill {bf['id']}'s timeframe "
                f"{bf['timeframe_start']} (inclusive) to {bf['timeframe_end']} (exclusive)"
            )
        if bf["_scope"] != (None, None):
            with self.lock:
                who = self._who(ev)
            if who != (None, None) and not self._same_customer(bf["_scope"], who):
                out.append(
                    f"the event's customer ({self._describe(who)}) is outside backfill "
                    f"{bf['id']}'s scope (external_customer_id {bf['_scope'][1]!r})"
                )
        return out

    def _store_backfill(self, bf: dict[str, Any], events: list[dict[str, Any]]) -> None:
        with self.lock:
            held = bf["_events"]
            for ev in events:
                key = ev["idempotency_key"]
                if key in held:
                    self.duplicates += 1
                else:
                    held[key] = ev

    # ------------------------------------------------------------------ idempotency

    def _idempotent(
        self,
        req: _Request,
        record: dict[str, Any],
        handler: Callable[[_Request, dict[str, Any]], _Outcome],
    ) -> _Outcome:
        """Orb's request-level ``Idempotency-Key`` on POST/PUT: a replay of the same
        request within 48 h gets the stored answer (``Idempotent-Replayed: true``); the
        same key on another request, or while the first still runs, gets a 409."""
        key = req.headers.get("Idempotency-Key")
        if key is None or req.method not in ("POST", "PUT", "PATCH"):
            return handler(req, record)
        if not record["authorization_ok"]:
            return handler(req, record)  # the 401 comes from the handler, never stored
        if not key or len(key) > IDEMPOTENCY_KEY_MAX:
            return validation_failed(
                [f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters, got {len(key)}"]
            )
        digest = hashlib.sha256()
        for part in (req.method, req.path, req.query):
            digest.update(part.encode("utf-8") + b"\0")
        digest.update(req.body if req.body is not None else f"<{req.body_len}>".encode())
        fingerprint = digest.hexdigest()
        now = self.now()
        what = f"{req.method} {req.path}"
        with self.lock:
            for k in [k for k, e in self._idempotency.items() if now - e.at >= IDEMPOTENCY_WINDOW]:
                del self._idempotency[k]
            entry = self._idempotency.get(key)
            if entry is not None:
                if entry.fingerprint != fingerprint:
                    return _Outcome(
                        409,
                        error_body(
                            409,
                            detail=f"Idempotency-Key {key!r} was already used in the last 48 "
                            f"hours for a different request ({entry.what}); send a new key "
                            "with a new request",
                        ),
                    )
                if entry.outcome is None:
                    return _Outcome(
                        409,
                        error_body(
                            409,
                            detail=f"A request with Idempotency-Key {key!r} is still in "
                            "progress; retry it shortly",
                        ),
                    )
                record["idempotent_replayed"] = True
                stored = entry.outcome
                return _Outcome(
                    stored.status, stored.body, {**stored.headers, "Idempotent-Replayed": "true"}
                )
            entry = _IdempotencyEntry(fingerprint, now, what)
            self._idempotency[key] = entry
        try:
            outcome = handler(req, record)
        except BaseException:
            with self.lock:
                self._idempotency.pop(key, None)
            raise
        storable = (
            outcome.action is None
            and outcome.status is not None
            and outcome.status < 500
            and outcome.status not in (408, 409, 429)
            and record.get("fault") is None
        )
        with self.lock:
            if storable:
                entry.outcome = outcome
            else:
                self._idempotency.pop(key, None)
        return outcome

    # ------------------------------------------------------------------ HTTP routing

    def _json_body(self, req: _Request, *, optional: bool = False) -> tuple[Any, _Outcome | None]:
        """The request's JSON body, or the 400 that refuses it. ``optional``: an empty
        body (or ``{}``) is allowed and read as None."""
        if optional and not req.body:
            return None, None
        ctype = (req.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return None, validation_failed(
                [f"Content-Type must be application/json, got {ctype!r}"]
            )
        parsed = self._parse(req)  # type: ignore[attr-defined]  # FakeOrb._parse
        if parsed.error is not None:
            return None, validation_failed([parsed.error])
        return parsed.body, None

    def _no_query(self, req: _Request) -> _Outcome | None:
        if req.query:
            names = sorted(parse_qs(req.query, keep_blank_values=True))
            return validation_failed([f"unknown query parameter(s): {', '.join(names)}"])
        return None

    def _resource_request(self, req: _Request, record: dict[str, Any]) -> _Outcome:
        """Every authorised route besides ping and ingest."""
        if not record["authorization_ok"]:
            known = req.path.startswith(("/v1/events/", "/v1/customers/"))
            if known:
                return _Outcome(401, error_body(401, detail="Missing or invalid API key"))
            return url_not_found(req.method, req.path)
        path, method = req.path, req.method
        if path == "/v1/events/search" and method == "POST":
            return self._http_search(req)
        if path == _BACKFILLS and method == "POST":
            return self._http_create_backfill(req)
        if path == _BACKFILLS and method == "GET":
            return self._http_list_backfills(req)
        if path.startswith(_BACKFILLS + "/"):
            rest = path[len(_BACKFILLS) + 1 :].split("/")
            if len(rest) == 1 and rest[0] and method == "GET":
                return self._no_query(req) or self._http_backfill_action(unquote(rest[0]), None)
            if len(rest) == 2 and rest[0] and rest[1] in ("close", "revert") and method == "POST":
                refusal = self._no_query(req)
                if refusal is None:
                    body, refusal = self._json_body(req, optional=True)
                    if refusal is None and body not in (None, {}):
                        refusal = validation_failed([f"{rest[1]} takes no request body"])
                return refusal or self._http_backfill_action(unquote(rest[0]), rest[1])
            return url_not_found(method, path)
        if path.startswith(_CUSTOMERS_PREFIX) and method in ("GET", "PUT"):
            raw = path[len(_CUSTOMERS_PREFIX) :]
            if raw and "/" not in raw:
                return self._no_query(req) or self._http_customer(req, unquote(raw))
            return url_not_found(method, path)
        if path.startswith(_EVENTS_PREFIX) and method == "PUT":
            rest = path[len(_EVENTS_PREFIX) :].split("/")
            if len(rest) == 1 and rest[0]:
                return self._no_query(req) or self._http_amend(req, unquote(rest[0]))
            if len(rest) == 2 and rest[0] and rest[1] == "deprecate":
                return self._no_query(req) or self._http_deprecate(req, unquote(rest[0]))
        return url_not_found(method, path)

    # ------------------------------------------------------------------ search

    def _http_search(self, req: _Request) -> _Outcome:
        refusal = self._no_query(req)
        body, refusal = (None, refusal) if refusal else self._json_body(req)
        if refusal is not None:
            return refusal
        errors = schema_errors("EventSearchCriteria", body)
        if errors:
            return validation_failed(errors)
        now = self.now()
        try:
            start = (
                parse_datetime(body["timeframe_start"])
                if body.get("timeframe_start") is not None
                else now - SEARCH_DEFAULT_LOOKBACK
            )
            end = (
                parse_datetime(body["timeframe_end"])
                if body.get("timeframe_end") is not None
                else now
            )
        except ValueError as exc:
            return validation_failed([str(exc)])
        if not start < end:
            return validation_failed(
                [f"timeframe_start {fmt_time(start)} must be before timeframe_end {fmt_time(end)}"]
            )
        return _Outcome(200, {"data": self.search(body["event_ids"], start, end)})

    def search(
        self, event_ids: list[str], start: datetime | None = None, end: datetime | None = None
    ) -> list[dict[str, Any]]:
        """What ``POST /v1/events/search`` answers: the events Orb holds with these ids
        (case-sensitive) and a timestamp in [start, end), never an amended one."""
        self._tick()
        now = self.now()
        start = start or now - SEARCH_DEFAULT_LOOKBACK
        end = end or now
        out = []
        with self.lock:
            recs = [r for k in set(event_ids) for r in self._by_key.get(k, ())]
            for rec in sorted(recs, key=lambda r: r.seq):
                if rec.versions:
                    continue
                ev = rec.original
                when = parse_event_timestamp(ev["timestamp"])
                if not start <= when < end:
                    continue
                cid, ext = self._who(ev)
                out.append(
                    {
                        "id": rec.key,
                        "customer_id": cid,
                        "external_customer_id": ext,
                        "event_name": ev["event_name"],
                        "properties": dict(ev["properties"]),
                        "timestamp": fmt_time(when),
                        "deprecated": rec.deprecated is not None,
                    }
                )
        return out

    # ------------------------------------------------------------------ backfill routes

    def _http_create_backfill(self, req: _Request) -> _Outcome:
        refusal = self._no_query(req)
        body, refusal = (None, refusal) if refusal else self._json_body(req)
        if refusal is not None:
            return refusal
        result = self._new_backfill(body)
        return result if isinstance(result, _Outcome) else _Outcome(200, result)

    def _http_list_backfills(self, req: _Request) -> _Outcome:
        query = parse_qs(req.query, keep_blank_values=True)
        # limit/cursor: Orb's spec; customer_id/status: filters of Orb's current client.
        unknown = sorted(set(query) - {"limit", "cursor", "customer_id", "status"})
        if unknown:
            return validation_failed([f"unknown query parameter(s): {', '.join(unknown)}"])
        if any(len(v) > 1 for v in query.values()):
            return validation_failed(["each query parameter may be given once"])
        raw_limit = query.get("limit", ["20"])[0]
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            return validation_failed([f"limit must be an integer from 1 to 100, got {raw_limit!r}"])
        limit = int(raw_limit)
        status = query.get("status", [None])[0]
        if status is not None and status not in (
            "pending",
            "reflected",
            "pending_revert",
            "reverted",
        ):
            return validation_failed([f"status {status!r} is not a backfill status"])
        customer_id = query.get("customer_id", [None])[0]
        items = [
            bf
            for bf in self.backfills()
            if (status is None or bf["status"] == status)
            and (customer_id is None or bf["customer_id"] == customer_id)
        ]
        cursor = query.get("cursor", [None])[0]
        if cursor is not None:
            ids = [bf["id"] for bf in items]
            if cursor not in ids:
                return validation_failed([f"cursor {cursor!r} is not a cursor this list gave"])
            items = items[ids.index(cursor) + 1 :]
        page, more = items[:limit], len(items) > limit
        return _Outcome(
            200,
            {
                "data": page,
                "pagination_metadata": {
                    "has_more": more,
                    "next_cursor": page[-1]["id"] if more else None,
                },
            },
        )

    def _http_backfill_action(self, backfill_id: str, action: str | None) -> _Outcome:
        now = self.now()
        with self.lock:
            bf = self._backfills.get(backfill_id)
            if bf is None:
                return resource_not_found(f"No backfill with id {backfill_id!r}")
            if action == "close":
                if bf["status"] != "pending":
                    return constraint_violation(
                        f"Backfill {backfill_id} is {bf['status']}; only a pending backfill can "
                        "be closed"
                    )
                # Reflection is asynchronous in Orb: the status turns `reflected` by the
                # stand-in's next request (or Python read).
                bf["_close"] = now
                bf["close_time"] = fmt_time(now)
            elif action == "revert":
                if bf["status"] == "pending":
                    bf["status"] = "reverted"
                    bf["reverted_at"] = fmt_time(now)
                elif bf["status"] == "reflected":
                    bf["status"] = "pending_revert"  # `reverted` by the next request
                else:
                    return constraint_violation(
                        f"Backfill {backfill_id} is {bf['status']}; only a pending or reflected "
                        "backfill can be reverted"
                    )
            return _Outcome(200, self._backfill_view(bf))

    # ------------------------------------------------------------------ customers route

    def _http_customer(self, req: _Request, ext: str) -> _Outcome:
        if req.method == "GET":
            cust = self.customer(ext)
            if cust is None:
                return resource_not_found(
                    f"Could not find a customer with external_customer_id {ext!r}"
                )
            return _Outcome(200, cust)
        body, refusal = self._json_body(req)
        if refusal is not None:
            return refusal  # not JSON: not an update anyone could read back
        with self.lock:
            update = {"external_customer_id": ext, "body": body, "status": None}
            self._customer_updates.append(update)
        outcome = self._edit_customer(ext, body)
        update["status"] = outcome.status
        return outcome

    def _edit_customer(self, ext: str, body: Any) -> _Outcome:
        errors = schema_errors("EditCustomer", body)
        if errors:
            return validation_failed(errors)
        with self.lock:
            cust = self._customers.get(ext)
            if cust is None:
                return resource_not_found(
                    f"Could not find a customer with external_customer_id {ext!r}: Orb needs "
                    "the customer created first"
                )
            new_ext = body.get("external_customer_id")
            if new_ext is not None and new_ext != cust["external_customer_id"]:
                return constraint_violation(
                    f"external_customer_id can only be set on a customer that has none; this "
                    f"customer's is {ext!r}"
                )
            currency = body.get("currency")
            if currency is not None and cust["currency"] not in (None, currency):
                return constraint_violation(
                    f"currency is already {cust['currency']!r} and cannot be changed"
                )
            if "metadata" in body:
                meta = body["metadata"]
                if meta is None:
                    cust["metadata"] = {}
                else:
                    for k, v in meta.items():
                        if v is None:
                            cust["metadata"].pop(k, None)
                        else:
                            cust["metadata"][k] = v
            for name in (
                "name",
                "email",
                "payment_provider",
                "payment_provider_id",
                "auto_collection",
                "auto_issuance",
                "email_delivery",
                "additional_emails",
                "billing_address",
                "shipping_address",
                "tax_id",
                "currency",
                "accounting_sync_configuration",
                "reporting_configuration",
                "payment_configuration",
            ):
                if name in body and body[name] is not None:
                    cust[name] = body[name]
            return _Outcome(200, self._customer_view(cust))

    # ------------------------------------------------------------------ amend / deprecate

    def _correction_target(self, key: str, verb: str) -> tuple[list[_Record], _Outcome | None]:
        recs = self._by_key.get(key) or []
        if not recs:
            return [], resource_not_found(
                f"No event with id (idempotency_key) {key!r} to {verb}: Orb has not ingested it "
                "(events in a backfill count only once it is reflected)"
            )
        return [r for r in recs if r.deprecated is None], None

    def _correction_rules(
        self, key: str, stored: dict[str, Any], verb: str
    ) -> tuple[str | None, _Outcome | None]:
        """Orb's shared amend/deprecate rules; returns (customer's Orb id, refusal)."""
        cid, ext = self._who(stored)
        if cid is None or ext is None:
            return None, constraint_violation(
                f"Cannot {verb} event {key!r}: its customer "
                f"({self._describe((cid, ext))}) does not exist in Orb; Orb corrects events "
                "only of existing customers: create the customer first"
            )
        ts = stored["timestamp"]
        closed = self._period_refusal(ext, parse_event_timestamp(ts), ts, verb)
        if closed:
            return None, constraint_violation(closed)
        now = self.now()
        log = self._amend_log.setdefault(cid, {})
        recent = {k for k, at in log.items() if now - at < AMEND_WINDOW}
        if key not in recent and len(recent) >= self.amend_cap:
            return None, constraint_violation(
                f"Cannot {verb} event {key!r}: customer {ext!r} already had {len(recent)} "
                f"events amended or deprecated in the last 100 days, Orb's limit "
                f"({self.amend_cap}). Ask Orb to raise it, or correct the period with a backfill."
            )
        return cid, None

    def _http_amend(self, req: _Request, key: str) -> _Outcome:
        body, refusal = self._json_body(req)
        if refusal is not None:
            return refusal
        errors = schema_errors("AmendedEvent", body)
        if not errors:
            errors = list(self._amend_prose_errors(body))
        if errors:
            return validation_failed(errors)
        with self.lock:
            active, refusal = self._correction_target(key, "amend")
            if refusal is not None:
                return refusal
            if not active:
                return constraint_violation(
                    f"Event {key!r} is deprecated; a deprecated event cannot be amended"
                )
            stored = active[0].current
            new_when = parse_event_timestamp(body["timestamp"])
            if new_when != parse_event_timestamp(stored["timestamp"]):
                return constraint_violation(
                    f"Cannot amend event {key!r}: the timestamp must stay {stored['timestamp']} "
                    f"(got {body['timestamp']}); Orb amends only with the same timestamp"
                )
            old_who, new_who = self._who(stored), self._who(body)
            if not self._same_customer(old_who, new_who):
                return constraint_violation(
                    f"Cannot amend event {key!r}: it belongs to {self._describe(old_who)}, not "
                    f"{self._describe(new_who)}; Orb amends only with the same customer"
                )
            cid, refusal = self._correction_rules(key, stored, "amend")
            if refusal is not None:
                return refusal
            self._amend_log[cid].setdefault(key, self.now())
            version = {"idempotency_key": key, **body}
            for rec in active:
                rec.versions.append(version)
        return _Outcome(200, {"amended": key})

    def _amend_prose_errors(self, body: dict[str, Any]) -> list[str]:
        out = []
        given = [
            f for f in ("customer_id", "external_customer_id") if body.get(f) not in (None, "")
        ]
        if len(given) != 1:
            out.append("exactly one of customer_id or external_customer_id must be specified")
        if not body["event_name"].strip():
            out.append("event_name must not be empty")
        for k, v in body["properties"].items():
            problem = _property_problem(v)
            if problem:
                out.append(f"properties.{k}: {problem}")
        try:
            parse_event_timestamp(body["timestamp"])
        except ValueError as exc:
            out.append(str(exc))
        return out

    def _http_deprecate(self, req: _Request, key: str) -> _Outcome:
        body, refusal = self._json_body(req, optional=True)
        if refusal is None and body not in (None, {}):
            refusal = validation_failed(["deprecate takes no request body"])
        if refusal is not None:
            return refusal
        with self.lock:
            active, refusal = self._correction_target(key, "deprecate")
            if refusal is not None:
                return refusal
            if not active:
                return _Outcome(200, {"deprecated": key})  # already deprecated: a retry
            cid, refusal = self._correction_rules(key, active[0].current, "deprecate")
            if refusal is not None:
                return refusal
            self._amend_log[cid].setdefault(key, self.now())
            for rec in active:
                rec.deprecated = "api"
        return _Outcome(200, {"deprecated": key})

    # ------------------------------------------------------------------ control API

    def _resource_control(self, req: _Request) -> _Outcome | None:
        """``/_fake/`` routes for the clock, customers, backfills and corrections
        (None: not one of these)."""
        route = (req.method, req.path.rstrip("/"))
        try:
            if route == ("GET", "/_fake/clock"):
                return _Outcome(200, self._clock_view())
            if route == ("POST", "/_fake/clock"):
                data = _control_json(req)
                if not isinstance(data, dict) or not set(data) <= {"now", "advance_seconds"}:
                    raise ValueError('expected {"now": ISO or null} and/or {"advance_seconds": n}')
                if "now" in data:
                    now = data["now"]
                    self.set_now(None if now is None else parse_datetime(now))
                if "advance_seconds" in data:
                    self.advance(data["advance_seconds"])
                self._tick()
                return _Outcome(200, self._clock_view())
            if route == ("GET", "/_fake/customers"):
                return _Outcome(200, self.customers())
            if route == ("POST", "/_fake/customers"):
                data = _control_json(req)
                if not isinstance(data, dict) or not set(data) <= {
                    "external_customer_id",
                    "metadata",
                    "name",
                    "email",
                }:
                    raise ValueError(
                        'expected {"external_customer_id": ID, "metadata": {...}, "name", "email"}'
                    )
                return _Outcome(200, self.add_customer(**data))
            if req.method == "GET" and route[1].startswith("/_fake/customers/"):
                ext = unquote(route[1][len("/_fake/customers/") :])
                cust = self.customer(ext)
                if cust is None:
                    return _Outcome(404, {"ok": False, "error": f"no customer {ext!r}"})
                return _Outcome(200, cust)
            if route == ("GET", "/_fake/customer_updates"):
                return _Outcome(200, self.customer_updates())
            if route == ("POST", "/_fake/billing_period"):
                data = _control_json(req)
                if not isinstance(data, dict) or set(data) != {
                    "external_customer_id",
                    "start",
                    "end",
                }:
                    raise ValueError(
                        'expected {"external_customer_id": ID, "start": ISO|null, "end": ISO|null}'
                    )
                start = None if data["start"] is None else parse_datetime(data["start"])
                end = None if data["end"] is None else parse_datetime(data["end"])
                self.set_billing_period(data["external_customer_id"], start, end)
                return _Outcome(200, {"ok": True})
            if route == ("GET", "/_fake/backfills"):
                return _Outcome(
                    200,
                    [{**bf, "events": self.backfill_events(bf["id"])} for bf in self.backfills()],
                )
            if route == ("POST", "/_fake/backfills"):
                data = _control_json(req)
                if not isinstance(data, dict):
                    raise ValueError("expected a NewBackfill JSON object")
                return _Outcome(200, self.create_backfill(**data))
            if route == ("GET", "/_fake/corrections"):
                return _Outcome(200, self.corrections())
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            return _Outcome(400, {"ok": False, "error": str(exc)})
        return None

    def _clock_view(self) -> dict[str, Any]:
        with self.lock:
            return {"now": fmt_time(self.now()), "frozen": self._fixed_now is not None}


def _control_json(req: _Request) -> Any:
    return json.loads((req.body or b"null").decode("utf-8") or "null")
