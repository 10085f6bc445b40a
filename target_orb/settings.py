"""Settings: the config schema, the checks it cannot express, and the frozen settings objects.

Each setting is declared once, in `CONFIG_SCHEMA`: its type, default, range (`minimum`,
`maximum`) and allowed values (`allowed_values`, taken from the `Literal` types below). The
SDK validates a config against it (one message per problem) and `resolve()` fills in its
defaults; the settings objects take their fields from `resolve()` by name. `config_problems`
holds only what JSON Schema cannot say (rules across settings, nested mapping values, the
api_url scheme). Adding a setting: its `_prop(...)` entry, and the code that reads it
(`resolve(config)[name]`, or a field of the same name on a settings dataclass).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import ipaddress
import json
import typing as t
from dataclasses import dataclass
from urllib.parse import urlsplit

from singer_sdk import typing as th

# Orb /v1/ingest limit (docs.withorb.com/events-and-metrics/event-ingestion).
MAX_EVENTS_PER_REQUEST = 500
DEFAULT_API_URL = "https://api.withorb.com/v1"
# Idle flush: long enough that a tap paging through an API keeps full batches, short enough
# that a quiet tap has its events in Orb and its bookmark saved within seconds.
DEFAULT_FLUSH_INTERVAL_SECONDS = 5.0

RecordPreset = t.Literal["segment", "segment_warehouse"]
NestedPolicy = t.Literal["flatten", "json_string", "drop", "reject"]
InvalidPolicy = t.Literal["dead_letter", "skip", "fail"]
LatePolicy = t.Literal["reject", "send", "backfill"]
IssuedPolicy = t.Literal["backfill", "dead_letter", "fail"]
IdentifyPolicy = t.Literal["skip", "customer_metadata"]
LoadMethod = t.Literal["append-only", "upsert", "overwrite"]


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
        allowed_values=list(t.get_args(RecordPreset)),
    ),
    _prop(
        "event_types",
        th.ArrayType(th.StringType),
        "Event types",
        "Segment `type` values that are sent, compared case-insensitively (`Track` matches "
        "`track` and `TRACK`); records without `type` count as track.",
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
        allowed_values=list(t.get_args(NestedPolicy)),
    ),
    _prop(
        "invalid_event_policy",
        th.StringType,
        "Invalid event policy",
        "A record that cannot become a valid Orb event, or that Orb rejects with a 400: "
        "`dead_letter` (write it to `dead_letter_path` and go on), `skip` (count and go on), "
        "or `fail` (stop the run).",
        default="dead_letter",
        allowed_values=list(t.get_args(InvalidPolicy)),
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
        th.IntegerType(minimum=1, maximum=MAX_EVENTS_PER_REQUEST),
        "Batch size",
        "Events per request to Orb, at most 500.",
        default=MAX_EVENTS_PER_REQUEST,
    ),
    _prop(
        "max_concurrent_requests",
        th.IntegerType(minimum=1),
        "Max concurrent requests",
        "Ingest requests in flight at once, shared by all streams.",
        default=4,
    ),
    _prop(
        "request_timeout",
        th.IntegerType(minimum=1),
        "Request timeout",
        "Seconds to wait for Orb to answer one request (read timeout; connect timeout is "
        "the smaller of this and 10 s).",
        default=60,
    ),
    _prop(
        "max_retry_seconds",
        th.IntegerType(minimum=1),
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
        allowed_values=list(t.get_args(LatePolicy)),
    ),
    _prop(
        "grace_period_hours",
        th.IntegerType(minimum=0),
        "Grace period hours",
        "Your Orb account's ingestion grace period; older events are late.",
        default=12,
    ),
    _prop(
        "issued_period_policy",
        th.StringType,
        "Issued period policy",
        "Under `late_event_policy: backfill`: late events of a customer whose invoice for "
        "that period Orb has already issued (Orb does not change or re-issue an issued "
        "invoice): `backfill` (load them so usage is right, and report them per customer and "
        "window), `dead_letter` (do not load; dead-letter them naming the invoice), or "
        "`fail` (stop the run). See README \"Loading history\".",
        default="backfill",
        allowed_values=list(t.get_args(IssuedPolicy)),
    ),
    _prop(
        "future_tolerance_seconds",
        th.IntegerType(minimum=0),
        "Future tolerance seconds",
        "Events further than this in the future are invalid (Orb allows 5 minutes).",
        default=300,
    ),
    _prop(
        "max_requests_per_second",
        th.IntegerType(minimum=1),
        "Max requests per second",
        "Client-side cap on ingest requests per second, shared by all streams. Off by default.",
    ),
    _prop(
        "max_events_per_minute",
        th.IntegerType(minimum=1),
        "Max events per minute",
        "Client-side cap on events per minute, shared by all streams. Off by default.",
    ),
    _prop(
        "progress_interval_seconds",
        th.IntegerType(minimum=0),
        "Progress interval seconds",
        "Log a progress line on stderr this often; 0 turns it off.",
        default=30,
    ),
    _prop(
        "flush_interval_seconds",
        th.NumberType(minimum=0, maximum=3600),
        "Flush interval seconds",
        "When no input arrives for this long, partial batches are sent and STATE is written "
        "once Orb acknowledged them; 0 turns it off. Default 5: a tap paging through an API "
        "usually pauses well under that between pages (so batches stay full), while a quiet "
        "or streaming tap still has its events in Orb and its bookmark saved within seconds.",
        default=DEFAULT_FLUSH_INTERVAL_SECONDS,
    ),
    _prop(
        "validate_records",
        th.BooleanType,
        "Validate records",
        "Validate each record against the tap's stream schema (fastjsonschema) and log "
        "mismatches. Off by default: target-orb's own mapping checks every field it sends "
        "and dead-letters what it cannot send, and a schema mismatch never stops a billing "
        "run either way, so validation only costs time (README, Performance).",
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
        allowed_values=list(t.get_args(IdentifyPolicy)),
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
        "load_method",
        th.StringType,
        "Load method",
        "`append-only` (default): ingest only, no extra request or storage. `upsert`: Orb "
        "corrections: a key Orb already holds with an equal body is not sent, one with a "
        "different body is amended (`PUT /v1/events/{key}`), a record with `_sdc_deleted_at` "
        "is deprecated when `deprecate_deleted_events` is true; what Orb acknowledged is kept "
        "in the ledger at `state_url`. `overwrite` is refused (a replacing backfill is a "
        "separate, deliberate operation in Orb). See README \"Corrections\".",
        default="append-only",
        allowed_values=list(t.get_args(LoadMethod)),
    ),
    _prop(
        "state_url",
        th.StringType,
        "State URL",
        "SQLAlchemy URL of target-orb's own store: the ledger of what Orb acknowledged (key → "
        "body digest; under `load_method: upsert`, and under `late_event_policy: backfill` "
        "the keys target-orb delivered, never re-sent into a backfill). Default: the SQLite "
        "file `target-orb-ledger.sqlite` in the folder of `dead_letter_path`. Use "
        "`postgresql://…` (extra `target-orb[postgres]`) in containers or when several jobs "
        "share one Orb account; use one store per Orb account.",
        secret=True,
    ),
    _prop(
        "ledger_url",
        th.StringType,
        "Ledger URL (deprecated)",
        "The earlier name of `state_url`; still accepted, with a deprecation warning.",
        secret=True,
    ),
    _prop(
        "deprecate_deleted_events",
        th.BooleanType,
        "Deprecate deleted events",
        "Under `load_method: upsert`: a record with `_sdc_deleted_at` set deprecates its Orb "
        "event (`PUT /v1/events/{key}/deprecate`). Off by default: such records are skipped "
        "and counted.",
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
# target-orb's own settings (the SDK adds its built-in ones, e.g. stream_maps, to a copy).
_OWN_SETTINGS = frozenset(CONFIG_SCHEMA["properties"])


def resolve(config: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Every setting `CONFIG_SCHEMA` declares, with its schema default where it is unset.

    A setting that is missing or null counts as unset (Meltano and `--config ENV` send
    null for an empty value). Settings without a schema default resolve to None (some take
    a default from `record_preset`: see `PRESET_DEFAULTS`).

    Args:
        config: A config (the SDK's, or a plain dict in tests).

    Returns:
        Setting name → value.
    """
    resolved: dict[str, t.Any] = {}
    for name, prop in CONFIG_SCHEMA["properties"].items():
        value = config.get(name)
        resolved[name] = copy.deepcopy(prop.get("default")) if value is None else value
    return resolved


