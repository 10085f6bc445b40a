"""The stand-in Orb's control API under ``/_fake/`` (no key): read back what it
received, set faults, the clock, customers, billing periods, invoices and rules."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from fake_orb.common import (
    _Outcome,
    _Request,
    error_body,
    fmt_time,
    parse_datetime,
    parse_when,
)
from fake_orb.ratelimit import RateLimit

if TYPE_CHECKING:
    from fake_orb.core import FakeOrb


def _control_response(status: int, body: Any) -> _Outcome:
    return _Outcome(status, body)


def fake_control(fake: FakeOrb, req: _Request) -> _Outcome:
    route = (req.method, req.path.rstrip("/"))
    resource = _resource_control(fake, req)
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
        return _post_settings(fake, req)
    if route == ("POST", "/_fake/reset"):
        fake.reset()
        return _control_response(200, {"ok": True})
    if req.method == "POST" and route[1] in (
        "/_fake/script",
        "/_fake/bad_keys",
        "/_fake/413_if_events_over",
    ):
        return _post_rule(fake, req, route[1])
    return _control_response(
        404, error_body(404, detail=f"No control route {req.method} {req.path}")
    )


def _post_settings(fake: FakeOrb, req: _Request) -> _Outcome:
    """``POST /_fake/settings``: change the rules of the running stand-in."""
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


def _post_rule(fake: FakeOrb, req: _Request, path: str) -> _Outcome:
    """``POST /_fake/script``, ``/_fake/bad_keys`` or ``/_fake/413_if_events_over``."""
    try:
        data = json.loads((req.body or b"null").decode("utf-8") or "null")
        if path == "/_fake/script":
            faults = data if isinstance(data, list) else [data]
            fake.script(*faults)
            return _control_response(200, {"ok": True, "pending": fake.pending_faults})
        if path == "/_fake/bad_keys":
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object of key -> reason")
            fake.set_bad_keys(data)
            return _control_response(200, {"ok": True, "bad_keys": sorted(data)})
        n = data.get("n") if isinstance(data, dict) else data
        fake.set_413_if_events_over(n)
        return _control_response(200, {"ok": True, "n": n})
    except (ValueError, UnicodeDecodeError) as exc:
        return _control_response(400, {"ok": False, "error": str(exc)})


def _resource_control(fake: FakeOrb, req: _Request) -> _Outcome | None:
    """``/_fake/`` routes for the clock, customers, backfills and corrections
    (None: not one of these)."""
    route = (req.method, req.path.rstrip("/"))
    try:
        outcome = _clock_and_customer_routes(fake, req, route)
        if outcome is None:
            outcome = _backfill_and_invoice_routes(fake, req, route)
        return outcome
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        return _Outcome(400, {"ok": False, "error": str(exc)})


def _clock_and_customer_routes(
    fake: FakeOrb, req: _Request, route: tuple[str, str]
) -> _Outcome | None:
    """The clock, customers, customer updates and billing periods (raises ValueError)."""
    if route == ("GET", "/_fake/clock"):
        return _Outcome(200, _clock_view(fake))
    if route == ("POST", "/_fake/clock"):
        data = _control_json(req)
        if not isinstance(data, dict) or not set(data) <= {"now", "advance_seconds"}:
            raise ValueError('expected {"now": ISO or null} and/or {"advance_seconds": n}')
        if "now" in data:
            now = data["now"]
            fake.set_now(None if now is None else parse_datetime(now))
        if "advance_seconds" in data:
            fake.advance(data["advance_seconds"])
        fake._tick()
        return _Outcome(200, _clock_view(fake))
    if route == ("GET", "/_fake/customers"):
        return _Outcome(200, fake.customers())
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
        return _Outcome(200, fake.add_customer(**data))
    if req.method == "GET" and route[1].startswith("/_fake/customers/"):
        ext = unquote(route[1][len("/_fake/customers/") :])
        cust = fake.customer(ext)
        if cust is None:
            return _Outcome(404, {"ok": False, "error": f"no customer {ext!r}"})
        return _Outcome(200, cust)
    if route == ("GET", "/_fake/customer_updates"):
        return _Outcome(200, fake.customer_updates())
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
        fake.set_billing_period(data["external_customer_id"], start, end)
        return _Outcome(200, {"ok": True})
    return None


def _backfill_and_invoice_routes(
    fake: FakeOrb, req: _Request, route: tuple[str, str]
) -> _Outcome | None:
    """Backfills, corrections, invoices and events in issued periods (raises ValueError)."""
    if route == ("GET", "/_fake/backfills"):
        return _Outcome(
            200,
            [{**bf, "events": fake.backfill_events(bf["id"])} for bf in fake.backfills()],
        )
    if route == ("POST", "/_fake/backfills"):
        data = _control_json(req)
        if not isinstance(data, dict):
            raise ValueError("expected a NewBackfill JSON object")
        return _Outcome(200, fake.create_backfill(**data))
    if route == ("GET", "/_fake/corrections"):
        return _Outcome(200, fake.corrections())
    if route == ("GET", "/_fake/invoices"):
        return _Outcome(200, fake.invoices())
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
        return _Outcome(200, fake.add_invoice(**data))
    if req.method == "POST" and route[1].startswith("/_fake/invoices/"):
        inv_id = unquote(route[1][len("/_fake/invoices/") :])
        data = _control_json(req)
        if not isinstance(data, dict) or set(data) != {"status"}:
            raise ValueError('expected {"status": "draft|issued|paid|synced|void"}')
        try:
            return _Outcome(200, fake.set_invoice_status(inv_id, data["status"]))
        except KeyError:
            return _Outcome(404, {"ok": False, "error": f"no invoice {inv_id!r}"})
    if route == ("GET", "/_fake/issued_period_events"):
        return _Outcome(200, fake.issued_period_events())
    return None


def _clock_view(fake: FakeOrb) -> dict[str, Any]:
    with fake.lock:
        return {"now": fmt_time(fake.now()), "frozen": fake._fixed_now is not None}


def _control_json(req: _Request) -> Any:
    return json.loads((req.body or b"null").decode("utf-8") or "null")
