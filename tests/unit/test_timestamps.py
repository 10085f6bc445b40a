"""Unit tests for target_orb.mapping.timestamps: every accepted form, every rejection."""

from __future__ import annotations

import datetime as dt
import enum
import re
import zoneinfo
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from target_orb.mapping.timestamps import TimestampError, format_orb, parse_and_format, to_utc

UTC = dt.timezone.utc
ORB_FORMAT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?Z")


def normalize(value: object) -> str:
    """What the mapping sends as `timestamp` for `value`."""
    return parse_and_format(value)[1]


def tz(hours: int, minutes: int = 0) -> dt.timezone:
    """A fixed offset; minutes carry the sign of hours."""
    return dt.timezone(dt.timedelta(hours=hours, minutes=minutes))


class _Subclass(dt.datetime):
    """A datetime subclass with its own isoformat, like pandas.Timestamp (nanoseconds)."""

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return "subclass isoformat must not be used"


class _NoOffset(dt.tzinfo):
    """A tzinfo that does not know its offset: the datetime counts as naive."""

    def utcoffset(self, _dt: dt.datetime | None) -> None:
        return None

    def dst(self, _dt: dt.datetime | None) -> None:
        return None

    def tzname(self, _dt: dt.datetime | None) -> str:
        return "unknown"


class _Str(str):
    __slots__ = ()


class _Epoch(enum.IntEnum):
    LAUNCH = 1625895431


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("broken repr")


