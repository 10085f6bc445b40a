"""The dead-letter file: JSON Lines appended, flushed and fsynced before a batch is acknowledged."""

from __future__ import annotations

import os
import threading
import typing as t

from target_orb import jsonutil

Source = t.Literal["local", "orb"]


class DeadLetterEntry(t.TypedDict, total=False):
    """One line of the dead-letter file (CONTRACT.md `dead_letter_path`)."""

    stream: str
    record: t.Any
    event: dict[str, t.Any]
    reason: str
    source: Source


def entry(
    stream: str,
    record: t.Any,
    reason: str,
    source: Source,
    event: dict[str, t.Any] | None = None,
) -> DeadLetterEntry:
    """Build a dead-letter line.

    Args:
        stream: The Singer stream the record came from.
        record: The record as received from the tap.
        reason: Why it was not delivered, in words a user can act on.
        source: `local` (target-orb refused it) or `orb` (Orb rejected it).
        event: The Orb event it became, when mapping got that far.

    Returns:
        The entry.
    """
    line: DeadLetterEntry = {"stream": stream, "record": record, "reason": reason, "source": source}
    if event is not None:
        line["event"] = event
    return line


class DeadLetterWriter:
    """Thread-safe appender; `write` returns only once the lines are on disk."""

    def __init__(self, path: str) -> None:
        """Remember the path; the file is opened on first write, so clean runs leave none.

        Args:
            path: File to append to.
        """
        self.path = path
        self.count = 0
        self._lock = threading.Lock()

    def write(self, entries: t.Sequence[DeadLetterEntry]) -> None:
        """Append the lines, flush and fsync.

        Args:
            entries: Lines to write.

        Raises:
            OSError: The file cannot be written; the batch must then not be acknowledged.
        """
        if not entries:
            return
        data = "".join(jsonutil.dumps_lenient(e) + "\n" for e in entries).encode("utf-8")
        with self._lock:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            self.count += len(entries)
