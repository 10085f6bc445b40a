"""Reading Singer input: lines from the descriptor (with idle flush), and a careful path.

The reading loop itself is `SeamMessageReader.process_lines` (target_orb/singer/sdk_seam.py): the
SDK's msgspec decoder on raw bytes, one dict lookup per line. Only a line msgspec refuses
goes through `read_careful` here, which reads what Python's `json` module
reads (`NaN`, `Infinity`, `-Infinity`, lone surrogate escapes, bytes that are not UTF-8):
a RECORD holding such values is handed to `on_invalid_record` (it becomes a dead-letter
entry with a reason) and reading goes on. Anything that is not a Singer message fails the
run with the line number and a short excerpt, never a traceback.

Input is read from the file descriptor in chunks, so the reader can notice when the tap
goes quiet: after `idle_seconds` without input it calls `on_idle` on the reading thread
(the SDK's sinks are not thread-safe, so nothing else ever touches them).
"""

from __future__ import annotations

import decimal
import json
import logging
import os
import select
import typing as t

from singer_sdk.exceptions import InvalidInputLine

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.reader")
_CHUNK = 1 << 16
_EXCERPT = 120
_WHITESPACE = " \t\r\n"

InvalidRecordHandler = t.Callable[[dict, str, str], None]
"""on_invalid_record(message with a JSON-safe copy of the record, code, reason)."""


class IdleHook(t.Protocol):
    """What `input_lines` needs to flush when the tap goes quiet."""

    idle_seconds: float
    on_idle: t.Callable[[], None] | None


class _NonFinite(str):
    """`NaN`, `Infinity` or `-Infinity` as read by the careful path (marked, never a float)."""

    __slots__ = ()


def excerpt(line: bytes | str) -> str:
    """A short, printable excerpt of an input line for error messages."""
    text = line.decode("utf-8", "backslashreplace") if isinstance(line, bytes) else line
    text = text.strip(_WHITESPACE)
    shown = text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…"
    return repr(shown)


def bad_line(number: int, line: bytes | str, what: str) -> InvalidInputLine:
    """The error for a line that is not a usable Singer message."""
    msg = (
        f"Input line {number} {what}: {excerpt(line)}. The tap's output is malformed; fix the "
        "tap (or the file) and rerun: nothing after the last STATE was acknowledged, so a "
        "rerun resends it."
    )
    return InvalidInputLine(msg)