# (input, expected Orb string). Expected values are literals, checked by hand or with
# `date -u -d @<seconds>`; none is computed with the code under test.
ACCEPTED = [
    # --- ISO 8601, the fast shapes -------------------------------------------------------
    pytest.param("2024-03-01T12:00:00Z", "2024-03-01T12:00:00Z", id="iso-z-seconds"),
    pytest.param("2024-03-01T12:00:00.123Z", "2024-03-01T12:00:00.123000Z", id="iso-z-millis"),
    pytest.param("2024-03-01T12:00:00.123456Z", "2024-03-01T12:00:00.123456Z", id="iso-z-micros"),
    pytest.param("2024-03-01T12:00:00.000Z", "2024-03-01T12:00:00Z", id="iso-z-zero-millis"),
    pytest.param("2024-03-01T12:00:00.000000Z", "2024-03-01T12:00:00Z", id="iso-z-zero-micros"),
    pytest.param("2024-03-01T12:00:00.000001Z", "2024-03-01T12:00:00.000001Z", id="iso-z-1us"),
    pytest.param(
        "2024-03-01T12:00:00.123000+00:00", "2024-03-01T12:00:00.123000Z", id="iso-sdk-shape"
    ),
    pytest.param("2024-03-01T12:00:00+00:00", "2024-03-01T12:00:00Z", id="iso-plus-zero"),
    # --- fraction digits: 1-10, truncated past 6, never rounded up ------------------------
    pytest.param("2024-03-01T12:00:00.1Z", "2024-03-01T12:00:00.100000Z", id="frac-1-digit"),
    pytest.param("2024-03-01T12:00:00.12Z", "2024-03-01T12:00:00.120000Z", id="frac-2-digits"),
    pytest.param("2024-03-01T12:00:00.1234Z", "2024-03-01T12:00:00.123400Z", id="frac-4-digits"),
    pytest.param(
        "2024-03-01T12:00:00.1234567Z", "2024-03-01T12:00:00.123456Z", id="frac-7-truncated"
    ),
    pytest.param(
        "2022-05-11T21:33:13.1652304793Z", "2022-05-11T21:33:13.165230Z", id="frac-10-segment"
    ),
    pytest.param(
        "2022-12-31T23:59:59.9999999Z", "2022-12-31T23:59:59.999999Z", id="frac-no-carry-to-year"
    ),
    pytest.param(
        "2022-12-31T23:59:59.9999999999Z", "2022-12-31T23:59:59.999999Z", id="frac-10-nines"
    ),
    pytest.param("2024-03-01T12:00:00,25Z", "2024-03-01T12:00:00.250000Z", id="frac-comma"),
    pytest.param(
        "2024-03-01T12:00:00.123456789+02:00", "2024-03-01T10:00:00.123456Z", id="frac-9-offset"
    ),
    # --- designators and separators -------------------------------------------------------
    pytest.param("2024-03-01t12:00:00z", "2024-03-01T12:00:00Z", id="lowercase-t-z"),
    pytest.param("2024-03-01 12:00:00Z", "2024-03-01T12:00:00Z", id="space-separator-z"),
    pytest.param("2024-03-01T12:00:00+05:30", "2024-03-01T06:30:00Z", id="offset-hh-mm"),
    pytest.param("2024-03-01T12:00:00+0530", "2024-03-01T06:30:00Z", id="offset-hhmm"),
    pytest.param("2024-03-01T12:00:00+05", "2024-03-01T07:00:00Z", id="offset-hh"),
    pytest.param("2024-03-01T12:00:00-0800", "2024-03-01T20:00:00Z", id="offset-negative"),
    pytest.param("2024-03-01T20:00:00-08:00", "2024-03-02T04:00:00Z", id="offset-next-day"),
    pytest.param("2024-01-01T01:00:00+05:30", "2023-12-31T19:30:00Z", id="offset-previous-year"),
    pytest.param("2024-03-01T12:00:00-00:00", "2024-03-01T12:00:00Z", id="offset-minus-zero"),
    pytest.param("2024-03-01T12:00:00+23:59", "2024-02-29T12:01:00Z", id="offset-max"),
    pytest.param("2024-03-01 12:00:00.5+00", "2024-03-01T12:00:00.500000Z", id="postgres-text"),
    # --- naive (UTC), seconds optional, date-only -----------------------------------------
    pytest.param("2024-03-01 12:00:00", "2024-03-01T12:00:00Z", id="naive-redshift"),
    pytest.param("2024-03-01T12:00:00.5", "2024-03-01T12:00:00.500000Z", id="naive-fraction"),
    pytest.param("2024-03-01T12:00Z", "2024-03-01T12:00:00Z", id="no-seconds-z"),
    pytest.param("2024-03-01 12:00", "2024-03-01T12:00:00Z", id="no-seconds-naive"),
    pytest.param("2024-03-01T12:00-01:00", "2024-03-01T13:00:00Z", id="no-seconds-offset"),
    pytest.param("2021-01-01", "2021-01-01T00:00:00Z", id="date-only"),
    pytest.param("2024-02-29", "2024-02-29T00:00:00Z", id="date-only-leap-day"),
    # --- whitespace -----------------------------------------------------------------------
    pytest.param(" \t2024-03-01T12:00:00Z\n", "2024-03-01T12:00:00Z", id="ws-fast-shape"),
    pytest.param("  2024-03-01T12:00+0530 ", "2024-03-01T06:30:00Z", id="ws-offset"),
    pytest.param(" 1625895431 ", "2021-07-10T05:37:11Z", id="ws-epoch-string"),
    # --- range ends -----------------------------------------------------------------------
    pytest.param("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z", id="year-1"),
    pytest.param("0999-06-15", "0999-06-15T00:00:00Z", id="year-999-padded"),
    pytest.param("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z", id="year-9999"),
    pytest.param("0001-01-01T00:30:00-00:30", "0001-01-01T01:00:00Z", id="year-1-offset"),
    # --- epoch seconds and milliseconds ---------------------------------------------------
    pytest.param(1625895431, "2021-07-10T05:37:11Z", id="epoch-s-int"),
    pytest.param(1625895431000, "2021-07-10T05:37:11Z", id="epoch-ms-int"),
    pytest.param(1625895431123, "2021-07-10T05:37:11.123000Z", id="epoch-ms-int-frac"),
    pytest.param(0, "1970-01-01T00:00:00Z", id="epoch-zero"),
    pytest.param(-1, "1969-12-31T23:59:59Z", id="epoch-s-negative"),
    pytest.param(-86400, "1969-12-31T00:00:00Z", id="epoch-s-minus-one-day"),
    pytest.param(99_999_999_999, "5138-11-16T09:46:39Z", id="epoch-s-below-threshold"),
    pytest.param(100_000_000_000, "1973-03-03T09:46:40Z", id="epoch-ms-at-threshold"),
    pytest.param(-100_000_000_000, "1966-10-31T14:13:20Z", id="epoch-ms-negative-threshold"),
    pytest.param(253_402_300_799_999, "9999-12-31T23:59:59.999000Z", id="epoch-ms-max"),
    pytest.param(-62_135_596_800_000, "0001-01-01T00:00:00Z", id="epoch-ms-min"),
    pytest.param(_Epoch.LAUNCH, "2021-07-10T05:37:11Z", id="epoch-int-subclass"),
    pytest.param(1625895431.5, "2021-07-10T05:37:11.500000Z", id="epoch-s-float"),
    pytest.param(1625895431.123456, "2021-07-10T05:37:11.123456Z", id="epoch-s-float-micros"),
    # The float nearest 1625895431.123457 is ...1234569549...: read what the producer wrote.
    pytest.param(1625895431.123457, "2021-07-10T05:37:11.123457Z", id="epoch-s-float-as-written"),
    pytest.param(0.3, "1970-01-01T00:00:00.300000Z", id="epoch-s-float-below-binary"),
    pytest.param(1625895431123.0, "2021-07-10T05:37:11.123000Z", id="epoch-ms-float"),
    pytest.param(1.6e12, "2020-09-13T12:26:40Z", id="epoch-ms-float-exponent"),
    pytest.param(Decimal("1625895431"), "2021-07-10T05:37:11Z", id="epoch-s-decimal"),
    pytest.param(
        Decimal("1625895431.1234567"), "2021-07-10T05:37:11.123456Z", id="epoch-s-decimal-trunc"
    ),
    pytest.param(
        Decimal("1625895431123.4569"), "2021-07-10T05:37:11.123456Z", id="epoch-ms-decimal-trunc"
    ),
    pytest.param(
        Decimal("1625895431.999999999999999999999999999999999"),
        "2021-07-10T05:37:11.999999Z",
        id="epoch-decimal-many-nines",
    ),
    pytest.param(Decimal("-0.0000005"), "1969-12-31T23:59:59.999999Z", id="epoch-decimal-floor"),
    pytest.param(Decimal("1E+3"), "1970-01-01T00:16:40Z", id="epoch-decimal-exponent"),
    pytest.param(Decimal("1E-999999999"), "1970-01-01T00:00:00Z", id="epoch-decimal-tiny"),
    pytest.param("1625895431", "2021-07-10T05:37:11Z", id="epoch-s-string"),
    pytest.param("1625895431000", "2021-07-10T05:37:11Z", id="epoch-ms-string"),
    pytest.param("1625895431.5", "2021-07-10T05:37:11.500000Z", id="epoch-s-string-frac"),
    pytest.param("1625895431123.4567", "2021-07-10T05:37:11.123456Z", id="epoch-ms-string-frac"),
    pytest.param("-86400", "1969-12-31T00:00:00Z", id="epoch-string-negative"),
    pytest.param("0001625895431", "2021-07-10T05:37:11Z", id="epoch-string-leading-zeros"),
    # --- datetime and date objects ----------------------------------------------------
    pytest.param(
        dt.datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "2024-03-01T12:00:00.123456Z",
        id="datetime-utc",
    ),
    pytest.param(dt.datetime(2024, 3, 1, 12, tzinfo=UTC), "2024-03-01T12:00:00Z", id="dt-utc-0us"),
    pytest.param(dt.datetime(2024, 3, 1, 12, tzinfo=tz(2)), "2024-03-01T10:00:00Z", id="dt-plus-2"),
    pytest.param(
        dt.datetime(2024, 3, 1, 23, 30, tzinfo=tz(-5, -30)), "2024-03-02T05:00:00Z", id="dt-minus"
    ),
    pytest.param(
        dt.datetime(2024, 3, 1, 12, 0, 0, 7), "2024-03-01T12:00:00.000007Z", id="dt-naive"
    ),
    pytest.param(
        dt.datetime(2024, 3, 1, 12, tzinfo=_NoOffset()), "2024-03-01T12:00:00Z", id="dt-no-offset"
    ),
    pytest.param(
        _Subclass(2024, 3, 1, 12, 0, 0, 5, tzinfo=tz(1)),
        "2024-03-01T11:00:00.000005Z",
        id="datetime-subclass",
    ),
    pytest.param(dt.date(2021, 1, 1), "2021-01-01T00:00:00Z", id="date"),
    pytest.param(_Str("2024-03-01T12:00:00+01:00"), "2024-03-01T11:00:00Z", id="str-subclass"),
]


