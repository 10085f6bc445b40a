"""Settings are declared once, in the config schema; the settings objects derive from it."""

from __future__ import annotations

import dataclasses

import pytest

from target_orb.mapping.spec import MappingSpec, build_mapping_spec
from target_orb.settings import CONFIG_SCHEMA, DeliverySettings, build_delivery_settings, resolve

PROPS = CONFIG_SCHEMA["properties"]
MINIMAL = {"external_customer_id_field": "userId"}


def test_resolve_gives_every_setting_its_schema_default():
    resolved = resolve({})
    assert set(resolved) == set(PROPS)
    for name, prop in PROPS.items():
        assert resolved[name] == prop.get("default"), name


def test_null_counts_as_unset_but_zero_and_false_do_not():
    resolved = resolve({"progress_interval_seconds": 0, "dry_run": False, "api_url": None})
    assert resolved["progress_interval_seconds"] == 0
    assert resolved["dry_run"] is False
    assert resolved["api_url"] == PROPS["api_url"]["default"]


@pytest.mark.parametrize("cls", [DeliverySettings, MappingSpec])
def test_settings_fields_have_no_defaults_of_their_own(cls):
    # A default here would be a second place for it; the schema's is the one.
    for field in dataclasses.fields(cls):
        assert field.default is dataclasses.MISSING, field.name
        assert field.default_factory is dataclasses.MISSING, field.name


def test_delivery_settings_are_the_schema_defaults_unless_set():
    delivery = build_delivery_settings(MINIMAL)
    for field in dataclasses.fields(DeliverySettings):
        assert getattr(delivery, field.name) == PROPS[field.name].get("default"), field.name
    tuned = build_delivery_settings({**MINIMAL, "max_concurrent_requests": 9,
                                     "api_url": "https://orb.test/v1/"})
    assert (tuned.max_concurrent_requests, tuned.api_url) == (9, "https://orb.test/v1")


def test_mapping_spec_takes_plain_settings_from_the_schema():
    spec = build_mapping_spec(MINIMAL)
    plain = [f.name for f in dataclasses.fields(MappingSpec)
             if f.name in PROPS and not isinstance(getattr(spec, f.name), frozenset)]
    assert {"nested_properties", "late_event_policy", "grace_period_hours"} <= set(plain)
    for name in plain:
        default = PROPS[name].get("default")
        if default is not None:
            assert getattr(spec, name) == default, name
    assert spec.event_types == frozenset(PROPS["event_types"]["default"])


def test_enum_values_are_declared_once_as_literal_types():
    from typing import get_args

    from target_orb import settings

    for name, literal in [("record_preset", settings.RecordPreset),
                          ("nested_properties", settings.NestedPolicy),
                          ("invalid_event_policy", settings.InvalidPolicy),
                          ("late_event_policy", settings.LatePolicy),
                          ("identify_policy", settings.IdentifyPolicy)]:
        assert PROPS[name]["enum"] == list(get_args(literal)), name


def test_a_decimal_flush_interval_from_meltano_becomes_a_float():
    # Meltano's `decimal` kind arrives as Decimal; the idle poll needs a plain number.
    from decimal import Decimal

    from target_orb.settings import build_delivery_settings

    settings = build_delivery_settings(
        {"api_key": "k", "external_customer_id_field": "userId",
         "flush_interval_seconds": Decimal("5.0")},
    )
    assert type(settings.flush_interval_seconds) is float
    assert settings.flush_interval_seconds == 5.0


def test_unknown_keys_name_the_closest_setting_and_underscores_are_comments():
    from target_orb.config_checks import unknown_keys_problem

    known = set(PROPS)
    assert unknown_keys_problem({"_comment": "x", "api_key": "k"}, known) is None
    message = unknown_keys_problem({"properties_maping": {}, "qqq": 1}, known)
    assert message is not None
    assert message.startswith(
        "`properties_maping` is not a setting of target-orb; did you mean `properties_mapping`?"
    )
    assert "`qqq` is not a setting of target-orb (see `target-orb --about`)." in message


def test_unknown_environment_variables_are_named_with_the_closest_setting():
    from target_orb.config_checks import unknown_env_vars

    environ = {
        "TARGET_ORB_API_KEY": "k", "TARGET_ORB_LOGLEVEL": "DEBUG", "OTHER": "x",
        "TARGET_ORB_GRACE_PERIOD_HOUR": "12",
    }
    (warning,) = unknown_env_vars(environ, "TARGET_ORB_", set(PROPS))
    assert "TARGET_ORB_GRACE_PERIOD_HOUR" in warning
    assert "did you mean TARGET_ORB_GRACE_PERIOD_HOURS" in warning


@pytest.mark.parametrize(
    ("value", "parsed"),
    [('{"a": "b"}', {"a": "b"}), ({"a": "b"}, {"a": "b"}), (None, None)],
)
def test_object_settings_given_as_json_text_are_parsed(value, parsed):
    from target_orb.config_checks import parse_structured_settings

    config, problems, reported = parse_structured_settings({"properties_mapping": value}, PROPS)
    assert (config["properties_mapping"], problems, reported) == (parsed, [], set())


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("properties_mapping", ["a"], "must be an object of source key → Orb key"),
        ("properties_mapping", "[1]", "got an array: [1]"),
        ("properties_mapping", "{nope", "is text that is not JSON"),
        ("event_types", "track", 'must be an array of strings, e.g. ["track"]'),
        ("event_denylist", {"a": 1}, "must be an array of strings"),
    ],
)
def test_wrong_shapes_name_the_expected_shape_and_an_example(name, value, words):
    from target_orb.config_checks import parse_structured_settings

    _config, (problem,), reported = parse_structured_settings({name: value}, PROPS)
    assert problem.startswith(f"`{name}` ")
    assert words in problem
    assert "e.g." in problem
    assert reported == {name}


def test_a_wrong_shape_of_an_sdk_setting_shows_no_value():
    from target_orb.config_checks import parse_structured_settings

    props = dict(PROPS, stream_map_config={"type": ["object", "null"]})
    _config, (problem,), _ = parse_structured_settings(
        {"stream_map_config": "salt=hunter2"}, props
    )
    assert "hunter2" not in problem
    assert "`stream_map_config` is text that is not JSON" in problem
