"""Pure record → Orb event mapping: filters, fields, properties, keys and in-request dedup."""

from __future__ import annotations

import datetime
import hashlib
import typing as t
from dataclasses import dataclass

from target_orb import jsonutil
from target_orb.mapping.fields import (
    MISSING,
    Invalid,
    InvalidRecordError,
    get_path,
    is_disabled_by_integrations,
    read_customer,
    short,
)
from target_orb.mapping.properties import (
    build_properties,
    properties_source,
)
from target_orb.mapping.spec import MappingSpec
from target_orb.mapping.timestamps import TimestampError, parse_and_format

MAX_KEY_LENGTH = 64  # longer idempotency keys are sent as their sha256 hex (64 chars)

OrbEvent = dict[str, t.Any]
"""`{"idempotency_key", "event_name", "timestamp", "properties", <customer key>}`."""


@dataclass(frozen=True, slots=True)
class Skip:
    """The record is deliberately not sent (counted, never dead-lettered)."""

    reason: t.Literal["type", "integrations", "filter"]


@dataclass(slots=True)
class Mapped:
    """A valid Orb event; `key_derived` when the key is a content hash (source had none);
    `late` when, under `late_event_policy: backfill`, it must go through an Orb backfill
    instead of live `/ingest` (see `backfill_threshold`).

    Not frozen: frozen dataclasses cost about a microsecond per instance on this hot path.
    """

    event: OrbEvent
    key_derived: bool = False
    late: bool = False


MapResult = Mapped | Skip | Invalid


def derive_key(
    stream: str, customer: str, event_name: str, timestamp: str, properties: t.Mapping
) -> str:
    """A deterministic key for a record with none: sha256 of its identifying content.

    Args:
        stream: Stream name.
        customer: Customer id as sent.
        event_name: Event name as sent.
        timestamp: Timestamp as sent.
        properties: Properties as sent.

    Returns:
        64 hex characters.
    """
    payload = jsonutil.dumps_sorted([stream, customer, event_name, timestamp, properties])
    return hashlib.sha256(payload).hexdigest()


def source_key(value: t.Any) -> str | None:
    if type(value) is str and 0 < len(value) <= MAX_KEY_LENGTH:
        return value
    if value is MISSING or value is None or isinstance(value, bool):
        return None
    if isinstance(value, (dict, list)):
        return None
    key = value if isinstance(value, str) else str(value)
    if key == "":
        return None
    if len(key) > MAX_KEY_LENGTH:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()
    return key


def backfill_threshold(now: datetime.datetime, grace_period_hours: float) -> datetime.datetime:
    """Events older than this are late: under `late_event_policy: backfill` they go through
    an Orb backfill instead of live `/ingest`.

    Exactly Orb's grace boundary by this machine's clock (now - grace period), with no
    margin in either direction: an event newer than the boundary cannot go into a backfill
    (a backfill's timeframe ends at or before it, orb-billing `events/backfills.py`), and an
    event that ages past it while its live request waits is refused by Orb as too old and
    then routed to a backfill once the boundary has passed it (target_orb/backfill/manager.py).

    Args:
        now: The current time (aware UTC).
        grace_period_hours: The account's grace period.

    Returns:
        now - grace.
    """
    return now - datetime.timedelta(hours=grace_period_hours)


_WINDOW_CACHE: list[t.Any] = [None, None, None]


def _window(
    now: datetime.datetime, spec: MappingSpec
) -> tuple[datetime.datetime, datetime.datetime]:
    """Oldest and newest acceptable event times (the oldest is the backfill threshold under
    `late_event_policy: backfill`); cached while `now` and `spec` are unchanged (callers
    pass the same `now` object for many records)."""
    cache = _WINDOW_CACHE
    if cache[0] is now and cache[1] is spec:
        return cache[2]
    oldest = backfill_threshold(now, spec.grace_period_hours)
    bounds = (oldest, now + datetime.timedelta(seconds=spec.future_tolerance_seconds))
    cache[0], cache[1], cache[2] = now, spec, bounds
    return bounds