@pytest.mark.parametrize(("value", "expected"), ACCEPTED)
def test_normalize_accepts(value: object, expected: str) -> None:
    assert normalize(value) == expected


@pytest.mark.parametrize(("value", "expected"), ACCEPTED)
def test_to_utc_matches_normalize(value: object, expected: str) -> None:
    """to_utc returns the same instant, as a plain aware UTC datetime."""
    parsed = to_utc(value)
    assert type(parsed) is dt.datetime
    assert parsed.tzinfo is UTC
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in expected else "%Y-%m-%dT%H:%M:%SZ"
    assert parsed == dt.datetime.strptime(expected, fmt).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("zone", "local", "expected"),
    [
        pytest.param("America/New_York", (2024, 1, 15, 9, 0), "2024-01-15T14:00:00Z", id="est"),
        pytest.param("America/New_York", (2024, 7, 1, 9, 0), "2024-07-01T13:00:00Z", id="edt"),
        pytest.param("Asia/Kolkata", (2024, 3, 1, 0, 0), "2024-02-29T18:30:00Z", id="ist"),
    ],
)
def test_normalize_zoneinfo_datetime(
    zone: str, local: tuple[int, int, int, int, int], expected: str
) -> None:
    try:
        zone_info = zoneinfo.ZoneInfo(zone)
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database on this machine")
    assert normalize(dt.datetime(*local, tzinfo=zone_info)) == expected


