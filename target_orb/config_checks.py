"""Config checks the schema cannot express: unknown keys and environment variables, JSON text
for object and array settings, and the rules across settings (`config_problems`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import typing as t
from dataclasses import dataclass
from urllib.parse import urlsplit

from target_orb.mapping.spec import PRESET_DEFAULTS, flatten_mapping
from target_orb.settings import OWN_SETTINGS, load_method

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
    if name not in OWN_SETTINGS:
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
    problems = _customer_field_problems(config)
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
        problems += _identify_problems(config)
    return problems + _api_url_problems(config.get("api_url"))


def _customer_field_problems(config: t.Mapping[str, t.Any]) -> list[str]:
    """Exactly one customer field, or the preset's default."""
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
    return problems


def _identify_problems(config: t.Mapping[str, t.Any]) -> list[str]:
    """`identify_policy: customer_metadata` with settings it cannot work with."""
    problems: list[str] = []
    if config.get("customer_id_field"):
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
    return problems


def _api_url_problems(api_url: t.Any) -> list[str]:
    """An http(s) URL; plain http only for a loopback host."""
    problems: list[str] = []
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
