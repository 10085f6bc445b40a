"""Settings: the config schema and the frozen settings objects built from it.

Each setting is declared once, in `CONFIG_SCHEMA`: its type, default, range (`minimum`,
`maximum`) and allowed values (`allowed_values`, taken from the `Literal` types below). The
SDK validates a config against it (one message per problem) and `resolve()` fills in its
defaults; the settings objects take their fields from `resolve()` by name.
`config_checks.config_problems` holds only what JSON Schema cannot say (rules across settings,
nested mapping values, the api_url scheme). Adding a setting: its `_prop(...)` entry, and the
code that reads it (`resolve(config)[name]`, or a field of the same name on a settings
dataclass).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing as t
from dataclasses import dataclass

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


# A mapping value is an Orb key, or (as Meltano writes dotted keys) a nested object of them.
_MAPPING_VALUE = th.CustomType({"type": ["string", "object"]})


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
        "the keys target-orb delivered, never re-sent into a backfill), the backfills "
        "target-orb created (per `job_name`) and, with `dead_letter_target: state`, the dead "
        "letters. Default: the SQLite file `target-orb-ledger.sqlite` in the folder of "
        "`dead_letter_path`. Use `postgresql://…` (extra `target-orb[postgres]`) in "
        "containers (a disk thrown away after the run loses nothing) or when several jobs "
        "share one Orb account; use one store per Orb account. See README \"Running in "
        "containers\".",
        secret=True,
    ),
    _prop(
        "dead_letter_target",
        th.StringType,
        "Dead-letter target",
        "Where dead letters go: `file` (default), the JSON Lines file at `dead_letter_path`; "
        "or `state`, a table in the store at `state_url` (same fields, plus the job and when "
        "it was written and replayed; committed before the STATE that passes them), so they "
        "survive a container's disk. List, export and replay them with "
        "`target-orb-deadletter --state-url URL`.",
        default="file",
        allowed_values=["file", "state"],
    ),
    _prop(
        "job_name",
        th.StringType,
        "Job name",
        "Names this job in the store at `state_url`, the logs and the run summary; jobs "
        "sharing one store recognise each other's backfills (one is waited for, never "
        "written into or closed). Default: the state ID of the `meltano run` (rebuilt from "
        "what Meltano puts in the environment: `MELTANO_STATE_ID` when set, else "
        "`<MELTANO_ENVIRONMENT>:<extractor>-to-<loader>`), else `target-orb`. Give each job "
        "sharing a store its own name.",
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
OWN_SETTINGS = frozenset(CONFIG_SCHEMA["properties"])


def resolve(config: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Every setting `CONFIG_SCHEMA` declares, with its schema default where it is unset.

    A setting that is missing or null counts as unset (Meltano and `--config ENV` send
    null for an empty value). Settings without a schema default resolve to None (some take
    a default from `record_preset`: see `mapping.spec.PRESET_DEFAULTS`).

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


def from_settings(cls: type[_D], resolved: t.Mapping[str, t.Any], **derived: t.Any) -> _D:
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


def state_url(config: t.Mapping[str, t.Any], default: str) -> str:
    """The store's URL: `state_url`, else its earlier name `ledger_url`, else `default`."""
    return str(config.get("state_url") or config.get("ledger_url") or default)


def state_url_setting(config: t.Mapping[str, t.Any]) -> str:
    """The name of the setting the store's URL came from (for messages)."""
    return "ledger_url" if config.get("ledger_url") and not config.get("state_url") else "state_url"


DEFAULT_JOB_NAME = "target-orb"


def job_name(
    config: t.Mapping[str, t.Any], environ: t.Mapping[str, str] | None = None
) -> str:
    """`job_name`, else the state ID of the Meltano run, else `target-orb`.

    Meltano 4 does not hand its state ID to the loader; it sets `MELTANO_EXTRACTOR_NAME`,
    `MELTANO_LOADER_NAME` (a plugin's info) and `MELTANO_ENVIRONMENT` in the loader's
    environment, from which `meltano run` builds the state ID
    (`meltano.core.block.extract_load.generate_state_id`:
    `<environment>:<extractor>-to-<loader>[:<suffix>]`). `MELTANO_STATE_ID` (the
    `meltano el --state-id` variable), when set, wins.

    Args:
        config: The parsed config.
        environ: The environment (default: `os.environ`).

    Returns:
        The job's name.
    """
    value = config.get("job_name")
    if value:
        return str(value)
    env = os.environ if environ is None else environ
    if env.get("MELTANO_STATE_ID"):
        return env["MELTANO_STATE_ID"]
    extractor, loader = env.get("MELTANO_EXTRACTOR_NAME"), env.get("MELTANO_LOADER_NAME")
    if extractor and loader:
        parts = [
            env.get("MELTANO_ENVIRONMENT") or "", f"{extractor}-to-{loader}",
            env.get("MELTANO_RUN_STATE_ID_SUFFIX") or "",
        ]
        return ":".join(p for p in parts if p)
    return DEFAULT_JOB_NAME


def load_method(config: t.Mapping[str, t.Any]) -> str:
    """The `load_method` setting as text (the SDK may hand it over as its enum).

    Args:
        config: The parsed config.

    Returns:
        `append-only`, `upsert` or `overwrite` (or what the user wrote).
    """
    value = config.get("load_method") or "append-only"
    return str(getattr(value, "value", value))


def build_delivery_settings(config: t.Mapping[str, t.Any]) -> DeliverySettings:
    """Collect the delivery settings.

    Args:
        config: A config for which `config_problems` returned nothing.

    Returns:
        The frozen delivery settings.
    """
    resolved = resolve(config)
    return from_settings(
        DeliverySettings,
        resolved,
        api_url=resolved["api_url"].rstrip("/"),
        # A number setting may arrive as Decimal (Meltano's `decimal` kind, JSON configs).
        flush_interval_seconds=float(resolved["flush_interval_seconds"]),
    )
