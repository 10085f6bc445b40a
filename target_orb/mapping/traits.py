"""Pure Identify → Orb customer metadata: routing, traits → string metadata, merging.

With `identify_policy: customer_metadata`, an Identify record (Segment `type` `identify`, or a
row of an Identify stream such as a warehouse `identifies` table) becomes an update of the Orb
customer's `metadata` (`PUT /v1/customers/external_customer_id/{id}` with exactly `{"metadata":
{...}}`; orb-billing resources/customers/customers.py, `update_by_external_id`). Orb stores
metadata values as strings; a `null` value deletes that one key; `"metadata": null` would clear
every key and is never built here. Only mapped traits (or every trait with
`traits_passthrough`) are kept: the rest never leaves this module, and no message built here
quotes a trait value.
"""

from __future__ import annotations

import datetime
import decimal
import math
import typing as t
from dataclasses import dataclass, field

from target_orb import jsonutil
from target_orb.mapping.fields import (
    MISSING,
    Invalid,
    InvalidRecordError,
    get_path,
    is_disabled_by_integrations,
    read_customer,
)
from target_orb.mapping.properties import passthrough_nested, warehouse_properties
from target_orb.mapping.spec import MappingSpec, flatten_mapping
from target_orb.mapping.timestamps import format_orb, to_utc
from target_orb.settings import resolve

IDENTIFY_TYPE = "identify"
# Segment's warehouse table of Identify calls; a tap prefixes its schema (`public-identifies`).
WAREHOUSE_IDENTIFY_TABLE = "identifies"
_SCHEMA_SEPARATORS = ("-", ".")
# `.` and `..` are path segments: HTTP clients and servers remove them, so no request can
# address a customer with such an id (RFC 3986 §5.2.4).
_DOT_SEGMENTS = frozenset({".", ".."})
# A number is written digit by digit (no exponent); past this many digits it is refused.
MAX_NUMBER_TEXT = 1000


@dataclass(frozen=True, slots=True)
class IdentifySpec:
    """How an Identify record becomes a customer metadata update; built once from the config."""

    customer_field: str
    traits_field: str | None  # None: the row's columns minus Segment's system columns
    traits_mapping: t.Mapping[str, str]
    traits_passthrough: bool
    identify_streams: frozenset[str] | None  # None: `identifies` streams (warehouse preset)
    warehouse: bool
    nested_properties: str = "flatten"
    honor_integrations: bool = True
    integration_name: str = "Orb"


def build_identify_spec(config: t.Mapping[str, t.Any], spec: MappingSpec) -> IdentifySpec | None:
    """The Identify spec, or None when `identify_policy` is `skip` (nothing changes then).

    Args:
        config: A config for which `config_problems` returned nothing.
        spec: The Track mapping spec (customer field, nesting and integrations rules).

    Returns:
        The spec, or None.
    """
    settings = resolve(config)
    if settings["identify_policy"] != "customer_metadata":
        return None
    warehouse = settings["record_preset"] == "segment_warehouse"
    traits_field = settings["traits_field"]
    if traits_field is None:
        traits_field = None if warehouse else "traits"
    streams = settings["identify_streams"]
    return IdentifySpec(
        customer_field=spec.customer_field,
        traits_field=traits_field,
        traits_mapping=flatten_mapping(settings["traits_mapping"]),
        traits_passthrough=bool(settings["traits_passthrough"]),
        identify_streams=frozenset(streams) if streams is not None else None,
        warehouse=warehouse,
        nested_properties=spec.nested_properties,
        honor_integrations=spec.honor_integrations,
        integration_name=spec.integration_name,
    )


def is_identify_stream(stream: str, spec: IdentifySpec) -> bool:
    """Whether a stream's records are Identify calls even without a `type` field.

    Args:
        stream: The Singer stream name.
        spec: The Identify spec.

    Returns:
        True for a stream named in `identify_streams`; without that setting, under the
        warehouse preset, for `identifies` with or without a schema prefix (`public-identifies`,
        `analytics.identifies`; case-insensitive).
    """
    if spec.identify_streams is not None:
        return stream in spec.identify_streams
    if not spec.warehouse:
        return False
    name = stream.lower()
    return name == WAREHOUSE_IDENTIFY_TABLE or name.endswith(
        tuple(sep + WAREHOUSE_IDENTIFY_TABLE for sep in _SCHEMA_SEPARATORS),
    )


