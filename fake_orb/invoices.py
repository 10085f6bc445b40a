"""Seeded invoices for the stand-in Orb: ``GET /v1/invoices`` and
``GET /v1/invoices/{invoice_id}``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from fake_orb.common import (
    _DATE_RE,
    _Outcome,
    _Request,
    cursor_page,
    fmt_time,
    parse_datetime,
    parse_event_timestamp,
    resource_not_found,
    validation_failed,
)
from fake_orb.customers import Customers
from fake_orb.store import _aware

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
_INVOICES = "/v1/invoices"


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


def _line_item(
    n: int, *, name: str, amount: str, quantity: float, start: datetime, end: datetime,
    currency: str, created: str,
) -> dict[str, Any]:
    """The one line item of a seeded invoice, carrying its service period."""
    return {
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


def _invoice(
    n: int, cust: dict[str, Any], *, status: str, when: datetime, created: str,
    currency: str, amount: str, line_item: dict[str, Any],
) -> dict[str, Any]:
    """A seeded ``Invoice`` (spec ``components.schemas.Invoice``), before its status
    fields are set."""
    return {
        "id": f"fake_inv_{n}",
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
        "line_items": [line_item],
    }


@dataclass
class _InvoiceFilter:
    """The filters of a ``GET /v1/invoices`` query (checked by :meth:`parse`)."""

    one: dict[str, str]  # each parameter but status[], given once
    statuses: list[str]
    raw_limit: str
    bounds: dict[str, datetime]
    due: dict[str, str]
    amounts: dict[str, float]
    flags: dict[str, bool]

    @classmethod
    def parse(cls, query: dict[str, list[str]]) -> _InvoiceFilter | list[str]:
        """The filters, or every way the query is malformed."""
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
            return errors
        return cls(one, statuses, raw_limit, bounds, due, amounts, flags)

    def keep(self, inv: dict[str, Any]) -> bool:
        """Whether ``inv`` passes every filter of the query."""
        when = parse_datetime(inv["invoice_date"])
        day = inv["due_date"][:10] if inv["due_date"] else None
        amount = float(inv["amount_due"])
        return (
            inv["status"] in self.statuses
            and self.one.get("customer_id", inv["customer"]["id"]) == inv["customer"]["id"]
            and self.one.get("external_customer_id", inv["customer"]["external_customer_id"])
            == inv["customer"]["external_customer_id"]
            and ("subscription_id" not in self.one or (inv["subscription"] or {}).get("id")
                 == self.one["subscription_id"])
            and ("gte" not in self.bounds or when >= self.bounds["gte"])
            and ("gt" not in self.bounds or when > self.bounds["gt"])
            and ("lt" not in self.bounds or when < self.bounds["lt"])
            and ("lte" not in self.bounds or when <= self.bounds["lte"])
            and ("eq" not in self.due or day == self.due["eq"])
            and ("gt" not in self.due or (day is not None and day > self.due["gt"]))
            and ("lt" not in self.due or (day is not None and day < self.due["lt"]))
            and ("eq" not in self.amounts or amount == self.amounts["eq"])
            and ("gt" not in self.amounts or amount > self.amounts["gt"])
            and ("lt" not in self.amounts or amount < self.amounts["lt"])
            and (
                "is_recurring" not in self.flags
                or (inv["invoice_source"] == "subscription") == self.flags["is_recurring"]
            )
        )


class Invoices(Customers):
    """Invoices seeded with :meth:`add_invoice` and the routes that read them."""

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
            item = _line_item(
                n, name=name, amount=amount, quantity=quantity, start=start, end=end,
                currency=currency, created=created,
            )
            self._invoices[inv_id] = _invoice(
                n, cust, status=status, when=when, created=created, currency=currency,
                amount=amount, line_item=item,
            )
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
        found = _InvoiceFilter.parse(query)
        if isinstance(found, list):
            return validation_failed(found)
        keep, one, raw_limit, flags = found.keep, found.one, found.raw_limit, found.flags
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
        return cursor_page(items, one.get("cursor"), int(raw_limit))

    def _http_invoice(self, invoice_id: str) -> _Outcome:
        inv = self.invoice(invoice_id)
        if inv is None:
            return resource_not_found(f"No invoice with id {invoice_id!r}")
        return _Outcome(200, inv)
