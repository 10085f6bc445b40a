"""Table-driven tests of the pure record → Orb event mapping (every mapping rule in the README)."""

from __future__ import annotations

import datetime
import hashlib
import json
from decimal import Decimal

import pytest

from target_orb.config_checks import config_problems
from target_orb.mapping.fields import Invalid
from target_orb.mapping.spec import build_mapping_spec
from target_orb.mapping.track import Mapped, Skip, dedupe_request, derive_key, map_record

NOW = datetime.datetime(2024, 3, 1, 12, 30, tzinfo=datetime.timezone.utc)
TS = "2024-03-01T12:00:00.123Z"


def spec(**config):
    base = {"external_customer_id_field": "userId"}
    base.update(config)
    assert config_problems(base) == []
    return build_mapping_spec(base)


def track(**fields):
    record = {
        "type": "track",
        "messageId": "msg-1",
        "userId": "cust_1",
        "event": "API Request",
        "timestamp": TS,
        "properties": {},
    }
    record.update(fields)
    return record


def mapped(result) -> dict:
    assert isinstance(result, Mapped), result
    return result.event


def invalid(result) -> Invalid:
    assert isinstance(result, Invalid), result
    return result


# --- the Segment destination's own example --------------------------------------------------


def test_segment_destination_example_maps_exactly():
    s = spec(
        properties_mapping={
            "amount": "amount",
            "currency": "currency",
            "confirmation_time": "confirmation_time",
        },
    )
    record = track(
        event="payment_confirmed",
        userId="external_customer_id",
        properties={
            "amount": Decimal("100.00"),
            "currency": "USD",
            "confirmation_time": "2022-05-11T21:33:13.1652304793Z",
            "unmapped": "dropped",
        },
    )
    assert mapped(map_record(record, "tracks", s, NOW)) == {
        "idempotency_key": "msg-1",
        "event_name": "payment_confirmed",
        "external_customer_id": "external_customer_id",
        "timestamp": "2024-03-01T12:00:00.123000Z",
        "properties": {
            "amount": Decimal("100.00"),
            "currency": "USD",
            "confirmation_time": "2022-05-11T21:33:13.1652304793Z",
        },
    }


# --- event name, customer, timestamp ---------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "record", "expected"),
    [
        ({}, track(event="Order Completed"), "Order Completed"),
        ({"event_name_field": "properties.kind"}, track(properties={"kind": "job_run"}), "job_run"),
        ({"event_name_field": "context.evt"}, track(context={"evt": "x"}), "x"),
        ({"event_name_field": "a.b"}, track(**{"a.b": "literal-dotted-key"}), "literal-dotted-key"),
    ],
    ids=["default-event", "dotted-path", "nested-context", "literal-dotted-key-wins"],
)
def test_event_name_field(config, record, expected):
    assert mapped(map_record(record, "s", spec(**config), NOW))["event_name"] == expected


@pytest.mark.parametrize(
    "value", [None, "", "   ", 42, {"a": 1}], ids=["null", "empty", "blank", "number", "object"]
)
def test_missing_or_bad_event_name_is_invalid(value):
    result = invalid(map_record(track(event=value), "s", spec(), NOW))
    assert result.code == "missing_event_name"
    assert "`event`" in result.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cust_1", "cust_1"),
        ("  cust_1 \n", "cust_1"),
        (12345, "12345"),
        (Decimal("12345"), "12345"),
        ("en/cus/?1500 ü", "en/cus/?1500 ü"),
    ],
    ids=["string", "whitespace-stripped", "int", "decimal", "slash-unicode"],
)
def test_customer_id_coerced_and_stripped(value, expected):
    event = mapped(map_record(track(userId=value), "s", spec(), NOW))
    assert event["external_customer_id"] == expected
    assert "customer_id" not in event


