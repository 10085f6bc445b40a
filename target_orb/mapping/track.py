"""Pure record → Orb event mapping: filters, fields, properties, keys and in-request dedup."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import math
import typing as t
from dataclasses import dataclass

from target_orb import jsonutil
from target_orb.mapping.timestamps import TimestampError, format_orb, parse_and_format, to_utc
from target_orb.settings import (
    WAREHOUSE_SYSTEM_COLUMNS,
    WAREHOUSE_SYSTEM_PREFIXES,
    MappingSpec,
)

INT64_MIN = -(2**63)  # Orb property numbers must fit int64 (docs.withorb.com/quickstart/ingest)
INT64_MAX = 2**63 - 1
_DEC_INT64_MIN = decimal.Decimal(INT64_MIN)  # Decimal-to-Decimal compares are ~2x faster
_DEC_INT64_MAX = decimal.Decimal(INT64_MAX)
MAX_KEY_LENGTH = 64  # longer idempotency keys are sent as their sha256 hex (64 chars)
_MISSING = object()
# Customer ids that count as missing, case-insensitive (README, "Mapping examples").
_BLANK_CUSTOMERS = frozenset({"", "null", "undefined"})

OrbEvent = dict[str, t.Any]
"""`{"idempotency_key", "event_name", "timestamp", "properties", <customer key>}`."""


@dataclass(frozen=True, slots=True)
class Skip:
    """The record is deliberately not sent (counted, never dead-lettered)."""

    reason: t.Literal["type", "integrations", "filter"]


@dataclass(frozen=True, slots=True)
class Invalid:
    """The record cannot become a valid Orb event."""

    code: str
    reason: str


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


class _InvalidRecordError(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def get_path(record: t.Any, path: str) -> t.Any:
    """Look up a dotted path; a literal key containing dots wins over walking.

    Args:
        record: The object to read.
        path: `a.b.c`, or a literal key such as `a.b` when it exists.

    Returns:
        The value, or the `_MISSING` sentinel.
    """
    if not isinstance(record, dict):
        return _MISSING
    if path in record:
        return record[path]
    if "." not in path:
        return _MISSING
    current: t.Any = record
    for part in path.split("."):
        if not isinstance(current, dict) or part not in current:
            return _MISSING
        current = current[part]
    return current


def _short(value: t.Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_disabled_by_integrations(integrations: t.Any, name: str) -> bool:
    """Segment's rule (analytics-next `isDisabledIntegration`), with `all` read like `All`.

    Args:
        integrations: The record's `integrations` value (any type).
        name: The destination key, `Orb` by default (case-sensitive).

    Returns:
        True when the record must be skipped.
    """
    if isinstance(integrations, str) and integrations.strip().startswith("{"):
        try:
            integrations = jsonutil.loads(integrations)
        except ValueError:
            return False
    if not isinstance(integrations, dict):
        return False
    if integrations.get(name) is False:
        return True
    all_flag = integrations["All"] if "All" in integrations else integrations.get("all")
    return all_flag is False and name not in integrations


def _customer(value: t.Any, field: str) -> str:
    if type(value) is str:
        text = value.strip()
        if len(text) > 9 or (text and text.lower() not in _BLANK_CUSTOMERS):
            return text
    if value is _MISSING or value is None:
        raise _InvalidRecordError("missing_customer", f"no customer id at `{field}`")
    if isinstance(value, bool) or not isinstance(value, (str, int, decimal.Decimal)):
        raise _InvalidRecordError(
            "bad_customer",
            f"customer id at `{field}` is {type(value).__name__} {_short(value)}, not a string",
        )
    text = str(value).strip()
    if text.lower() in _BLANK_CUSTOMERS:
        raise _InvalidRecordError(
            "missing_customer",
            f"customer id at `{field}` is {_short(value)}, which names no customer",
        )
    return text


def _check_scalar(key: str, value: t.Any) -> t.Any:
    """Return the value to send for a scalar, or raise for one Orb cannot take."""
    if isinstance(value, str) or value is True or value is False:
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise _InvalidRecordError(
                "bad_property_value", f"property `{key}` = {value} is outside the int64 range"
            )
        return value
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise _InvalidRecordError(
                "bad_property_value", f"property `{key}` is {value}, not a finite number"
            )
        if not INT64_MIN <= value <= INT64_MAX and value == value.to_integral_value():
            raise _InvalidRecordError(
                "bad_property_value", f"property `{key}` = {value} is outside the int64 range"
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _InvalidRecordError(
                "bad_property_value", f"property `{key}` is {value}, not a finite number"
            )
        return value
    if isinstance(value, datetime.datetime):
        return format_orb(to_utc(value))
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise _InvalidRecordError(
        "bad_property_value",
        f"property `{key}` has a value of type {type(value).__name__}, which Orb cannot take",
    )


class _PropertyBuilder:
    """Collects flat Orb properties and detects two sources landing on one key."""

    __slots__ = ("nested", "out", "sources")

    def __init__(self, nested: str) -> None:
        self.nested = nested
        self.out: dict[str, t.Any] = {}
        self.sources: dict[str, str] = {}

    def put(self, orb_key: str, source: str, value: t.Any) -> None:
        kind = type(value)
        # Ordered by frequency; each branch leaves `value` as it is sent.
        if kind is str or kind is bool:
            pass
        elif kind is int:
            if not INT64_MIN <= value <= INT64_MAX:
                value = _check_scalar(source, value)  # raises
        elif kind is decimal.Decimal:
            if not (value.is_finite() and _DEC_INT64_MIN <= value <= _DEC_INT64_MAX):
                value = _check_scalar(source, value)  # raises, or a non-integral big number
        elif value is None:
            return  # nulls are dropped (Orb takes no null property values)
        elif isinstance(value, dict):
            self._nested(orb_key, source, value, is_object=True)
            return
        elif isinstance(value, (list, tuple)):
            self._nested(orb_key, source, value, is_object=False)
            return
        else:
            value = _check_scalar(source, value)
        if orb_key in self.out:
            raise _InvalidRecordError(
                "key_collision",
                f"properties `{self.sources.get(orb_key, orb_key)}` and `{source}` both map "
                f"to Orb property `{orb_key}`",
            )
        if source != orb_key:
            self.sources[orb_key] = source  # only renamed/flattened keys need remembering
        self.out[orb_key] = value

    def _nested(self, orb_key: str, source: str, value: t.Any, *, is_object: bool) -> None:
        policy = self.nested
        if policy == "reject":
            kind = "an object" if is_object else "an array"
            raise _InvalidRecordError(
                "nested_property",
                f"property `{source}` is {kind} and `nested_properties` is `reject`",
            )
        if policy == "drop":
            return
        if policy == "flatten" and is_object:
            for sub_key, sub_value in value.items():
                self.put(f"{orb_key}_{sub_key}", f"{source}.{sub_key}", sub_value)
            return
        # json_string (objects and arrays) and flatten (arrays): a JSON string.
        try:
            text = jsonutil.dumps_str(value)
        except (TypeError, ValueError) as exc:
            raise _InvalidRecordError(
                "bad_property_value", f"property `{source}` cannot be JSON-encoded: {exc}"
            ) from exc
        self.put(orb_key, source, text)


def _properties_source(record: t.Mapping[str, t.Any], spec: MappingSpec) -> dict[str, t.Any]:
    if spec.warehouse_columns:
        return _warehouse_properties(record)
    if spec.properties_field == "":
        source: t.Any = record
    else:
        source = get_path(record, spec.properties_field)
    if source is _MISSING or source is None:
        return {}
    if isinstance(source, str):
        source = _parse_json_object(source, spec.properties_field or "(record)")
    if not isinstance(source, dict):
        raise _InvalidRecordError(
            "bad_properties",
            f"properties at `{spec.properties_field}` are {type(source).__name__}, not an object",
        )
    return source  # `_sdc_*` keys are skipped where properties are enumerated


def _parse_json_object(text: str, where: str) -> t.Mapping[str, t.Any]:
    if not text.strip():
        return {}
    try:
        parsed = jsonutil.loads(text)
    except ValueError as exc:
        raise _InvalidRecordError(
            "bad_properties", f"properties at `{where}` are a string that is not JSON: {exc}"
        ) from exc
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise _InvalidRecordError(
            "bad_properties", f"properties at `{where}` are a JSON string that is not an object"
        )
    return parsed


def _is_system_column(name: str) -> bool:
    return name in WAREHOUSE_SYSTEM_COLUMNS or name.startswith(WAREHOUSE_SYSTEM_PREFIXES)


def _warehouse_properties(record: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Top-level columns minus Segment's system columns; a `properties` object is unwrapped."""
    props = {k: v for k, v in record.items() if not _is_system_column(k) and k != "properties"}
    wrapped = record.get("properties")
    if isinstance(wrapped, str):
        wrapped = _parse_json_object(wrapped, "properties")
    if isinstance(wrapped, dict):
        for key, value in wrapped.items():
            if key in props and props[key] is not None and value is not None:
                raise _InvalidRecordError(
                    "key_collision",
                    f"column `{key}` and `properties.{key}` both become Orb property `{key}`",
                )
            if value is not None or key not in props:
                props[key] = value
    elif wrapped is not None:
        raise _InvalidRecordError(
            "bad_properties", f"column `properties` is {type(wrapped).__name__}, not an object"
        )
    return props


