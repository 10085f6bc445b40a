"""Orb's resources beyond ingest, for the stand-in Orb (``target_orb.fake_orb``).

:class:`OrbResources` is a mixin of :class:`target_orb.fake_orb.FakeOrb`. It holds the
stand-in's clock and event store and serves, strictly after Orb's spec
(``orb-openapi.json``) and Orb's API reference pages for these endpoints:

- ``POST /v1/events/search``;
- ``POST``/``GET /v1/events/backfills``, ``GET /v1/events/backfills/{id}``,
  ``POST /v1/events/backfills/{id}/close`` and ``…/revert``, and the backfill side of
  ``POST /v1/ingest?backfill_id=``;
- ``GET``/``PUT /v1/customers/external_customer_id/{id}``;
- ``PUT /v1/events/{event_id}`` (amend) and ``PUT /v1/events/{event_id}/deprecate``;
- ``GET /v1/invoices`` and ``GET /v1/invoices/{invoice_id}`` for seeded invoices;
- the request-level ``Idempotency-Key`` header on POST/PATCH.

Each rule's Orb source and test are in ``fake_orb_RULES.md`` beside this module.

It imports nothing from ``target_orb`` except the stand-in's own modules.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, unquote

from target_orb.fake_orb_common import (
    DeprecationFilter,
    FilterSyntaxError,
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

#: Orb keeps a request-level Idempotency-Key for 48 hours (docs.withorb.com/reference/idempotency).
IDEMPOTENCY_WINDOW = timedelta(hours=48)
IDEMPOTENCY_KEY_MAX = 64
#: The methods whose Idempotency-Key Orb honours (docs.withorb.com/reference/idempotency).
IDEMPOTENT_METHODS = ("POST", "PATCH")
#: Orb: "By default, Orb allows backfills up to 31 days in duration at a time."
BACKFILL_MAX = timedelta(days=31)
#: Orb: a backfill's close_time defaults to 1 day after its creation.
BACKFILL_DEFAULT_CLOSE = timedelta(days=1)
#: Orb: search looks back one week unless given a timeframe_start.
SEARCH_DEFAULT_LOOKBACK = timedelta(days=7)
#: Orb: at most 100 events amended per customer in a 100-day period (by default).
AMEND_WINDOW = timedelta(days=100)

#: Invoice statuses (spec ``Invoice.status``); list default: issued, paid, synced.
INVOICE_STATUSES = ("draft", "issued", "paid", "synced", "void")
#: ``GET /v1/invoices`` query parameters the stand-in answers (spec, plus the official
#: client's ``include_zero_quantity_line_items``) and those it refuses as not modelled.
_INVOICE_QUERY = {
    "status[]", "customer_id", "external_customer_id", "subscription_id", "limit", "cursor",
    "invoice_date[gte]", "invoice_date[gt]", "invoice_date[lt]", "invoice_date[lte]",
    "due_date", "due_date[gt]", "due_date[lt]", "amount", "amount[gt]", "amount[lt]",
    "is_recurring", "include_zero_quantity_line_items",
}
_INVOICE_QUERY_UNMODELLED = {"due_date_window", "date_type"}
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_INVOICES = "/v1/invoices"
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


def _non_negative_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


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


def _unit_price(n: int, name: str, currency: str, created: str) -> dict[str, Any]:
    """A ``UnitPrice`` (spec ``components.schemas.UnitPrice``) for a seeded line item."""
    return {
        "id": f"fake_price_{n}",
        "name": name,
        "model_type": "unit",
        "unit_config": {"unit_amount": "0.00", "prorated": False},
        "metadata": {},
        "external_price_id": None,
        "replaces_price_id": None,
        "price_type": "usage_price",
        "created_at": created,
        "cadence": "monthly",
        "billing_mode": "in_arrear",
        "billing_cycle_configuration": {"duration": 1, "duration_unit": "month"},
        "invoicing_cycle_configuration": None,
        "billable_metric": {"id": "fake_metric_1"},
        "dimensional_price_configuration": None,
        "fixed_price_quantity": None,
        "plan_phase_order": None,
        "currency": currency,
        "conversion_rate": None,
        "conversion_rate_config": None,
        "item": {"id": "fake_item_1", "name": name},
        "credit_allocation": None,
        "composite_price_filters": None,
        "invoice_grouping_key": None,
        "license_type": None,
        "discount": None,
        "minimum": None,
        "minimum_amount": None,
        "maximum": None,
        "maximum_amount": None,
    }


class OrbResources:
    """Clock, event store, backfills, search, customers, amend/deprecate, idempotency."""

    # Provided by FakeOrb.
    lock: threading.RLock
    clock: Callable[[], datetime]
    grace_period_hours: float
    future_tolerance_seconds: float
    landed: dict[str, dict[str, Any]]
    duplicates: int

    def _init_resources(
        self,
        amend_cap: int,
        *,
        one_pending_backfill: bool = False,
        reflection_delay_requests: int = 0,
    ) -> None:
        if isinstance(amend_cap, bool) or not isinstance(amend_cap, int) or amend_cap < 0:
            raise ValueError(f"amend_cap must be a non-negative int, got {amend_cap!r}")
        self.amend_cap = amend_cap
        self.one_pending_backfill = bool(one_pending_backfill)
        self.reflection_delay_requests = _non_negative_int(
            reflection_delay_requests, "reflection_delay_requests"
        )
        self._api_requests = 0  # authorised or not: what a reflection delay counts
        self._invoices: dict[str, dict[str, Any]] = {}
        self._invoice_seq = 0
        self._issued_period_events: list[dict[str, Any]] = []
        self.unevaluated_deprecation_filters = 0
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
            self._issued_period_events.clear()
            self.unevaluated_deprecation_filters = 0
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

    def _tick(self, *, api_request: bool = False) -> None:
        """Let time act: reflect backfills past close_time, finish pending reverts.

        ``api_request``: called for an Orb API request, which a reflection delay counts.
        """
        now = self.now()
        with self.lock:
            if api_request:
                self._api_requests += 1
            for bf in self._backfills.values():
                if bf["status"] == "pending" and bf["_close"] <= now:
                    if self._reflection_due(bf):
                        self._reflect(bf)
                elif bf["status"] == "pending_revert":
                    self._finish_revert(bf, now)

    def _reflection_due(self, bf: dict[str, Any]) -> bool:
        """A closed backfill (close_time reached) is reflected at once, or, with
        ``reflection_delay_requests`` N, stays ``pending`` while N more API requests
        arrive (Orb reflects asynchronously: the spec's close answer is still pending)."""
        if self.reflection_delay_requests == 0:
            return True
        if bf.get("_closed_at_request") is None:
            bf["_closed_at_request"] = self._api_requests
        return self._api_requests - bf["_closed_at_request"] > self.reflection_delay_requests

    # ------------------------------------------------------------------ event store

    def _hold(self, ev: dict[str, Any], backfill_id: str | None) -> _Record:
        """Make ``ev`` an event Orb holds (caller holds the lock)."""
        self._seq += 1
        rec = _Record(self._seq, ev["idempotency_key"], ev, backfill_id)
        if backfill_id is None:
            # Orb 4.90 (backfills.py `create`): with a deprecation_filter, "Matching events
            # that arrive later with timestamps inside the timeframe will also be
            # deprecated." Events arriving before the backfill is reflected are deprecated
            # when it is (see _reflect); these arrive after.
            for bf in self._backfills.values():
                if (
                    bf["status"] == "reflected"
                    and bf["deprecation_filter"] is not None
                    and self._deprecated_by(bf, ev)
                ):
                    rec.deprecated = f"backfill:{bf['id']}"
                    break
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
        return {
            "double_billed": self.double_billed,
            "events_in_issued_periods": len(self._issued_period_events),
            "unevaluated_deprecation_filters": self.unevaluated_deprecation_filters,
        }

    def issued_period_events(self) -> list[dict[str, Any]]:
        """Events a reflected backfill brought into a period whose invoice was already
        issued, paid or synced (Orb does not change such an invoice): ``backfill_id``,
        ``idempotency_key``, ``timestamp``, ``invoice_id``, ``invoice_status``,
        ``external_customer_id``; in reflection order."""
        self._tick()
        with self.lock:
            return [dict(e) for e in self._issued_period_events]

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

    # ------------------------------------------------------------------ invoices

    def add_invoice(
        self,
        external_customer_id: str,
        period_start: datetime,
        period_end: datetime,
        status: str = "issued",
        invoice_date: datetime | None = None,
        *,
        amount: str = "0.00",
        currency: str = "USD",
        quantity: float = 0.0,
        name: str = "Usage",
    ) -> dict[str, Any]:
        """Seed an invoice of this customer for the service period [period_start,
        period_end) (one line item carries it as ``start_date``/``end_date``);
        ``invoice_date`` defaults to ``period_end``. An unknown customer is created first
        (in Orb an invoice always has one). Returns the ``Invoice`` object."""
        if status not in INVOICE_STATUSES:
            raise ValueError(f"status must be one of {', '.join(INVOICE_STATUSES)}, got {status!r}")
        start, end = _aware(period_start, "period_start"), _aware(period_end, "period_end")
        if not start < end:
            raise ValueError(f"period_start {period_start} must be before period_end {period_end}")
        when = end if invoice_date is None else _aware(invoice_date, "invoice_date")
        if not isinstance(amount, str) or not isinstance(currency, str):
            raise ValueError("amount and currency must be strings (Orb sends amounts as strings)")
        with self.lock:
            if external_customer_id not in self._customers:
                self.add_customer(external_customer_id)
            cust = self._customers[external_customer_id]
            self._invoice_seq += 1
            n = self._invoice_seq
            inv_id = f"fake_inv_{n}"
            created = fmt_time(self.now())
            self._invoices[inv_id] = {
                "id": inv_id,
                "invoice_number": f"FAKE-{n:05d}",
                "status": status,
                "customer": {
                    "id": cust["id"],
                    "external_customer_id": cust["external_customer_id"],
                },
                "invoice_date": fmt_time(when),
                "due_date": fmt_time(when),
                "created_at": created,
                "currency": currency,
                "amount_due": amount,
                "subtotal": amount,
                "total": amount,
                "metadata": {},
                "voided_at": None,
                "paid_at": None,
                "issued_at": None,
                "scheduled_issue_at": None,
                "auto_collection": {
                    "enabled": False,
                    "next_attempt_at": None,
                    "num_attempts": None,
                    "previously_attempted_at": None,
                },
                "issue_failed_at": None,
                "sync_failed_at": None,
                "payment_failed_at": None,
                "payment_started_at": None,
                "invoice_pdf": None,
                "subscription": None,
                "customer_balance_transactions": [],
                "invoice_source": "subscription",
                "shipping_address": None,
                "billing_address": None,
                "hosted_invoice_url": None,
                "will_auto_issue": False,
                "eligible_to_issue_at": None,
                "customer_tax_id": None,
                "memo": None,
                "credit_notes": [],
                "payment_attempts": [],
                "discount": None,
                "discounts": [],
                "minimum": None,
                "minimum_amount": None,
                "maximum": None,
                "maximum_amount": None,
                "hidden_line_item_count": 0,
                "line_items": [
                    {
                        "id": f"fake_li_{n}",
                        "name": name,
                        "amount": amount,
                        "subtotal": amount,
                        "adjusted_subtotal": amount,
                        "credits_applied": "0.00",
                        "partially_invoiced_amount": "0.00",
                        "quantity": quantity,
                        "start_date": fmt_time(start),
                        "end_date": fmt_time(end),
                        "grouping": None,
                        "filter": None,
                        "adjustments": [],
                        "sub_line_items": [],
                        "tax_amounts": [],
                        "usage_customer_ids": None,
                        "price": _unit_price(n, name, currency, created),
                    }
                ],
            }
            self._set_invoice_status(self._invoices[inv_id], status)
            return self._invoice_view(self._invoices[inv_id])

    def set_invoice_status(self, invoice_id: str, status: str) -> dict[str, Any]:
        """Move a seeded invoice to ``status`` (e.g. issue a draft); returns it."""
        if status not in INVOICE_STATUSES:
            raise ValueError(f"status must be one of {', '.join(INVOICE_STATUSES)}, got {status!r}")
        with self.lock:
            inv = self._invoices.get(invoice_id)
            if inv is None:
                raise KeyError(invoice_id)
            self._set_invoice_status(inv, status)
            return self._invoice_view(inv)

    def _set_invoice_status(self, inv: dict[str, Any], status: str) -> None:
        inv["status"] = status
        issued = status in ("issued", "paid", "synced")
        inv["issued_at"] = inv["invoice_date"] if issued else None
        inv["paid_at"] = inv["invoice_date"] if status == "paid" else None
        inv["voided_at"] = fmt_time(self.now()) if status == "void" else None
        inv["scheduled_issue_at"] = inv["invoice_date"] if status == "draft" else None
        inv["eligible_to_issue_at"] = inv["invoice_date"] if status == "draft" else None

    @staticmethod
    def _invoice_view(inv: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(inv))  # a deep copy: callers cannot change the seed

    def invoices(self) -> list[dict[str, Any]]:
        """Every seeded invoice (any status), in the order they were added."""
        with self.lock:
            return [self._invoice_view(i) for i in self._invoices.values()]

    def invoice(self, invoice_id: str) -> dict[str, Any] | None:
        with self.lock:
            inv = self._invoices.get(invoice_id)
            return None if inv is None else self._invoice_view(inv)

    def _issued_invoice_for(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        """An issued/paid/synced invoice of ``ev``'s customer whose line items' service
        period holds its timestamp (caller holds the lock)."""
        if not self._invoices:
            return None
        try:
            when = parse_event_timestamp(ev["timestamp"])
        except (ValueError, KeyError, TypeError):
            return None
        who = self._who(ev)
        for inv in self._invoices.values():
            if inv["status"] not in ("issued", "paid", "synced"):
                continue
            owner = (inv["customer"]["id"], inv["customer"]["external_customer_id"])
            if not self._same_customer(owner, who):
                continue
            for li in inv["line_items"]:
                if parse_datetime(li["start_date"]) <= when < parse_datetime(li["end_date"]):
                    return inv
        return None

    def _http_list_invoices(self, req: _Request) -> _Outcome:
        """``GET /v1/invoices`` (spec ``paths./invoices.get``), with the query the official
        client sends: arrays as ``status[]=a&status[]=b``, comparisons as ``name[op]``."""
        query = parse_qs(req.query, keep_blank_values=True)
        unknown = sorted(set(query) - _INVOICE_QUERY - _INVOICE_QUERY_UNMODELLED)
        if unknown:
            return validation_failed([f"unknown query parameter(s): {', '.join(unknown)}"])
        unmodelled = sorted(set(query) & _INVOICE_QUERY_UNMODELLED)
        if query.get("date_type") == ["invoice_date"]:
            unmodelled.remove("date_type")  # Orb's default: nothing to do
        if unmodelled:
            return validation_failed(
                [f"query parameter(s) {', '.join(unmodelled)}: not modelled by the stand-in"]
            )
        if any(len(v) > 1 for k, v in query.items() if k != "status[]"):
            return validation_failed(["each query parameter but status[] may be given once"])
        one = {k: v[0] for k, v in query.items() if k != "status[]"}
        errors: list[str] = []
        statuses = query.get("status[]") or ["issued", "paid", "synced"]
        for st in statuses:
            if st not in INVOICE_STATUSES:
                errors.append(f"status[]: {st!r} is not one of {', '.join(INVOICE_STATUSES)}")
        raw_limit = one.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            errors.append(f"limit must be an integer from 1 to 100, got {raw_limit!r}")
        bounds: dict[str, datetime] = {}
        for op in ("gte", "gt", "lt", "lte"):
            name = f"invoice_date[{op}]"
            if name in one:
                try:
                    bounds[op] = parse_datetime(one[name])
                except ValueError as exc:
                    errors.append(f"{name}: {exc}")
        due: dict[str, str] = {}
        for name, op in (("due_date", "eq"), ("due_date[gt]", "gt"), ("due_date[lt]", "lt")):
            if name in one:
                if not _DATE_RE.match(one[name]):
                    errors.append(f"{name}: {one[name]!r} is not a date (YYYY-MM-DD)")
                due[op] = one[name]
        amounts: dict[str, float] = {}
        for name, op in (("amount", "eq"), ("amount[gt]", "gt"), ("amount[lt]", "lt")):
            if name in one:
                try:
                    amounts[op] = float(one[name])
                except ValueError:
                    errors.append(f"{name}: {one[name]!r} is not an amount")
        flags: dict[str, bool] = {}
        for name in ("is_recurring", "include_zero_quantity_line_items"):
            if name in one:
                if one[name] not in ("true", "false"):
                    errors.append(f"{name} must be true or false, got {one[name]!r}")
                flags[name] = one[name] == "true"
        if errors:
            return validation_failed(errors)

        def keep(inv: dict[str, Any]) -> bool:
            when = parse_datetime(inv["invoice_date"])
            day = inv["due_date"][:10] if inv["due_date"] else None
            amount = float(inv["amount_due"])
            return (
                inv["status"] in statuses
                and one.get("customer_id", inv["customer"]["id"]) == inv["customer"]["id"]
                and one.get("external_customer_id", inv["customer"]["external_customer_id"])
                == inv["customer"]["external_customer_id"]
                and ("subscription_id" not in one or (inv["subscription"] or {}).get("id")
                     == one["subscription_id"])
                and ("gte" not in bounds or when >= bounds["gte"])
                and ("gt" not in bounds or when > bounds["gt"])
                and ("lt" not in bounds or when < bounds["lt"])
                and ("lte" not in bounds or when <= bounds["lte"])
                and ("eq" not in due or day == due["eq"])
                and ("gt" not in due or (day is not None and day > due["gt"]))
                and ("lt" not in due or (day is not None and day < due["lt"]))
                and ("eq" not in amounts or amount == amounts["eq"])
                and ("gt" not in amounts or amount > amounts["gt"])
                and ("lt" not in amounts or amount < amounts["lt"])
                and (
                    "is_recurring" not in flags
                    or (inv["invoice_source"] == "subscription") == flags["is_recurring"]
                )
            )

        with self.lock:
            # Orb: "ordered starting from the most recently issued invoice date".
            items = sorted(
                (self._invoice_view(i) for i in self._invoices.values() if keep(i)),
                key=lambda i: (i["invoice_date"], int(i["id"].rsplit("_", 1)[1])),
                reverse=True,
            )
        if flags.get("include_zero_quantity_line_items") is False:
            for inv in items:
                inv["line_items"] = [li for li in inv["line_items"] if li["quantity"] != 0]
        cursor = one.get("cursor")
        if cursor is not None:
            ids = [i["id"] for i in items]
            if cursor not in ids:
                return validation_failed([f"cursor {cursor!r} is not a cursor this list gave"])
            items = items[ids.index(cursor) + 1 :]
        limit = int(raw_limit)
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

    def _http_invoice(self, invoice_id: str) -> _Outcome:
        inv = self.invoice(invoice_id)
        if inv is None:
            return resource_not_found(f"No invoice with id {invoice_id!r}")
        return _Outcome(200, inv)

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
        deprecation_filter: str | None = None,
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
        if deprecation_filter is not None:
            body["deprecation_filter"] = deprecation_filter
        self._tick()
        result = self._new_backfill(body)
        if isinstance(result, _Outcome):
            raise FakeOrbError(result.body["detail"])
        return result

    def grace_boundary(self) -> datetime:
        """Orb's event reporting grace boundary now: the stand-in's clock minus the grace
        period. Live ingest takes events from here on; a backfill without
        ``deprecation_filter`` must end at or before it."""
        return self.now() - timedelta(hours=self.grace_period_hours)

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
        replace = body.get("replace_existing_events", True)
        text = body.get("deprecation_filter")
        dep_filter: DeprecationFilter | None = None
        if text is not None:
            # Orb (backfills.py `create`, NewBackfill): the filter narrows which existing
            # events a *replacing* backfill deprecates. On a non-replacing backfill it
            # would deprecate nothing; Orb does not say what it does there (assumption).
            if not text.strip():
                return validation_failed(["deprecation_filter must not be empty"])
            if not replace:
                return validation_failed(
                    [
                        "deprecation_filter selects the existing events a replacing backfill "
                        "deprecates; it needs replace_existing_events true"
                    ]
                )
            try:
                dep_filter = DeprecationFilter.parse(text)
            except FilterSyntaxError:
                dep_filter = None  # stored; deprecates every event in scope (assumption)
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
        # Orb 4.90, backfills.py `create`: "When `deprecation_filter` is provided, the
        # timeframe may extend to `now` rather than the event reporting grace boundary."
        boundary = now - timedelta(hours=self.grace_period_hours)
        if text is None and end > boundary:
            return validation_failed(
                [
                    f"timeframe_end {fmt_time(end)} is past the event reporting grace boundary "
                    f"{fmt_time(boundary)} (now {fmt_time(now)} minus the grace period of "
                    f"{self.grace_period_hours:g} h): a backfill without deprecation_filter "
                    "must end at or before the grace boundary. End it there; newer events "
                    "are ingested live."
                ]
            )
        if text is not None and end > now:
            return validation_failed(
                [
                    f"timeframe_end {fmt_time(end)} is after now ({fmt_time(now)}): with "
                    "deprecation_filter a backfill's timeframe may extend to now, no further"
                ]
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
            refusal = self._backfill_conflict(start, end, scope)
            if refusal is not None:
                return refusal
            self._backfill_seq += 1
            bf_id = f"fake_bf_{self._backfill_seq}"
            close = close or now + BACKFILL_DEFAULT_CLOSE
            if text is not None and dep_filter is None:
                self.unevaluated_deprecation_filters += 1
            bf = {
                "id": bf_id,
                "status": "pending",
                "created_at": fmt_time(now),
                "timeframe_start": fmt_time(start),
                "timeframe_end": fmt_time(end),
                "close_time": fmt_time(close),
                "reverted_at": None,
                "customer_id": scope[0],
                "replace_existing_events": replace,
                "deprecation_filter": text,
                "_start": start,
                "_end": end,
                "_close": close,
                "_scope": scope,
                "_filter": dep_filter,
                "_events": {},
            }
            self._backfills[bf_id] = bf
            return self._backfill_view(bf)

    @staticmethod
    def _scope_text(bf: dict[str, Any]) -> str:
        scope = bf["_scope"]
        if scope == (None, None):
            return "account-wide"
        return f"scoped to external_customer_id {scope[1]!r}"

    def _backfill_conflict(
        self, start: datetime, end: datetime, scope: tuple[str | None, str | None]
    ) -> _Outcome | None:
        """The refusal of a new backfill that a pending one blocks (caller holds the lock).

        Orb 4.90 (backfills.py `create`): "A backfill may not overlap in timeframe with
        another backfill in a pending or pending_revert state for the same customer, or with
        any account-wide backfill in one of those states. Backfills scoped to different
        customers may have overlapping timeframes." With ``one_pending_backfill`` (Orb's
        support pages: a new backfill cannot be created while another is still being
        reflected), any pending or pending_revert backfill blocks any create.
        """
        for other in self._backfills.values():
            if other["status"] not in ("pending", "pending_revert"):
                continue
            where = (
                f"{other['timeframe_start']} to {other['timeframe_end']}, "
                f"{self._scope_text(other)}, status {other['status']}, "
                f"closes at {other['close_time']}"
            )
            if self.one_pending_backfill:
                return constraint_violation(
                    f"Backfill {other['id']} ({where}) is still pending: a new backfill cannot "
                    "be created while another is pending or being reflected (this stand-in "
                    "runs with one pending backfill per account). Close or revert "
                    f"{other['id']}, wait until it is reflected, then retry."
                )
            if not (start < other["_end"] and other["_start"] < end):
                continue
            account_wide = other["_scope"] == (None, None) or scope == (None, None)
            if account_wide or other["_scope"][0] == scope[0]:
                return constraint_violation(
                    f"The timeframe {fmt_time(start)} to {fmt_time(end)} overlaps backfill "
                    f"{other['id']} ({where}). Orb allows no backfill to overlap a pending or "
                    "pending_revert backfill of the same customer or an account-wide one: "
                    f"close or revert {other['id']}, or wait until it is reflected, then retry."
                )
        return None

    def _in_backfill(self, bf: dict[str, Any], ev: dict[str, Any]) -> bool:
        try:
            when = parse_event_timestamp(ev["timestamp"])
        except (ValueError, KeyError, TypeError):
            return False
        if not bf["_start"] <= when < bf["_end"]:
            return False
        return bf["_scope"] == (None, None) or self._same_customer(bf["_scope"], self._who(ev))

    def _deprecated_by(self, bf: dict[str, Any], ev: dict[str, Any]) -> bool:
        """Whether replacing backfill ``bf`` deprecates existing event ``ev``: in its
        timeframe and scope and, with a ``deprecation_filter``, matching it."""
        if not bf["replace_existing_events"] or not self._in_backfill(bf, ev):
            return False
        dep_filter = bf.get("_filter")
        if dep_filter is None:
            return True  # no filter, or one the stand-in cannot read (assumption A4)
        props = ev.get("properties")
        return dep_filter.matches(props if isinstance(props, dict) else {})

    def _reflect(self, bf: dict[str, Any]) -> None:
        """Close time reached: the backfill's events become Orb's (caller holds the lock)."""
        bf["status"] = "reflected"
        for rec in self._records:
            if rec.deprecated is None and self._deprecated_by(bf, rec.current):
                rec.deprecated = f"backfill:{bf['id']}"
        for ev in bf["_events"].values():
            already = bool(self._active(ev["idempotency_key"]))
            rec = self._hold(ev, bf["id"])
            if already:
                # Undocumented in Orb; the stand-in assumes the worst: a second billed copy.
                rec.double_billed = True
                self.double_billed += 1
            invoice = self._issued_invoice_for(ev)
            if invoice is not None:
                # Orb's support docs: a closed backfill updates draft invoices only; an
                # issued invoice keeps its values. Recorded so tests can see it happen.
                self._issued_period_events.append(
                    {
                        "backfill_id": bf["id"],
                        "idempotency_key": rec.key,
                        "timestamp": ev.get("timestamp"),
                        "invoice_id": invoice["id"],
                        "invoice_status": invoice["status"],
                        "external_customer_id": invoice["customer"]["external_customer_id"],
                    }
                )

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
        """Orb's request-level ``Idempotency-Key`` on POST/PATCH: a replay of the same
        request within 48 h gets the stored answer (``Idempotent-Replayed: true``); the
        same key on another request, or while the first still runs, gets a 409.

        Orb's idempotency page (docs.withorb.com/reference/idempotency) names POST and
        PATCH only; on PUT (amend, deprecate, customer update, which Orb's spec calls
        idempotent by design) and GET the header is ignored, although the official client
        sends one on every non-GET request (``_base_client.py``)."""
        key = req.headers.get("Idempotency-Key")
        if key is None or req.method not in IDEMPOTENT_METHODS:
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
            known = req.path.startswith(("/v1/events/", "/v1/customers/", _INVOICES))
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
        if path == _INVOICES and method == "GET":
            return self._http_list_invoices(req)
        if path.startswith(_INVOICES + "/") and method == "GET":
            inv_id = path[len(_INVOICES) + 1 :]
            if inv_id and "/" not in inv_id:
                return self._no_query(req) or self._http_invoice(unquote(inv_id))
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
                # stand-in's next request (or Python read), or reflection_delay_requests
                # requests later.
                bf["_close"] = now
                bf["close_time"] = fmt_time(now)
                bf["_closed_at_request"] = self._api_requests
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
            if route == ("GET", "/_fake/invoices"):
                return _Outcome(200, self.invoices())
            if route == ("POST", "/_fake/invoices"):
                data = _control_json(req)
                fields = {
                    "external_customer_id", "period_start", "period_end", "status",
                    "invoice_date", "amount", "currency", "quantity", "name",
                }
                if not isinstance(data, dict) or not set(data) <= fields or not {
                    "external_customer_id", "period_start", "period_end"
                } <= set(data):
                    raise ValueError(
                        'expected {"external_customer_id": ID, "period_start": ISO, '
                        '"period_end": ISO, "status": "issued", "invoice_date": ISO, "amount", '
                        '"currency", "quantity", "name"}'
                    )
                for name in ("period_start", "period_end", "invoice_date"):
                    if data.get(name) is not None:
                        data[name] = parse_when(data[name])
                return _Outcome(200, self.add_invoice(**data))
            if req.method == "POST" and route[1].startswith("/_fake/invoices/"):
                inv_id = unquote(route[1][len("/_fake/invoices/") :])
                data = _control_json(req)
                if not isinstance(data, dict) or set(data) != {"status"}:
                    raise ValueError('expected {"status": "draft|issued|paid|synced|void"}')
                try:
                    return _Outcome(200, self.set_invoice_status(inv_id, data["status"]))
                except KeyError:
                    return _Outcome(404, {"ok": False, "error": f"no invoice {inv_id!r}"})
            if route == ("GET", "/_fake/issued_period_events"):
                return _Outcome(200, self.issued_period_events())
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            return _Outcome(400, {"ok": False, "error": str(exc)})
        return None

    def _clock_view(self) -> dict[str, Any]:
        with self.lock:
            return {"now": fmt_time(self.now()), "frozen": self._fixed_now is not None}


def parse_when(value: Any) -> datetime:
    """An RFC 3339 date-time, or a bare ``YYYY-MM-DD`` (midnight UTC), for set-up input
    (CLI flags and control routes; Orb's own routes take date-times only)."""
    if isinstance(value, str) and _DATE_RE.match(value):
        return parse_datetime(value + "T00:00:00Z")
    return parse_datetime(value)


def _control_json(req: _Request) -> Any:
    return json.loads((req.body or b"null").decode("utf-8") or "null")
