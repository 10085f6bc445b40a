"""Event corrections for the stand-in Orb: ``PUT /v1/events/{event_id}`` (amend) and
``PUT /v1/events/{event_id}/deprecate``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fake_orb.common import (
    _Outcome,
    _property_problem,
    _Request,
    constraint_violation,
    parse_event_timestamp,
    resource_not_found,
    schema_errors,
    validation_failed,
)
from fake_orb.customers import Customers
from fake_orb.store import _Record

#: Orb: at most 100 events amended per customer in a 100-day period (by default).
AMEND_WINDOW = timedelta(days=100)


class Corrections(Customers):
    """Amend and deprecate: same timestamp and customer, an open billing period, a cap."""

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
