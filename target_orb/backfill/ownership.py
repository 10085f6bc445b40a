"""The ownership record: which backfills this target created, kept beside the dead-letter file."""

from __future__ import annotations

import datetime
import os
import threading
import typing as t

from target_orb import jsonutil
from target_orb.backfill.windows import instant
from target_orb.errors import OrbFatalError
from target_orb.mapping.timestamps import format_orb

RECORD_VERSION = 1
RECORD_KEEP = datetime.timedelta(days=30)  # closed entries older than this are pruned


def record_path_for(dead_letter_path: str) -> str:
    """Where the ownership record lives: beside the dead-letter file.

    Args:
        dead_letter_path: The `dead_letter_path` setting.

    Returns:
        `x.jsonl` → `x.backfills.json`; any other name gets `.backfills.json` appended.
    """
    base = dead_letter_path[:-6] if dead_letter_path.endswith(".jsonl") else dead_letter_path
    return base + ".backfills.json"


class OwnershipRecord:
    """The backfills this installation of target-orb created, in a small fsynced JSON file.

    Entries: `{"id", "api_url", "idempotency_key", "timeframe_start", "timeframe_end",
    "close_time", "created_at", "state": "creating" | "pending" | "closed", "events"}`.
    `creating` is written before the create request, so a run killed between the request and
    Orb's answer still lets the rerun recognise the backfill (by timeframe and close_time).
    """

    def __init__(self, path: str, api_url: str) -> None:
        """Remember where the record lives; nothing is read until `load`.

        Args:
            path: The record file.
            api_url: Orb base URL; entries of another URL are kept but never matched.
        """
        self.path = path
        self.api_url = api_url
        self._entries: list[dict[str, t.Any]] = []
        self._lock = threading.Lock()

    def check_writable(self) -> str | None:
        """Say what is wrong with the path, or None.

        Returns:
            A message naming the file, or None.
        """
        path = os.path.abspath(self.path)
        if os.path.isdir(path):
            return f"the backfill record {self.path!r} (beside `dead_letter_path`) is a directory."
        existing = os.path.dirname(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.access(path if os.path.exists(path) else existing, os.W_OK):
            return (
                f"the backfill record {self.path!r} (beside `dead_letter_path`) is not "
                "writable; choose a writable `dead_letter_path`."
            )
        return None

    def load(self) -> None:
        """Read the file (absent: empty record).

        Raises:
            OrbFatalError: The file exists but is not a target-orb backfill record.
        """
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            self._entries = []
            return
        try:
            data = jsonutil.loads(text) if text.strip() else {"backfills": []}
        except ValueError:
            data = None
        entries = data.get("backfills") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            msg = (
                f"The backfill record {self.path!r} is not a target-orb backfill record "
                "(invalid JSON). target-orb uses it to recognise the backfills it created, "
                "so it will not guess. If no target-orb run is in progress, close any pending "
                "backfill target-orb left in Orb (GET /v1/events/backfills), then move the "
                "file away and rerun."
            )
            raise OrbFatalError(msg)
        self._entries = entries

    def entries(self) -> list[dict[str, t.Any]]:
        """A copy of the entries."""
        with self._lock:
            return [dict(e) for e in self._entries]

    def _save(self, now: datetime.datetime) -> None:
        keep_after = now - RECORD_KEEP
        kept = []
        for item in self._entries:
            close = instant(item.get("close_time"))
            if item.get("state") != "pending" and close is not None and close < keep_after:
                continue  # closed (or never answered) long ago: nothing left to recognise
            kept.append(item)
        self._entries = kept
        data = {
            "what": "Backfills target-orb created in Orb (late_event_policy: backfill). "
            "target-orb reads this to recognise its own pending backfills; keep it beside "
            "the dead-letter file.",
            "version": RECORD_VERSION,
            "backfills": kept,
        }
        payload = (jsonutil.dumps_str(data) + "\n").encode("utf-8")
        path = os.path.abspath(self.path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def add_intent(self, payload: dict[str, t.Any], key: str, now: datetime.datetime) -> None:
        """Record a create about to be sent (before the request).

        Args:
            payload: The create body.
            key: Its Idempotency-Key.
            now: Current time.
        """
        with self._lock:
            self._entries.append(
                {
                    "id": None,
                    "api_url": self.api_url,
                    "idempotency_key": key,
                    "timeframe_start": payload["timeframe_start"],
                    "timeframe_end": payload["timeframe_end"],
                    "close_time": payload["close_time"],
                    "created_at": format_orb(now.replace(microsecond=0)),
                    "state": "creating",
                    "events": 0,
                },
            )
            self._save(now)

    def update(self, key: str, now: datetime.datetime, **changes: t.Any) -> None:
        """Change the entry of an Idempotency-Key (or of a backfill id, given as `id=`).

        Args:
            key: The entry's Idempotency-Key, or "" to find it by `changes["id"]`.
            now: Current time.
            changes: Fields to set.
        """
        with self._lock:
            for item in self._entries:
                if (key and item.get("idempotency_key") == key) or (
                    not key and item.get("id") == changes.get("id")
                ):
                    item.update(changes)
                    break
            else:
                return
            self._save(now)

    def owner_entry(self, backfill: t.Mapping[str, t.Any]) -> dict[str, t.Any] | None:
        """The record entry of an Orb backfill, or None when target-orb did not create it.

        Args:
            backfill: Orb's Backfill object.

        Returns:
            The entry (a live reference), or None.
        """
        bid = backfill.get("id")
        start = instant(backfill.get("timeframe_start"))
        end = instant(backfill.get("timeframe_end"))
        close = instant(backfill.get("close_time"))
        with self._lock:
            for item in self._entries:
                if item.get("api_url") != self.api_url:
                    continue
                if bid is not None and item.get("id") == bid:
                    return item
                if (
                    item.get("id") is None
                    and item.get("state") == "creating"
                    and backfill.get("replace_existing_events") is not True
                    and start is not None
                    and start == instant(item.get("timeframe_start"))
                    and end == instant(item.get("timeframe_end"))
                    and close == instant(item.get("close_time"))
                ):
                    return item
        return None
