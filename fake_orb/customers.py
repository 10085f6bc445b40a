"""Customers for the stand-in Orb: seeding, ``GET``/``PUT
/v1/customers/external_customer_id/{id}`` and billing periods."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from fake_orb.common import (
    _Outcome,
    _Request,
    constraint_violation,
    fmt_time,
    resource_not_found,
    schema_errors,
    validation_failed,
)
from fake_orb.store import EventStore, _aware


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


class Customers(EventStore):
    """Seeded customers, their metadata updates and billing periods."""

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