def _escape_text(text: str, bytes_escaped: bool) -> tuple[str, str | None]:
    """Escape surrogates (undecodable bytes or lone surrogate escapes) as visible text.

    Returns:
        The escaped text and the problem code (None when the text is clean).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return text, None
    code = "lone_surrogate"
    out = []
    for char in text:
        point = ord(char)
        if bytes_escaped and 0xDC80 <= point <= 0xDCFF:
            out.append(f"\\x{point - 0xDC00:02x}")
            code = "not_utf8"
        elif 0xD800 <= point <= 0xDFFF:
            out.append(f"\\u{point:04x}")
        else:
            out.append(char)
    return "".join(out), code


def _clean(
    value: t.Any, path: str, problems: list[tuple[str, str, str]], bytes_escaped: bool
) -> t.Any:
    """A JSON-safe copy of `value`; each poison value found is added to `problems`.

    Problems are (path, code, text): non-finite numbers become their name as a string, and
    text that is not valid Unicode shows its bad bytes as `\\xNN` (lone surrogates `\\uXXXX`).
    """
    if type(value) is _NonFinite:
        problems.append((path, "non_finite_number", f"{path} is {value}"))
        return str(value)
    if isinstance(value, str):
        clean, code = _escape_text(value, bytes_escaped)
        if code == "not_utf8":
            problems.append((path, code, f"{path} has bytes that are not UTF-8"))
        elif code is not None:
            problems.append((path, code, f"{path} has a lone surrogate escape (not valid text)"))
        return clean
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            clean_key, code = _escape_text(key, bytes_escaped) if isinstance(key, str) else (
                key, None)
            child = f"{path}.{clean_key}" if path else str(clean_key)
            if code is not None:
                what = "bytes that are not UTF-8" if code == "not_utf8" else "a lone surrogate"
                problems.append((child, code, f"the key {child} has {what}"))
            out[clean_key] = _clean(item, child, problems, bytes_escaped)
        return out
    if isinstance(value, list):
        return [
            _clean(item, f"{path}[{i}]", problems, bytes_escaped) for i, item in enumerate(value)
        ]
    return value


def _invalid_reason(problems: list[tuple[str, str, str]]) -> str:
    shown = "; ".join(text for _, _, text in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return (
        f"the tap wrote values Orb cannot take: {shown}{more}. Non-finite numbers (NaN, "
        "Infinity) are kept here as strings and bad bytes as \\xNN text; fix the source data "
        "or the tap, then replay the corrected record."
    )


def input_lines(source: t.IO[t.Any], idle: IdleHook) -> t.Iterator[bytes | str]:
    """Lines as bytes from the file descriptor when there is one, else as the stream gives.

    Reading the descriptor in chunks lets the reader notice a quiet tap: after
    `idle.idle_seconds` without input (and something arrived since the last time) it calls
    `idle.on_idle()` on this, the reading, thread.
    """
    try:
        fd = source.fileno()
    except (AttributeError, OSError, ValueError):
        return iter(source)
    if os.name == "nt":  # no poll/select on pipes: plain reads, no idle flush
        return iter(getattr(source, "buffer", source))
    return _fd_lines(fd, idle)


def _fd_lines(fd: int, idle: IdleHook) -> t.Iterator[bytes]:
    pending = b""
    armed = False  # input arrived since the last idle flush
    read = os.read
    poller = select.poll() if hasattr(select, "poll") else None
    if poller is not None:
        poller.register(fd, select.POLLIN)
    while True:
        if armed and idle.idle_seconds > 0 and idle.on_idle is not None:
            ready: list[t.Any]
            if poller is not None:
                ready = poller.poll(idle.idle_seconds * 1000)
            else:  # pragma: no cover - platforms without poll
                ready = select.select([fd], [], [], idle.idle_seconds)[0]
            if not ready:
                armed = False
                idle.on_idle()
                continue
        chunk = read(fd, _CHUNK)
        if not chunk:
            break
        armed = True
        if pending:
            chunk = pending + chunk
        lines = chunk.split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def read_careful(
    line: bytes | str, number: int, on_invalid_record: InvalidRecordHandler | None
) -> dict | None:
    """Read a line msgspec refused the way Python's json module reads it.

    Returns:
        The message (or whatever JSON value the line holds: the caller checks it is an
        object); None for a whitespace-only line or a RECORD handed to `on_invalid_record`.

    Raises:
        InvalidInputLine: The line is not JSON, or holds poison values outside a record.
    """
    bytes_escaped = False
    if isinstance(line, bytes):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", "surrogateescape")
            bytes_escaped = True
    else:
        text = line
    text = text.strip(_WHITESPACE)
    if text.startswith("\ufeff"):  # a byte-order mark (first line of some files)
        text = text[1:].lstrip(_WHITESPACE)
    if not text:
        return None
    try:
        message = json.loads(text, parse_float=decimal.Decimal, parse_constant=_NonFinite)
    except RecursionError:
        what = "is not a JSON Singer message (nested too deeply)"
        raise bad_line(number, line, what) from None
    except ValueError as exc:
        detail = getattr(exc, "msg", None) or str(exc)
        raise bad_line(number, line, f"is not a JSON Singer message ({detail})") from None
    if type(message) is not dict:
        return message  # the caller says it is not an object
    problems: list[tuple[str, str, str]] = []
    clean = _clean(message, "", problems, bytes_escaped)
    if not problems:
        return message
    record_problems = all(path.startswith(("record.", "record[")) for path, _, _ in problems)
    handler = on_invalid_record
    if (
        message.get("type") == "RECORD"
        and record_problems
        and type(message.get("stream")) is str
        and type(message.get("record")) is dict
        and handler is not None
    ):
        problems = [(p, c, txt.replace("record.", "", 1)) for p, c, txt in problems]
        handler(clean, problems[0][1], _invalid_reason(problems))
        return None
    shown = "; ".join(text for _, _, text in problems[:3])
    raise bad_line(
        number, line,
        f"holds values that cannot be carried outside a record's fields ({shown})",
    )
