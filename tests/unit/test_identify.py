"""Table-driven tests of the pure Identify → customer metadata mapping (CONTRACT.md, Identify)."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pytest

from target_orb.config_checks import config_problems
from target_orb.identify.customers import customer_path
from target_orb.mapping.fields import Invalid
from target_orb.mapping.fields import InvalidRecordError as _InvalidRecordError
from target_orb.mapping.spec import build_mapping_spec
from target_orb.mapping.traits import (
    Skipped,
    Update,
    build_identify_spec,
    is_identify,
    is_identify_stream,
    map_identify,
    merge_updates,
    metadata_value,
)
from target_orb.orb.answers import Answer, classify_answer

CET = datetime.timezone(datetime.timedelta(hours=1))
ERRORS = "https://docs.withorb.com/reference/error-responses#"


def ispec(**config):
    base = {
        "external_customer_id_field": "userId",
        "identify_policy": "customer_metadata",
        "traits_mapping": {"plan": "plan"},
    }
    if config.get("record_preset") == "segment_warehouse":
        del base["external_customer_id_field"]  # the preset's default, `user_id`
    base.update(config)
    assert config_problems(base) == []
    spec = build_identify_spec(base, build_mapping_spec(base))
    assert spec is not None
    return spec


def identify(traits=None, **fields):
    record = {
        "type": "identify",
        "messageId": "msg-1",
        "userId": "cust_1",
        "timestamp": "2024-03-01T12:00:00Z",
        "traits": {"plan": "pro"} if traits is None else traits,
    }
    record.update(fields)
    return record


def metadata(result) -> dict:
    assert isinstance(result, Update), result
    return result.metadata


def invalid(result) -> Invalid:
    assert isinstance(result, Invalid), result
    return result


# --- policy and routing ---------------------------------------------------------------------


def test_skip_policy_builds_no_spec():
    config = {"external_customer_id_field": "userId"}
    assert build_identify_spec(config, build_mapping_spec(config)) is None
    config["identify_policy"] = "skip"
    assert build_identify_spec(config, build_mapping_spec(config)) is None


def test_customer_metadata_is_accepted_at_start():
    assert config_problems(
        {"external_customer_id_field": "userId", "identify_policy": "customer_metadata"}
    ) == []


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"customer_id_field": "orbId"}, "external_customer_id_field"),
        ({"external_customer_id_field": "userId", "event_types": ["track", "Identify"]},
         "Remove `identify` from `event_types`"),
    ],
)
def test_config_problems_name_the_way_out(config, needle):
    problems = config_problems({**config, "identify_policy": "customer_metadata"})
    assert len(problems) == 1
    assert needle in problems[0]


@pytest.mark.parametrize(
    ("record", "identify_stream", "expected"),
    [
        ({"type": "identify"}, False, True),
        ({"type": "Identify"}, False, True),
        ({"type": "IDENTIFY"}, True, True),
        ({"type": "track"}, False, False),
        ({"type": "track"}, True, False),  # an explicit type decides, even in an Identify stream
        ({"type": "page"}, False, False),
        ({}, False, False),  # no type counts as track
        ({}, True, True),  # ... except in an Identify stream
        ({"type": ""}, True, True),
        ({"type": None}, True, True),
        ({"type": 3}, True, False),
        ({"type": "identify "}, False, False),
        ("not a dict", True, False),
    ],
)
def test_is_identify(record, identify_stream, expected):
    assert is_identify(record, identify_stream) is expected


@pytest.mark.parametrize(
    ("stream", "preset", "streams", "expected"),
    [
        ("identifies", "segment_warehouse", None, True),
        ("public-identifies", "segment_warehouse", None, True),
        ("analytics.identifies", "segment_warehouse", None, True),
        ("PROD-IDENTIFIES", "segment_warehouse", None, True),
        ("user_identifies", "segment_warehouse", None, False),
        ("identifies_v2", "segment_warehouse", None, False),
        ("public-tracks", "segment_warehouse", None, False),
        ("identifies", "segment", None, False),  # raw Segment JSON: `type` decides
        ("crm-traits", "segment", ["crm-traits"], True),
        ("public-identifies", "segment_warehouse", ["crm-traits"], False),  # setting replaces
        ("public-identifies", "segment_warehouse", [], False),
    ],
)
def test_identify_streams(stream, preset, streams, expected):
    config = {"record_preset": preset}
    if streams is not None:
        config["identify_streams"] = streams
    if preset == "segment":
        config["external_customer_id_field"] = "userId"
    assert is_identify_stream(stream, ispec(**config)) is expected


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("pro", "pro"),
        ("", ""),
        ("12.50", "12.50"),  # strings are never reinterpreted
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (-42, "-42"),
        (2**70, "1180591620717411303424"),  # no int64 limit on text
        (Decimal("12.50"), "12.5"),
        (Decimal("100.0"), "100"),
        (Decimal("0.10"), "0.1"),
        (Decimal("-0.0"), "0"),
        (Decimal("1E+2"), "100"),
        (Decimal("1.5E-7"), "0.00000015"),
        (Decimal("123456789012345678901234567890.123456789"),
         "123456789012345678901234567890.123456789"),  # never rounded
        (12.5, "12.5"),
        (0.1, "0.1"),
        (1e20, "100000000000000000000"),
        (None, None),
        (datetime.datetime(2024, 3, 1, 13, 0, tzinfo=CET), "2024-03-01T12:00:00Z"),
        (datetime.date(2024, 3, 1), "2024-03-01"),
    ],
)
def test_metadata_values_are_strings_in_plain_notation(value, text):
    assert metadata_value("k", value) == text


@pytest.mark.parametrize(
    "value",
    [Decimal("NaN"), Decimal("Infinity"), float("nan"), float("-inf"), Decimal("1E+5000"),
     10**2000, object(), b"bytes"],
)
def test_values_orb_metadata_cannot_hold_are_invalid(value):
    with pytest.raises(_InvalidRecordError) as info:
        metadata_value("score", value)
    assert info.value.code == "bad_trait_value"
    assert "`score`" in info.value.reason


# --- traits → metadata ----------------------------------------------------------------------


def test_engage_audience_trait_becomes_true_text():
    spec = ispec(traits_mapping={"order_completed_last_30days": "order_completed_last_30days"})
    record = identify({"order_completed_last_30days": True, "email": "ann@example.com"})
    assert map_identify(record, spec) == Update(
        "cust_1", {"order_completed_last_30days": "true"}
    )
    record["traits"]["order_completed_last_30days"] = False
    assert metadata(map_identify(record, spec)) == {"order_completed_last_30days": "false"}


def test_unmapped_traits_are_dropped_and_mapped_ones_renamed():
    spec = ispec(traits_mapping={"plan": "orb_plan", "ltv": "lifetime_value"})
    record = identify({"plan": "pro", "ltv": Decimal("1234.50"), "email": "a@b.c",
                       "phone": "+1 555", "address": {"city": "Paris"}})
    assert metadata(map_identify(record, spec)) == {"orb_plan": "pro", "lifetime_value": "1234.5"}


def test_null_trait_deletes_the_key():
    spec = ispec(traits_mapping={"plan": "plan", "seats": "seats"})
    assert metadata(map_identify(identify({"plan": None, "seats": 3}), spec)) == {
        "plan": None, "seats": "3",
    }


def test_missing_mapped_trait_is_not_sent():
    spec = ispec(traits_mapping={"plan": "plan", "seats": "seats"})
    assert metadata(map_identify(identify({"seats": 3}), spec)) == {"seats": "3"}


def test_no_mapped_trait_is_skipped_not_sent():
    spec = ispec()
    assert map_identify(identify({"email": "a@b.c"}), spec) == Skipped("no_traits")
    assert map_identify(identify({}), spec) == Skipped("no_traits")
    record = identify()
    del record["traits"]
    assert map_identify(record, spec) == Skipped("no_traits")
    record["traits"] = None
    assert map_identify(record, spec) == Skipped("no_traits")


def test_dotted_mapping_and_meltano_nested_mapping():
    spec = ispec(traits_mapping={"company": {"plan": "company_plan"}, "a.b": "ab"})
    record = identify({"company": {"plan": "team", "name": "ACME"}, "a.b": "literal"})
    assert metadata(map_identify(record, spec)) == {"company_plan": "team", "ab": "literal"}


@pytest.mark.parametrize(
    ("nested", "expected"),
    [
        ("flatten", {"company_plan": "team", "company_seats": "5", "tags": '["a","b"]'}),
        ("json_string", {"company": '{"plan":"team","seats":5}', "tags": '["a","b"]'}),
        ("drop", {}),
    ],
)
def test_nested_traits_follow_nested_properties(nested, expected):
    spec = ispec(nested_properties=nested, traits_mapping={"company": "company", "tags": "tags"})
    record = identify({"company": {"plan": "team", "seats": 5}, "tags": ["a", "b"]})
    result = map_identify(record, spec)
    if expected:
        assert metadata(result) == expected
    else:
        assert result == Skipped("no_traits")


def test_nested_traits_reject():
    spec = ispec(nested_properties="reject", traits_mapping={"company": "company"})
    result = invalid(map_identify(identify({"company": {"plan": "team"}}), spec))
    assert result.code == "nested_property"
    assert "`company`" in result.reason


def test_passthrough_sends_every_flat_trait_renamed_where_mapped():
    spec = ispec(traits_passthrough=True, traits_mapping={"plan": "orb_plan"})
    record = identify({"plan": "pro", "seats": 5, "vip": True, "company": {"size": 10},
                       "_sdc_batched_at": "x"})
    assert metadata(map_identify(record, spec)) == {
        "orb_plan": "pro", "seats": "5", "vip": "true", "company_size": "10",
    }


def test_two_traits_on_one_key_is_invalid_naming_both():
    spec = ispec(traits_passthrough=True, traits_mapping={})
    result = invalid(map_identify(identify({"a": {"b": 1}, "a_b": 2}), spec))
    assert result.code == "key_collision"
    assert "`a.b`" in result.reason
    assert "`a_b`" in result.reason


def test_traits_json_string_is_parsed_and_other_shapes_are_invalid():
    spec = ispec()
    assert metadata(map_identify(identify('{"plan": "pro", "email": "x"}'), spec)) == {
        "plan": "pro"
    }
    result = invalid(map_identify(identify("not json"), spec))
    assert result.code == "bad_traits"
    assert "not json" not in result.reason  # the value is never quoted
    assert invalid(map_identify(identify(["plan"]), spec)).code == "bad_traits"


def test_bad_mapped_value_is_invalid_without_quoting_it():
    spec = ispec(traits_mapping={"score": "score"})
    result = invalid(map_identify(identify({"score": Decimal("NaN")}), spec))
    assert result.code == "bad_trait_value"


# --- customer id ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  ", "null", "undefined", "NULL"])
def test_identify_without_customer_is_invalid(value):
    result = invalid(map_identify(identify(userId=value), ispec()))
    assert result.code == "missing_customer"
    assert "`userId`" in result.reason


def test_identify_with_no_customer_field_is_invalid():
    record = identify()
    del record["userId"]
    assert invalid(map_identify(record, ispec())).code == "missing_customer"


@pytest.mark.parametrize("value", [".", ".."])
def test_dot_segment_customer_ids_cannot_be_addressed(value):
    result = invalid(map_identify(identify(userId=value), ispec()))
    assert result.code == "bad_customer"


def test_customer_id_is_coerced_and_stripped():
    assert map_identify(identify(userId=" 42 "), ispec()).customer == "42"
    assert map_identify(identify(userId=42), ispec()).customer == "42"


@pytest.mark.parametrize(
    ("customer", "path"),
    [
        ("cust_1", "/customers/external_customer_id/cust_1"),
        ("en/cus/?1500", "/customers/external_customer_id/en%2Fcus%2F%3F1500"),
        ("a b", "/customers/external_customer_id/a%20b"),
        ("zoë 東京", "/customers/external_customer_id/zo%C3%AB%20%E6%9D%B1%E4%BA%AC"),
        ("a%2Fb", "/customers/external_customer_id/a%252Fb"),
        ("#x&y=1+2", "/customers/external_customer_id/%23x%26y%3D1%2B2"),
        ("...", "/customers/external_customer_id/..."),
    ],
)
def test_customer_path_url_encodes_the_id(customer, path):
    assert customer_path(customer) == path


def test_integrations_rule_applies_to_identify():
    spec = ispec()
    assert map_identify(identify(integrations={"Orb": False}), spec) == Skipped("integrations")
    assert map_identify(identify(integrations={"All": False}), spec) == Skipped("integrations")
    assert isinstance(map_identify(identify(integrations={"All": False, "Orb": True}), spec),
                      Update)
    spec = ispec(honor_integrations=False)
    assert isinstance(map_identify(identify(integrations={"Orb": False}), spec), Update)


# --- warehouse shape ------------------------------------------------------------------------


def warehouse_row(**columns):
    row = {
        "id": "djs-1", "user_id": "user_8841", "anonymous_id": "anon-1",
        "received_at": "2024-03-01T12:00:01Z", "sent_at": "2024-03-01T12:00:00Z",
        "timestamp": "2024-03-01T12:00:00Z", "original_timestamp": "2024-03-01T12:00:00Z",
        "uuid_ts": "2024-03-01T12:00:02Z", "context_ip": "203.0.113.9",
        "context_library_name": "analytics.js", "_sdc_extracted_at": "x",
        "email": "ann@example.com", "plan": "pro", "seats": 5,
    }
    row.update(columns)
    return row


def test_warehouse_identifies_row_traits_are_columns_minus_system_columns():
    spec = ispec(record_preset="segment_warehouse", traits_mapping={"plan": "plan",
                                                                    "seats": "seats"})
    assert map_identify(warehouse_row(), spec) == Update("user_8841", {"plan": "pro",
                                                                      "seats": "5"})


def test_warehouse_passthrough_never_sends_system_columns():
    spec = ispec(record_preset="segment_warehouse", traits_passthrough=True, traits_mapping={})
    assert metadata(map_identify(warehouse_row(), spec)) == {
        "email": "ann@example.com", "plan": "pro", "seats": "5",
    }


def test_warehouse_preset_with_explicit_traits_field():
    spec = ispec(record_preset="segment_warehouse", traits_field="traits")
    row = {"user_id": "u1", "plan": "ignored", "traits": '{"plan": "team"}'}
    assert map_identify(row, spec) == Update("u1", {"plan": "team"})


def test_warehouse_customer_field_can_be_overridden():
    spec = ispec(record_preset="segment_warehouse", external_customer_id_field="context_group_id")
    assert map_identify(warehouse_row(context_group_id="acct_1"), spec).customer == "acct_1"


# --- merging --------------------------------------------------------------------------------


def test_merge_in_input_order_later_value_wins_nulls_included():
    updates = [
        Update("a", {"plan": "free", "seats": "1"}),
        Update("b", {"plan": "pro"}),
        Update("a", {"plan": "team", "vip": None}),
        Update("a", {"seats": None, "vip": "true"}),
        Update("b", {"plan": None}),
    ]
    merged = merge_updates(updates)
    assert [(m.customer, m.metadata, m.indexes) for m in merged] == [
        ("a", {"plan": "team", "seats": None, "vip": "true"}, [0, 2, 3]),
        ("b", {"plan": None}, [1, 4]),
    ]


def test_merged_update_equals_applying_each_in_turn():
    """Orb merges metadata key by key; a merged PUT must leave what sequential PUTs leave."""

    def apply(state, meta):
        state = dict(state)
        for key, value in meta.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        return state

    updates = [Update("a", {"x": "1", "y": "2"}), Update("a", {"x": None}),
               Update("a", {"x": "3", "z": None}), Update("a", {"y": None, "z": "4"})]
    start = {"z": "0", "w": "keep"}
    sequential = start
    for update in updates:
        sequential = apply(sequential, update.metadata)
    (merged,) = merge_updates(updates)
    assert apply(start, merged.metadata) == sequential


# --- answers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "answer"),
    [
        (200, {"id": "c"}, Answer.DONE),
        (404, {"type": ERRORS + "404-resource-not-found"}, Answer.NOT_FOUND),
        (404, {"type": "https://docs.billwithorb.com/reference/error-responses"
                       "#404-resource-not-found"}, Answer.NOT_FOUND),
        (404, {"type": ERRORS + "404-url-not-found"}, Answer.FATAL),
        (404, {"type": ERRORS + "404-feature-not-available"}, Answer.FATAL),
        (404, "<html>not found</html>", Answer.FATAL),
        (404, None, Answer.FATAL),
        (401, {}, Answer.FATAL),
        (403, {}, Answer.FATAL),
        (400, {"type": ERRORS + "400-request-validation-errors"}, Answer.REJECTED),
        (413, {}, Answer.REJECTED),
        (422, {}, Answer.REJECTED),
    ],
)
def test_classify_answer(status, body, answer):
    assert classify_answer(status, body) is answer
