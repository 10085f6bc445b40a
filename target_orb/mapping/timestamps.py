"""Turn any accepted timestamp input into Orb's UTC `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`."""

from __future__ import annotations

import datetime
import math
import re
from decimal import ROUND_FLOOR, Context, Decimal

__all__ = ["TimestampError", "format_orb", "parse_and_format", "to_utc"]

# `datetime.UTC` is Python 3.11+; `timezone.utc` is the same singleton on every version.
_UTC = datetime.timezone.utc
_ZERO = datetime.timedelta(0)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)

# An epoch number whose absolute value is at least 1e11 is read as milliseconds, anything
# smaller as seconds. 1e11 seconds is the year 5138, which no real event carries, while
# 1e11 milliseconds is 1973-03-03, before any event a billing system will see; so the two
# readings never compete for a plausible date.
_MS_THRESHOLD = 10**11
# Larger than any epoch (in either unit) that lands inside datetime's years 1..9999
# (max 253_402_300_799_999 ms). Checked before any arithmetic so that a huge value fails
# cheaply instead of building giant numbers.
_EPOCH_LIMIT = 10**15
# Exact decimal arithmetic for epoch fractions, independent of the caller's thread-local
# decimal context: |value| < 1e15 quantized to 1e-6 has at most 21 digits.
_DEC_CONTEXT = Context(prec=40, rounding=ROUND_FLOOR)
_DEC_MICRO = Decimal("1e-6")
_DEC_MILLI = Decimal("1e-3")

_MAX_SHOWN = 60
_EXPECTED = "expected ISO 8601, a date, or epoch seconds/milliseconds"

# The shapes that dominate real feeds: Segment's raw JSON and analytics libraries
# (`...T12:00:00.123Z`), `date -u` (`...T12:00:00Z`) and the Singer SDK's datetime
# serialisation (`...T12:00:00.123000+00:00`): UTC with 0, 3 or 6 fraction digits, so no
# offset arithmetic, and `parse_and_format` can build its output from the input text.
_FAST_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{3}|[0-9]{6}))?(?:Z|\+00:00)",
    re.ASCII,
)

# Everything else ISO 8601 (extended format) the contract accepts. re.ASCII keeps `[0-9]`
# honest and makes the parser independent of Python 3.11's wider `fromisoformat`.
_ISO_RE = re.compile(
    r"""
    ([0-9]{4})-([0-9]{2})-([0-9]{2})            # date, required
    (?:
        [Tt\x20]                                # separator: T, t or a space
        ([0-9]{2}):([0-9]{2})                   # hour and minute
        (?::([0-9]{2})                          # seconds, optional
            (?:[.,]([0-9]{1,10}))?              # fraction: `.` or `,`, 1-10 digits
        )?
        (?:
            ([Zz])                              # UTC
            |([+-])([0-9]{2})(?::?([0-9]{2}))?  # +HH:MM, +HHMM or +HH
        )?                                      # no designator: naive, taken as UTC
    )?
    """,
    re.ASCII | re.VERBOSE,
)

# Epoch seconds or milliseconds written as a string: optional minus, digits, optional fraction.
_EPOCH_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)


class TimestampError(ValueError):
    """Input cannot be read as a timestamp.

    `str(e)` says what was wrong and shows a truncated repr of the value, e.g.
    "cannot read 'abc' as a timestamp (expected ISO 8601, a date, or epoch
    seconds/milliseconds)".
    """


def _show(value: object) -> str:
    """Return a short, safe repr of `value` for an error message.

    Args:
        value: The rejected input.

    Returns:
        `repr(value)`, cut to about 60 characters.
    """
    if isinstance(value, int) and value.bit_length() > 200:
        # repr() of a huge int is slow, and past 4300 digits raises on Python 3.11+.
        return f"<int of {value.bit_length()} bits>"
    try:
        shown = repr(value)
    except Exception:  # noqa: BLE001 - any repr() failure falls back to the type name
        return f"<{type(value).__name__} object>"
    if len(shown) > _MAX_SHOWN:
        shown = shown[: _MAX_SHOWN - 3] + "..."
    return shown