def build_properties(source: t.Mapping[str, t.Any], spec: MappingSpec) -> dict[str, t.Any]:
    """Apply `properties_mapping`, passthrough and `nested_properties` to one properties object.

    Args:
        source: The properties object (already unwrapped/parsed).
        spec: The mapping spec.

    Returns:
        Flat Orb properties.
    """
    builder = _PropertyBuilder(spec.nested_properties)
    mapping = spec.properties_mapping
    for src, dst in mapping.items():
        if src in source:
            value = source[src]
        elif "." in src:
            value = get_path(source, src)
            if value is _MISSING:
                continue
        else:
            continue
        if not src.startswith("_sdc_"):  # tap metadata never becomes a property
            builder.put(dst, src, value)
    if spec.properties_passthrough:
        out = builder.out
        for key, value in source.items():
            if key in mapping or key.startswith("_sdc_"):
                continue
            kind = type(value)
            if (
                kind is str or kind is bool or (kind is int and INT64_MIN <= value <= INT64_MAX)
            ) and key not in out:
                out[key] = value  # the common cases, inlined from builder.put
                continue
            if isinstance(value, dict) and mapping:
                passthrough_nested(builder, key, key, value, mapping)
            else:
                builder.put(key, key, value)
    return builder.out


class NestedBuilder(t.Protocol):
    """What passthrough needs of a builder (properties here, traits in identify.py)."""

    nested: str

    def put(self, orb_key: str, source: str, value: t.Any) -> None: ...