@pytest.mark.parametrize(
    "value",
    [None, "", "  ", "null", "undefined", "NULL", True, {"id": 1}, ["a"]],
    ids=["none", "empty", "blank", "null-string", "undefined", "NULL", "bool", "dict", "list"],
)
def test_customer_id_missing_or_unusable_is_invalid(value):
    result = invalid(map_record(track(userId=value), "s", spec(), NOW))
    assert result.code in {"missing_customer", "bad_customer"}
    assert "`userId`" in result.reason


def test_missing_customer_key_is_invalid():
    record = track()
    del record["userId"]
    record["anonymousId"] = "anon-1"
    assert invalid(map_record(record, "s", spec(), NOW)).code == "missing_customer"


def test_customer_from_nested_group_id():
    s = spec(external_customer_id_field="context.groupId")
    event = mapped(map_record(track(context={"groupId": "acct_123"}), "s", s, NOW))
    assert event["external_customer_id"] == "acct_123"


def test_customer_id_field_sends_orb_customer_id_only():
    s = build_mapping_spec({"customer_id_field": "orbId"})
    event = mapped(map_record(track(orbId="C123"), "s", s, NOW))
    assert event["customer_id"] == "C123"
    assert "external_customer_id" not in event


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-01T12:00:00Z", "2024-03-01T12:00:00Z"),
        ("2024-03-01T13:00:00+01:00", "2024-03-01T12:00:00Z"),
        ("2024-03-01T17:30:00+0530", "2024-03-01T12:00:00Z"),
        ("2024-03-01T12:00:00.1234567891Z", "2024-03-01T12:00:00.123456Z"),
        ("2024-03-01", "2024-03-01T00:00:00Z"),
        ("2024-03-01 12:00:00", "2024-03-01T12:00:00Z"),
        (1709294400, "2024-03-01T12:00:00Z"),
        (1709294400123, "2024-03-01T12:00:00.123000Z"),
        ("1709294400", "2024-03-01T12:00:00Z"),
        (
            datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.timezone.utc),
            "2024-03-01T12:00:00Z",
        ),
        (datetime.datetime(2024, 3, 1, 12, 0), "2024-03-01T12:00:00Z"),
    ],
    ids=[
        "z", "offset-colon", "offset-hhmm", "ten-fraction-digits", "date-only", "naive",
        "epoch-s", "epoch-ms", "epoch-s-string", "datetime-aware", "datetime-naive",
    ],
)
def test_timestamp_normalised_to_utc_z(value, expected):
    s = spec(grace_period_hours=100000)
    assert mapped(map_record(track(timestamp=value), "s", s, NOW))["timestamp"] == expected


@pytest.mark.parametrize("value", [None, "", "yesterday", "2024-13-01T00:00:00Z", [1]])
def test_bad_timestamp_is_invalid(value):
    result = invalid(map_record(track(timestamp=value), "s", spec(), NOW))
    assert result.code == "bad_timestamp"


def test_timestamp_field_setting():
    s = spec(timestamp_field="receivedAt")
    record = track(receivedAt="2024-03-01T12:10:00Z", timestamp="garbage")
    assert mapped(map_record(record, "s", s, NOW))["timestamp"] == "2024-03-01T12:10:00Z"


def test_late_event_rejected_by_default_and_sent_with_send_policy():
    old = "2024-02-29T23:00:00Z"  # 13.5 h before NOW, grace is 12 h
    result = invalid(map_record(track(timestamp=old), "s", spec(), NOW))
    assert result.code == "late"
    assert "grace" in result.reason
    sent = map_record(track(timestamp=old), "s", spec(late_event_policy="send"), NOW)
    assert mapped(sent)["timestamp"] == old
    assert mapped(map_record(track(timestamp=old), "s", spec(grace_period_hours=14), NOW))


