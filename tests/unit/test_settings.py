"""Settings are declared once, in the config schema; the settings objects derive from it."""

from __future__ import annotations

import dataclasses

import pytest

from target_orb.settings import (
    CONFIG_SCHEMA,
    DeliverySettings,
    MappingSpec,
    build_delivery_settings,
    build_mapping_spec,
    resolve,
)

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