def passthrough_nested(
    builder: NestedBuilder,
    orb_key: str,
    source: str,
    value: t.Mapping[str, t.Any],
    mapping: t.Mapping[str, str],
) -> None:
    """Pass a nested object through, leaving out the leaves a mapping already renamed."""
    if builder.nested != "flatten":
        builder.put(orb_key, source, value)
        return
    for sub_key, sub_value in value.items():
        sub_source = f"{source}.{sub_key}"
        if sub_source in mapping:
            continue
        if isinstance(sub_value, dict):
            passthrough_nested(builder, f"{orb_key}_{sub_key}", sub_source, sub_value, mapping)
        else:
            builder.put(f"{orb_key}_{sub_key}", sub_source, sub_value)


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


def _idempotency_key(value: t.Any) -> str | None:
    if type(value) is str and 0 < len(value) <= MAX_KEY_LENGTH:
        return value
    if value is _MISSING or value is None or isinstance(value, bool):
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
    if (event_name is _MISSING or event_name in (None, "")) and spec.event_name_fallback:
        event_name = get_path(record, spec.event_name_fallback)
    name_key = event_name if isinstance(event_name, str) else None
    if spec.event_allowlist is not None and name_key not in spec.event_allowlist:
        return Skip("filter")
    if name_key in spec.event_denylist:
        return Skip("filter")
    try:
        return _map_valid(record, stream, spec, now, event_name)
    except _InvalidRecordError as exc:
        return Invalid(exc.code, exc.reason)


def _map_valid(
    record: t.Mapping[str, t.Any],
    stream: str,
    spec: MappingSpec,
    now: datetime.datetime,
    event_name: t.Any,
) -> Mapped:
    if event_name is _MISSING or event_name is None:
        raise _InvalidRecordError(
            "missing_event_name", f"no event name at `{spec.event_name_field}`"
        )
    if not isinstance(event_name, str) or not event_name.strip():
        raise _InvalidRecordError(
            "missing_event_name",
            f"event name at `{spec.event_name_field}` is {_short(event_name)}, not a non-empty "
            "string",
        )
    customer = _customer(get_path(record, spec.customer_field), spec.customer_field)

    raw_ts = get_path(record, spec.timestamp_field)
    if raw_ts is _MISSING or raw_ts is None:
        raise _InvalidRecordError("bad_timestamp", f"no timestamp at `{spec.timestamp_field}`")
    try:
        when, timestamp = parse_and_format(raw_ts)
    except TimestampError as exc:
        raise _InvalidRecordError("bad_timestamp", f"`{spec.timestamp_field}`: {exc}") from exc
    oldest, newest = _window(now, spec)
    window = "late" if when < oldest else "future" if when > newest else "ok"
    if window == "future":
        raise _InvalidRecordError(
            "future",
            f"timestamp {timestamp} is more than {spec.future_tolerance_seconds} s in the future "
            "(setting `future_tolerance_seconds`; check the source clock)",
        )
    if window == "late" and spec.late_event_policy == "reject":
        raise _InvalidRecordError(
            "late",
            f"timestamp {timestamp} is older than the {spec.grace_period_hours} h grace period "
            "(settings `grace_period_hours`, `late_event_policy`); Orb only takes it through a "
            "backfill",
        )

    properties = build_properties(_properties_source(record, spec), spec)
    key = _idempotency_key(get_path(record, spec.idempotency_key_field))
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