def test_utc_datetime_is_returned_as_is() -> None:
    """The SDK's datetimes are already UTC: the fast path must not copy or shift them."""
    value = dt.datetime(2024, 3, 1, 12, 0, 0, 1, tzinfo=UTC)
    assert to_utc(value) is value


REJECTED = [
    # --- not a timestamp at all -----------------------------------------------------------
    pytest.param(None, r"^cannot read None as a timestamp: value is missing$", id="none"),
    pytest.param("", r"^cannot read '' as a timestamp: empty string$", id="empty"),
    pytest.param("   ", r"^cannot read '   ' as a timestamp: empty string$", id="blank"),
    pytest.param(
        "not a date",
        r"^cannot read 'not a date' as a timestamp \(expected ISO 8601, a date, "
        r"or epoch seconds/milliseconds\)$",
        id="words",
    ),
    pytest.param(True, r"^cannot read True as a timestamp: a boolean", id="bool-true"),
    pytest.param(False, r"^cannot read False as a timestamp: a boolean", id="bool-false"),
    pytest.param([1625895431], r"unsupported type list", id="list"),
    pytest.param({"ts": "2024-03-01"}, r"unsupported type dict", id="dict"),
    pytest.param(b"2024-03-01T12:00:00Z", r"unsupported type bytes", id="bytes"),
    pytest.param(dt.time(12, 0), r"unsupported type time", id="time-object"),
    pytest.param(dt.timedelta(seconds=5), r"unsupported type timedelta", id="timedelta"),
    pytest.param(_BadRepr(), r"cannot read <_BadRepr object> as a timestamp", id="broken-repr"),
    # --- not finite -------------------------------------------------------------------------
    pytest.param(float("nan"), r"cannot read nan .*not a finite number", id="float-nan"),
    pytest.param(float("inf"), r"cannot read inf .*not a finite number", id="float-inf"),
    pytest.param(float("-inf"), r"not a finite number", id="float-minus-inf"),
    pytest.param(Decimal("NaN"), r"not a finite number", id="decimal-nan"),
    pytest.param(Decimal("sNaN"), r"not a finite number", id="decimal-snan"),
    pytest.param(Decimal("-Infinity"), r"not a finite number", id="decimal-infinity"),
    pytest.param("NaN", r"expected ISO 8601", id="string-nan"),
    pytest.param("Infinity", r"expected ISO 8601", id="string-infinity"),
    # --- out-of-range fields (fast path and general path) ---------------------------------
    pytest.param("2024-13-01T00:00:00Z", r"month must be in 1\.\.12", id="month-13-fast"),
    pytest.param("2024-13-01T00:00:00+01:00", r"month must be in 1\.\.12", id="month-13-offset"),
    pytest.param("2024-00-10", r"month must be in 1\.\.12", id="month-0-date"),
    pytest.param("0000-01-01", r"year 0 is out of range", id="year-0"),
    pytest.param("0000-01-01T00:00:00Z", r"year 0 is out of range", id="year-0-fast"),
    pytest.param("2023-02-29", r"day is out of range for month", id="feb-29-non-leap"),
    pytest.param("2024-04-31T00:00:00Z", r"day is out of range for month", id="apr-31"),
    pytest.param("2024-03-01T24:00:00Z", r"hour must be in 0\.\.23", id="hour-24"),
    pytest.param("2024-03-01T12:60:00Z", r"minute must be in 0\.\.59", id="minute-60"),
    pytest.param("2024-03-01T23:59:60Z", r"second must be in 0\.\.59", id="leap-second"),
    pytest.param("2024-03-01 23:59:60", r"second must be in 0\.\.59", id="leap-second-naive"),
    pytest.param("2024-03-01T12:00:00+24:00", r"UTC offset must be between", id="offset-24h"),
    pytest.param("2024-03-01T12:00:00+05:60", r"UTC offset must be between", id="offset-60m"),
    # --- outside years 1..9999 once in UTC ------------------------------------------------
    pytest.param("0001-01-01T00:00:00+00:01", r"outside years 1\.\.9999 once", id="before-year-1"),
    pytest.param("9999-12-31T23:59:59-00:01", r"outside years 1\.\.9999 once", id="after-9999"),
    pytest.param(
        dt.datetime(1, 1, 1, tzinfo=tz(1)), r"outside years 1\.\.9999 once", id="datetime-year-0"
    ),
    # --- malformed ISO shapes ---------------------------------------------------------------
    pytest.param("2024-03-01T12:00:00.12345678901Z", r"expected ISO 8601", id="frac-11-digits"),
    pytest.param("2024-03-01T12:00:00.Z", r"expected ISO 8601", id="frac-empty"),
    pytest.param("2024-03-01T12:00.5Z", r"expected ISO 8601", id="frac-without-seconds"),
    pytest.param("2024-3-1", r"expected ISO 8601", id="date-not-padded"),
    pytest.param("20240301T120000Z", r"expected ISO 8601", id="basic-format"),
    pytest.param("2024-03-01T12Z", r"expected ISO 8601", id="hour-only"),
    pytest.param("2024-03-01Z", r"expected ISO 8601", id="date-with-z"),
    pytest.param("2024-03-01T", r"expected ISO 8601", id="dangling-t"),
    pytest.param("2024-03-01_12:00:00Z", r"expected ISO 8601", id="bad-separator"),
    pytest.param("2024-03-01T12:00:00 +00:00", r"expected ISO 8601", id="space-before-offset"),
    pytest.param("2024-03-01 12:00:00 UTC", r"expected ISO 8601", id="utc-word"),
    pytest.param("2024-03-01T12:00:00+5:30", r"expected ISO 8601", id="offset-1-digit-hour"),
    pytest.param("2024-03-01T12:00:00+05:3", r"expected ISO 8601", id="offset-1-digit-minute"),
    pytest.param("2024-03-01T12:00:00+05:30:15", r"expected ISO 8601", id="offset-seconds"),
    pytest.param("12:00:00", r"expected ISO 8601", id="time-only"),
    pytest.param("2024-03-01T12:00:00ZZ", r"expected ISO 8601", id="trailing-junk"),
    pytest.param("\u0662\u0660\u0662\u0664-03-01", r"expected ISO 8601", id="arabic-indic-digits"),
    pytest.param("\uff12\uff10\uff12\uff14-03-01", r"expected ISO 8601", id="fullwidth-digits"),
    pytest.param("Fri, 01 Mar 2024 12:00:00 GMT", r"expected ISO 8601", id="http-date"),
    # --- malformed epoch strings ------------------------------------------------------------
    pytest.param("1.6e12", r"expected ISO 8601", id="epoch-string-exponent"),
    pytest.param("+1625895431", r"expected ISO 8601", id="epoch-string-plus"),
    pytest.param("1625895431.", r"expected ISO 8601", id="epoch-string-dangling-dot"),
    pytest.param(".5", r"expected ISO 8601", id="epoch-string-no-int-part"),
    pytest.param("1_625_895_431", r"expected ISO 8601", id="epoch-string-underscores"),
    pytest.param("1625895431 000", r"expected ISO 8601", id="epoch-string-inner-space"),
    # --- epochs outside years 1..9999 (no OverflowError may leak) ---------------------------
    pytest.param(253_402_300_800_000, r"epoch value is outside years", id="epoch-ms-past-9999"),
    pytest.param(-62_135_596_800_001, r"epoch value is outside years", id="epoch-ms-before-1"),
    pytest.param(-99_999_999_999, r"epoch value is outside years", id="epoch-s-before-year-1"),
    pytest.param(10**15, r"epoch value is outside years", id="epoch-1e15"),
    pytest.param(-(10**30), r"epoch value is outside years", id="epoch-huge-negative"),
    pytest.param(10**5000, r"^cannot read <int of 16610 bits> .*outside", id="epoch-giant-int"),
    pytest.param(1e300, r"epoch value is outside years", id="epoch-float-huge"),
    pytest.param(Decimal("1E+999999999"), r"epoch value is outside years", id="epoch-decimal-huge"),
    pytest.param(
        Decimal("253402300800000.5"), r"epoch value is outside years", id="epoch-decimal-past"
    ),
    pytest.param("9" * 5000, r"epoch value is outside years", id="epoch-string-5000-digits"),
    pytest.param("9" * 17, r"epoch value is outside years", id="epoch-string-17-digits"),
    pytest.param("1" + "0" * 15 + ".5", r"epoch value is outside years", id="epoch-string-frac"),
]


