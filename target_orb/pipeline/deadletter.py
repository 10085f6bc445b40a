"""The dead-letter file: JSON Lines appended, flushed and fsynced before a batch is acknowledged.

A record already in the file for the same reason (same stream, same idempotency key, or the
same record when it never became an event, and the same reason) is not appended again: a
scheduled rerun over the same input (a JSON Lines tap re-reads its whole file) counts it as
already dead-lettered instead of growing the file with copies. The writer keeps an index of
64-bit digests of the entries in the file (built by streaming the file once, on the first
write of a run), never the lines themselves.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import typing as t

from target_orb import jsonutil

Source = t.Literal["local", "orb"]


class DeadLetterEntry(t.TypedDict, total=False):
    """One line of the dead-letter file (README, "The dead-letter file")."""

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


def entry_digest(item: t.Any) -> int | None:
    """What makes two dead letters the same: stream, idempotency key or record, and reason.

    The key is the Orb event's `idempotency_key` when the entry has an event; otherwise the
    record itself, without the tap's `_sdc_*` metadata columns (they change on every
    extraction).

    Args:
        item: A dead-letter entry as read back from JSON.

    Returns:
        A 64-bit digest, or None for something that is not a dead-letter entry.
    """
    if not isinstance(item, dict) or "stream" not in item or "reason" not in item:
        return None
    event = item.get("event")
    key = event.get("idempotency_key") if isinstance(event, dict) else None
    if isinstance(key, str) and key:
        identity: t.Any = ["key", key]
    else:
        record = item.get("record")
        if isinstance(record, dict):
            record = {k: v for k, v in record.items() if not str(k).startswith("_sdc_")}
        identity = ["record", record]
    data = jsonutil.dumps_sorted([item["stream"], identity, item["reason"]])
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


class DeadLetterSink(t.Protocol):
    """Where dead letters go: this file writer, or the store's table
    (`state.deadletters.DeadLetterStore`, `dead_letter_target: state`)."""

    path: str

    def check_writable(self) -> str | None: ...

    def write(self, entries: t.Sequence[DeadLetterEntry]) -> int: ...


class DeadLetterWriter:
    """Thread-safe appender; `write` returns only once the lines are on disk."""

    def __init__(self, path: str) -> None:
        """Remember the path; the file is opened on first write, so clean runs leave none.

        Args:
            path: File to append to.
        """
        self.path = path
        self._lock = threading.Lock()
        self._index: set[int] | None = None  # digests of the entries in the file

    def _load_index(self) -> set[int]:
        """Digests of the entries already in the file, read one line at a time.

        A line that is not JSON (a write torn by a crash) is not indexed, so its entry is
        appended again. The file is fsynced first: what the index says is on disk must be.
        """
        index: set[int] = set()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return index
        with os.fdopen(fd, "rb") as handle:
            os.fsync(handle.fileno())
            for raw in handle:
                if not raw.strip():
                    continue
                try:
                    item = jsonutil.loads(raw)
                except ValueError:  # msgspec.DecodeError is a ValueError
                    continue
                digest = entry_digest(item)
                if digest is not None:
                    index.add(digest)
        return index

    def check_writable(self) -> str | None:
        """Say what is wrong with the path before any record is read, or None.

        Tried for real (`os.access` says yes to root whatever the folder): the file is
        opened for appending when it exists, otherwise a temporary file is made and removed
        in the nearest existing folder, so a clean run still leaves no dead-letter file.

        Returns:
            A message naming the setting and the path the user set, or None when the file
            can be appended to.
        """
        path = os.path.abspath(self.path)
        if os.path.isdir(path):
            return f"`dead_letter_path` {self.path!r} is a directory; name a file in it."
        existing = os.path.dirname(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        try:
            if os.path.exists(path):
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
            elif not os.path.isdir(existing):
                return (
                    f"`dead_letter_path` {self.path!r} cannot be written: {existing!r} is not "
                    "a folder. Choose another file (the backfill record and the ledger are "
                    "kept beside it)."
                )
            else:
                with tempfile.TemporaryFile(dir=existing):
                    pass
        except OSError as exc:
            return (
                f"`dead_letter_path` {self.path!r} cannot be written ({exc.strerror or exc}). "
                "Choose another file (the backfill record and the ledger are kept beside it)."
            )
        return None

    def write(self, entries: t.Sequence[DeadLetterEntry]) -> int:
        """Append the lines not already in the file, flush and fsync.

        Args:
            entries: Lines to write.

        Returns:
            How many were appended; the others were already in the file (same stream, key
            or record, and reason) and count as already dead-lettered.

        Raises:
            OSError: The file cannot be written; the batch must then not be acknowledged.
        """
        if not entries:
            return 0
        with self._lock:
            if self._index is None:
                self._index = self._load_index()
            lines: list[str] = []
            digests: set[int] = set()
            for item in entries:
                line = jsonutil.dumps_lenient(item)
                # Digest what will be read back from the file, so both sides agree.
                digest = entry_digest(jsonutil.loads(line))
                if digest is not None and (digest in self._index or digest in digests):
                    continue
                if digest is not None:
                    digests.add(digest)
                lines.append(line + "\n")
            if not lines:
                return 0
            self._append("".join(lines).encode("utf-8"))
            self._index |= digests  # only once they are on disk
            return len(lines)

    def _append(self, data: bytes) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            # A new file's name lives in its directory: without this fsync a crash
            # could lose the whole file although its contents were fsynced.
            _fsync_directory(parent)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
