"""Routing of every authorised Orb API request besides ping and ingest."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from fake_orb.backfills import _BACKFILLS, Backfills
from fake_orb.common import (
    _Outcome,
    _Request,
    error_body,
    url_not_found,
    validation_failed,
)
from fake_orb.corrections import Corrections
from fake_orb.idempotency import Idempotency
from fake_orb.invoices import _INVOICES
from fake_orb.search import Search

_CUSTOMERS_PREFIX = "/v1/customers/external_customer_id/"
_EVENTS_PREFIX = "/v1/events/"


class OrbResources(Backfills, Corrections, Search, Idempotency):
    """Every Orb resource beyond ingest, and the router that reaches them."""

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