def test_future_event_is_invalid_beyond_tolerance():
    soon = "2024-03-01T12:34:59Z"  # 4 min 59 s ahead: inside the 5 min tolerance
    far = "2024-03-01T12:35:01Z"
    assert mapped(map_record(track(timestamp=soon), "s", spec(), NOW))
    assert invalid(map_record(track(timestamp=far), "s", spec(), NOW)).code == "future"
    assert invalid(
        map_record(track(timestamp=soon), "s", spec(future_tolerance_seconds=60), NOW)
    ).code == "future"


# --- idempotency keys -------------------------------------------------------------------------


def test_key_up_to_64_chars_kept_verbatim():
    key = "k" * 64
    assert mapped(map_record(track(messageId=key), "s", spec(), NOW))["idempotency_key"] == key


def test_key_over_64_chars_becomes_sha256_hex():
    key = "node-next-1709294400123-743be593-7789-4b74-8078-cbcc8894c586-" + "x" * 40
    event = mapped(map_record(track(messageId=key), "s", spec(), NOW))
    assert event["idempotency_key"] == hashlib.sha256(key.encode()).hexdigest()
    assert len(event["idempotency_key"]) == 64


def test_numeric_key_becomes_string():
    assert mapped(map_record(track(messageId=987), "s", spec(), NOW))["idempotency_key"] == "987"


def test_key_field_setting():
    s = spec(idempotency_key_field="properties.uid")
    event = mapped(map_record(track(properties={"uid": "u-1"}), "s", s, NOW))
    assert event["idempotency_key"] == "u-1"


@pytest.mark.parametrize("missing", [None, "", "absent"])
def test_missing_key_is_deterministic_content_hash(missing):
    s = spec(properties_mapping={"tokens": "tokens"})
    record = track(properties={"tokens": 3})
    if missing == "absent":
        del record["messageId"]
    else:
        record["messageId"] = missing
    first = map_record(record, "tracks", s, NOW)
    second = map_record(json.loads(json.dumps(record)), "tracks", s, NOW)
    assert isinstance(first, Mapped)
    assert first.key_derived
    assert first.event["idempotency_key"] == second.event["idempotency_key"]
    expected = derive_key(
        "tracks", "cust_1", "API Request", "2024-03-01T12:00:00.123000Z", {"tokens": 3}
    )
    assert first.event["idempotency_key"] == expected
    assert len(expected) == 64
    other = map_record({**record, "properties": {"tokens": 4}}, "tracks", s, NOW)
    assert other.event["idempotency_key"] != expected
    other_stream = map_record(record, "other", s, NOW)
    assert other_stream.event["idempotency_key"] != expected


# --- properties -------------------------------------------------------------------------------


def test_unmapped_properties_dropped_by_default():
    s = spec(properties_mapping={"tokens": "token_count"})
    event = mapped(map_record(track(properties={"tokens": 5, "secret": "x"}), "s", s, NOW))
    assert event["properties"] == {"token_count": 5}


def test_passthrough_sends_all_renamed_where_mapped():
    s = spec(properties_passthrough=True, properties_mapping={"tokens": "token_count"})
    record = track(properties={"tokens": 5, "region": "eu", "_sdc_batched_at": "x"})
    assert mapped(map_record(record, "s", s, NOW))["properties"] == {
        "token_count": 5,
        "region": "eu",
    }


def test_mapping_by_dotted_path_inside_properties():
    s = spec(properties_mapping={"request.method": "http_method"})
    record = track(properties={"request": {"method": "POST", "path": "/x"}})
    assert mapped(map_record(record, "s", s, NOW))["properties"] == {"http_method": "POST"}


def test_passthrough_with_nested_mapping_does_not_send_leaf_twice():
    s = spec(properties_passthrough=True, properties_mapping={"request.method": "http_method"})
    record = track(properties={"request": {"method": "POST", "path": "/x"}})
    assert mapped(map_record(record, "s", s, NOW))["properties"] == {
        "http_method": "POST",
        "request_path": "/x",
    }


