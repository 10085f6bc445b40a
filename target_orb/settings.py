"""Settings: the config schema, the cross-field checks and the frozen settings objects."""

from __future__ import annotations

import ipaddress
import typing as t
from dataclasses import dataclass
from urllib.parse import urlsplit

from singer_sdk import typing as th

MAX_EVENTS_PER_REQUEST = 500  # Orb /v1/ingest limit (reference/orb-api.md §2.8)
DEFAULT_API_URL = "https://api.withorb.com/v1"

RecordPreset = t.Literal["segment", "segment_warehouse"]
NestedPolicy = t.Literal["flatten", "json_string", "drop", "reject"]
InvalidPolicy = t.Literal["dead_letter", "skip", "fail"]
LatePolicy = t.Literal["reject", "send", "backfill"]
IdentifyPolicy = t.Literal["skip", "customer_metadata"]

RECORD_PRESETS = ("segment", "segment_warehouse")
NESTED_POLICIES = ("flatten", "json_string", "drop", "reject")
INVALID_POLICIES = ("dead_letter", "skip", "fail")
LATE_POLICIES = ("reject", "send", "backfill")
IDENTIFY_POLICIES = ("skip", "customer_metadata")

# Segment warehouse system columns that never become properties (CONTRACT.md, record_preset).
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


# A mapping value is an Orb key, or (as Meltano writes dotted keys) a nested object of them.
_MAPPING_VALUE = th.CustomType({"type": ["string", "object"]})


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


def _prop(name: str, typ: t.Any, title: str, description: str, **kwargs: t.Any) -> th.Property:
    return th.Property(name, typ, title=title, description=description, **kwargs)


