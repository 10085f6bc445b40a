"""Issued invoices: which customers' periods Orb will no longer change (`issued_period_policy`)."""

from __future__ import annotations

import datetime
import typing as t
from dataclasses import dataclass

from target_orb.backfill.windows import Window, instant

INVOICES_PATH = "/invoices"
# Invoices Orb will not change (GET /v1/invoices lists these by default: orb-billing 4.90
# `invoices.py`, list: "By default, this only returns invoices that are `issued`, `paid`,
# or `synced`"; a `draft` is updated by a closed backfill, a `void` bills nothing).
ISSUED_STATUSES = ("issued", "paid", "synced")


@dataclass(frozen=True, slots=True)
class IssuedPeriod:
    """A service period of one customer that an issued invoice already billed."""

    invoice: str  # for messages: `inv_… (number …, status issued)`
    start: datetime.datetime
    end: datetime.datetime


IssuedIndex = dict[str, list[IssuedPeriod]]
"""Customer (`ext:<external_customer_id>` or `id:<customer_id>`) → issued periods."""


def customer_keys(event: t.Mapping[str, t.Any]) -> tuple[str, ...]:
    """An event's (or an invoice customer's) keys into an `IssuedIndex`."""
    keys = []
    if event.get("external_customer_id") not in (None, ""):
        keys.append(f"ext:{event['external_customer_id']}")
    if event.get("customer_id") not in (None, ""):
        keys.append(f"id:{event['customer_id']}")
    if event.get("id") not in (None, "") and "customer_id" not in event:
        keys.append(f"id:{event['id']}")  # an invoice's `customer` object
    return tuple(keys)


def issued_periods(invoices: t.Iterable[t.Any], window: Window) -> IssuedIndex:
    """Which customers' periods overlapping `window` Orb has already invoiced.

    Args:
        invoices: Orb `Invoice` objects (GET /v1/invoices `data`), any status.
        window: The backfill window.

    Returns:
        Customer key → the line items' service periods (`start_date`..`end_date`) that
        overlap the window, from invoices in `ISSUED_STATUSES`.
    """
    index: IssuedIndex = {}
    for invoice in invoices:
        if not isinstance(invoice, dict) or invoice.get("status") not in ISSUED_STATUSES:
            continue
        customer = invoice.get("customer")
        if not isinstance(customer, dict):
            continue
        label = f"{invoice.get('id')}"
        if invoice.get("invoice_number"):
            label += f" (number {invoice['invoice_number']}, {invoice.get('status')})"
        else:
            label += f" ({invoice.get('status')})"
        periods: list[IssuedPeriod] = []
        items = invoice.get("line_items")
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            start, end = instant(item.get("start_date")), instant(item.get("end_date"))
            if start is None or end is None or not window.overlaps(start, end):
                continue
            if not any(p.start == start and p.end == end for p in periods):
                periods.append(IssuedPeriod(label, start, end))
        for key in customer_keys(customer) if periods else ():
            index.setdefault(key, []).extend(periods)
    return index


def issued_period_of(index: IssuedIndex, event: t.Mapping[str, t.Any]) -> IssuedPeriod | None:
    """The issued period holding `event` (its customer and timestamp), if any."""
    if not index:
        return None
    when = instant(event.get("timestamp"))
    if when is None:
        return None
    for key in customer_keys(event):
        for period in index.get(key, ()):
            if period.start <= when < period.end:
                return period
    return None