def test_properties_field_root_and_other_path():
    s = spec(properties_field="", properties_passthrough=True)
    record = {"userId": "c", "event": "e", "timestamp": TS, "messageId": "k", "n": 1}
    assert mapped(map_record(record, "s", s, NOW))["properties"] == {
        "userId": "c", "event": "e", "timestamp": TS, "messageId": "k", "n": 1,
    }
    s2 = spec(properties_field="context.traits", properties_passthrough=True)
    record2 = track(context={"traits": {"plan": "pro"}})
    assert mapped(map_record(record2, "s", s2, NOW))["properties"] == {"plan": "pro"}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            "flatten",
            {"request_method": "POST", "request_meta_retries": 2, "tags": '["beta","x"]',
             "products": '[{"sku":"a","price":1.5}]', "n": 1},
        ),
        (
            "json_string",
            {"request": '{"method":"POST","meta":{"retries":2}}', "tags": '["beta","x"]',
             "products": '[{"sku":"a","price":1.5}]', "n": 1},
        ),
        ("drop", {"n": 1}),
    ],
)
def test_nested_properties_policies(policy, expected):
    s = spec(properties_passthrough=True, nested_properties=policy)
    props = {
        "request": {"method": "POST", "meta": {"retries": 2}},
        "tags": ["beta", "x"],
        "products": [{"sku": "a", "price": Decimal("1.5")}],
        "n": 1,
    }
    assert mapped(map_record(track(properties=props), "s", s, NOW))["properties"] == expected


def test_nested_properties_reject_makes_record_invalid():
    s = spec(properties_passthrough=True, nested_properties="reject")
    result = invalid(map_record(track(properties={"tags": ["a"]}), "s", s, NOW))
    assert result.code == "nested_property"
    assert "`tags`" in result.reason


def test_null_properties_dropped():
    s = spec(properties_passthrough=True)
    record = track(properties={"coupon": None, "n": 1, "nested": {"x": None, "y": 2}})
    assert mapped(map_record(record, "s", s, NOW))["properties"] == {"n": 1, "nested_y": 2}


def test_value_types_pass_and_decimal_stays_decimal():
    s = spec(properties_passthrough=True)
    props = {
        "s": "12.50", "t": True, "f": False, "i": -(2**63), "j": 2**63 - 1,
        "d": Decimal("41.7"), "big": Decimal("9223372036854775807"), "fl": 1.5,
    }
    out = mapped(map_record(track(properties=props), "s", s, NOW))["properties"]
    assert out == props
    assert isinstance(out["d"], Decimal)


@pytest.mark.parametrize(
    "value",
    [
        float("nan"), float("inf"), Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"),
        2**63, -(2**63) - 1, Decimal("9223372036854775808"), b"bytes",
    ],
    ids=["nan", "inf", "dec-nan", "dec-inf", "dec-neg-inf", "int64+1", "int64-1", "dec-int64+1",
         "bytes"],
)
def test_unsendable_values_make_record_invalid(value):
    s = spec(properties_passthrough=True)
    result = invalid(map_record(track(properties={"v": value}), "s", s, NOW))
    assert result.code == "bad_property_value"
    assert "`v`" in result.reason


def test_two_sources_on_one_orb_key_is_invalid_naming_both():
    s = spec(properties_passthrough=True)
    record = track(properties={"request": {"method": "POST"}, "request_method": "GET"})
    result = invalid(map_record(record, "s", s, NOW))
    assert result.code == "key_collision"
    assert "`request.method`" in result.reason
    assert "`request_method`" in result.reason


def test_mapping_collision_with_passthrough_is_invalid():
    s = spec(properties_passthrough=True, properties_mapping={"accountType": "account_type"})
    record = track(properties={"accountType": "pro", "account_type": "free"})
    result = invalid(map_record(record, "s", s, NOW))
    assert "`accountType`" in result.reason
    assert "`account_type`" in result.reason


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        (None, {}),
        ({}, {}),
        ('{"tokens": 3, "price": 12.5}', {"tokens": 3, "price": Decimal("12.5")}),
        ("", {}),
    ],
    ids=["null", "empty", "json-string", "empty-string"],
)
def test_properties_object_forms(props, expected):
    s = spec(properties_passthrough=True)
    record = track(properties=props)
    assert mapped(map_record(record, "s", s, NOW))["properties"] == expected