@pytest.mark.parametrize(("value", "message"), REJECTED)
def test_rejects(value: object, message: str) -> None:
    with pytest.raises(TimestampError, match=message):
        to_utc(value)
    with pytest.raises(TimestampError, match=message):
        normalize(value)


def test_error_is_a_value_error_with_truncated_repr() -> None:
    value = "x" * 500
    with pytest.raises(ValueError, match=r"^cannot read 'x{50,60}\.\.\. as a timestamp") as info:
        to_utc(value)
    assert isinstance(info.value, TimestampError)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("0001-01-01T00:00:00+01:00", id="overflow-in-offset"),
        pytest.param(dt.datetime(1, 1, 1, tzinfo=tz(1)), id="overflow-in-astimezone"),
        pytest.param(-(10**14), id="overflow-in-epoch"),
        pytest.param("2024-13-01T00:00:00Z", id="datetime-value-error"),
    ],
)
def test_error_does_not_chain_internal_errors(value: object) -> None:
    """The message stands alone: no OverflowError/ValueError shown as 'during handling'."""
    with pytest.raises(TimestampError) as info:
        to_utc(value)
    assert info.value.__suppress_context__ is True
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(dt.datetime(2024, 3, 1, 12, tzinfo=UTC), "2024-03-01T12:00:00Z", id="no-us"),
        pytest.param(
            dt.datetime(2024, 3, 1, 12, 0, 0, 1, tzinfo=UTC),
            "2024-03-01T12:00:00.000001Z",
            id="1us",
        ),
        pytest.param(
            dt.datetime(2024, 3, 1, 12, 0, 0, 120000, tzinfo=UTC),
            "2024-03-01T12:00:00.120000Z",
            id="6-digits-always",
        ),
        pytest.param(dt.datetime(5, 1, 2, tzinfo=UTC), "0005-01-02T00:00:00Z", id="year-padded"),
        pytest.param(
            dt.datetime(2024, 3, 1, 12, tzinfo=tz(0)), "2024-03-01T12:00:00Z", id="zero-offset-tz"
        ),
    ],
)
def test_format_orb(value: dt.datetime, expected: str) -> None:
    assert format_orb(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(dt.datetime(2024, 3, 1, 12), id="naive"),
        pytest.param(dt.datetime(2024, 3, 1, 12, tzinfo=tz(1)), id="not-utc"),
    ],
)
def test_format_orb_refuses_non_utc(value: dt.datetime) -> None:
    with pytest.raises(ValueError, match="aware UTC datetime"):
        format_orb(value)