def _error(value: object, reason: str | None = None) -> TimestampError:
    """Build the error for `value`.

    Args:
        value: The rejected input.
        reason: What was wrong; None for "no accepted shape".

    Returns:
        The exception, for the caller to raise.
    """
    if reason is None:
        return TimestampError(f"cannot read {_show(value)} as a timestamp ({_EXPECTED})")
    return TimestampError(f"cannot read {_show(value)} as a timestamp: {reason}")


def _from_epoch_micros(micros: int, value: object) -> datetime.datetime:
    """Add `micros` microseconds to the Unix epoch.

    Args:
        micros: Microseconds since 1970-01-01T00:00:00Z, may be negative.
        value: The original input, for the error message.

    Returns:
        The aware UTC datetime.

    Raises:
        TimestampError: The result falls outside years 1..9999.
    """
    try:
        return _EPOCH + datetime.timedelta(microseconds=micros)
    except OverflowError:
        raise _error(value, "epoch value is outside years 1..9999") from None


def _from_epoch_int(number: int, value: object) -> datetime.datetime:
    """Read an integer as epoch seconds or milliseconds (see `_MS_THRESHOLD`).

    Args:
        number: The epoch number.
        value: The original input, for the error message.

    Returns:
        The aware UTC datetime.

    Raises:
        TimestampError: The result falls outside years 1..9999.
    """
    if not -_EPOCH_LIMIT < number < _EPOCH_LIMIT:
        raise _error(value, "epoch value is outside years 1..9999")
    if -_MS_THRESHOLD < number < _MS_THRESHOLD:
        return _from_epoch_micros(number * 1_000_000, value)
    return _from_epoch_micros(number * 1_000, value)


def _from_epoch_decimal(number: Decimal, value: object) -> datetime.datetime:
    """Read a Decimal as epoch seconds or milliseconds, truncating below the microsecond.

    Truncation is toward the past (floor), as it is for ISO fractions: -0.0000005 s is
    1969-12-31T23:59:59.9999995Z, which truncates to .999999, not to the epoch.

    Args:
        number: The epoch number, finite.
        value: The original input, for the error message.

    Returns:
        The aware UTC datetime.

    Raises:
        TimestampError: The value is not finite, or the result falls outside years 1..9999.
    """
    # Decimal comparisons are exact; abs() would round to the ambient context's precision.
    if not number.is_finite():
        raise _error(value, "not a finite number")
    if not -_EPOCH_LIMIT < number < _EPOCH_LIMIT:
        raise _error(value, "epoch value is outside years 1..9999")
    if -_MS_THRESHOLD < number < _MS_THRESHOLD:
        micros = number.quantize(_DEC_MICRO, context=_DEC_CONTEXT).scaleb(6, context=_DEC_CONTEXT)
    else:
        micros = number.quantize(_DEC_MILLI, context=_DEC_CONTEXT).scaleb(3, context=_DEC_CONTEXT)
    return _from_epoch_micros(int(micros), value)


def _from_aware_or_naive(dt: datetime.datetime, value: object) -> datetime.datetime:
    """Convert a plain `datetime` to UTC; a naive one (or one without an offset) is UTC.

    Args:
        dt: An instance of exactly `datetime.datetime`.
        value: The original input, for the error message.

    Returns:
        The aware UTC datetime.

    Raises:
        TimestampError: Converting to UTC leaves years 1..9999.
    """
    offset = dt.utcoffset()
    if offset is None:
        return dt.replace(tzinfo=_UTC)
    if offset == _ZERO:
        return dt.replace(tzinfo=_UTC)
    try:
        return dt.astimezone(_UTC)
    except OverflowError:
        raise _error(value, "outside years 1..9999 once converted to UTC") from None