@pytest.mark.parametrize("props", ['{"a": ', "[1, 2]", 7, ["x"]], ids=["bad-json", "json-array",
                                                                       "number", "list"])
def test_properties_not_an_object_is_invalid(props):
    s = spec(properties_passthrough=True)
    assert invalid(map_record(track(properties=props), "s", s, NOW)).code == "bad_properties"


def test_sdc_fields_never_become_properties():
    s = spec(properties_field="", properties_passthrough=True)
    record = {
        "userId": "c", "event": "e", "timestamp": TS, "messageId": "k",
        "_sdc_extracted_at": "x", "_sdc_sequence": 1,
    }
    assert not any(k.startswith("_sdc_") for k in mapped(map_record(record, "s", s, NOW))[
        "properties"])


# --- record_preset: segment_warehouse ----------------------------------------------------------


WAREHOUSE_ROW = {
    "id": "node-next-1709294400123-743be593",
    "anonymous_id": None,
    "user_id": "user_8841",
    "event": "api_request",
    "event_text": "API Request",
    "timestamp": "2024-03-01T12:00:00.123000+00:00",
    "original_timestamp": "2024-03-01T12:00:00.123000+00:00",
    "sent_at": "2024-03-01T12:00:00.456000+00:00",
    "received_at": "2024-03-01T12:00:00.731000+00:00",
    "uuid_ts": "2024-03-01T13:02:11.000000+00:00",
    "uuid": "u",
    "loaded_at": "x",
    "context_library_name": "@segment/analytics-node",
    "context_group_id": "acct_123",
    "_sdc_extracted_at": "2024-03-01T13:00:00Z",
    "endpoint": "/v1/search",
    "tokens": 1532,
    "cached": False,
    "latency_ms": Decimal("41.7"),
    "tags": '["beta"]',
}


def test_warehouse_preset_maps_columns():
    s = build_mapping_spec({"record_preset": "segment_warehouse"})
    assert mapped(map_record(WAREHOUSE_ROW, "prod-api_request", s, NOW)) == {
        "idempotency_key": "node-next-1709294400123-743be593",
        "event_name": "API Request",
        "external_customer_id": "user_8841",
        "timestamp": "2024-03-01T12:00:00.123000Z",
        "properties": {
            "endpoint": "/v1/search", "tokens": 1532, "cached": False,
            "latency_ms": Decimal("41.7"), "tags": '["beta"]',
        },
    }


def test_warehouse_event_text_falls_back_to_event():
    s = build_mapping_spec({"record_preset": "segment_warehouse"})
    row = {**WAREHOUSE_ROW, "event_text": None}
    assert mapped(map_record(row, "s", s, NOW))["event_name"] == "api_request"


def test_warehouse_explicit_setting_overrides_preset():
    s = build_mapping_spec(
        {"record_preset": "segment_warehouse", "external_customer_id_field": "context_group_id",
         "event_name_field": "event"},
    )
    event = mapped(map_record(WAREHOUSE_ROW, "s", s, NOW))
    assert event["external_customer_id"] == "acct_123"
    assert event["event_name"] == "api_request"


@pytest.mark.parametrize(
    "wrapped", [{"plan": "pro", "seats": 3}, '{"plan": "pro", "seats": 3}'],
    ids=["object", "json-string"],
)
def test_warehouse_properties_column_unwrapped(wrapped):
    s = build_mapping_spec({"record_preset": "segment_warehouse"})
    row = {"id": "k", "user_id": "u", "event": "e", "timestamp": TS, "properties": wrapped,
           "region": "eu"}
    assert mapped(map_record(row, "s", s, NOW))["properties"] == {
        "plan": "pro", "seats": 3, "region": "eu",
    }


