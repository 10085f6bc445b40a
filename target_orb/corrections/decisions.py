"""Pure decisions for `load_method: upsert`: what to do with each key, and what Orb's refusals mean.

No I/O here: callers pass what the ledger knows, what Orb's search found and the current
time. The I/O (ledger, search, ingest, amend, deprecate) is in corrections/upsert.py and batch.py.

Orb's rules for corrections (orb-billing resources/events/events.py, `update` and `deprecate`):
an amendment (`PUT /v1/events/{id}`) keeps the key, timestamp and customer of the stored event
and replaces its body; a deprecation (`PUT /v1/events/{id}/deprecate`) stops it counting. Both
need an existing customer, a timestamp in the customer's current billing period (or the
previous period's grace), and at most 100 corrections per customer per 100 days by default.
Search finds only events that were never amended, so the ledger is what remembers amended keys.
"""

from __future__ import annotations

import enum
import typing as t
from dataclasses import dataclass

from target_orb.mapping.timestamps import TimestampError, parse_and_format
from target_orb.orb.answers import orb_error_summary
from target_orb.state.digests import CUSTOMER_KEYS, Known, OrbEvent, body_digest


class Action(enum.Enum):
    """What happens to one key."""

    INGEST = "ingest"  # Orb does not hold it: a new event
    UNCHANGED = "unchanged"  # Orb holds an equal body: nothing is sent
    AMEND = "amend"  # Orb holds a different body: PUT /events/{key}
    AMEND_OR_INGEST = "amend_or_ingest"  # an unconfirmed ingest: amend, or ingest if Orb has none
    DEPRECATE = "deprecate"  # a deleted row Orb (may) hold: PUT /events/{key}/deprecate
    ALREADY_DEPRECATED = "already_deprecated"  # a deleted row Orb already ignores
    DEPRECATED_IN_ORB = "deprecated_in_orb"  # a live row whose event Orb deprecated: refused


@dataclass(frozen=True, slots=True)
class Decision:
    """The action for one key and, for a refusal, why."""

    action: Action
    reason: str = ""


# -- bodies and digests ----------------------------------------------------------------


def normalize_timestamp(value: t.Any) -> t.Any:
    """Orb's timestamp text in target-orb's format, so search results compare with events."""
    try:
        return parse_and_format(value)[1]
    except (TimestampError, TypeError, ValueError):
        return value


def orb_body(found: t.Mapping[str, t.Any], customer_key: str) -> OrbEvent:
    """Orb's search `Event` as the AmendedEvent fields target-orb would send for it.

    Orb returns both customer fields; keep the one target-orb is configured to send.

    Args:
        found: One item of the search response's `data`.
        customer_key: `external_customer_id` or `customer_id` (the mapping spec's).

    Returns:
        The comparable body.
    """
    body: OrbEvent = {
        "event_name": found.get("event_name"),
        "timestamp": normalize_timestamp(found.get("timestamp")),
        "properties": found.get("properties") or {},
    }
    value = found.get(customer_key)
    if value in (None, ""):
        other = CUSTOMER_KEYS[1 - CUSTOMER_KEYS.index(customer_key)]
        if found.get(other) not in (None, ""):
            body[other] = found.get(other)
    else:
        body[customer_key] = value
    return body


def customer_of(body: t.Mapping[str, t.Any] | None) -> tuple[str, str] | None:
    """(field, id) of a body's customer, or None."""
    if not body:
        return None
    for key in CUSTOMER_KEYS:
        if body.get(key) not in (None, ""):
            return key, str(body[key])
    return None


# -- the decision ------------------------------------------------------------------------


def decide(
    new_body: OrbEvent | None,
    *,
    deleted: bool,
    known: Known | None,
) -> Decision:
    """What to do with one key under `upsert` (deletes only reach here when allowed).

    Args:
        new_body: What the source says now (AmendedEvent fields), or None for a deleted
            record that could not be mapped (only its key is known).
        deleted: The record has `_sdc_deleted_at` set.
        known: What Orb holds (ledger or search), or None when neither knows the key.

    Returns:
        The decision.
    """
    if deleted:
        if known is not None and known.deprecated and known.pending_op is None:
            return Decision(Action.ALREADY_DEPRECATED)
        # Unknown keys are deprecated too: an amended event is invisible to search, so
        # only Orb can say whether it holds the key (a "not found" answer is counted).
        return Decision(Action.DEPRECATE)
    assert new_body is not None
    digest = body_digest(new_body)
    if known is None:
        return Decision(Action.INGEST)
    if known.deprecated and known.pending_op is None:
        return Decision(
            Action.DEPRECATED_IN_ORB,
            "Orb holds this key as a deprecated event (deprecated by target-orb for a "
            "deleted row, or by a person in Orb); Orb does not take a deprecated key back "
            "(re-ingesting it errors). If the row should be billed again, give it a new "
            "idempotency key.",
        )
    if known.pending_op is not None:
        if not known.confirmed:
            # An ingest was sent and its answer never recorded (the run stopped): Orb holds
            # either nothing or the pending body. Re-ingesting the same body is harmless;
            # a different body must be amended (or ingested if Orb has nothing).
            if known.pending_op == "ingest" and known.pending_digest == digest:
                return Decision(Action.INGEST)
            return Decision(Action.AMEND_OR_INGEST)
        # A correction was sent and its answer never recorded: Orb holds the old or the
        # new body. Amending is idempotent (the latest amendment wins), so amend.
        return Decision(Action.AMEND)
    if known.digest == digest:
        return Decision(Action.UNCHANGED)
    return Decision(Action.AMEND)


