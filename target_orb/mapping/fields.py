"""Reading a record's fields: dotted paths, the customer id, Segment's `integrations` switch.

Shared by the track mapping and the traits mapping; pure.
"""

from __future__ import annotations

import decimal
import typing as t
from dataclasses import dataclass

from target_orb import jsonutil

MISSING = object()
# Customer ids that count as missing, case-insensitive (README, "Mapping examples").
_BLANK_CUSTOMERS = frozenset({"", "null", "undefined"})


@dataclass(frozen=True, slots=True)
class Invalid:
    """The record cannot become a valid Orb event."""

    code: str
    reason: str


class InvalidRecordError(Exception):
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
        The value, or the `MISSING` sentinel.
    """
    if not isinstance(record, dict):
        return MISSING
    if path in record:
        return record[path]
    if "." not in path:
        return MISSING
    current: t.Any = record
    for part in path.split("."):
        if not isinstance(current, dict) or part not in current:
            return MISSING
        current = current[part]
    return current


def short(value: t.Any, limit: int = 60) -> str:
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


def read_customer(value: t.Any, field: str) -> str:
    if type(value) is str:
        text = value.strip()
        if len(text) > 9 or (text and text.lower() not in _BLANK_CUSTOMERS):
            return text
    if value is MISSING or value is None:
        raise InvalidRecordError("missing_customer", f"no customer id at `{field}`")
    if isinstance(value, bool) or not isinstance(value, (str, int, decimal.Decimal)):
        raise InvalidRecordError(
            "bad_customer",
            f"customer id at `{field}` is {type(value).__name__} {short(value)}, not a string",
        )
    text = str(value).strip()
    if text.lower() in _BLANK_CUSTOMERS:
        raise InvalidRecordError(
            "missing_customer",
            f"customer id at `{field}` is {short(value)}, which names no customer",
        )
    return text