def test_warehouse_properties_clash_with_column_is_invalid():
    s = build_mapping_spec({"record_preset": "segment_warehouse"})
    row = {"id": "k", "user_id": "u", "event": "e", "timestamp": TS,
           "properties": {"region": "us"}, "region": "eu"}
    result = invalid(map_record(row, "s", s, NOW))
    assert result.code == "key_collision"
    assert "region" in result.reason


# --- filters: type, integrations, allow/deny ----------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "sent"),
    [("track", True), (None, True), ("TRACK", True), ("identify", False), ("page", False),
     ("screen", False), ("group", False), ("alias", False), ("delete", False)],
)
def test_event_types_default_track_only(kind, sent):
    record = track(type=kind)
    result = map_record(record, "s", spec(), NOW)
    assert isinstance(result, Mapped) if sent else result == Skip("type")


def test_event_types_setting():
    s = spec(event_types=["track", "page"])
    assert isinstance(map_record(track(type="page"), "s", s, NOW), Mapped)
    assert map_record(track(type="identify"), "s", s, NOW) == Skip("type")


@pytest.mark.parametrize(
    ("integrations", "skipped"),
    [
        ({}, False),
        (None, False),
        ({"All": False}, True),
        ({"all": False}, True),
        ({"All": False, "Orb": True}, False),
        ({"Orb": False}, True),
        ({"All": True, "Orb": False}, True),
        ({"Orb": {"some": "option"}}, False),
        ({"All": False, "Orb": {"some": "option"}}, False),
        ({"orb": True, "All": False}, True),
        ({"All": True, "Mixpanel": False}, False),
        ('{"Orb": false}', True),
    ],
    ids=[
        "empty", "null", "All-false", "all-false-lowercase", "All-false-Orb-true", "Orb-false",
        "All-true-Orb-false", "Orb-options-object", "All-false-Orb-object",
        "wrong-case-orb-does-not-match", "other-destination-false", "json-string",
    ],
)
def test_integrations_rule(integrations, skipped):
    result = map_record(track(integrations=integrations), "s", spec(), NOW)
    assert (result == Skip("integrations")) is skipped
    if not skipped:
        assert isinstance(result, Mapped)


def test_integrations_rule_can_be_turned_off_and_renamed():
    record = track(integrations={"All": False})
    assert isinstance(map_record(record, "s", spec(honor_integrations=False), NOW), Mapped)
    renamed = spec(integration_name="Orb (Prod)")
    assert isinstance(
        map_record(track(integrations={"All": False, "Orb (Prod)": True}), "s", renamed, NOW),
        Mapped,
    )
    assert map_record(track(integrations={"Orb (Prod)": False}), "s", renamed, NOW) == Skip(
        "integrations"
    )


def test_allow_and_deny_lists_on_source_event_name():
    allow = spec(event_allowlist=["API Request"])
    assert isinstance(map_record(track(), "s", allow, NOW), Mapped)
    assert map_record(track(event="Audience Entered"), "s", allow, NOW) == Skip("filter")
    deny = spec(event_denylist=["Audience Entered", "Trait Computed"])
    assert map_record(track(event="Trait Computed"), "s", deny, NOW) == Skip("filter")
    assert isinstance(map_record(track(), "s", deny, NOW), Mapped)


def test_skipped_records_are_not_validated():
    # A skipped identify with no customer is a skip, never a dead letter.
    record = {"type": "identify", "traits": {"email": "a@b"}}
    assert map_record(record, "s", spec(), NOW) == Skip("type")


def test_not_segment_shaped_record_is_invalid_not_crash():
    result = invalid(map_record({"id": 1, "fruits": ["apple"]}, "array_data", spec(), NOW))
    assert result.code == "missing_event_name"
    assert invalid(map_record(["not", "a", "dict"], "s", spec(), NOW)).code == "not_an_object"


