"""Backfills for the stand-in Orb: ``POST``/``GET /v1/events/backfills``,
``GET …/{id}``, ``POST …/{id}/close`` and ``…/revert``, the backfill side of
``POST /v1/ingest?backfill_id=``, and the clock reflecting them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from fake_orb.common import (
    FakeOrbError,
    _Outcome,
    _Request,
    constraint_violation,
    cursor_page,
    fmt_time,
    parse_datetime,
    parse_event_timestamp,
    resource_not_found,
    schema_errors,
    validation_failed,
)
from fake_orb.deprecation_filter import DeprecationFilter, FilterSyntaxError
from fake_orb.invoices import Invoices
from fake_orb.store import _aware

#: Orb: "By default, Orb allows backfills up to 31 days in duration at a time."
BACKFILL_MAX = timedelta(days=31)
#: Orb: a backfill's close_time defaults to 1 day after its creation.
BACKFILL_DEFAULT_CLOSE = timedelta(days=1)
_BACKFILLS = "/v1/events/backfills"


class Backfills(Invoices):
    """Backfills: create, list, fetch, close, revert, ingest into, reflect."""

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
        read = self._read_new_backfill(body)
        if isinstance(read, _Outcome):
            return read
        start, end, close, text, dep_filter = read
        now = self.now()
        refusal = self._timeframe_refusal(body, start, end, close, now)
        if refusal is not None:
            return refusal
        with self.lock:
            scope = self._backfill_scope(body.get("customer_id"), body.get("external_customer_id"))
            if isinstance(scope, _Outcome):
                return scope
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
                "replace_existing_events": body.get("replace_existing_events", True),
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
    def _read_new_backfill(
        body: Any,
    ) -> (
        tuple[datetime, datetime, datetime | None, str | None, DeprecationFilter | None]
        | _Outcome
    ):
        """A ``NewBackfill`` body read: (start, end, close_time or None, deprecation_filter
        text, the filter parsed or None), or the 400 that refuses it."""
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
        return start, end, close, text, dep_filter

    def _timeframe_refusal(
        self, body: Any, start: datetime, end: datetime, close: datetime | None, now: datetime
    ) -> _Outcome | None:
        """Orb's rules on a new backfill's timeframe, close time and customer fields."""
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
        if body.get("customer_id") is not None and body.get("external_customer_id") is not None:
            return validation_failed(
                ["give at most one of customer_id and external_customer_id, not both"]
            )
        if close is not None and close <= now:
            return validation_failed(
                [f"close_time {body['close_time']} is not in the future ({fmt_time(now)})"]
            )
        # Orb 4.90, backfills.py `create`: "When `deprecation_filter` is provided, the
        # timeframe may extend to `now` rather than the event reporting grace boundary."
        text = body.get("deprecation_filter")
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
        return None

    def _backfill_scope(self, cid: Any, ext: Any) -> tuple[str | None, str | None] | _Outcome:
        """(Orb id, external id) of the customer a backfill is scoped to ((None, None):
        account-wide), or the 404 for an unknown one (caller holds the lock)."""
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
        return scope

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
        return cursor_page(items, query.get("cursor", [None])[0], limit)

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
