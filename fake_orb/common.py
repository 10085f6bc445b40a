"""Shared pieces of the stand-in Orb (the ``fake_orb`` package): error bodies, request and
answer records, JSON helpers, timestamp rules and the vendored request schemas.

Like the rest of the stand-in it imports only the standard library and ``jsonschema``
and nothing from ``target_orb``, so the target's own code can never vouch for itself.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import jsonschema

ERROR_TYPE_BASE = "https://docs.withorb.com/reference/error-responses#"
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# (type suffix, title) per HTTP status for default error bodies. The 400-429/500
# suffixes are Orb's (docs.withorb.com/reference/error-responses); 403/408/502/503 have no
# Orb type, so these suffixes are made up in the same style.
_DEFAULT_ERRORS: dict[int, tuple[str, str]] = {
    400: ("400-constraint-violation", "Constraint violation"),
    401: ("401-authentication-error", "Authentication error"),
    403: ("403-forbidden", "Forbidden"),
    404: ("404-url-not-found", "URL not found"),
    408: ("408-request-timeout", "Request timeout"),
    409: ("409-resource-conflict", "Resource conflict"),
    413: ("413-request-too-large", "Request too large"),
    429: ("429-too-many-requests", "Too many requests"),
    500: ("500-internal-server-error", "Internal server error"),
    502: ("502-bad-gateway", "Bad gateway"),
    503: ("503-service-unavailable", "Service unavailable"),
}
_VALIDATION_TYPE = "400-request-validation-errors"
_VALIDATION_TITLE = "Request validation failed"
_NOT_FOUND_TYPE = "404-resource-not-found"
_NOT_FOUND_TITLE = "A specified resource was not found."

# RFC 3339 date-time (used for the JSON-schema "date-time" format).
_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
# What Orb documents for event timestamps: UTC. A trailing Z, or the UTC offset +00:00
# that Orb's own Python client (`orb-billing`, datetime.isoformat()) sends.
_ORB_TS_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:Z|\+00:00)$"
)
_OFFSET_RE = re.compile(r"T.*[+-]\d{2}(:?\d{2})?$")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def error_body(status: int, type_suffix: str | None = None, **extra: Any) -> dict[str, Any]:
    """An RFC-7807 error body shaped like Orb's (docs.withorb.com/reference/error-responses)."""
    default_suffix, default_title = _DEFAULT_ERRORS.get(status, (f"{status}-error", "Error"))
    suffix = type_suffix or default_suffix
    body: dict[str, Any] = {
        "type": suffix if suffix.startswith("http") else ERROR_TYPE_BASE + suffix,
        "status": status,
        "title": default_title,
        "detail": default_title,
    }
    body.update(extra)
    return body


# --------------------------------------------------------------------------- records


@dataclass
class _Request:
    method: str
    path: str
    query: str
    headers: Any  # email.message.Message
    body: bytes | None  # None when the body was drained for being too large
    body_len: int


@dataclass
class _Outcome:
    status: int | None = 200
    body: Any = None  # dict/list -> JSON; str -> text; None -> empty
    headers: dict[str, str] = field(default_factory=dict)
    action: str | None = None  # None | "hang" | "reset"
    seconds: float = 0.0
    delay: bool = False  # apply latency_ms before answering


def validation_failed(errors: list[Any], detail: str | None = None) -> _Outcome:
    """400 ``request-validation-errors`` with these ``validation_errors`` items."""
    return _Outcome(
        400,
        error_body(
            400,
            _VALIDATION_TYPE,
            title=_VALIDATION_TITLE,
            detail=detail or "; ".join(str(e) for e in errors) or "The request failed validation",
            validation_errors=errors,
        ),
    )


def cursor_page(items: list[dict[str, Any]], cursor: str | None, limit: int) -> _Outcome:
    """One page of an Orb list answer: the items after `cursor` (an id this list gave),
    at most `limit`, with `pagination_metadata` (`has_more`, `next_cursor`: the last id)."""
    if cursor is not None:
        ids = [item["id"] for item in items]
        if cursor not in ids:
            return validation_failed([f"cursor {cursor!r} is not a cursor this list gave"])
        items = items[ids.index(cursor) + 1 :]
    page, more = items[:limit], len(items) > limit
    return _Outcome(
        200,
        {
            "data": page,
            "pagination_metadata": {
                "has_more": more,
                "next_cursor": page[-1]["id"] if more else None,
            },
        },
    )