# -- Orb's refusals ------------------------------------------------------------------------


class Refusal(t.NamedTuple):
    """A correction Orb refused: a short code for the summary and a reason for a person."""

    code: str
    reason: str


def _who(body: t.Mapping[str, t.Any] | None) -> str:
    customer = customer_of(body)
    return f"{customer[0]} {customer[1]!r}" if customer else "the customer"


def refusal_reason(
    code: str,
    *,
    op: str,
    key: str,
    stored: t.Mapping[str, t.Any] | None,
    new: t.Mapping[str, t.Any] | None,
    status: int,
    body: t.Any,
) -> str:
    """Words a billing engineer can act on for a refused amendment or deprecation.

    Args:
        code: From `refusal_code`.
        op: `amend` or `deprecate`.
        key: The idempotency key.
        stored: What Orb holds (ledger or search), when known.
        new: What the source says now (None for a deprecation of an unmapped row).
        status: HTTP status.
        body: Orb's error body.

    Returns:
        The reason text (Orb's own words at the end).
    """
    verb = "amend" if op == "amend" else "deprecate"
    orb_said = f" Orb said (HTTP {status}): {orb_error_summary(body, 300)}"
    text = _refusal_text(code, verb=verb, key=key, stored=stored, new=new)
    return f"Orb refused the correction ({code}): {text}{orb_said}"


def _refusal_text(
    code: str,
    *,
    verb: str,
    key: str,
    stored: t.Mapping[str, t.Any] | None,
    new: t.Mapping[str, t.Any] | None,
) -> str:
    """What `refusal_reason` says for one refusal code, before Orb's own words."""
    stored_ts = (stored or {}).get("timestamp")
    new_ts = (new or {}).get("timestamp")
    if code == "timestamp_changed":
        text = (
            f"the source moved event {key!r} from {stored_ts} to {new_ts}; Orb never changes "
            "an event's timestamp (an amendment keeps it), so Orb still bills it at "
            f"{stored_ts}. To bill it at the new time: deprecate {key!r} in Orb (or issue a "
            "credit note if that period is invoiced) and send the row under a new "
            "idempotency key."
        )
    elif code == "customer_changed":
        text = (
            f"the source moved event {key!r} from {_who(stored)} to {_who(new)}; Orb never "
            "moves an event to another customer, so Orb still bills it to "
            f"{_who(stored)}. To move it: deprecate {key!r} in Orb (or issue a credit note "
            "if that period is invoiced) and send the row under a new idempotency key."
        )
    elif code == "unknown_customer":
        text = (
            f"Orb has no customer for {_who(new or stored)}; Orb {verb}s events only for "
            "customers that exist in Orb (even during the initial integration period). "
            "Create the customer in Orb, then replay this line "
            "(`python -m target_orb.deadletter replay FILE | target-orb --config …`)."
        )
    elif code == "closed_period":
        text = (
            f"event {key!r} at {new_ts or stored_ts} is outside {_who(stored or new)}'s "
            "current billing period and the previous period's grace, or that period was "
            f"already invoiced, so Orb no longer lets it be {verb}d. This needs a credit note "
            "or an Orb backfill (a deliberate replacing backfill of that timeframe, done in "
            "Orb) to change what was billed."
        )
    elif code == "amendment_cap":
        text = (
            f"{_who(stored or new)} reached Orb's limit on corrections (by default 100 "
            "amended or deprecated events per customer per 100 days). Ask Orb to raise the "
            "limit or correct the period with an Orb backfill, then replay this line."
        )
    elif code == "event_not_found":
        text = (
            f"Orb does not hold event {key!r}, so it cannot be {verb}d. Check that the "
            "event was ingested into this Orb account (test-mode and live keys are separate "
            "accounts) and that `ledger_url` is not shared with another account."
        )
    else:
        text = (
            f"Orb refused to {verb} event {key!r}; check Orb's message below, fix the cause, "
            "then replay this line."
        )
    return text


