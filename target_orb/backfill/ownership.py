"""The ownership record: which backfills target-orb created.

In the store at `state_url` (`StoreOwnershipRecord`, per job) on every run that sends; the
JSON file beside the dead-letter file (`OwnershipRecord`) is the earlier release's record,
imported once into the store, and still what the manager's unit tests drive.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import typing as t

from sqlalchemy.exc import SQLAlchemyError

from target_orb import jsonutil
from target_orb.backfill.windows import instant
from target_orb.errors import OrbFatalError
from target_orb.mapping.timestamps import format_orb
from target_orb.state.backfills import BackfillRows, utc_text
from target_orb.state.ledger import describe

LOGGER = logging.getLogger("target_orb.backfill")

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
        self.job_name = ""  # one job's file: its name is not recorded
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

    def other_job(self, backfill: t.Mapping[str, t.Any]) -> str | None:
        """A file is one job's record: no other job's backfill is known here."""
        del backfill
        return None

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


class StoreOwnershipRecord:
    """The ownership record in the store at `state_url` (`target_orb_backfills`), per job.

    Same entries and semantics as `OwnershipRecord` (intent committed before the create
    request, the id once Orb answered, `closed` once closed), read fresh from the store at
    each question so a backfill another job created meanwhile is recognised. This job's
    entries are its own (`owner_entry`: closed and continued when a killed run left them);
    another job's are only recognised (`other_job`: waited for, never written into or
    closed). A legacy `….backfills.json` beside the dead-letter file is imported once.
    """

    def __init__(
        self, rows: BackfillRows, *, api_url: str, job_name: str, legacy_path: str
    ) -> None:
        """Wire the record; nothing is read until `load`.

        Args:
            rows: The store's backfill rows.
            api_url: Orb base URL; entries of another URL are never matched.
            job_name: This job (`job_name`).
            legacy_path: Where an earlier release kept the JSON record.
        """
        self.rows = rows
        self.api_url = api_url
        self.job_name = job_name
        self.legacy_path = legacy_path
        self.path = f"target-orb's store at `state_url` {describe(rows.store.url)}"

    def check_writable(self) -> str | None:
        """The store was opened (and checked) when the run started."""
        return None

    def load(self) -> None:
        """Import a legacy JSON record once; prune entries closed long ago.

        Raises:
            OrbFatalError: The store cannot be used, or the legacy file is damaged.
        """
        try:
            self._load()
        except SQLAlchemyError as exc:
            raise self._fail(exc, "read the backfill record") from None

    def _load(self) -> None:
        if os.path.exists(self.legacy_path):
            marker = "imported:" + os.path.abspath(self.legacy_path)[:230]
            if not self.rows.imported(marker):
                legacy = OwnershipRecord(self.legacy_path, self.api_url)
                legacy.load()
                count = self.rows.import_legacy(marker, self.job_name, legacy.entries())
                LOGGER.info(
                    "Imported %d backfill(s) of the earlier ownership record %s into the store "
                    "(job %s); the file is no longer read.", count, self.legacy_path,
                    self.job_name,
                )
        now = datetime.datetime.now(datetime.timezone.utc)
        self.rows.prune(utc_text(now - RECORD_KEEP))

    def entries(self) -> list[dict[str, t.Any]]:
        """This job's entries for `api_url`, oldest first."""
        try:
            entries = self.rows.all(self.api_url)
        except SQLAlchemyError as exc:
            raise self._fail(exc, "be read") from None
        return [e for e in entries if e["job_name"] == self.job_name]

    def _fail(self, exc: SQLAlchemyError, doing: str) -> OrbFatalError:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        msg = (
            f"target-orb's store (`state_url` {describe(self.rows.store.url)}) could not "
            f"{doing}: {detail}. Fix the database, then rerun; a backfill left pending is "
            "recognised from the store and closed then."
        )
        return OrbFatalError(msg)

    def add_intent(self, payload: dict[str, t.Any], key: str, now: datetime.datetime) -> None:
        """Commit a create about to be sent (before the request).

        Raises:
            OrbFatalError: The store cannot be written (nothing was created).
        """
        try:
            self._add_intent(payload, key, now)
        except SQLAlchemyError as exc:
            raise self._fail(exc, "record a backfill create") from None

    def _add_intent(self, payload: dict[str, t.Any], key: str, now: datetime.datetime) -> None:
        self.rows.insert(self.job_name, {
            "id": None, "api_url": self.api_url, "idempotency_key": key,
            "timeframe_start": payload["timeframe_start"],
            "timeframe_end": payload["timeframe_end"], "close_time": payload["close_time"],
            "created_at": format_orb(now.replace(microsecond=0)), "state": "creating",
            "events": 0,
        })

    def update(self, key: str, now: datetime.datetime, **changes: t.Any) -> None:
        """Change this job's entry of an Idempotency-Key (or of a backfill id, `id=`).

        Raises:
            OrbFatalError: The store cannot be written.
        """
        del now  # the store stamps updated_at itself
        try:
            self._update(key, changes)
        except SQLAlchemyError as exc:
            raise self._fail(exc, "update a backfill's entry") from None

    def _update(self, key: str, changes: t.Mapping[str, t.Any]) -> None:
        if key:
            mine = [e for e in self.entries() if e["idempotency_key"] == key]
        else:
            bid = changes.get("id")
            mine = [e for e in self.entries() if e["id"] is not None and e["id"] == bid]
        for item in mine[:1]:
            self.rows.update(item["idempotency_key"], changes)

    def owner_entry(self, backfill: t.Mapping[str, t.Any]) -> dict[str, t.Any] | None:
        """This job's entry of an Orb backfill, or None (another job's, or no store's)."""
        found = self._matches(backfill)
        if found and all(e["job_name"] == self.job_name for e in found):
            return found[0]
        return None

    def other_job(self, backfill: t.Mapping[str, t.Any]) -> str | None:
        """The job sharing this store that created an Orb backfill, or None.

        When the backfill matches only unanswered intents and some of them are another
        job's, it counts as that job's: a job never closes a backfill it may not own.
        """
        for item in self._matches(backfill):
            if item["job_name"] != self.job_name:
                return str(item["job_name"])
        return None

    def _matches(self, backfill: t.Mapping[str, t.Any]) -> list[dict[str, t.Any]]:
        """The entry holding the backfill's id; else the intents its timeframe and close
        time match (a create whose answer was lost)."""
        bid = backfill.get("id")
        try:
            entries = self.rows.all(self.api_url)
        except SQLAlchemyError as exc:
            raise self._fail(exc, "be read") from None
        if bid is not None:
            by_id = [e for e in entries if e["id"] == bid]
            if by_id:
                return by_id[:1]
        start = instant(backfill.get("timeframe_start"))
        end = instant(backfill.get("timeframe_end"))
        close = instant(backfill.get("close_time"))
        if start is None or backfill.get("replace_existing_events") is True:
            return []
        return [
            e for e in entries
            if e["id"] is None and e["state"] == "creating"
            and start == instant(e["timeframe_start"]) and end == instant(e["timeframe_end"])
            and close == instant(e["close_time"])
        ]
