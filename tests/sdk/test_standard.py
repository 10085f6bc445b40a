"""The SDK's standard target suite, each test subclassed with a validate() of what landed.

In the style of target-snowflake: the standard tests only check "did not raise"; here
every one also checks what reached the stand-in Orb and the dead-letter file. The
standard streams are not Segment-shaped, so every one of their records must be
dead-lettered with a reason (never dropped, never a crash) and nothing may land in Orb.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from singer_sdk.testing import get_target_test_class
from singer_sdk.testing.suites import SingerTestSuite
from singer_sdk.testing.target_tests import (
    TargetArrayData,
    TargetCamelcaseComplexSchema,
    TargetCamelcaseTest,
    TargetCliPrintsTest,
    TargetDuplicateRecords,
    TargetEncodedStringData,
    TargetInvalidSchemaTest,
    TargetNoPrimaryKeys,
    TargetOptionalAttributes,
    TargetPrimaryKeyUpdates,
    TargetRecordBeforeSchemaTest,
    TargetRecordMissingKeyProperty,
    TargetRecordMissingOptionalFields,
    TargetSchemaNoProperties,
    TargetSchemaUpdates,
    TargetSpecialCharsInAttributes,
)
from singer_sdk.testing.templates import TargetFileTestTemplate

from fake_orb import FakeOrb
from target_orb.target import TargetOrb

API_KEY = "sdk-suite-key"
# The fixtures carry historical timestamps (2015, 2024): both sides widen the grace window.
ORB = FakeOrb(api_key=API_KEY, grace_period_hours=10**6)
WORK = Path(tempfile.mkdtemp(prefix="target-orb-sdk-suite-"))
DEAD_LETTERS = WORK / "dead-letter.jsonl"
CONFIG = {
    "api_key": API_KEY,
    "api_url": ORB.url,
    "external_customer_id_field": "userId",
    "properties_passthrough": True,
    "dead_letter_path": str(DEAD_LETTERS),
    "grace_period_hours": 10**6,
    "progress_interval_seconds": 0,
    "max_retry_seconds": 10,
}


@pytest.fixture(scope="module", autouse=True)
def _stand_in():
    ORB.start()
    yield
    ORB.stop()
    shutil.rmtree(WORK, ignore_errors=True)


def _dead_letters() -> list[dict]:
    if not DEAD_LETTERS.exists():
        return []
    return [json.loads(line) for line in DEAD_LETTERS.read_text().splitlines()]


def _input_records(path) -> list[dict]:
    lines = [json.loads(line) for line in Path(str(path)).read_text().splitlines() if line.strip()]
    return [m for m in lines if m.get("type") == "RECORD"]


class _AllDeadLettered:
    """validate(): every input record is dead-lettered with a reason, nothing lands in Orb."""

    def validate(self) -> None:
        expected = _input_records(self.singer_filepath)
        letters = _dead_letters()
        assert [(d["stream"], d["record"]) for d in letters] == [
            (m["stream"], m["record"]) for m in expected
        ]
        assert all(d["source"] == "local" and d["reason"] for d in letters)
        assert ORB.events() == []


class _NothingDelivered:
    """validate() for tests that must raise before delivering anything."""

    def validate(self) -> None:
        assert ORB.events() == []
        assert not ORB.ingest_requests()


class OrbArrayData(_AllDeadLettered, TargetArrayData): ...
class OrbCamelcase(_AllDeadLettered, TargetCamelcaseTest): ...
class OrbCamelcaseComplexSchema(_AllDeadLettered, TargetCamelcaseComplexSchema): ...
class OrbDuplicateRecords(_AllDeadLettered, TargetDuplicateRecords): ...
class OrbEncodedStringData(_AllDeadLettered, TargetEncodedStringData): ...
class OrbNoPrimaryKeys(_AllDeadLettered, TargetNoPrimaryKeys): ...
class OrbOptionalAttributes(_AllDeadLettered, TargetOptionalAttributes): ...
class OrbPrimaryKeyUpdates(_AllDeadLettered, TargetPrimaryKeyUpdates): ...
class OrbRecordMissingOptionalFields(_AllDeadLettered, TargetRecordMissingOptionalFields): ...
class OrbSchemaNoProperties(_AllDeadLettered, TargetSchemaNoProperties): ...
class OrbSchemaUpdates(_AllDeadLettered, TargetSchemaUpdates): ...
class OrbSpecialCharsInAttributes(_AllDeadLettered, TargetSpecialCharsInAttributes): ...
class OrbInvalidSchema(_NothingDelivered, TargetInvalidSchemaTest): ...
class OrbRecordBeforeSchema(_NothingDelivered, TargetRecordBeforeSchemaTest): ...
class OrbRecordMissingKeyProperty(_NothingDelivered, TargetRecordMissingKeyProperty): ...


class OrbSegmentTracks(TargetFileTestTemplate):
    """Raw Segment Track messages (Segment spec examples) land exactly as the contract says."""

    name = "segment_tracks"

    @property
    def singer_filepath(self) -> Path:
        return Path(__file__).parent / "data" / f"{self.name}.singer"

    def validate(self) -> None:
        landed = {e["idempotency_key"]: e for e in ORB.events()}
        assert set(landed) == {
            "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
            "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
            "node-next-1709294400123-743be593-7789-4b74-8078-cbcc8894c586",
        }
        assert landed["ajs-f8ca1e4de5024d9430b3928bd8ac6b96"] == {
            "idempotency_key": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
            "event_name": "Course Clicked",
            "external_customer_id": "AiUGstSDIg",
            "timestamp": "2015-12-12T19:11:01.249000Z",
            "properties": {"title": "Intro to Analytics"},
        }
        usage = landed["node-next-1709294400123-743be593-7789-4b74-8078-cbcc8894c586"]
        assert usage["properties"] == {
            "endpoint": "/v1/search", "tokens": 1532, "cached": False, "region": "us-east-1",
            "latency_ms": 41.7, "tags": '["beta"]', "request_method": "POST",
        }
        assert landed["022bb90c-bbac-11e4-8dfc-aa07a5b093db"]["properties"] == {}
        letters = _dead_letters()
        assert [d["record"]["messageId"] for d in letters] == ["no-customer"]
        assert self.runner.state_messages == [
            {"bookmarks": {"segment_tracks": {"replication_key_value": "2024-03-01T12:00:00Z"}}},
        ]


# Excluded from the suite, with reasons:
# - TargetMultipleStateMessages: the SDK collapses STATE messages between drains (it is
#   commented out of the SDK's own suite: "TODO: fix behavior in SDK to make this pass");
#   target-orb writes STATE only at drains, once delivery is acknowledged.
# - TargetRecordMissingRequiredProperty: not in the SDK suite either; target-orb never
#   fails a run on schema drift (the record goes to the mapping and is dead-lettered if
#   it cannot become an event), covered by tests/integration/test_cli.py.
standard = SingerTestSuite(
    kind="target",
    tests=[
        OrbArrayData, OrbCamelcase, OrbCamelcaseComplexSchema, TargetCliPrintsTest,
        OrbDuplicateRecords, OrbEncodedStringData, OrbInvalidSchema, OrbNoPrimaryKeys,
        OrbOptionalAttributes, OrbPrimaryKeyUpdates, OrbRecordBeforeSchema,
        OrbRecordMissingKeyProperty, OrbRecordMissingOptionalFields, OrbSchemaNoProperties,
        OrbSchemaUpdates, OrbSpecialCharsInAttributes, OrbSegmentTracks,
    ],
)

StandardTests = get_target_test_class(
    TargetOrb,
    config=CONFIG,
    custom_suites=[standard],
    include_target_tests=False,
    parse_env_config=False,
)


class TestTargetOrbStandard(StandardTests):
    """SDK standard target tests plus Segment fixtures, against the stand-in Orb."""

    @pytest.fixture
    def resource(self):
        ORB.reset()
        DEAD_LETTERS.unlink(missing_ok=True)
        yield ORB
        DEAD_LETTERS.unlink(missing_ok=True)
