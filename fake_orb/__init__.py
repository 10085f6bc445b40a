"""A strict, local stand-in for Orb's API: ingest, search, backfills, customers,
amend and deprecate, invoices.

It is meant for tests, benchmarks and manual runs of ``target-orb`` (or of any Orb
client, Orb's own ``orb-billing`` included) without a real Orb account. It validates
requests *independently* of the target: it imports only the standard library,
``jsonschema`` and its own modules, never a ``target_orb`` module (a package of its own in
the ``target-orb`` distribution), so a bug in the target's own payload code cannot hide
behind a shared helper. It refuses what Orb does not document.

What it serves (every route but ping needs ``Authorization: Bearer <api_key>``):

- ``GET /v1/ping``.
- ``POST /v1/ingest[?backfill_id=]``, checked in this order:

  1. ``Authorization`` (401 ``401-authentication-error``).
  2. A scripted fault, if one is queued (see :meth:`FakeOrb.script`).
  3. Body size against ``max_body_bytes`` (413 ``413-request-too-large``).
  4. Query parameters (only ``backfill_id`` is allowed), ``Content-Type``
     (``application/json``), and JSON syntax (400).
  5. ``backfill_id``: unknown 404 ``resource-not-found``, not pending 400.
  6. At most ``max_events_per_request`` events (400, whole request).
  7. The persistent ``set_413_if_events_over`` rule (413).
  8. Unless ``accept_all``: the vendored ``IngestRequestBody`` schema (Draft
     2020-12, ``date-time`` format checked), then the rules Orb's spec states only
     in prose: exactly one non-empty customer field, flat ``properties`` (string,
     boolean, int64, finite float), a UTC timestamp (trailing ``Z`` or ``+00:00``;
     other offsets refused) inside ``[now - grace period, now + future tolerance]``
     (a backfill drops the grace rule but must hold the event's timestamp in its
     timeframe and its customer in its scope), non-empty ``idempotency_key`` and
     ``event_name``, a key that was never deprecated, and no two events in one
     request sharing a key with different bodies (the whole request is rejected).
  9. The persistent ``set_bad_keys`` rule (400 naming those keys).

  Accepted live events are stored per idempotency key; the first body ever stored
  for a key wins and later sends of that key are counted as duplicates.
- ``POST /v1/events/search`` (``EventSearchCriteria``): 1-500 case-sensitive ids,
  timeframe default the last 7 days, end exclusive; never finds amended events.
- ``POST``/``GET /v1/events/backfills``, ``GET …/{id}``, ``POST …/{id}/close``,
  ``POST …/{id}/revert``: at most 31 days; ``timeframe_end`` at or before the grace
  boundary (now - grace period) at create time, or at or before now with a
  ``deprecation_filter`` (which needs a replacing backfill, narrows what it deprecates,
  and deprecates matching events that arrive later); no overlap with a pending or
  pending_revert backfill of the same customer or an account-wide one (backfills of
  different customers may overlap), or, with ``one_pending_backfill``, no create at all
  while any backfill is pending; ``replace_existing_events`` default true,
  ``close_time`` default creation + 1 day; events invisible until closed (reflection
  happens by the next request, or ``reflection_delay_requests`` requests later) or until
  the clock passes ``close_time``; a non-replacing backfill re-adding a key Orb already
  holds bills it twice (``stats()["double_billed"]``); events it brings into a period
  whose invoice is issued, paid or synced are recorded
  (``stats()["events_in_issued_periods"]``, :meth:`FakeOrb.issued_period_events`).
- ``GET``/``PUT /v1/customers/external_customer_id/{id}`` for seeded customers
  (``EditCustomer``; metadata ``"key": null`` deletes, ``"metadata": null`` clears).
- ``PUT /v1/events/{id}`` (amend, ``AmendedEvent``) and ``PUT /v1/events/{id}/deprecate``:
  same timestamp and customer, an existing customer, an open billing period (the
  calendar month, or ``set_billing_period``; the previous one during the grace
  period), at most ``amend_cap`` events per customer per 100 days.
- ``GET /v1/invoices`` (``status[]`` default issued/paid/synced, customer, invoice-date
  and amount filters, ``limit`` 1-100 default 20, ``cursor``; newest invoice date first)
  and ``GET /v1/invoices/{id}`` for invoices seeded with :meth:`FakeOrb.add_invoice`,
  ``--invoice`` or ``POST /_fake/invoices``.
- ``Idempotency-Key`` on every POST/PATCH (ignored on PUT and GET): a replay within
  48 h gets the stored answer with ``Idempotent-Replayed: true``; another request under
  the same key gets a 409. Every 5xx carries ``Transient-Error: true``.
- Optional fixed-window rate limits (:class:`RateLimit`): ingest events and requests,
  writes (every other POST/PUT/PATCH/DELETE) and reads (GET); 429 without
  ``Retry-After``.

Each rule, the Orb document it comes from and the test that exercises it are listed in
``RULES.md`` in this package, with the assumptions the stand-in makes where
Orb's documents are silent.

Every time rule reads the stand-in's clock: :meth:`FakeOrb.set_now`,
:meth:`FakeOrb.advance`, ``POST /_fake/clock`` or ``--now``. The control API under
``/_fake/`` (no key) reads back events, requests, stats, customers, customer updates,
backfills, corrections, invoices and events in issued periods, and sets faults, the
clock, billing periods, invoices and the rules (``/_fake/settings``).

Run it from a shell with ``python -m fake_orb --help`` (or the
``fake-orb`` console script); ``fake-orb -- COMMAND ...`` runs COMMAND against a
fresh stand-in with ``TARGET_ORB_API_URL`` / ``TARGET_ORB_API_KEY`` set and
prints what landed, the backfills, the corrected events and the customers.

The package: ``core`` (:class:`FakeOrb`: lifecycle, rules, request dispatch), ``server``
(HTTP plumbing), ``ingest`` (``POST /v1/ingest`` and scripted faults), ``store`` (clock,
the events Orb holds), ``backfills``, ``search``, ``customers``, ``invoices``,
``corrections`` (amend/deprecate), ``idempotency``, ``routes`` (the resource router),
``control`` (``/_fake/``), ``ratelimit``, ``deprecation_filter``, ``common`` (error bodies,
records, time rules, the vendored schemas in ``data/``) and ``cli`` (``fake-orb``).
"""

from __future__ import annotations

from fake_orb.cli import main
from fake_orb.common import (
    ERROR_TYPE_BASE,
    INT64_MAX,
    INT64_MIN,
    FakeOrbError,
    _Outcome,
    error_body,
    format_checker,
    load_schema,
    parse_when,
)
from fake_orb.core import FakeOrb
from fake_orb.ingest import _normalize_fault
from fake_orb.ratelimit import RateLimit

__all__ = [
    "ERROR_TYPE_BASE",
    "INT64_MAX",
    "INT64_MIN",
    "FakeOrb",
    "FakeOrbError",
    "RateLimit",
    "_Outcome",
    "_normalize_fault",
    "error_body",
    "format_checker",
    "load_schema",
    "main",
    "parse_when",
]
