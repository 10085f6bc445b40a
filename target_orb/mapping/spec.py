"""The mapping's settings: presets, and the frozen `MappingSpec` built once from the config."""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from target_orb.settings import LatePolicy, NestedPolicy, from_settings, resolve

# Segment warehouse system columns that never become properties (README, "Segment warehouse rows").
WAREHOUSE_SYSTEM_COLUMNS = frozenset(
    {
        "id",
        "anonymous_id",
        "user_id",
        "event",
        "event_text",
        "timestamp",
        "original_timestamp",
        "sent_at",
        "received_at",
        "uuid",
        "uuid_ts",
        "loaded_at",
    },
)
WAREHOUSE_SYSTEM_PREFIXES = ("context_", "_sdc_")

# Defaults each preset gives to the mapping fields; an explicit setting always wins.
PRESET_DEFAULTS: dict[str, dict[str, t.Any]] = {
    "segment": {
        "event_name_field": "event",
        "idempotency_key_field": "messageId",
        "timestamp_field": "timestamp",
        "properties_field": "properties",
        "properties_passthrough": False,
    },
    "segment_warehouse": {
        "event_name_field": "event_text",
        "idempotency_key_field": "id",
        "external_customer_id_field": "user_id",
        "timestamp_field": "timestamp",
        "properties_field": "",
        "properties_passthrough": True,
    },
}


def flatten_mapping(mapping: t.Mapping[str, t.Any], prefix: str = "") -> dict[str, t.Any]:
    """`{"request": {"method": "m"}}` → `{"request.method": "m"}`; other values kept as is.

    Args:
        mapping: A `properties_mapping` / `traits_mapping` value.
        prefix: Dotted path so far.

    Returns:
        Flat source path → value.
    """
    flat: dict[str, t.Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, t.Mapping):
            flat.update(flatten_mapping(value, f"{path}."))
        else:
            flat[path] = value
    return flat


@dataclass(frozen=True, slots=True)
class MappingSpec:
    """How one record becomes one Orb event; built once from the config.

    Fields named after a setting hold its resolved value; the others are derived from the
    preset (`build_mapping_spec`).
    """

    event_name_field: str
    event_name_fallback: str | None
    customer_field: str
    customer_key: t.Literal["external_customer_id", "customer_id"]
    idempotency_key_field: str
    timestamp_field: str
    properties_field: str
    properties_mapping: t.Mapping[str, str]
    properties_passthrough: bool
    warehouse_columns: bool
    nested_properties: NestedPolicy
    event_types: frozenset[str]
    honor_integrations: bool
    integration_name: str
    event_allowlist: frozenset[str] | None
    event_denylist: frozenset[str]
    late_event_policy: LatePolicy
    grace_period_hours: int
    future_tolerance_seconds: int


def build_mapping_spec(config: t.Mapping[str, t.Any]) -> MappingSpec:
    """Resolve presets and defaults into a MappingSpec.

    Args:
        config: A config for which `config_problems` returned nothing.

    Returns:
        The frozen spec the pure mapping uses.
    """
    resolved = resolve(config)
    preset = resolved["record_preset"]
    for name, value in PRESET_DEFAULTS[preset].items():
        if resolved[name] is None:
            resolved[name] = value
    if config.get("customer_id_field"):
        customer_field, customer_key = resolved["customer_id_field"], "customer_id"
    else:
        customer_field = resolved["external_customer_id_field"]
        customer_key = "external_customer_id"
    allow = resolved["event_allowlist"]
    return from_settings(
        MappingSpec,
        resolved,
        event_name_fallback=(
            "event"
            if preset == "segment_warehouse" and config.get("event_name_field") is None
            else None
        ),
        customer_field=customer_field,
        customer_key=customer_key,
        properties_mapping=flatten_mapping(resolved["properties_mapping"]),
        properties_passthrough=bool(resolved["properties_passthrough"]),
        warehouse_columns=preset == "segment_warehouse" and resolved["properties_field"] == "",
        # Compared with the record's lower-cased `type`: case-insensitive on both sides.
        event_types=frozenset(str(v).lower() for v in resolved["event_types"]),
        event_allowlist=frozenset(allow) if allow is not None else None,
        event_denylist=frozenset(resolved["event_denylist"] or ()),
    )
