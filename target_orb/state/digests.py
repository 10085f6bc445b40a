"""What Orb holds for a key, and the digest that compares two bodies; pure.

Shared by the corrections feature (the ledger of amended keys) and the backfill feature
(the keys it delivered), through the store in `state/ledger.py`.
"""

from __future__ import annotations

import decimal
import hashlib
import typing as t
from dataclasses import dataclass

from target_orb import jsonutil

OrbEvent = dict[str, t.Any]


CUSTOMER_KEYS = ("customer_id", "external_customer_id")


@dataclass(frozen=True, slots=True)
class Known:
    """What Orb holds for a key, as far as target-orb can tell.

    From the ledger (what Orb acknowledged to target-orb) or from Orb's search.
    """

    body: OrbEvent | None  # AmendedEvent fields; None when only the digest is known
    digest: str | None  # digest of the body Orb holds; None when unknown (only attempted)
    amended: bool = False
    deprecated: bool = False
    pending_op: str | None = None  # a write was sent and its answer never recorded
    pending_digest: str | None = None
    source: t.Literal["ledger", "search"] = "ledger"

    @property
    def confirmed(self) -> bool:
        """Orb acknowledged a body or a deprecation for this key."""
        return self.digest is not None or self.deprecated


def _canonical_value(value: t.Any) -> t.Any:
    """Numbers compare by value (5, 5.0 and Decimal("5.00") are equal), strings stay strings."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float, decimal.Decimal)):
        try:
            number = decimal.Decimal(str(value) if isinstance(value, float) else value)
            return {"n": format(number.normalize(), "f")}
        except (decimal.InvalidOperation, ValueError):
            return {"n": str(value)}
    if isinstance(value, t.Mapping):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v) for v in value]
    return value


def amendment_body(event: t.Mapping[str, t.Any]) -> OrbEvent:
    """The AmendedEvent fields of an event: exactly event_name, timestamp, properties and one
    customer field (Orb refuses an `idempotency_key` in an amendment: orb-billing
    resources/events/events.py, `update`).

    Args:
        event: A mapped Orb event, or Orb's stored event from search.

    Returns:
        The body to PUT, also what the ledger digests.
    """
    body: OrbEvent = {
        "event_name": event.get("event_name"),
        "timestamp": event.get("timestamp"),
        "properties": event.get("properties") or {},
    }
    for key in CUSTOMER_KEYS:
        value = event.get(key)
        if value not in (None, ""):
            body[key] = value
            break
    return body


def body_digest(body: t.Mapping[str, t.Any]) -> str:
    """sha256 of the canonical AmendedEvent body (key order and number spelling ignored).

    Args:
        body: AmendedEvent fields (`amendment_body`).

    Returns:
        64 hex characters.
    """
    canonical = _canonical_value(amendment_body(body))
    return hashlib.sha256(jsonutil.dumps_sorted(canonical)).hexdigest()