# --- properties --------------------------------------------------------------------------
# Whole-minute offsets only: ISO 8601 (and this parser) has no seconds in an offset.
fixed_offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)
aware_datetimes = st.datetimes(
    min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2200, 12, 31, 23, 59, 59, 999999)
).flatmap(lambda naive: fixed_offsets.map(lambda zone: naive.replace(tzinfo=zone)))
OTHER_ZONE = dt.timezone(dt.timedelta(hours=-9, minutes=-30))


def _parse_orb(text: str) -> dt.datetime:
    """Read Orb's format with strptime, independently of the code under test."""
    assert ORB_FORMAT.fullmatch(text), text
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in text else "%Y-%m-%dT%H:%M:%SZ"
    return dt.datetime.strptime(text, fmt).replace(tzinfo=UTC)


@given(aware_datetimes)
def test_property_all_spellings_agree(value: dt.datetime) -> None:
    spellings = [value.isoformat(), value, value.astimezone(OTHER_ZONE), value.astimezone(UTC)]
    results = [normalize(x) for x in spellings]
    assert len(set(results)) == 1, results
    # The one result is the same instant, in Orb's format, with microseconds kept.
    assert _parse_orb(results[0]) == value
    assert ("." in results[0]) == (value.microsecond != 0)
    for x in spellings:
        assert to_utc(normalize(x)) == to_utc(x)