def _from_fast_match(match: re.Match[str], value: object) -> datetime.datetime:
    """Build the datetime for a `_FAST_RE` match.

    Args:
        match: The match of `_FAST_RE` on the stripped input.
        value: The original input, for the error message.

    Returns:
        The aware UTC datetime.

    Raises:
        TimestampError: A field is out of range (month 13, second 60, ...).
    """
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        return datetime.datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int(fraction.ljust(6, "0")) if fraction else 0,
            _UTC,
        )
    except ValueError as exc:
        raise _error(value, str(exc)) from None


def _from_string(text: str, value: object) -> datetime.datetime:
    """Parse an ISO 8601 string or an epoch digit string.

    Args:
        text: The input with surrounding whitespace already stripped.
        value: The original input, for the error message.

    Returns:
        The aware UTC datetime.

    Raises:
        TimestampError: The string has no accepted shape or a field is out of range.
    """
    match = _ISO_RE.fullmatch(text)
    if match is not None:
        year, month, day, hour, minute, second, fraction, _z, sign, off_h, off_m = match.groups()
        try:
            if hour is None:  # date only: midnight UTC
                return datetime.datetime(int(year), int(month), int(day), tzinfo=_UTC)
            # More than 6 fraction digits are truncated, never rounded up: rounding could
            # carry into the next second (or day, or year).
            micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
            parsed = datetime.datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second) if second else 0,
                micros,
                tzinfo=_UTC,
            )
        except ValueError as exc:  # month 13, day 32, year 0, second 60, ...
            raise _error(value, str(exc)) from None
        if sign is None:  # `Z` or no designator
            return parsed
        hours, minutes = int(off_h), int(off_m) if off_m else 0
        if hours > 23 or minutes > 59:
            raise _error(value, "UTC offset must be between -23:59 and +23:59")
        offset = datetime.timedelta(hours=hours, minutes=minutes)
        try:
            # The parsed wall time is labelled UTC, so subtracting the offset gives real UTC.
            return parsed - offset if sign == "+" else parsed + offset
        except OverflowError:
            raise _error(value, "outside years 1..9999 once converted to UTC") from None

    if _EPOCH_RE.fullmatch(text) is not None:
        if "." in text:
            return _from_epoch_decimal(Decimal(text), value)
        if len(text.lstrip("-0")) > 16:  # int() of >4300 digits raises on Python 3.11+
            raise _error(value, "epoch value is outside years 1..9999")
        return _from_epoch_int(int(text), value)

    if not text:
        raise _error(value, "empty string")
    raise _error(value)


def _from_other(value: object) -> datetime.datetime:
    """`to_utc` past its fast paths: numbers, datetime subclasses, dates, str subclasses."""
    if isinstance(value, bool):  # bool is an int subclass, and never a timestamp
        raise _error(value, "a boolean is not a timestamp")
    if isinstance(value, int):
        return _from_epoch_int(int(value), value)
    if isinstance(value, Decimal):
        return _from_epoch_decimal(value, value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _error(value, "not a finite number")
        # repr() is the shortest string that reads back as this float, i.e. what the
        # producer wrote; the exact binary value would truncate 0.123456 to 0.123455.
        return _from_epoch_decimal(Decimal(repr(float(value))), value)
    if isinstance(value, datetime.datetime):
        # A subclass (pandas.Timestamp, pendulum.DateTime, ...): rebuild a plain datetime so
        # that formatting cannot pick up the subclass's extras (nanoseconds).
        plain = datetime.datetime(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
            value.tzinfo,
            fold=value.fold,
        )
        return _from_aware_or_naive(plain, value)
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day, tzinfo=_UTC)
    if isinstance(value, str):  # a str subclass
        return to_utc(str(value))
    if value is None:
        raise _error(value, "value is missing")
    raise _error(value, f"unsupported type {type(value).__name__} ({_EXPECTED})")


