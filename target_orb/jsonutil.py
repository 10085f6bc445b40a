"""JSON encoding that is Decimal-safe and fast (msgspec), used for every payload we write."""

from __future__ import annotations

import decimal
import typing as t

import msgspec

# Decimal is written as a JSON number (never a float round-trip); datetimes as RFC 3339.
_ENCODER = msgspec.json.Encoder(decimal_format="number")
_SORTED_ENCODER = msgspec.json.Encoder(decimal_format="number", order="sorted")
# Floats decode to Decimal, as the SDK's reader does, so no precision is lost.
_DECODER = msgspec.json.Decoder(float_hook=decimal.Decimal)


def _fallback(obj: t.Any) -> t.Any:
    """Last resort for values msgspec does not know (sets, custom objects)."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


_LENIENT_ENCODER = msgspec.json.Encoder(decimal_format="number", enc_hook=_fallback)


def dumps(obj: t.Any) -> bytes:
    """Encode to compact JSON bytes; Decimal stays an exact number."""
    return _ENCODER.encode(obj)


def dumps_str(obj: t.Any) -> str:
    """Encode to a compact JSON str."""
    return _ENCODER.encode(obj).decode("utf-8")


def dumps_sorted(obj: t.Any) -> bytes:
    """Encode with sorted keys, for hashing (the same content always gives the same bytes)."""
    return _SORTED_ENCODER.encode(obj)


def dumps_lenient(obj: t.Any) -> str:
    """Encode anything a tap may have sent (used for dead-letter lines and logs)."""
    return _LENIENT_ENCODER.encode(obj).decode("utf-8")


def loads(data: str | bytes) -> t.Any:
    """Decode JSON."""
    return _DECODER.decode(data)
