"""A Singer message reader: the SDK's msgspec reader with a tighter per-line loop."""

from __future__ import annotations

import typing as t
from collections import Counter, defaultdict

from singer_sdk.contrib.msgspec import MsgSpecReader
from singer_sdk.contrib.msgspec import decoder as _decoder
from typing_extensions import override

_TYPE = frozenset({"type"})


class OrbMessageReader(MsgSpecReader):
    """Same messages, same callbacks and errors as `MsgSpecReader`, less work per line.

    The SDK loop builds a `{"type"}` set and checks `issubset` on every line; here the
    check is one dict lookup, and the full SDK check (with its error) runs only when
    `type` is missing.
    """

    @override
    def process_lines(
        self,
        file_input: t.IO[str] | None,
        callbacks: dict[str, t.Callable[[dict], None]],
    ) -> t.Counter[str]:
        stats: dict[str, int] = defaultdict(int)
        decode = _decoder.decode
        get_callback = callbacks.get
        for line in file_input or self.default_input:
            self._current_message = line
            try:
                message = decode(line)
            except Exception:  # noqa: BLE001 - the SDK's own decoding path raises the error
                message = self.deserialize_json(line)
            kind = message.get("type") if type(message) is dict else None
            if kind is None:
                self.assert_line_requires(message, requires=_TYPE)
            callback = get_callback(kind)
            if callback is not None:
                callback(message)
            else:
                self._process_unknown_message(message)
            stats[kind] += 1
        return Counter(**stats)
