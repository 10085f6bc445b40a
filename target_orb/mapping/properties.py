"""A record's properties → Orb's flat event properties: sources, nesting, scalar checks; pure."""

from __future__ import annotations

import datetime
import decimal
import math
import typing as t

from target_orb import jsonutil
from target_orb.mapping.fields import MISSING, InvalidRecordError, get_path
from target_orb.mapping.spec import WAREHOUSE_SYSTEM_COLUMNS, WAREHOUSE_SYSTEM_PREFIXES, MappingSpec
from target_orb.mapping.timestamps import format_orb, to_utc

INT64_MIN = -(2**63)  # Orb property numbers must fit int64 (docs.withorb.com/quickstart/ingest)
INT64_MAX = 2**63 - 1
_DEC_INT64_MIN = decimal.Decimal(INT64_MIN)  # Decimal-to-Decimal compares are ~2x faster
_DEC_INT64_MAX = decimal.Decimal(INT64_MAX)


def _check_scalar(key: str, value: t.Any) -> t.Any:
    """Return the value to send for a scalar, or raise for one Orb cannot take."""
    if isinstance(value, str) or value is True or value is False:
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidRecordError(
                "bad_property_value", f"property `{key}` = {value} is outside the int64 range"
            )
        return value
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise InvalidRecordError(
                "bad_property_value", f"property `{key}` is {value}, not a finite number"
            )
        if not INT64_MIN <= value <= INT64_MAX and value == value.to_integral_value():
            raise InvalidRecordError(
                "bad_property_value", f"property `{key}` = {value} is outside the int64 range"
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRecordError(
                "bad_property_value", f"property `{key}` is {value}, not a finite number"
            )
        return value
    if isinstance(value, datetime.datetime):
        return format_orb(to_utc(value))
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise InvalidRecordError(
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
            raise InvalidRecordError(
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
            raise InvalidRecordError(
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
            raise InvalidRecordError(
                "bad_property_value", f"property `{source}` cannot be JSON-encoded: {exc}"
            ) from exc
        self.put(orb_key, source, text)


def properties_source(record: t.Mapping[str, t.Any], spec: MappingSpec) -> dict[str, t.Any]:
    if spec.warehouse_columns:
        return warehouse_properties(record)
    if spec.properties_field == "":
        source: t.Any = record
    else:
        source = get_path(record, spec.properties_field)
    if source is MISSING or source is None:
        return {}
    if isinstance(source, str):
        source = _parse_json_object(source, spec.properties_field or "(record)")
    if not isinstance(source, dict):
        raise InvalidRecordError(
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
        raise InvalidRecordError(
            "bad_properties", f"properties at `{where}` are a string that is not JSON: {exc}"
        ) from exc
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise InvalidRecordError(
            "bad_properties", f"properties at `{where}` are a JSON string that is not an object"
        )
    return parsed


def _is_system_column(name: str) -> bool:
    return name in WAREHOUSE_SYSTEM_COLUMNS or name.startswith(WAREHOUSE_SYSTEM_PREFIXES)


def warehouse_properties(record: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Top-level columns minus Segment's system columns; a `properties` object is unwrapped."""
    props = {k: v for k, v in record.items() if not _is_system_column(k) and k != "properties"}
    wrapped = record.get("properties")
    if isinstance(wrapped, str):
        wrapped = _parse_json_object(wrapped, "properties")
    if isinstance(wrapped, dict):
        for key, value in wrapped.items():
            if key in props and props[key] is not None and value is not None:
                raise InvalidRecordError(
                    "key_collision",
                    f"column `{key}` and `properties.{key}` both become Orb property `{key}`",
                )
            if value is not None or key not in props:
                props[key] = value
    elif wrapped is not None:
        raise InvalidRecordError(
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
            if value is MISSING:
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
    """What passthrough needs of a builder (properties here, traits in mapping/traits.py)."""

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