@given(
    aware_datetimes,
    st.sampled_from(["T", "t", " "]),
    st.sampled_from(["seconds", "milliseconds", "microseconds"]),
)
def test_property_isoformat_variants(value: dt.datetime, sep: str, timespec: str) -> None:
    text = value.isoformat(sep=sep, timespec=timespec)
    # isoformat truncates to the timespec; so must the expectation.
    keep = {"seconds": 1_000_000, "milliseconds": 1000, "microseconds": 1}[timespec]
    expected = value.replace(microsecond=value.microsecond // keep * keep)
    assert _parse_orb(normalize(text)) == expected
    assert to_utc(normalize(text)) == to_utc(text)


@st.composite
def iso_strings(draw: st.DrawFn) -> tuple[str, dt.datetime]:
    """An ISO 8601 string built from parts, with the instant it means (from the parts)."""
    local = draw(
        st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2200, 12, 30))
    )
    digits = draw(st.text(alphabet="0123456789", min_size=0, max_size=10))
    mark = draw(st.sampled_from([".", ","]))
    fraction = f"{mark}{digits}" if digits else ""
    sep = draw(st.sampled_from(["T", "t", " "]))
    offset_minutes = draw(st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59))
    sign = "-" if offset_minutes < 0 else "+"
    hh, mm = divmod(abs(offset_minutes), 60)
    style = draw(st.sampled_from(["Z", "z", "", "hh:mm", "hhmm", "hh"]))
    if style in ("Z", "z", ""):
        designator, offset = style, dt.timedelta(0)
    elif style == "hh":
        designator, offset = f"{sign}{hh:02d}", dt.timedelta(hours=hh if sign == "+" else -hh)
    else:
        colon = ":" if style == "hh:mm" else ""
        designator = f"{sign}{hh:02d}{colon}{mm:02d}"
        offset = dt.timedelta(minutes=offset_minutes)
    text = f"{local:%Y-%m-%d}{sep}{local:%H:%M:%S}{fraction}{designator}"
    # Sub-microsecond digits are dropped (floor), computed exactly with Fraction.
    micros = int(Fraction(int(digits), 10 ** len(digits)) * 1_000_000) if digits else 0
    instant = local.replace(microsecond=micros, tzinfo=UTC) - offset
    return text, instant