# --- in-request dedup --------------------------------------------------------------------------


def test_dedupe_collapses_equal_and_rejects_different_bodies():
    a = {"idempotency_key": "k1", "event_name": "e", "properties": {"n": 1}}
    b = {"idempotency_key": "k2", "event_name": "e", "properties": {}}
    a_again = dict(a)
    a_changed = {**a, "properties": {"n": 2}}
    keep, collapsed, conflicts = dedupe_request([a, b, a_again, a_changed])
    assert keep == [0, 1]
    assert collapsed == 1
    assert [index for index, _ in conflicts] == [3]
    assert "k1" in conflicts[0][1]


# --- config problems ---------------------------------------------------------------------------


def config_errors(config: dict) -> list[str]:
    """Every problem the user is shown for `config` (schema checks and the cross-field rules)."""
    from singer_sdk.exceptions import ConfigValidationError

    from target_orb.target import TargetOrb

    with pytest.raises(ConfigValidationError) as info:
        TargetOrb(config=config, validate_config=True, parse_env_config=False)
    return list(info.value.errors)


def test_config_errors_name_every_bad_setting_once():
    errors = config_errors(
        {
            "api_key": "k",
            "batch_size_rows": 501,
            "max_concurrent_requests": 0,
            "properties_mapping": {"a": 1, "b": "ok", "c": {"d": 2}},
            "nested_properties": "explode",
            "invalid_event_policy": "ignore",
            "api_url": "http://orb.example.com/v1",
        },
    )
    names = ("external_customer_id_field", "batch_size_rows", "max_concurrent_requests",
             "properties_mapping", "nested_properties", "invalid_event_policy", "api_url")
    for name in names:
        assert sum(name in e for e in errors) >= 1, (name, errors)
    # One message per problem: the schema reports types, ranges and enum values; the
    # cross-field rules only what the schema cannot (properties_mapping: `a` by the schema,
    # the nested `c.d` by config_problems).
    assert len(errors) == 8, errors
    assert sum("explode" in e for e in errors) == 1
    assert sum("501" in e for e in errors) == 1
    assert any("c.d" in e for e in errors)


def test_config_problems_leaves_value_checks_to_the_schema():
    assert config_problems(
        {"external_customer_id_field": "u", "batch_size_rows": 501,
         "nested_properties": "explode", "properties_mapping": {"a": 1}}
    ) == []


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/v1", "http://localhost:1/v1", "http://[::1]:9/v1",
     "https://api.withorb.com/v1"],
)
def test_http_allowed_only_for_loopback(url):
    assert config_problems({"external_customer_id_field": "u", "api_url": url}) == []


def test_nested_mapping_object_is_read_as_dotted_paths():
    # Meltano writes `request.method: http_method` as {"request": {"method": "http_method"}}.
    s = spec(properties_mapping={"request": {"method": "http_method"}, "tokens": "tokens"})
    record = track(properties={"request": {"method": "POST"}, "tokens": 2})
    assert mapped(map_record(record, "s", s, NOW))["properties"] == {
        "http_method": "POST", "tokens": 2,
    }
    assert config_problems(
        {"external_customer_id_field": "u", "properties_mapping": {"request": {"method": 1}}}
    ) != []


@pytest.mark.parametrize(
    "name", ["API Request ", "Öffnen 🚀", "api_request", "Order Completed"],
    ids=["trailing-space", "unicode-emoji", "slug", "spaces"],
)
def test_event_names_are_sent_verbatim(name):
    # Orb advises names without whitespace but accepts them; renaming would split a metric.
    assert mapped(map_record(track(event=name), "s", spec(), NOW))["event_name"] == name