def to_utc(value: object) -> datetime.datetime:
    """Parse any accepted input into an aware UTC datetime (microsecond precision).

    Accepted inputs:

    - ISO 8601 strings (extended format): `YYYY-MM-DD`, then `T`, `t` or a space,
      `HH:MM[:SS[.f]]` with 1-10 fraction digits after `.` or `,` (digits past the 6th
      are truncated, never rounded), then `Z`/`z`, `+HH:MM`, `+HHMM`, `+HH` (or `-`), or
      nothing (naive: taken as UTC). Date-only `YYYY-MM-DD` is midnight UTC.
    - Epoch numbers: `int`, `float`, `Decimal`, or a string of digits with an optional
      leading `-` and `.fraction`. An absolute value of at least 1e11 is milliseconds,
      anything smaller is seconds (1e11 seconds is the year 5138; 1e11 ms is 1973).
      Fractions below the microsecond are truncated toward the past.
    - `datetime.datetime` (aware: converted; naive: taken as UTC) and `datetime.date`
      (midnight UTC).

    Strings are stripped of surrounding whitespace first.

    Args:
        value: The input.

    Returns:
        An aware datetime whose tzinfo is `datetime.timezone.utc`.

    Raises:
        TimestampError: The value is of another type (None, bool, list, ...), has no
            accepted shape, has a field out of range, is NaN or infinite, or lands
            outside years 1..9999 once converted to UTC.
    """
    # Fast paths first: exact types, no exceptions on the happy path.
    if type(value) is str:
        text = value.strip()
        match = _FAST_RE.fullmatch(text)
        if match is not None:
            return _from_fast_match(match, value)
        return _from_string(text, value)
    if type(value) is datetime.datetime:
        # What the SDK hands over for `format: date-time` fields; usually already UTC.
        if value.tzinfo is _UTC:
            return value
        return _from_aware_or_naive(value, value)

    return _from_other(value)


def format_orb(dt: datetime.datetime) -> str:
    """Format an aware UTC datetime the way Orb's `timestamp` wants it.

    Args:
        dt: An aware datetime with a zero UTC offset, e.g. from `to_utc`.

    Returns:
        `YYYY-MM-DDTHH:MM:SSZ` when `dt.microsecond == 0`, else
        `YYYY-MM-DDTHH:MM:SS.ffffffZ` (always 6 fraction digits).

    Raises:
        ValueError: `dt` is naive or not in UTC (a programming error, not bad input).
    """
    if dt.tzinfo is not _UTC and dt.utcoffset() != _ZERO:
        raise ValueError(f"format_orb needs an aware UTC datetime, got {dt!r}")
    # isoformat() zero-pads the year (strftime('%Y') does not on glibc), prints the
    # fraction as 6 digits only when non-zero, and ends a UTC datetime with '+00:00'.
    return dt.isoformat()[:-6] + "Z"


def parse_and_format(value: object) -> tuple[datetime.datetime, str]:
    """`(to_utc(value), format_orb(to_utc(value)))` with one parse (the mapping's hot path).

    For the dominant `_FAST_RE` shapes the C `fromisoformat` builds the datetime (and
    checks field ranges) about twice as fast as converting the groups by hand; every shape
    it gets is one Python 3.10's `fromisoformat` already reads.

    Args:
        value: Any input `to_utc` accepts.

    Returns:
        The aware UTC datetime and its Orb format.

    Raises:
        TimestampError: `value` cannot be read as a timestamp.
    """
    if type(value) is str:
        text = value.strip()
        match = _FAST_RE.fullmatch(text)
        if match is not None:
            try:
                parsed = datetime.datetime.fromisoformat(
                    text[:-1] + "+00:00" if text[-1] == "Z" else text
                )
            except ValueError as exc:
                raise _error(value, str(exc)) from None
            fraction = match.group(7)
            if not fraction or parsed.microsecond == 0:
                return parsed, text[:19] + "Z"
            return parsed, f"{text[:19]}.{fraction.ljust(6, '0')}Z"
    parsed = to_utc(value)
    return parsed, format_orb(parsed)