def constraint_violation(detail: str) -> _Outcome:
    """400 ``constraint-violation``: a well-formed request Orb's rules refuse."""
    return _Outcome(400, error_body(400, "400-constraint-violation", detail=detail))


def resource_not_found(detail: str) -> _Outcome:
    """404 ``resource-not-found`` (the URL is right, the thing it names does not exist)."""
    return _Outcome(404, error_body(404, _NOT_FOUND_TYPE, title=_NOT_FOUND_TITLE, detail=detail))


def url_not_found(method: str, path: str) -> _Outcome:
    return _Outcome(404, error_body(404, detail=f"No route for {method} {path}"))


class FakeOrbError(ValueError):
    """A Python-API call the stand-in refuses, with the detail Orb's answer would carry."""


# --------------------------------------------------------------------------- JSON


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class _DuplicateJSONKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateJSONKeyError(f"duplicate JSON object key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass
class _Parsed:
    body: Any = None
    error: str | None = None
    events: list[Any] | None = None


def _property_problem(value: Any) -> str | None:
    if isinstance(value, bool | str):
        return None
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return None
        return "integer is outside the int64 range [-2**63, 2**63-1]"
    if isinstance(value, float):
        return None if math.isfinite(value) else "number must be finite"
    if value is None:
        return "null is not allowed (values must be string, number or boolean)"
    if isinstance(value, list):
        return "arrays are not allowed (values must be string, number or boolean)"
    if isinstance(value, dict):
        return "nested objects are not allowed (values must be string, number or boolean)"
    return f"unsupported value type {type(value).__name__}"


# --------------------------------------------------------------------------- time


def fmt_time(when: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (UTC), the form the stand-in answers with."""
    when = when.astimezone(timezone.utc)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond:06d}"
    return text + "Z"


def parse_datetime(value: str) -> datetime:
    """An RFC 3339 date-time with a designator (Z or any offset) as an aware UTC datetime.

    For request fields that are plain ``date-time`` in Orb's spec (backfill timeframes,
    search timeframes). Raises ValueError with a reason a person can act on.
    """
    m = _RFC3339_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(
            f"{value!r} is not an RFC 3339 date-time with a time zone (e.g. 2020-12-09T16:09:53Z)"
        )
    year, month, day, hour, minute, sec = (int(g) for g in m.groups()[:6])
    frac = (m.group(7) or ".")[1:]
    zone = m.group(8)
    try:
        when = datetime(year, month, day, hour, minute, min(sec, 59), int(frac[:6].ljust(6, "0")))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid date-time: {exc}") from None
    if zone in ("Z", "z"):
        offset = timedelta(0)
    else:
        sign = -1 if zone[0] == "-" else 1
        offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    return (when - offset).replace(tzinfo=timezone.utc)


def parse_event_timestamp(ts: str) -> datetime:
    """An event ``timestamp`` as Orb takes it: UTC only (``Z`` or ``+00:00``).

    Raises ValueError naming what is wrong.
    """
    m = _ORB_TS_RE.match(ts)
    if not m:
        if _OFFSET_RE.search(ts):
            raise ValueError(
                f"timestamp {ts!r} has a non-UTC timezone offset; Orb takes UTC only: "
                "a trailing 'Z' or '+00:00' (e.g. 2020-12-09T16:09:53Z)"
            )
        if re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?$", ts):
            raise ValueError(
                f"timestamp {ts!r} has no timezone designator; it must end in 'Z' (UTC)"
            )
        raise ValueError(f"timestamp {ts!r} is not of the form YYYY-MM-DDTHH:MM:SS[.ffffff]Z")
    year, month, day, hour, minute, sec = (int(g) for g in m.groups()[:6])
    frac = m.group(7) or ""
    try:
        return datetime(
            year, month, day, hour, minute, sec, int(frac[:6].ljust(6, "0")), tzinfo=timezone.utc
        )
    except ValueError as exc:
        raise ValueError(f"timestamp {ts!r} is not a valid date-time: {exc}") from None


def _timestamp_errors(ts: str, oldest: datetime | None, newest: datetime) -> Iterator[str]:
    """Why Orb would refuse this event timestamp (``oldest`` None: no grace rule)."""
    try:
        when = parse_event_timestamp(ts)
    except ValueError as exc:
        yield str(exc)
        return
    if oldest is not None and when < oldest:
        yield (
            f"timestamp {ts!r} is older than the grace period (earliest accepted "
            f"{oldest.strftime('%Y-%m-%dT%H:%M:%SZ')}); use a backfill"
        )
    if when > newest:
        yield (
            f"timestamp {ts!r} is too far in the future (latest accepted "
            f"{newest.strftime('%Y-%m-%dT%H:%M:%SZ')})"
        )


_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_when(value: Any) -> datetime:
    """An RFC 3339 date-time, or a bare ``YYYY-MM-DD`` (midnight UTC), for set-up input
    (CLI flags and control routes; Orb's own routes take date-times only)."""
    if isinstance(value, str) and _DATE_RE.match(value):
        return parse_datetime(value + "T00:00:00Z")
    return parse_datetime(value)


# --------------------------------------------------------------------------- schemas


def _check_rfc3339(value: object) -> bool:
    if not isinstance(value, str):
        return True  # formats only constrain strings
    m = _RFC3339_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    year, month, day, hour, minute, sec = (int(g) for g in m.groups()[:6])
    # datetime() validates calendar ranges; RFC 3339 allows a leap second 60.
    datetime(year, month, day, hour, minute, min(sec, 59))
    return True


def _check_email(value: object) -> bool:
    if not isinstance(value, str):
        return True
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or " " in value:
        raise ValueError(f"{value!r} is not an email address")
    return True


def format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    # jsonschema's own date-time checker needs an optional package
    # (rfc3339-validator) and silently passes without it: register ours.
    checker.checks("date-time", raises=ValueError)(_check_rfc3339)
    checker.checks("email", raises=ValueError)(_check_email)
    return checker


_REQUEST_SCHEMAS_LOCK = threading.Lock()
_REQUEST_VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def request_validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator for one of Orb's request schemas vendored in ``orb_request_schemas.json``
    (``EventSearchCriteria``, ``NewBackfill``, ``AmendedEvent``, ``EditCustomer``)."""
    with _REQUEST_SCHEMAS_LOCK:
        if name not in _REQUEST_VALIDATORS:
            res = importlib.resources.files("fake_orb") / "data" / "orb_request_schemas.json"
            defs = json.loads(res.read_text(encoding="utf-8"))["$defs"]
            schema = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$ref": f"#/$defs/{name}",
                "$defs": defs,
            }
            jsonschema.Draft202012Validator.check_schema(schema)
            _REQUEST_VALIDATORS[name] = jsonschema.Draft202012Validator(
                schema, format_checker=format_checker()
            )
        return _REQUEST_VALIDATORS[name]


def schema_errors(name: str, body: Any) -> list[str]:
    """Every way ``body`` breaks Orb's ``name`` schema, as ``where: message`` strings."""
    out = []
    for err in sorted(
        request_validator(name).iter_errors(body), key=lambda e: list(map(str, e.absolute_path))
    ):
        where = ".".join(str(p) for p in err.absolute_path)
        out.append(f"{where}: {err.message}" if where else err.message)
    return out


_SCHEMA_LOCK = threading.Lock()
_SCHEMA_VALIDATOR: jsonschema.Draft202012Validator | None = None


def load_schema() -> dict[str, Any]:
    """The vendored ``IngestRequestBody`` JSON schema."""
    res = importlib.resources.files("fake_orb") / "data" / "ingest_request_body.schema.json"
    return json.loads(res.read_text(encoding="utf-8"))


def _validator() -> jsonschema.Draft202012Validator:
    global _SCHEMA_VALIDATOR  # noqa: PLW0603 - lazily built module singleton
    with _SCHEMA_LOCK:
        if _SCHEMA_VALIDATOR is None:
            schema = load_schema()
            jsonschema.Draft202012Validator.check_schema(schema)
            _SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(
                schema, format_checker=format_checker()
            )
        return _SCHEMA_VALIDATOR