CONFIG_SCHEMA: dict = th.PropertiesList(
    _prop(
        "api_key",
        th.StringType,
        "Orb API key",
        "Orb API key, sent as `Authorization: Bearer …`. Test-mode and live keys differ. "
        "Set it through TARGET_ORB_API_KEY or a secret store, never in a committed file.",
        required=True,
        secret=True,
    ),
    _prop(
        "event_name_field",
        th.StringType,
        "Event name field",
        "Dotted path of the record field that becomes Orb's `event_name`. Default `event` "
        "(`event_text`, falling back to `event`, with `record_preset: segment_warehouse`).",
    ),
    _prop(
        "external_customer_id_field",
        th.StringType,
        "External customer ID field",
        "Dotted path of the field that becomes Orb's `external_customer_id`, e.g. `userId` or "
        "`context.groupId`. Required unless `customer_id_field` is set (the warehouse preset "
        "defaults it to `user_id`).",
    ),
    _prop(
        "idempotency_key_field",
        th.StringType,
        "Idempotency key field",
        "Dotted path of the field that becomes Orb's `idempotency_key`. Default `messageId` "
        "(`id` with the warehouse preset). Keys over 64 characters are sent as their sha256 "
        "hex; a missing key is replaced by a deterministic content hash.",
    ),
    _prop(
        "properties_mapping",
        th.ObjectType(additional_properties=_MAPPING_VALUE),
        "Properties mapping",
        "Source property key (a dotted path inside the properties object) → Orb property key. "
        "Keys not mapped are dropped unless `properties_passthrough` is true. A nested object "
        "is read as dotted paths (Meltano turns `a.b` keys into nested objects).",
        default={},
    ),
    _prop(
        "api_url",
        th.StringType,
        "API URL",
        "Orb API base URL; `/ingest` and `/ping` are appended. Must be https:// unless the "
        "host is a loopback address (a local stand-in).",
        default=DEFAULT_API_URL,
    ),
    _prop(
        "customer_id_field",
        th.StringType,
        "Orb customer ID field",
        "Dotted path of a field holding Orb's own `customer_id`; use instead of "
        "`external_customer_id_field` (set exactly one of the two).",
    ),
    _prop(
        "timestamp_field",
        th.StringType,
        "Timestamp field",
        "Dotted path of the event time. Default `timestamp`. Sent as UTC `…Z`.",
    ),
    _prop(
        "properties_field",
        th.StringType,
        "Properties field",
        "Dotted path of the object whose keys `properties_mapping` addresses; `\"\"` means "
        "the record root. Default `properties` (`\"\"` with the warehouse preset). A JSON "
        "object string in this field is parsed.",
    ),
    _prop(
        "properties_passthrough",
        th.BooleanType,
        "Pass all properties through",
        "Send every property (after flattening), renamed where `properties_mapping` maps "
        "it. Default false (true with the warehouse preset). `_sdc_*` keys never pass.",
    ),
    _prop(
        "record_preset",
        th.StringType,
        "Record preset",
        "`segment` (raw Segment JSON: messageId, userId, properties) or `segment_warehouse` "
        "(Segment warehouse rows: id, user_id, event_text, flat property columns).",
        default="segment",
        allowed_values=list(RECORD_PRESETS),
    ),
    _prop(
        "event_types",
        th.ArrayType(th.StringType),
        "Event types",
        "Segment `type` values that are sent; records without `type` count as track.",
        default=["track"],
    ),
    _prop(
        "honor_integrations",
        th.BooleanType,
        "Honor integrations",
        "Skip a record when `integrations.<integration_name>` is false, or `integrations.All` "
        "(or `all`) is false and there is no `<integration_name>` key.",
        default=True,
    ),
    _prop(
        "integration_name",
        th.StringType,
        "Integration name",
        "The key looked up in a record's `integrations` object (case-sensitive).",
        default="Orb",
    ),
    _prop(
        "event_allowlist",
        th.ArrayType(th.StringType),
        "Event allowlist",
        "If set, only source event names in this list are sent; others are skipped.",
    ),
    _prop(
        "event_denylist",
        th.ArrayType(th.StringType),
        "Event denylist",
        "Source event names that are skipped (e.g. `Audience Entered`).",
    ),
    _prop(
        "nested_properties",
        th.StringType,
        "Nested properties",
        "What happens to nested objects and arrays in properties: `flatten` (objects become "
        "`a_b` keys, arrays JSON strings), `json_string`, `drop`, or `reject` (invalid record).",
        default="flatten",
        allowed_values=list(NESTED_POLICIES),
    ),
    _prop(
        "invalid_event_policy",
        th.StringType,
        "Invalid event policy",
        "A record that cannot become a valid Orb event, or that Orb rejects with a 400: "
        "`dead_letter` (write it to `dead_letter_path` and go on), `skip` (count and go on), "
        "or `fail` (stop the run).",
        default="dead_letter",
        allowed_values=list(INVALID_POLICIES),
    ),
    _prop(
        "dead_letter_path",
        th.StringType,
        "Dead-letter file",
        "JSON Lines file for records that could not be delivered, with the reason. "
        "Appended, flushed and fsynced before the batch is acknowledged.",
        default="target-orb-dead-letter.jsonl",
    ),
    _prop(
        "dry_run",
        th.BooleanType,
        "Dry run",
        "Map and validate, log the Orb payloads, send nothing and write no STATE.",
        default=False,
    ),
    _prop(
        "batch_size_rows",
        th.IntegerType,
        "Batch size",
        "Events per request to Orb, at most 500.",
        default=MAX_EVENTS_PER_REQUEST,
    ),
    _prop(
        "max_concurrent_requests",
        th.IntegerType,
        "Max concurrent requests",
        "Ingest requests in flight at once, shared by all streams.",
        default=4,
    ),
    _prop(
        "request_timeout",
        th.IntegerType,
        "Request timeout",
        "Seconds to wait for Orb to answer one request (read timeout; connect timeout is "
        "the smaller of this and 10 s).",
        default=60,
    ),
    _prop(
        "max_retry_seconds",
        th.IntegerType,
        "Max retry seconds",
        "Total time budget for retrying one request (429, 5xx, timeouts) before the run fails.",
        default=600,
    ),
    _prop(
        "late_event_policy",
        th.StringType,
        "Late event policy",
        "Events older than `grace_period_hours`: `reject` (dead-letter locally), `send` "
        "(send anyway; Orb rejects them unless your account's grace period is longer), or "
        "`backfill` (load them through Orb backfills: non-replacing, at most 31 days each, "
        "closed before the run ends; keys Orb already holds are left out). See README "
        "\"Loading history\".",
        default="reject",
        allowed_values=list(LATE_POLICIES),
    ),
    _prop(
        "grace_period_hours",
        th.IntegerType,
        "Grace period hours",
        "Your Orb account's ingestion grace period; older events are late.",
        default=12,
    ),
    _prop(
        "future_tolerance_seconds",
        th.IntegerType,
        "Future tolerance seconds",
        "Events further than this in the future are invalid (Orb allows 5 minutes).",
        default=300,
    ),
    _prop(
        "max_requests_per_second",
        th.IntegerType,
        "Max requests per second",
        "Client-side cap on ingest requests per second, shared by all streams. Off by default.",
    ),
    _prop(
        "max_events_per_minute",
        th.IntegerType,
        "Max events per minute",
        "Client-side cap on events per minute, shared by all streams. Off by default.",
    ),
    _prop(
        "progress_interval_seconds",
        th.IntegerType,
        "Progress interval seconds",
        "Log a progress line on stderr this often; 0 turns it off.",
        default=30,
    ),
    _prop(
        "validate_records",
        th.BooleanType,
        "Validate records",
        "Validate each record against the tap's stream schema (fastjsonschema) and log "
        "mismatches. Off by default: target-orb's own mapping checks every field it sends "
        "and dead-letters what it cannot send, and a schema mismatch never stops a billing "
        "run either way, so validation would only cost time (about a fifth of the "
        "per-record work, see benchmarks/).",
        default=False,
    ),
    _prop(
        "identify_policy",
        th.StringType,
        "Identify policy",
        "Identify records (Segment `type` `identify`, or the rows of `identify_streams`): "
        "`skip` (counted as skipped by type), or `customer_metadata`: each becomes an update "
        "of the Orb customer's `metadata` (`PUT /v1/customers/external_customer_id/{id}`, "
        "customer from `external_customer_id_field`) with the traits chosen by "
        "`traits_mapping` as strings; a null trait deletes its key. Merged per customer in "
        "input order; a customer Orb does not know is dead-lettered.",
        default="skip",
        allowed_values=list(IDENTIFY_POLICIES),
    ),
    _prop(
        "traits_field",
        th.StringType,
        "Traits field",
        "Dotted path of an Identify's traits object; `\"\"` means the record root. Default "
        "`traits`; with `record_preset: segment_warehouse` the traits are the row's columns "
        "minus Segment's system columns (the `identifies` table). A JSON-object string is "
        "parsed.",
    ),
    _prop(
        "traits_mapping",
        th.ObjectType(additional_properties=_MAPPING_VALUE),
        "Traits mapping",
        "Trait key (a dotted path inside the traits) → Orb metadata key. Unmapped traits are "
        "dropped unless `traits_passthrough`, and never leave the process (emails, phones and "
        "addresses stay home). Nested traits follow `nested_properties`.",
        default={},
    ),
    _prop(
        "traits_passthrough",
        th.BooleanType,
        "Traits passthrough",
        "Send every trait (after flattening) as customer metadata, renamed where "
        "`traits_mapping` maps it. Default false, with every preset: traits often hold "
        "personal data.",
        default=False,
    ),
    _prop(
        "identify_streams",
        th.ArrayType(th.StringType),
        "Identify streams",
        "Streams whose records are Identify calls even without a `type` field (used with "
        "`identify_policy: customer_metadata`). Default: with `record_preset: "
        "segment_warehouse`, streams named `identifies` with or without a schema prefix "
        "(`public-identifies`, `analytics.identifies`); none otherwise. `[]` turns that off.",
    ),
).to_dict()