def is_identify(record: t.Any, identify_stream: bool) -> bool:
    """Whether a record takes the metadata path.

    Args:
        record: The record.
        identify_stream: Whether its stream is an Identify stream.

    Returns:
        True for `type` `identify` (any case), and for a record with no `type` in an
        Identify stream. Every other record takes the Track path, unchanged.
    """
    if type(record) is not dict:
        return False
    kind = record.get("type")
    if kind is None or kind == "":
        return identify_stream
    return isinstance(kind, str) and kind.lower() == IDENTIFY_TYPE


@dataclass(frozen=True, slots=True)
class Skipped:
    """An Identify deliberately not sent (counted in the summary, never dead-lettered)."""

    reason: t.Literal["integrations", "no_traits"]


@dataclass(frozen=True, slots=True)
class Update:
    """One Identify record's metadata change for one customer."""

    customer: str
    metadata: dict[str, str | None]


def metadata_value(key: str, value: t.Any) -> str | None:
    """A scalar trait as Orb metadata text (Orb takes strings only; null deletes the key).

    Strings are kept as they are; booleans are `"true"`/`"false"`; integers are decimal text;
    other numbers are plain decimal text with no exponent and no trailing zeros
    (`12.50` → `"12.5"`, `100.0` → `"100"`, `1.5e-7` → `"0.00000015"`), so one value always
    gives one text; datetimes are UTC `…Z`.

    Args:
        key: The trait's name (for the reason when the value cannot be sent).
        value: A scalar (not an object or array).

    Returns:
        The text, or None for a null trait.

    Raises:
        InvalidRecordError: NaN/Infinity, or a type Orb metadata cannot hold.
    """
    if value is None or isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        value = decimal.Decimal(value)  # str(int) refuses very long ints (sys.int_info)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRecordError("bad_trait_value", f"trait `{key}` is not a finite number")
        value = decimal.Decimal(repr(value))  # the shortest text that reads back as the float
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise InvalidRecordError("bad_trait_value", f"trait `{key}` is not a finite number")
        text = _plain_decimal(value) if abs(value.adjusted()) <= MAX_NUMBER_TEXT else ""
        if not text or len(text) > MAX_NUMBER_TEXT:
            raise InvalidRecordError(
                "bad_trait_value",
                f"trait `{key}` is a number with more than {MAX_NUMBER_TEXT} digits in plain "
                "decimal notation",
            )
        return text
    if isinstance(value, datetime.datetime):
        return format_orb(to_utc(value))
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise InvalidRecordError(
        "bad_trait_value",
        f"trait `{key}` has a value of type {type(value).__name__}, which Orb metadata cannot "
        "hold",
    )


def _plain_decimal(value: decimal.Decimal) -> str:
    if value.is_zero():
        return "0"
    # normalize() drops trailing zeros; a context as precise as the value never rounds it.
    exact = decimal.Context(prec=len(value.as_tuple().digits), Emax=decimal.MAX_EMAX,
                            Emin=decimal.MIN_EMIN)
    return f"{value.normalize(exact):f}"


class _MetadataBuilder:
    """Collects flat metadata and detects two traits landing on one key."""

    __slots__ = ("nested", "out", "sources")

    def __init__(self, nested: str) -> None:
        self.nested = nested
        self.out: dict[str, str | None] = {}
        self.sources: dict[str, str] = {}

    def put(self, orb_key: str, source: str, value: t.Any) -> None:
        if isinstance(value, (dict, list, tuple)):
            self._nested(orb_key, source, value, is_object=isinstance(value, dict))
            return
        text = metadata_value(source, value)
        if orb_key in self.out:
            raise InvalidRecordError(
                "key_collision",
                f"traits `{self.sources[orb_key]}` and `{source}` both map to Orb metadata key "
                f"`{orb_key}`",
            )
        self.sources[orb_key] = source
        self.out[orb_key] = text

    def _nested(self, orb_key: str, source: str, value: t.Any, *, is_object: bool) -> None:
        policy = self.nested
        if policy == "reject":
            kind = "an object" if is_object else "an array"
            raise InvalidRecordError(
                "nested_property", f"trait `{source}` is {kind} and `nested_properties` is `reject`"
            )
        if policy == "drop":
            return
        if policy == "flatten" and is_object:
            for sub_key, sub_value in value.items():
                self.put(f"{orb_key}_{sub_key}", f"{source}.{sub_key}", sub_value)
            return
        try:  # json_string (objects and arrays) and flatten (arrays)
            text = jsonutil.dumps_str(value)
        except (TypeError, ValueError):
            raise InvalidRecordError(
                "bad_trait_value", f"trait `{source}` cannot be written as JSON text"
            ) from None
        self.put(orb_key, source, text)


