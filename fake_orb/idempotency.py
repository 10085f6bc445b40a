"""Orb's request-level ``Idempotency-Key`` header for the stand-in Orb."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fake_orb.common import (
    _Outcome,
    _Request,
    error_body,
    validation_failed,
)
from fake_orb.store import EventStore

#: Orb keeps a request-level Idempotency-Key for 48 hours (docs.withorb.com/reference/idempotency).
IDEMPOTENCY_WINDOW = timedelta(hours=48)
IDEMPOTENCY_KEY_MAX = 64
#: The methods whose Idempotency-Key Orb honours (docs.withorb.com/reference/idempotency).
IDEMPOTENT_METHODS = ("POST", "PATCH")


@dataclass
class _IdempotencyEntry:
    fingerprint: str
    at: datetime
    what: str
    outcome: _Outcome | None = None  # None while the first request is still running


def _fingerprint(req: _Request) -> str:
    """What makes two requests under one key the same request: method, path, query, body."""
    digest = hashlib.sha256()
    for part in (req.method, req.path, req.query):
        digest.update(part.encode("utf-8") + b"\0")
    digest.update(req.body if req.body is not None else f"<{req.body_len}>".encode())
    return digest.hexdigest()


def _replay(
    key: str, entry: _IdempotencyEntry, fingerprint: str, record: dict[str, Any]
) -> _Outcome:
    """The answer to a request under a key already in use (caller holds the lock): the
    stored answer replayed, or a 409 (another request, or the first still running)."""
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


def _storable(outcome: _Outcome, record: dict[str, Any]) -> bool:
    """Whether an answer is kept for replays: a final, non-transient answer, no fault."""
    return (
        outcome.action is None
        and outcome.status is not None
        and outcome.status < 500
        and outcome.status not in (408, 409, 429)
        and record.get("fault") is None
    )


class Idempotency(EventStore):
    """Replays of a POST/PATCH under the same ``Idempotency-Key`` within 48 h."""

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
        fingerprint = _fingerprint(req)
        now = self.now()
        what = f"{req.method} {req.path}"
        with self.lock:
            for k in [k for k, e in self._idempotency.items() if now - e.at >= IDEMPOTENCY_WINDOW]:
                del self._idempotency[k]
            entry = self._idempotency.get(key)
            if entry is not None:
                return _replay(key, entry, fingerprint, record)
            entry = _IdempotencyEntry(fingerprint, now, what)
            self._idempotency[key] = entry
        try:
            outcome = handler(req, record)
        except BaseException:
            with self.lock:
                self._idempotency.pop(key, None)
            raise
        with self.lock:
            if _storable(outcome, record):
                entry.outcome = outcome
            else:
                self._idempotency.pop(key, None)
        return outcome