def test_literal_dotted_property_key_wins_over_nested_path():
    s = spec(properties_mapping={"a.b": "ab"})
    record = track(properties={"a.b": "literal", "a": {"b": "nested"}})
    assert mapped(map_record(record, "s", s, NOW))["properties"] == {"ab": "literal"}
    nested_only = track(properties={"a": {"b": "nested"}})
    assert mapped(map_record(nested_only, "s", s, NOW))["properties"] == {"ab": "nested"}


def test_numeric_looking_strings_stay_strings():
    # tap-csv and x-singer.decimal columns send numbers as strings; target-orb never guesses.
    s = spec(properties_passthrough=True)
    record = track(properties={"price": "12.50", "sci": "1e3"})
    assert mapped(map_record(record, "s", s, NOW))["properties"] == {"price": "12.50",
                                                                     "sci": "1e3"}


# --- the grace and future window (boundaries) ----------------------------------------------

WNOW = datetime.datetime(2024, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
US = datetime.timedelta(microseconds=1)


def tz(hours: int, minutes: int = 0) -> datetime.timezone:
    return datetime.timezone(datetime.timedelta(hours=hours, minutes=minutes))


def window(event: datetime.datetime, *, now: datetime.datetime, **settings: int) -> str:
    """"ok", "late" or "future" for a record at `event`, as map_record decides it."""
    result = map_record(track(timestamp=event.isoformat()), "s", spec(**settings), now)
    return "ok" if isinstance(result, Mapped) else invalid(result).code
GRACE = datetime.timedelta(hours=12)
TOLERANCE = datetime.timedelta(seconds=300)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(WNOW, "ok", id="now"),
        pytest.param(WNOW - GRACE, "ok", id="exactly-grace"),
        pytest.param(WNOW - GRACE - US, "late", id="1us-past-grace"),
        pytest.param(WNOW - datetime.timedelta(days=400), "late", id="long-ago"),
        pytest.param(WNOW + TOLERANCE, "ok", id="exactly-tolerance"),
        pytest.param(WNOW + TOLERANCE + US, "future", id="1us-past-tolerance"),
        pytest.param(WNOW + datetime.timedelta(days=1), "future", id="tomorrow"),
        pytest.param((WNOW - GRACE).astimezone(tz(-8)), "ok", id="grace-edge-other-zone"),
        pytest.param((WNOW + TOLERANCE + US).astimezone(tz(9)), "future", id="future-other-zone"),
    ],
)
def test_window_boundaries(event: datetime.datetime, expected: str) -> None:
    assert window(event, now=WNOW, grace_period_hours=12, future_tolerance_seconds=300) == expected


@pytest.mark.parametrize(
    ("event", "grace_hours", "tolerance_seconds", "expected"),
    [
        pytest.param(WNOW, 0, 0, "ok", id="zero-window-now"),
        pytest.param(WNOW - US, 0, 0, "late", id="zero-window-1us-before"),
        pytest.param(WNOW + US, 0, 0, "future", id="zero-window-1us-after"),
        pytest.param(WNOW - datetime.timedelta(hours=30), 24, 60, "late", id="grace-24h"),
        pytest.param(WNOW - datetime.timedelta(hours=23), 24, 60, "ok", id="within-24h"),
        pytest.param(WNOW + datetime.timedelta(minutes=30), 24, 3600, "ok", id="tolerance-1h"),
    ],
)
def test_window_follows_the_settings(
    event: datetime.datetime, grace_hours: int, tolerance_seconds: int, expected: str
) -> None:
    result = window(
        event, now=WNOW, grace_period_hours=grace_hours, future_tolerance_seconds=tolerance_seconds
    )
    assert result == expected


def test_window_with_non_utc_now() -> None:
    now = WNOW.astimezone(tz(5, 30))
    settings = {"grace_period_hours": 12, "future_tolerance_seconds": 0}
    assert window(WNOW - GRACE, now=now, **settings) == "ok"
    assert window(WNOW - GRACE - US, now=now, **settings) == "late"
