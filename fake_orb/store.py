"""The stand-in Orb's state: clock, the events Orb holds, who an event belongs to, and
the request-body helpers every resource route shares."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fake_orb.common import (
    _Outcome,
    _Parsed,
    _Request,
    validation_failed,
)

if TYPE_CHECKING:
    from fake_orb.idempotency import _IdempotencyEntry


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


def _non_negative_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def _aware(when: datetime, what: str) -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {when!r}")
    return when.astimezone(timezone.utc)


class EventStore:
    """Clock, event store and customer identity; the base of every resource mixin."""

    # Provided by FakeOrb.
    lock: threading.RLock
    clock: Callable[[], datetime]
    grace_period_hours: float
    future_tolerance_seconds: float
    landed: dict[str, dict[str, Any]]
    duplicates: int

    if TYPE_CHECKING:  # provided by the mixins built on this one

        def _tick(self, *, api_request: bool = False) -> None: ...  # backfills.Backfills

        def _deprecated_by(self, bf: dict[str, Any], ev: dict[str, Any]) -> bool: ...  # ditto

        def _parse(self, req: _Request) -> _Parsed: ...  # ingest.Ingest

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
        parsed = self._parse(req)  # Ingest._parse
        if parsed.error is not None:
            return None, validation_failed([parsed.error])
        return parsed.body, None

    def _no_query(self, req: _Request) -> _Outcome | None:
        if req.query:
            names = sorted(parse_qs(req.query, keep_blank_values=True))
            return validation_failed([f"unknown query parameter(s): {', '.join(names)}"])
        return None