def _traits(record: t.Mapping[str, t.Any], spec: IdentifySpec) -> t.Mapping[str, t.Any]:
    if spec.traits_field is None:
        # Segment's warehouse `identifies` table: traits are top-level columns.
        return warehouse_properties(record)
    source = record if spec.traits_field == "" else get_path(record, spec.traits_field)
    if source is MISSING or source is None:
        return {}
    if isinstance(source, str):
        # A JSON-object string (a dbt model's JSON column) holds the traits.
        if not source.strip():
            return {}
        try:
            source = jsonutil.loads(source)
        except ValueError:
            raise InvalidRecordError(
                "bad_traits", f"traits at `{spec.traits_field}` are a string that is not JSON"
            ) from None
        if source is None:
            return {}
    if not isinstance(source, dict):
        raise InvalidRecordError(
            "bad_traits",
            f"traits at `{spec.traits_field}` are {type(source).__name__}, not an object",
        )
    return source


def build_metadata(traits: t.Mapping[str, t.Any], spec: IdentifySpec) -> dict[str, str | None]:
    """Apply `traits_mapping`, `traits_passthrough` and `nested_properties` to the traits.

    Args:
        traits: The traits object.
        spec: The Identify spec.

    Returns:
        Orb metadata key → text, or None to delete that key. Unmapped traits are not read
        (unless `traits_passthrough`), so they cannot reach a request or a message.
    """
    builder = _MetadataBuilder(spec.nested_properties)
    mapping = spec.traits_mapping
    for src, dst in mapping.items():
        if src in traits:
            value = traits[src]
        else:
            value = get_path(traits, src) if "." in src else MISSING
            if value is MISSING:
                continue
        if not src.startswith("_sdc_"):
            builder.put(dst, src, value)
    if spec.traits_passthrough:
        for key, value in traits.items():
            if key in mapping or key.startswith("_sdc_"):
                continue
            if isinstance(value, dict) and spec.nested_properties == "flatten":
                # The leaves `traits_mapping` already renamed are left out.
                passthrough_nested(builder, key, key, value, mapping)
            else:
                builder.put(key, key, value)
    return builder.out


def map_identify(
    record: t.Mapping[str, t.Any], spec: IdentifySpec
) -> Update | Skipped | Invalid:
    """Turn one Identify record into a metadata update, a skip, or an invalid-record reason.

    Args:
        record: The Identify record.
        spec: The Identify spec.

    Returns:
        Update; Skipped (`integrations`, or `no_traits` when no mapped trait is present);
        or Invalid (no customer id, traits that are not an object, a value Orb cannot hold).
    """
    if spec.honor_integrations and is_disabled_by_integrations(
        record.get("integrations"), spec.integration_name
    ):
        return Skipped("integrations")
    try:
        customer = read_customer(get_path(record, spec.customer_field), spec.customer_field)
        if customer in _DOT_SEGMENTS:
            raise InvalidRecordError(
                "bad_customer",
                f"customer id at `{spec.customer_field}` is {customer!r}, which cannot be "
                "addressed in Orb's URL path (`.` and `..` are path segments)",
            )
        metadata = build_metadata(_traits(record, spec), spec)
    except InvalidRecordError as exc:
        return Invalid(exc.code, exc.reason)
    if not metadata:
        return Skipped("no_traits")
    return Update(customer, metadata)


@dataclass(slots=True)
class MergedUpdate:
    """The updates for one customer merged in input order (the later value wins)."""

    customer: str
    metadata: dict[str, str | None] = field(default_factory=dict)
    indexes: list[int] = field(default_factory=list)  # the source updates, in input order


def merge_updates(updates: t.Sequence[Update]) -> list[MergedUpdate]:
    """One update per customer; keys merge in input order, a later value (null too) wins.

    Orb merges metadata key by key (a null deletes one key), so applying the merged update
    leaves the customer exactly as applying each update in turn would.

    Args:
        updates: Updates in input order.

    Returns:
        Merged updates, in the order each customer first appeared.
    """
    merged: dict[str, MergedUpdate] = {}
    for index, update in enumerate(updates):
        item = merged.get(update.customer)
        if item is None:
            item = merged[update.customer] = MergedUpdate(update.customer)
        item.metadata.update(update.metadata)
        item.indexes.append(index)
    return list(merged.values())