_D = t.TypeVar("_D")


def _from_settings(cls: type[_D], resolved: t.Mapping[str, t.Any], **derived: t.Any) -> _D:
    """Build a settings dataclass: each field named after a setting takes its value.

    Args:
        cls: The dataclass.
        resolved: `resolve(config)`.
        derived: Values of the fields that are not plain settings.

    Returns:
        The instance.
    """
    values = {
        f.name: resolved[f.name] for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in derived
    }
    return cls(**values, **derived)


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


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How events travel to Orb; every field is the setting of the same name."""

    api_url: str
    max_concurrent_requests: int
    request_timeout: int
    max_retry_seconds: int
    max_requests_per_second: int | None
    max_events_per_minute: int | None
    dry_run: bool
    invalid_event_policy: InvalidPolicy
    dead_letter_path: str
    progress_interval_seconds: int
    flush_interval_seconds: float


# What an object- or array-valued setting looks like, for messages about a wrong shape.
SHAPE_EXAMPLES: dict[str, str] = {
    "properties_mapping": '{"amount": "amount", "request.method": "http_method"}',
    "traits_mapping": '{"plan": "plan", "lifetime_value": "ltv"}',
    "event_types": '["track"]',
    "event_allowlist": '["API Request", "payment_confirmed"]',
    "event_denylist": '["Audience Entered", "Audience Exited"]',
    "identify_streams": '["identifies", "crm-traits"]',
    "stream_maps": '{"tracks": {"__alias__": "api_calls"}}',
    "stream_map_config": '{"salt": "abc"}',
    "faker_config": '{"seed": 42}',
}
# Environment variables with the plugin prefix that are not settings (the SDK's log level).
NOT_SETTINGS_ENV = frozenset({"LOGLEVEL"})
_OBJECT_SHAPE = "an object"
_ARRAY_SHAPE = "an array"


@dataclass(frozen=True, slots=True)
class ConfigCheck:
    """What `check_config_keys` found: the config with JSON text parsed, and the problems.

    `settings` names the settings a problem was reported for (the schema's own message
    about the same value would only repeat it).
    """

    config: dict[str, t.Any]
    problems: list[str]
    settings: frozenset[str]


def _types(prop: t.Mapping[str, t.Any]) -> set[str]:
    kind = prop.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {str(k) for k in kind}
    return set()


def structured_shape(prop: t.Mapping[str, t.Any]) -> str | None:
    """`object` or `array` for a setting whose value is one (and never plain text), else None.

    Args:
        prop: The setting's JSON schema.

    Returns:
        The JSON type, or None.
    """
    kinds = _types(prop)
    if "string" in kinds:
        return None
    if "object" in kinds:
        return "object"
    if "array" in kinds:
        return "array"
    return None


def closest_setting(name: str, known: t.Iterable[str]) -> str | None:
    """The known setting a mistyped name most likely meant (difflib), or None.

    Args:
        name: The unknown name.
        known: Setting names.

    Returns:
        The closest setting name.
    """
    matches = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_keys_problem(config: t.Mapping[str, t.Any], known: t.Collection[str]) -> str | None:
    """One message naming every config key that is not a setting, with the closest setting.

    Keys starting with `_` are ignored (a common way to leave comments in a JSON config).

    Args:
        config: The config as given.
        known: Every setting of `--about` (target-orb's and the SDK's built-in ones).

    Returns:
        The message, or None when every key is a setting.
    """
    unknown = sorted(k for k in config if not str(k).startswith("_") and k not in known)
    if not unknown:
        return None
    parts = []
    for key in unknown:
        guess = closest_setting(str(key), known)
        hint = f"; did you mean `{guess}`?" if guess else " (see `target-orb --about`)."
        parts.append(f"`{key}` is not a setting of target-orb{hint}")
    noun = "it" if len(unknown) == 1 else "them"
    return (
        " ".join(parts)
        + f" Fix or remove {noun}: target-orb would otherwise run without that setting "
        "(keys starting with `_` are ignored, for comments)."
    )


def unknown_env_vars(
    environ: t.Mapping[str, str], prefix: str, known: t.Collection[str]
) -> list[str]:
    """Warnings for `PREFIX*` environment variables that name no setting.

    Args:
        environ: The environment.
        prefix: `TARGET_ORB_`.
        known: Every setting of `--about`.

    Returns:
        One message per such variable, naming the closest setting's variable.
    """
    names = {prefix + k.upper().replace("-", "_"): k for k in known}
    warnings = []
    for var in sorted(environ):
        rest = var[len(prefix):]
        if not var.startswith(prefix) or var in names or rest in NOT_SETTINGS_ENV:
            continue
        guess = closest_setting(rest, known)
        hint = (
            f"; did you mean {prefix}{guess.upper()} (`{guess}`)?" if guess
            else " (see `target-orb --about`)."
        )
        warnings.append(
            f"Environment variable {var} names no setting of target-orb and is ignored{hint}"
        )
    return warnings


def _excerpt(name: str, value: t.Any) -> str:
    """A short excerpt of a wrongly shaped value, for target-orb's own settings only: the
    SDK's (`stream_map_config`, …) may hold values that belong in no log."""
    if name not in _OWN_SETTINGS:
        return "(value not shown)"
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: t.Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _shape_sentence(name: str, shape: str, prop: t.Mapping[str, t.Any]) -> str:
    if shape == "object":
        what = _OBJECT_SHAPE
        if name in ("properties_mapping", "traits_mapping"):
            what += " of source key → Orb key, both strings"
        example = SHAPE_EXAMPLES.get(name, '{"key": "value"}')
    else:
        what = _ARRAY_SHAPE
        items = prop.get("items")
        if isinstance(items, t.Mapping) and "string" in _types(items):
            what += " of strings"
        example = SHAPE_EXAMPLES.get(name, '["a", "b"]')
    return (
        f"must be {what}, e.g. {example} (in a JSON config file, or as that JSON text in "
        "an environment variable or `meltano config set`)"
    )