@given(iso_strings())
def test_property_iso_strings_from_parts(case: tuple[str, dt.datetime]) -> None:
    text, instant = case
    assert to_utc(text) == instant
    assert _parse_orb(normalize(text)) == instant
    assert to_utc(normalize(text)) == to_utc(text)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


@given(
    st.datetimes(
        min_value=dt.datetime(1974, 1, 1), max_value=dt.datetime(5000, 1, 1), timezones=st.just(UTC)
    )
)
def test_property_epoch_units(value: dt.datetime) -> None:
    """From 1974 to 5000 seconds stay below 1e11 and milliseconds at or above it."""
    delta = value - EPOCH
    seconds = delta // dt.timedelta(seconds=1)
    millis = delta // dt.timedelta(milliseconds=1)
    micros = delta // dt.timedelta(microseconds=1)
    whole = value.replace(microsecond=0)
    assert to_utc(seconds) == whole
    assert to_utc(str(seconds)) == whole
    assert to_utc(millis) == value.replace(microsecond=value.microsecond // 1000 * 1000)
    assert to_utc(str(millis)) == to_utc(millis)
    assert to_utc(Decimal(micros).scaleb(-6)) == value
    assert to_utc(str(Decimal(micros).scaleb(-6))) == value


@given(
    st.datetimes(
        min_value=dt.datetime(1970, 1, 1),
        max_value=dt.datetime(2200, 1, 1),
        timezones=st.just(dt.timezone.utc),
    ),
    st.sampled_from(["Z", "+00:00"]),
    st.sampled_from([0, 3, 6]),
)
def test_parse_and_format_agrees_with_to_utc_and_format_orb(when, suffix, digits):

    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{when.microsecond:06d}"[:digits]
    text += suffix
    assert parse_and_format(text) == (to_utc(text), format_orb(to_utc(text)))
    assert parse_and_format(when) == (to_utc(when), format_orb(to_utc(when)))


@pytest.mark.parametrize("text", ["2024-02-30T00:00:00Z", "2024-01-01T24:00:00.000Z",
                                  "2024-13-01T00:00:00+00:00"])
def test_parse_and_format_rejects_out_of_range_fields(text):

    with pytest.raises(TimestampError):
        parse_and_format(text)