def map_record(
    record: t.Mapping[str, t.Any],
    stream: str,
    spec: MappingSpec,
    now: datetime.datetime,
) -> MapResult:
    """Turn one record into an Orb event, a skip, or an invalid-record reason.

    Args:
        record: The Singer record (top-level datetimes may be `datetime` objects).
        stream: The stream name (part of a derived key).
        spec: The mapping spec.
        now: The current time (aware UTC), for the grace and future windows.

    Returns:
        Mapped, Skip or Invalid.
    """
    if not isinstance(record, dict):
        return Invalid("not_an_object", f"record is {type(record).__name__}, not an object")
    kind = record.get("type")
    if kind is None or kind == "":
        kind = "track"
    if not isinstance(kind, str) or kind.lower() not in spec.event_types:
        return Skip("type")
    if spec.honor_integrations and is_disabled_by_integrations(
        record.get("integrations"), spec.integration_name
    ):
        return Skip("integrations")

    event_name = get_path(record, spec.event_name_field)
    if (event_name is MISSING or event_name in (None, "")) and spec.event_name_fallback:
        event_name = get_path(record, spec.event_name_fallback)
    name_key = event_name if isinstance(event_name, str) else None
    if spec.event_allowlist is not None and name_key not in spec.event_allowlist:
        return Skip("filter")
    if name_key in spec.event_denylist:
        return Skip("filter")
    try:
        return _map_valid(record, stream, spec, now, event_name)
    except InvalidRecordError as exc:
        return Invalid(exc.code, exc.reason)


def _map_valid(
    record: t.Mapping[str, t.Any],
    stream: str,
    spec: MappingSpec,
    now: datetime.datetime,
    event_name: t.Any,
) -> Mapped:
    if event_name is MISSING or event_name is None:
        raise InvalidRecordError(
            "missing_event_name", f"no event name at `{spec.event_name_field}`"
        )
    if not isinstance(event_name, str) or not event_name.strip():
        raise InvalidRecordError(
            "missing_event_name",
            f"event name at `{spec.event_name_field}` is {short(event_name)}, not a non-empty "
            "string",
        )
    customer = read_customer(get_path(record, spec.customer_field), spec.customer_field)

    raw_ts = get_path(record, spec.timestamp_field)
    if raw_ts is MISSING or raw_ts is None:
        raise InvalidRecordError("bad_timestamp", f"no timestamp at `{spec.timestamp_field}`")
    try:
        when, timestamp = parse_and_format(raw_ts)
    except TimestampError as exc:
        raise InvalidRecordError("bad_timestamp", f"`{spec.timestamp_field}`: {exc}") from exc
    oldest, newest = _window(now, spec)
    window = "late" if when < oldest else "future" if when > newest else "ok"
    if window == "future":
        raise InvalidRecordError(
            "future",
            f"timestamp {timestamp} is more than {spec.future_tolerance_seconds} s in the future "
            "(setting `future_tolerance_seconds`; check the source clock)",
        )
    if window == "late" and spec.late_event_policy == "reject":
        raise InvalidRecordError(
            "late",
            f"timestamp {timestamp} is older than the {spec.grace_period_hours} h grace period "
            "(settings `grace_period_hours`, `late_event_policy`); Orb only takes it through a "
            "backfill",
        )

    properties = build_properties(properties_source(record, spec), spec)
    key = source_key(get_path(record, spec.idempotency_key_field))
    derived = key is None
    if key is None:
        key = derive_key(stream, customer, event_name, timestamp, properties)
    event: OrbEvent = {
        "idempotency_key": key,
        "event_name": event_name,
        spec.customer_key: customer,
        "timestamp": timestamp,
        "properties": properties,
    }
    if window == "late" and spec.late_event_policy == "backfill":
        return Mapped(event, key_derived=derived, late=True)
    return Mapped(event, key_derived=derived)


def dedupe_request(
    events: t.Sequence[OrbEvent],
) -> tuple[list[int], int, list[tuple[int, str]]]:
    """Collapse equal duplicates in one request; a different body under a used key is invalid.

    Orb rejects a whole request that holds one key with two bodies (Orb API reference,
    Ingest events).

    Args:
        events: The candidate events of one request, in input order.

    Returns:
        (indexes to send, number of equal duplicates collapsed,
         [(index, reason)] of conflicting later events).
    """
    seen: dict[str, OrbEvent] = {}
    keep: list[int] = []
    collapsed = 0
    conflicts: list[tuple[int, str]] = []
    for index, event in enumerate(events):
        key = event["idempotency_key"]
        first = seen.get(key)
        if first is None:
            seen[key] = event
            keep.append(index)
        elif first == event:
            collapsed += 1
        else:
            conflicts.append(
                (
                    index,
                    f"idempotency key {key!r} is already used in this request by a different "
                    "event; the first one is sent, this one is not (Orb would reject the whole "
                    "request)",
                ),
            )
    return keep, collapsed, conflicts