def parse_structured_settings(
    config: t.Mapping[str, t.Any], properties: t.Mapping[str, t.Mapping[str, t.Any]]
) -> tuple[dict[str, t.Any], list[str], set[str]]:
    """Object- and array-valued settings given as JSON text are parsed; wrong shapes named.

    `meltano config set` (for a setting whose kind Meltano does not know) and environment
    variables hand such values over as text.

    Args:
        config: The config as given.
        properties: The config schema's properties (with the SDK's built-in settings).

    Returns:
        The config with parsed values, the problems, and the settings they are about.
    """
    parsed = dict(config)
    problems: list[str] = []
    reported: set[str] = set()
    for name, prop in properties.items():
        value = parsed.get(name)
        shape = structured_shape(prop)
        if value is None or shape is None:
            continue
        expected = dict if shape == "object" else list
        if isinstance(value, str):
            try:
                decoded = json.loads(value)
            except ValueError as exc:
                problems.append(
                    f"`{name}` is text that is not JSON ({exc.args[0].split(':')[0]}: "
                    f"{_excerpt(name, value)}); it {_shape_sentence(name, shape, prop)}."
                )
                reported.add(name)
                continue
            if isinstance(decoded, expected):
                parsed[name] = decoded
                continue
            value = decoded
        if not isinstance(value, expected):
            problems.append(
                f"`{name}` {_shape_sentence(name, shape, prop)}; got {_describe(value)}: "
                f"{_excerpt(name, value)}."
            )
            reported.add(name)
    return parsed, problems, reported