@dataclass(frozen=True, slots=True)
class MappingSpec:
    """How one record becomes one Orb event; built once from the config."""

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
    late_event_policy: LatePolicy = "reject"
    grace_period_hours: int = 12
    future_tolerance_seconds: int = 300


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How events travel to Orb."""

    api_url: str
    batch_size_rows: int = MAX_EVENTS_PER_REQUEST
    max_concurrent_requests: int = 4
    request_timeout: int = 60
    max_retry_seconds: int = 600
    max_requests_per_second: int | None = None
    max_events_per_minute: int | None = None
    dry_run: bool = False
    invalid_event_policy: InvalidPolicy = "dead_letter"
    dead_letter_path: str = "target-orb-dead-letter.jsonl"
    progress_interval_seconds: int = 30


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_problems(config: t.Mapping[str, t.Any]) -> list[str]:
    """Every cross-field problem in a config, each naming the setting and the way out.

    Args:
        config: The parsed config (defaults already applied by the SDK).

    Returns:
        Messages; empty when the config is usable.
    """
    problems: list[str] = []
    preset = config.get("record_preset") or "segment"
    ext_field = config.get("external_customer_id_field")
    cust_field = config.get("customer_id_field")
    if preset == "segment_warehouse" and not ext_field and not cust_field:
        ext_field = "user_id"
    if not ext_field and not cust_field:
        problems.append(
            "Neither `external_customer_id_field` nor `customer_id_field` is set: set one, "
            "e.g. `external_customer_id_field: userId` (TARGET_ORB_EXTERNAL_CUSTOMER_ID_FIELD).",
        )
    elif config.get("external_customer_id_field") and cust_field:
        problems.append(
            "Both `external_customer_id_field` and `customer_id_field` are set; Orb takes "
            "exactly one customer field per event. Remove one of them.",
        )
    batch = config.get("batch_size_rows")
    if isinstance(batch, int) and not 1 <= batch <= MAX_EVENTS_PER_REQUEST:
        problems.append(
            f"`batch_size_rows` is {batch}; Orb accepts 1 to {MAX_EVENTS_PER_REQUEST} events "
            "per request. Set it to 500 or less.",
        )
    for name in ("properties_mapping", "traits_mapping"):
        mapping = config.get(name) or {}
        if not isinstance(mapping, t.Mapping):
            problems.append(f"`{name}` must be an object of string → string.")
            continue
        mapping = flatten_mapping(mapping)
        bad = [k for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            problems.append(
                f"`{name}` has non-string values for {sorted(map(str, bad))}; every key and "
                "value must be a string (Segment's Orb destination has the same rule).",
            )
        empty = [k for k, v in mapping.items() if isinstance(v, str) and not v.strip()]
        if empty:
            problems.append(f"`{name}` maps {sorted(empty)} to an empty Orb key.")
    enums = {
        "record_preset": RECORD_PRESETS,
        "nested_properties": NESTED_POLICIES,
        "invalid_event_policy": INVALID_POLICIES,
        "late_event_policy": LATE_POLICIES,
        "identify_policy": IDENTIFY_POLICIES,
    }
    for name, allowed in enums.items():
        value = config.get(name)
        if value is not None and value not in allowed:
            problems.append(f"`{name}` is {value!r}; use one of {', '.join(allowed)}.")
    if config.get("identify_policy") == "customer_metadata":
        if cust_field:
            problems.append(
                "`identify_policy: customer_metadata` updates customers by external id "
                "(`PUT /v1/customers/external_customer_id/{id}`) and `customer_id_field` is "
                "set: use `external_customer_id_field` instead, or `identify_policy: skip`.",
            )
        if "identify" in {str(v).lower() for v in config.get("event_types") or ()}:
            problems.append(
                "`event_types` lists `identify` and `identify_policy` is `customer_metadata`; "
                "an Identify record becomes a customer metadata update, not a usage event. "
                "Remove `identify` from `event_types`.",
            )
    positive = (
        "max_concurrent_requests",
        "request_timeout",
        "max_retry_seconds",
        "max_requests_per_second",
        "max_events_per_minute",
    )
    for name in positive:
        value = config.get(name)
        if isinstance(value, int) and value < 1:
            problems.append(f"`{name}` is {value}; it must be at least 1 (or unset).")
    for name in ("grace_period_hours", "future_tolerance_seconds", "progress_interval_seconds"):
        value = config.get(name)
        if isinstance(value, int) and value < 0:
            problems.append(f"`{name}` is {value}; it must be 0 or more.")
    api_url = config.get("api_url") or DEFAULT_API_URL
    if not isinstance(api_url, str):
        return problems
    parts = urlsplit(api_url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        problems.append(f"`api_url` {api_url!r} is not an http(s) URL.")
    elif parts.scheme != "https" and not _is_loopback(parts.hostname):
        problems.append(
            f"`api_url` {api_url!r} is not https://; plain http is only allowed for a "
            "loopback host (a local stand-in). Use https://api.withorb.com/v1.",
        )
    return problems


def build_mapping_spec(config: t.Mapping[str, t.Any]) -> MappingSpec:
    """Resolve presets and defaults into a MappingSpec.

    Args:
        config: A config for which `config_problems` returned nothing.

    Returns:
        The frozen spec the pure mapping uses.
    """
    preset = config.get("record_preset") or "segment"
    defaults = PRESET_DEFAULTS[preset]

    def pick(name: str) -> t.Any:
        value = config.get(name)
        return defaults.get(name) if value is None else value

    cust_field = config.get("customer_id_field")
    if cust_field:
        customer_field, customer_key = cust_field, "customer_id"
    else:
        customer_field = pick("external_customer_id_field")
        customer_key = "external_customer_id"
    event_name_field = pick("event_name_field")
    fallback = (
        "event"
        if preset == "segment_warehouse" and config.get("event_name_field") is None
        else None
    )
    allow = config.get("event_allowlist")
    return MappingSpec(
        event_name_field=event_name_field,
        event_name_fallback=fallback,
        customer_field=customer_field,
        customer_key=customer_key,  # type: ignore[arg-type]
        idempotency_key_field=pick("idempotency_key_field"),
        timestamp_field=pick("timestamp_field"),
        properties_field=pick("properties_field"),
        properties_mapping=flatten_mapping(config.get("properties_mapping") or {}),
        properties_passthrough=bool(pick("properties_passthrough")),
        warehouse_columns=preset == "segment_warehouse" and pick("properties_field") == "",
        nested_properties=config.get("nested_properties") or "flatten",
        event_types=frozenset(config.get("event_types") or ["track"]),
        honor_integrations=bool(config.get("honor_integrations", True)),
        integration_name=config.get("integration_name") or "Orb",
        event_allowlist=frozenset(allow) if allow is not None else None,
        event_denylist=frozenset(config.get("event_denylist") or ()),
        late_event_policy=config.get("late_event_policy") or "reject",
        grace_period_hours=int(config.get("grace_period_hours", 12)),
        future_tolerance_seconds=int(config.get("future_tolerance_seconds", 300)),
    )


def build_delivery_settings(config: t.Mapping[str, t.Any]) -> DeliverySettings:
    """Collect the delivery settings.

    Args:
        config: A config for which `config_problems` returned nothing.

    Returns:
        The frozen delivery settings.
    """
    return DeliverySettings(
        api_url=(config.get("api_url") or DEFAULT_API_URL).rstrip("/"),
        batch_size_rows=int(config.get("batch_size_rows") or MAX_EVENTS_PER_REQUEST),
        max_concurrent_requests=int(config.get("max_concurrent_requests") or 4),
        request_timeout=int(config.get("request_timeout") or 60),
        max_retry_seconds=int(config.get("max_retry_seconds") or 600),
        max_requests_per_second=config.get("max_requests_per_second"),
        max_events_per_minute=config.get("max_events_per_minute"),
        dry_run=bool(config.get("dry_run", False)),
        invalid_event_policy=config.get("invalid_event_policy") or "dead_letter",
        dead_letter_path=config.get("dead_letter_path") or "target-orb-dead-letter.jsonl",
        progress_interval_seconds=int(config.get("progress_interval_seconds", 30)),
    )