def check_config_keys(
    config: t.Mapping[str, t.Any], properties: t.Mapping[str, t.Mapping[str, t.Any]]
) -> ConfigCheck:
    """What is checked before the schema: unknown keys, and JSON text for structured settings.

    Args:
        config: The config as given.
        properties: The config schema's properties (with the SDK's built-in settings).

    Returns:
        The config to validate and use, and the problems found.
    """
    problems: list[str] = []
    unknown = unknown_keys_problem(config, set(properties))
    if unknown is not None:
        problems.append(unknown)
    parsed, shape_problems, reported = parse_structured_settings(config, properties)
    return ConfigCheck(parsed, problems + shape_problems, frozenset(reported))


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
    """What the config schema cannot check, each problem once, naming the way out.

    Types, ranges and allowed values are checked by the SDK against `CONFIG_SCHEMA` (so a
    value is reported once, by the schema). Here: rules across settings, the leaves of
    nested mapping objects, and the api_url scheme.

    Args:
        config: The parsed config.

    Returns:
        Messages; empty when the config is usable.
    """
    problems: list[str] = []
    preset = config.get("record_preset") or "segment"
    ext_field = config.get("external_customer_id_field")
    cust_field = config.get("customer_id_field")
    if preset == "segment_warehouse" and not ext_field and not cust_field:
        ext_field = PRESET_DEFAULTS[preset]["external_customer_id_field"]
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
    for name in ("properties_mapping", "traits_mapping"):
        problems += _mapping_problems(name, config.get(name))
    if load_method(config) == "overwrite":
        problems.append(
            "`load_method: overwrite` is not supported: in Orb it would mean a replacing "
            "backfill, which deletes billed events and is a deliberate operation to run in "
            "Orb itself. Use `upsert` to amend changed events (and deprecate deleted ones "
            "with `deprecate_deleted_events`), or `append-only`.",
        )
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
    api_url = config.get("api_url")
    if isinstance(api_url, str):
        parts = urlsplit(api_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            problems.append(f"`api_url` {api_url!r} is not an http(s) URL.")
        elif parts.scheme != "https" and not _is_loopback(parts.hostname):
            problems.append(
                f"`api_url` {api_url!r} is not https://; plain http is only allowed for a "
                "loopback host (a local stand-in). Use https://api.withorb.com/v1.",
            )
    return problems


def _mapping_problems(name: str, mapping: t.Any) -> list[str]:
    """Leaves of a `*_mapping` object: strings, not blank (the schema checks the top level)."""
    if not isinstance(mapping, t.Mapping):
        return []  # null means the default; any other type is the schema's to report
    flat = flatten_mapping(mapping)
    problems = []
    # A top-level value that is neither string nor object is the schema's error already;
    # the leaves inside nested objects are checked here.
    bad = [
        path
        for key, value in mapping.items()
        if isinstance(value, t.Mapping)
        for path, leaf in flatten_mapping(value, f"{key}.").items()
        if not isinstance(leaf, str)
    ]
    if bad:
        problems.append(
            f"`{name}` has non-string values for {sorted(bad)}; every key and value must be "
            "a string (Segment's Orb destination has the same rule).",
        )
    empty = [k for k, v in flat.items() if isinstance(v, str) and not v.strip()]
    if empty:
        problems.append(f"`{name}` maps {sorted(empty)} to an empty Orb key.")
    return problems


def state_url(config: t.Mapping[str, t.Any], default: str) -> str:
    """The store's URL: `state_url`, else its earlier name `ledger_url`, else `default`."""
    return str(config.get("state_url") or config.get("ledger_url") or default)


def load_method(config: t.Mapping[str, t.Any]) -> str:
    """The `load_method` setting as text (the SDK may hand it over as its enum).

    Args:
        config: The parsed config.

    Returns:
        `append-only`, `upsert` or `overwrite` (or what the user wrote).
    """
    value = config.get("load_method") or "append-only"
    return str(getattr(value, "value", value))


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
    return _from_settings(
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


def build_delivery_settings(config: t.Mapping[str, t.Any]) -> DeliverySettings:
    """Collect the delivery settings.

    Args:
        config: A config for which `config_problems` returned nothing.

    Returns:
        The frozen delivery settings.
    """
    resolved = resolve(config)
    return _from_settings(
        DeliverySettings,
        resolved,
        api_url=resolved["api_url"].rstrip("/"),
        # A number setting may arrive as Decimal (Meltano's `decimal` kind, JSON configs).
        flush_interval_seconds=float(resolved["flush_interval_seconds"]),
    )
