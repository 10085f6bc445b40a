"""`late_event_policy: backfill`: windows, the ownership record, and the backfill manager.

How history is loaded (README "Loading history"; Orb API reference: event backfills, event search):

- **Windows.** A late event belongs to the calendar month (UTC) of its timestamp:
  `[YYYY-MM-01T00:00:00Z, first of next month)`, at most 31 whole UTC days, so every rerun
  makes the same windows. One Orb backfill per window and run.
- **Create.** `POST /v1/events/backfills` with `replace_existing_events: false` sent
  explicitly (Orb's default is `true`, which would replace every customer's events in the
  timeframe), an explicit `close_time` (creation + 24 h, Orb's own default made explicit),
  and no customer scope (not needed: a non-replacing backfill only adds). The request carries
  `Idempotency-Key: target-orb-backfill-<sha256 of the payload and the window's create
  count>`: a retried create (timeout, 5xx, 409) sends the same payload and key, so Orb
  replays the first answer instead of making a second backfill; a later create (a later
  run, or a window whose backfill Orb closed) has a new close time or count, hence a new
  key, and never replays an old, closed backfill.
- **Ownership record.** Orb keeps no label on a backfill, so target-orb writes what it
  creates to a small JSON file beside the dead-letter file (`<dead_letter_path without
  .jsonl>.backfills.json`, e.g. `target-orb-dead-letter.backfills.json`), fsynced and replaced
  atomically: the create's payload and key *before* the request, the backfill id once Orb
  answered, `closed` once closed. A pending backfill overlapping a window is target-orb's when
  its id is in the record, or when it matches an unanswered create of the record (same
  timeframe and the same `close_time`, to the second). Any other pending backfill (another
  tool's, a person's) stops the run before anything of that window is sent, naming it, its
  close time and what to do; target-orb never writes into it.
- **Before ingesting** a batch into a window's backfill, `POST /v1/events/search` (500 ids a
  call, the window as timeframe) says which keys Orb already holds; those are left out and
  counted "already in Orb". Search cannot see a still-pending backfill, so keys this run put
  into its own backfills are remembered in memory, and a pending backfill left by a killed
  run is never written into again: the rerun closes it (its events are then billed once),
  waits until Orb reflects it, and only then searches and loads the rest of the window
  through a new backfill. Each backfill ingest request also carries a deterministic
  `Idempotency-Key` (backfill id + body), so a retried request is a replay, not a second copy.
- **Close.** Every backfill a run created is closed before the run exits: at the end of the
  input, and on failure and SIGTERM/SIGINT paths too (TargetOrb._fail/_terminated). A run
  killed outright leaves it pending until its `close_time`; the next run closes it.
- **STATE** moves past a late event once it is ingested into a backfill (Orb reflects it at
  close or at `close_time`, so it is not lost), found already in Orb, or dead-lettered: the
  loads run as pipeline jobs (`Pipeline.submit_job`).
- **Boundary events.** Events younger than the grace period but within
  `mapping.BACKFILL_SAFETY_MARGIN` of it go to a backfill too, and an event Orb's live
  `/ingest` still rejects as too old is loaded through a backfill, not dead-lettered.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import threading
import time
import typing as t
from dataclasses import dataclass, field
from urllib.parse import quote

from target_orb import jsonutil
from target_orb.deadletter import DeadLetterEntry, entry
from target_orb.delivery import Deliverer, Response
from target_orb.errors import DeliveryAbortedError, OrbFatalError
from target_orb.mapping import backfill_threshold
from target_orb.pipeline import JobResult
from target_orb.policy import Outcome, classify, orb_error_summary, rejected_keys
from target_orb.search import search_existing
from target_orb.timestamps import TimestampError, format_orb, to_utc

if t.TYPE_CHECKING:
    from target_orb.client import OrbClient
    from target_orb.delivery import Limiter
    from target_orb.pipeline import Job
    from target_orb.stats import RunStats

LOGGER = logging.getLogger("target_orb.backfill")
_UTC = datetime.timezone.utc

BACKFILLS_PATH = "/events/backfills"
CLOSE_AFTER = datetime.timedelta(hours=24)  # explicit close_time: creation + Orb's default
# "Orb allows backfills up to 31 days in duration" (Orb API reference, Create backfill).
MAX_WINDOW_DAYS = 31
RECORD_VERSION = 1
RECORD_KEEP = datetime.timedelta(days=30)  # closed entries older than this are pruned
PENDING = frozenset({"pending", "pending_revert"})  # block overlapping creates (§3.1)
# Orb's live /ingest answer for an event past the grace period (the stand-in says "older than
# the grace period ... use a backfill"; Orb documents only "validation errors").
_TOO_OLD = re.compile(r"grace|too old|older than|backfill", re.IGNORECASE)


MAX_ROTATIONS = 3  # new backfills for one window in one run when Orb closed ours under us


class BackfillNotPendingError(Exception):
    """Orb refused an ingest because the backfill no longer takes events (closed by its
    close_time or by someone): the window needs a new backfill, the events are fine."""

    def __init__(self, backfill_id: str, response: Response) -> None:
        detail = orb_error_summary(response.body)
        super().__init__(f"backfill {backfill_id} refused events: {detail}")
        self.backfill_id = backfill_id
        self.response = response


def _refuses_backfill(response: Response, body: bytes) -> bool:
    """An ingest answer that refuses the backfill itself (not any event in the request)."""
    if not isinstance(response.body, dict):
        return False
    text = orb_error_summary(response.body, 2000).lower()
    if "backfill" not in text:
        return False
    try:
        keys = [e.get("idempotency_key") for e in jsonutil.loads(body).get("events", [])]
    except (ValueError, AttributeError):
        return False
    return not rejected_keys(response.body, [k for k in keys if isinstance(k, str)])


def utcnow() -> datetime.datetime:
    """The current time, aware UTC."""
    return datetime.datetime.now(_UTC)


# ----------------------------------------------------------------------------- windows


@dataclass(frozen=True, slots=True, order=True)
class Window:
    """One backfill timeframe: a calendar month, UTC, `[start, end)`."""

    start: datetime.datetime
    end: datetime.datetime

    @property
    def label(self) -> str:
        """`2024-03-01T00:00:00Z..2024-04-01T00:00:00Z`."""
        return f"{format_orb(self.start)}..{format_orb(self.end)}"

    def overlaps(self, start: datetime.datetime, end: datetime.datetime) -> bool:
        """Whether `[start, end)` shares any instant with this window."""
        return start < self.end and self.start < end


def month_window(year: int, month: int) -> Window:
    """The window of one calendar month (UTC).

    Args:
        year: Year.
        month: Month 1-12.

    Returns:
        `[first of the month, first of the next month)`.
    """
    start = datetime.datetime(year, month, 1, tzinfo=_UTC)
    end = (
        datetime.datetime(year + 1, 1, 1, tzinfo=_UTC)
        if month == 12
        else datetime.datetime(year, month + 1, 1, tzinfo=_UTC)
    )
    return Window(start, end)


_WINDOWS: dict[str, Window] = {}


def window_of(timestamp: str) -> Window:
    """The window of an Orb event timestamp (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, as mapped).

    Args:
        timestamp: The event's `timestamp` as sent to Orb.

    Returns:
        Its calendar-month window.
    """
    prefix = timestamp[:7]
    window = _WINDOWS.get(prefix)
    if window is None:
        window = month_window(int(prefix[:4]), int(prefix[5:7]))
        _WINDOWS[prefix] = window
    return window


def group_by_window(events: t.Sequence[dict[str, t.Any]]) -> dict[Window, list[int]]:
    """Indexes of `events` by window, windows in time order.

    Args:
        events: Mapped Orb events.

    Returns:
        window → indexes (input order).
    """
    groups: dict[Window, list[int]] = {}
    for index, event in enumerate(events):
        groups.setdefault(window_of(event["timestamp"]), []).append(index)
    return dict(sorted(groups.items()))


# ----------------------------------------------------------------------------- ownership record


def record_path_for(dead_letter_path: str) -> str:
    """Where the ownership record lives: beside the dead-letter file.

    Args:
        dead_letter_path: The `dead_letter_path` setting.

    Returns:
        `x.jsonl` → `x.backfills.json`; any other name gets `.backfills.json` appended.
    """
    base = dead_letter_path[:-6] if dead_letter_path.endswith(".jsonl") else dead_letter_path
    return base + ".backfills.json"


def _instant(value: t.Any) -> datetime.datetime | None:
    if value is None:
        return None
    try:
        return to_utc(value)
    except TimestampError:
        return None


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
            close = _instant(item.get("close_time"))
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
        start = _instant(backfill.get("timeframe_start"))
        end = _instant(backfill.get("timeframe_end"))
        close = _instant(backfill.get("close_time"))
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
                    and start == _instant(item.get("timeframe_start"))
                    and end == _instant(item.get("timeframe_end"))
                    and close == _instant(item.get("close_time"))
                ):
                    return item
        return None


# ----------------------------------------------------------------------------- manager


@dataclass(slots=True)
class _WindowLoad:
    """One window in this run: its backfill and the keys this run put into it."""

    window: Window
    lock: threading.Lock = field(default_factory=threading.Lock)
    backfill_id: str | None = None
    key: str = ""
    error: BaseException | None = None
    acked: set[str] = field(default_factory=set)
    inflight: dict[str, threading.Event] = field(default_factory=dict)
    events: int = 0
    already: int = 0
    status: str = ""
    deliverer: Deliverer | None = None
    rotations: int = 0
    checked: bool = False  # pending backfills overlapping the window dealt with
    finished: list[dict[str, t.Any]] = field(default_factory=list)  # earlier ones this run


@dataclass(frozen=True, slots=True)
class _Part:
    """Late events of one stream and one window, with their source records."""

    stream: str
    events: list[dict[str, t.Any]]
    records: list[t.Any]


@dataclass(slots=True)
class _Loaded:
    accepted: int = 0
    rejected: list[DeadLetterEntry] = field(default_factory=list)
    requests: int = 0


class BackfillManager:
    """Creates, continues and closes backfills and loads late events into them.

    Thread-safe: loads run as pipeline jobs on the delivery threads. One instance per run.
    """

    def __init__(
        self,
        *,
        client: OrbClient | None,
        deliverer: Deliverer | None,
        make_ingest_deliverer: t.Callable[[t.Callable[[bytes, int], Response]], Deliverer]
        | None,
        stats: RunStats,
        record: OwnershipRecord,
        write_limiter: Limiter | None,
        read_limiter: Limiter | None,
        grace_period_hours: float,
        max_retry_seconds: float,
        aborted: t.Callable[[], bool] = lambda: False,
        now: t.Callable[[], datetime.datetime] = utcnow,
        sleep: t.Callable[[float], t.Any] = time.sleep,
        monotonic: t.Callable[[], float] = time.monotonic,
    ) -> None:
        """Wire the manager (client None: dry run, plan only).

        Args:
            client: The Orb client, or None in dry-run mode.
            deliverer: Retries for backfill/search calls (the runtime's deliverer).
            make_ingest_deliverer: Builds a Deliverer around a send function (same retry
                rules, ingest limiter) for ingest into one backfill.
            stats: Run counters.
            record: The ownership record.
            write_limiter: Orb "other writes" budget (create, close).
            read_limiter: Orb reads budget (search, list, fetch).
            grace_period_hours: For recognising events Orb rejects as too old.
            max_retry_seconds: Budget for waiting on a backfill Orb is still reflecting.
            aborted: True once the run is stopping (pipeline abort).
            now: Current time, aware UTC.
            sleep: Blocking wait (polls).
            monotonic: Monotonic seconds (poll budgets).
        """
        self._client = client
        self._deliverer = deliverer
        self._make_ingest_deliverer = make_ingest_deliverer
        self._stats = stats
        self.record = record
        self._write_limiter = write_limiter
        self._read_limiter = read_limiter
        self._grace = grace_period_hours
        self._budget = max_retry_seconds
        self._aborted = aborted
        self._now = now
        self._sleep = sleep
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._windows: dict[Window, _WindowLoad] = {}
        self._creation_locks: dict[Window, threading.Lock] = {}
        self._pending: list[dict[str, t.Any]] | None = None
        self._plan: dict[Window, int] = {}
        self._closing = False
        self._finished = False

    @property
    def dry_run(self) -> bool:
        """True when nothing may be sent (plan only)."""
        return self._client is None

    # -- start -------------------------------------------------------------------

    def start(self) -> None:
        """Check and read the ownership record before anything is read or sent.

        Raises:
            OrbFatalError: The record cannot be written or read.
        """
        if self.dry_run:
            return
        problem = self.record.check_writable()
        if problem is not None:
            raise OrbFatalError(f"`late_event_policy: backfill`: {problem} Nothing was sent.")
        self.record.load()

    # -- reading thread ----------------------------------------------------------

    def plan(self, events: t.Sequence[dict[str, t.Any]]) -> None:
        """Dry run: count late events per window for the plan (no request).

        Args:
            events: Late Orb events.
        """
        for window, indexes in group_by_window(events).items():
            self._plan[window] = self._plan.get(window, 0) + len(indexes)

    def load_job(
        self, stream: str, events: list[dict[str, t.Any]], records: list[t.Any]
    ) -> Job:
        """A pipeline job that loads late events through their windows' backfills.

        Args:
            stream: Stream name.
            events: Late Orb events (unique keys).
            records: Their source records.

        Returns:
            The job.
        """

        def run() -> JobResult:
            done = self._load(stream, events, records)
            return JobResult(done.accepted, done.rejected, done.requests)

        return run

    def live_job(
        self, stream: str, events: list[dict[str, t.Any]], records: list[t.Any]
    ) -> Job:
        """A live ingest job that routes events Orb rejects as too old to a backfill.

        Args:
            stream: Stream name.
            events: Live Orb events (unique keys).
            records: Their source records.

        Returns:
            The job.
        """
        deliverer = self._deliverer
        assert deliverer is not None

        def run() -> JobResult:
            result = deliverer.deliver(events)
            rejected: list[DeadLetterEntry] = []
            old: list[int] = []
            threshold = backfill_threshold(self._now(), self._grace)
            for index, reason in result.rejected:
                if self._too_old(events[index], reason, threshold):
                    old.append(index)
                else:
                    rejected.append(entry(stream, records[index], reason, "orb", events[index]))
            accepted, requests = len(result.accepted), result.requests
            if old:
                LOGGER.warning(
                    "Stream '%s': Orb rejected %d event(s) as older than its grace period "
                    "(they aged past it while being sent); loading them through a backfill.",
                    stream, len(old),
                )
                with self._stats.lock:
                    self._stats.late_rerouted += len(old)
                done = self._load(stream, [events[i] for i in old], [records[i] for i in old])
                accepted += done.accepted
                rejected.extend(done.rejected)
                requests += done.requests
            return JobResult(accepted, rejected, requests)

        return run

    @staticmethod
    def _too_old(event: dict[str, t.Any], reason: str, threshold: datetime.datetime) -> bool:
        if _TOO_OLD.search(reason):
            return True
        when = _instant(event.get("timestamp"))
        return when is not None and when < threshold

    # -- delivery threads --------------------------------------------------------

    def _window_load(self, window: Window) -> _WindowLoad:
        with self._lock:
            load = self._windows.get(window)
            if load is None:
                load = self._windows[window] = _WindowLoad(window)
            return load

    def _load(
        self, stream: str, events: list[dict[str, t.Any]], records: list[t.Any]
    ) -> _Loaded:
        total = _Loaded()
        for window, indexes in group_by_window(events).items():
            load = self._window_load(window)
            self._check_window(load)
            part = _Part(stream, [events[i] for i in indexes], [records[i] for i in indexes])
            done = self._load_window(load, part)
            total.accepted += done.accepted
            total.rejected.extend(done.rejected)
            total.requests += done.requests
        return total

    def _load_window(self, load: _WindowLoad, part: _Part) -> _Loaded:
        """Search, then ingest what Orb does not hold yet into the window's backfill.

        Keys are claimed per window so two jobs never send one key into a backfill at once;
        a job that meets a key another job is sending waits for that send to settle.
        """
        done = _Loaded()
        events = part.events
        todo = list(range(len(events)))
        while todo:
            mine: list[int] = []
            waits: list[tuple[int, threading.Event]] = []
            duplicates = 0
            with load.lock:
                for i in todo:
                    key = events[i]["idempotency_key"]
                    if key in load.acked:
                        duplicates += 1
                    elif key in load.inflight:
                        waits.append((i, load.inflight[key]))
                    else:
                        load.inflight[key] = threading.Event()
                        mine.append(i)
            if duplicates:
                with self._stats.lock:
                    self._stats.duplicates_collapsed += duplicates
            acked: list[str] = []
            try:
                if mine:
                    self._send_window(load, part, mine, done, acked)
            finally:
                with load.lock:
                    load.acked.update(acked)
                    for i in mine:
                        flag = load.inflight.pop(events[i]["idempotency_key"], None)
                        if flag is not None:
                            flag.set()
            for _, flag in waits:
                while not flag.wait(0.5):
                    if self._aborted():
                        raise DeliveryAbortedError("backfill load aborted")
            todo = [i for i, _ in waits]
        return done

    def _send_window(
        self, load: _WindowLoad, part: _Part, mine: list[int], done: _Loaded, acked: list[str]
    ) -> None:
        """Send the claimed events `mine` of `part`: search first, then ingest the rest.

        When Orb says the window's backfill no longer takes events (its close_time passed
        during a long run, or someone closed it), a new backfill replaces it once Orb
        reflected the old one, and what is not acknowledged yet is searched and sent again.
        """
        events = part.events
        remaining = mine
        while True:
            try:
                self._search_and_ingest(load, part, remaining, done, acked)
            except BackfillNotPendingError as exc:
                self._rotate(load, exc.backfill_id, exc)
                have = set(acked)
                remaining = [i for i in remaining if events[i]["idempotency_key"] not in have]
                continue
            return

    def _search_and_ingest(
        self, load: _WindowLoad, part: _Part, mine: list[int], done: _Loaded, acked: list[str]
    ) -> None:
        events = part.events
        keys = [events[i]["idempotency_key"] for i in mine]
        client = self._client
        assert client is not None and self._deliverer is not None
        window = load.window
        searches = 0

        def count_search() -> None:
            nonlocal searches
            searches += 1

        # Late events are older than now: the timeframe ends at the window's end or just
        # after now, whichever is first, and always covers every event of the window.
        end = min(window.end, self._now().replace(microsecond=0) + datetime.timedelta(seconds=1))
        found = search_existing(
            client, self._deliverer, keys,
            timeframe_start=window.start, timeframe_end=max(end, window.start + _SECOND),
            limiter=self._read_limiter, on_request=count_search,
        )
        done.requests += searches
        send = [i for i in mine if events[i]["idempotency_key"] not in found]
        already = len(mine) - len(send)
        acked.extend(k for k in keys if k in found)
        if already:
            with self._stats.lock:
                self._stats.already_in_orb += already
            with load.lock:
                load.already += already
        if not send:
            return  # nothing new: no backfill is created for it
        self._ensure_backfill(load)
        deliverer = load.deliverer
        assert deliverer is not None
        batch = [events[i] for i in send]
        with self._stats.lock:
            self._stats.events_sent += len(batch)
        try:
            result = deliverer.deliver(batch)
        except OrbFatalError as exc:
            msg = (
                f"while loading {len(batch)} events into backfill {load.backfill_id} "
                f"({window.label}): {exc}"
            )
            raise OrbFatalError(msg) from None
        done.requests += result.requests
        done.accepted += len(result.accepted)
        acked.extend(batch[i]["idempotency_key"] for i in result.accepted)
        with load.lock:
            load.events += len(result.accepted)
        with self._stats.lock:
            self._stats.events_backfilled += len(result.accepted)
        if result.rejected and self._closing:
            # The run is stopping and may have closed this backfill under the request:
            # the refusal says nothing about the events, so they are not dead-lettered.
            raise DeliveryAbortedError("backfill closed while the run was stopping")
        for index, reason in result.rejected:
            record = part.records[send[index]]
            done.rejected.append(
                entry(part.stream, record, f"{reason} (backfill {load.backfill_id})", "orb",
                      batch[index]),
            )

    # -- backfill lifecycle ------------------------------------------------------

    def _check_window(self, load: _WindowLoad) -> None:
        """Once per window, before any search or send: deal with overlapping pending
        backfills (close our own leftover, wait for closing ones, stop on another's)."""
        if load.checked:
            return
        # Serialised per window by a second lock so the claim lock stays short.
        with self._creation_lock(load.window):
            if load.error is not None:
                raise load.error
            if load.checked:
                return
            try:
                self._clear_overlaps(load.window, refresh=False)
            except BaseException as exc:
                load.error = exc
                raise
            load.checked = True

    def _ensure_backfill(self, load: _WindowLoad) -> None:
        """Make sure the window has an open backfill this run created (created lazily, so
        a replay that finds everything in Orb creates none)."""
        if load.backfill_id is not None:
            return
        with self._creation_lock(load.window):
            if load.error is not None:
                raise load.error
            if load.backfill_id is not None:
                return
            try:
                backfill_id, key = self._create(load.window)
            except BaseException as exc:
                load.error = exc
                raise
            self._use(load, backfill_id, key)

    def _use(self, load: _WindowLoad, backfill_id: str, key: str) -> None:
        """Make `backfill_id` the window's backfill (ingest goes there from now on)."""
        client = self._client
        assert client is not None and self._make_ingest_deliverer is not None

        def send(body: bytes, count: int) -> Response:
            # A deterministic request key: a retried request is a replay, never a 2nd copy.
            digest = hashlib.sha256(backfill_id.encode("utf-8") + b"\0" + body).hexdigest()
            headers = {"Idempotency-Key": f"target-orb-bfi-{digest[:48]}"}
            response = client.post_ingest(body, count, backfill_id=backfill_id, headers=headers)
            if response.status in (400, 404, 409) and _refuses_backfill(response, body):
                raise BackfillNotPendingError(backfill_id, response)
            return response

        deliverer = self._make_ingest_deliverer(send)
        with load.lock:
            load.deliverer = deliverer
            load.key = key
            load.status = "pending"
            load.events = 0
            load.backfill_id = backfill_id

    def _rotate(self, load: _WindowLoad, gone: str, exc: BackfillNotPendingError) -> None:
        """Replace the window's backfill `gone`, which Orb says takes no more events."""
        with self._creation_lock(load.window):
            if load.backfill_id != gone:
                return  # another job already replaced it
            current = self._fetch(gone)
            close = _instant(current.get("close_time"))
            if current.get("status") == "pending" and (close is None or close > self._now()):
                msg = (
                    f"Orb refused events for backfill {gone} ({load.window.label}), which is "
                    f"still open: {orb_error_summary(exc.response.body)}. Nothing more was "
                    "sent into it and no STATE was written past these events; rerun."
                )
                raise OrbFatalError(msg)
            if load.rotations >= MAX_ROTATIONS:
                msg = (
                    f"Orb closed target-orb's backfill for {load.window.label} {load.rotations} "
                    "times during this run; stopping. Check who closes target-orb's backfills, "
                    "then rerun (what was loaded stays loaded)."
                )
                raise OrbFatalError(msg)
            load.rotations += 1
            LOGGER.warning(
                "Backfill %s (%s) stopped taking events (Orb status %s, close time %s) with "
                "%d events in it; continuing the window in a new backfill.",
                gone, load.window.label, current.get("status"), current.get("close_time"),
                load.events,
            )
            load.finished.append(self._row(load, str(current.get("status") or "closed")))
            self.record.update(load.key, self._now(), state="closed", events=load.events)
            self._wait_settled(gone, load.window)
            backfill_id, key = self._create(load.window)
            self._use(load, backfill_id, key)

    def _creation_lock(self, window: Window) -> threading.Lock:
        with self._lock:
            return self._creation_locks.setdefault(window, threading.Lock())

    def _request(
        self, method: str, path: str, *, body: t.Any = None, params: t.Any = None,
        headers: t.Any = None, limiter: Limiter | None, deliverer: Deliverer | None = None,
    ) -> Response:
        client = self._client
        assert client is not None
        deliverer = deliverer or self._deliverer
        assert deliverer is not None

        def once() -> Response:
            return client.call(method, path, body=body, params=params, headers=headers)

        response = deliverer.request(once, what=f"{method} {client.url(path)}", limiter=limiter)
        with self._stats.lock:
            self._stats.requests += 1
        return response

    def _pending_backfills(self, *, refresh: bool) -> list[dict[str, t.Any]]:
        """Orb's backfills in `pending` / `pending_revert` (listed once per run)."""
        with self._lock:
            if self._pending is not None and not refresh:
                return list(self._pending)
        found: list[dict[str, t.Any]] = []
        cursor: str | None = None
        while True:
            params = {"limit": "100"}
            if cursor:
                params["cursor"] = cursor
            response = self._request(
                "GET", BACKFILLS_PATH, params=params, limiter=self._read_limiter
            )
            body = response.body
            if classify(response.status) is not Outcome.OK or not isinstance(body, dict):
                raise OrbFatalError(self._call_failed("list the backfills", response))
            data = body.get("data")
            for item in data if isinstance(data, list) else []:
                if isinstance(item, dict) and item.get("status") in PENDING:
                    found.append(item)
            meta = body.get("pagination_metadata")
            cursor = meta.get("next_cursor") if isinstance(meta, dict) else None
            if not (isinstance(meta, dict) and meta.get("has_more") and cursor):
                break
        with self._lock:
            self._pending = found
        return list(found)

    def _clear_overlaps(self, window: Window, *, refresh: bool) -> None:
        """Deal with every pending backfill overlapping `window` before creating one.

        Ours (in the record): closed, then waited for until Orb reflected it. Another's
        that is already past its close time (being reflected or reverted): waited for.
        Another's that is open: the run stops, naming it.
        """
        now = self._now()
        for backfill in self._pending_backfills(refresh=refresh):
            start = _instant(backfill.get("timeframe_start"))
            end = _instant(backfill.get("timeframe_end"))
            if start is None or end is None or not window.overlaps(start, end):
                continue
            bid = str(backfill.get("id"))
            if any(w.backfill_id == bid for w in self._loads()):
                continue  # created by this run for another window (windows do not overlap)
            close = _instant(backfill.get("close_time"))
            owned = self.record.owner_entry(backfill)
            open_ = backfill.get("status") == "pending" and (close is None or close > now)
            if owned is not None:
                if owned.get("id") is None:
                    self.record.update(owned["idempotency_key"], now, id=bid, state="pending")
                LOGGER.warning(
                    "Backfill %s (%s) was created by an earlier target-orb run that did not "
                    "finish; closing it (its events are then billed once) and loading the rest "
                    "of the window after Orb reflected it.",
                    bid, window.label,
                )
                if open_:
                    self._close(bid)
                self._wait_settled(bid, window)
                self.record.update("", self._now(), id=bid, state="closed")
            elif not open_:
                LOGGER.warning(
                    "Backfill %s overlapping %s is %s (close time %s); waiting until Orb has "
                    "finished with it before creating target-orb's backfill.",
                    bid, window.label, backfill.get("status"), backfill.get("close_time"),
                )
                self._wait_settled(bid, window)
            else:
                raise OrbFatalError(self._foreign_message(backfill, window))
        with self._lock:
            if self._pending is not None:
                self._pending = [
                    b for b in self._pending
                    if not window.overlaps(
                        _instant(b.get("timeframe_start")) or window.end,
                        _instant(b.get("timeframe_end")) or window.start,
                    )
                ]

    def _loads(self) -> list[_WindowLoad]:
        with self._lock:
            return list(self._windows.values())

    def _foreign_message(self, backfill: t.Mapping[str, t.Any], window: Window) -> str:
        bid = backfill.get("id")
        return (
            f"Orb has a pending backfill {bid} ({backfill.get('timeframe_start')} to "
            f"{backfill.get('timeframe_end')}, replace_existing_events: "
            f"{backfill.get('replace_existing_events')}, closes at "
            f"{backfill.get('close_time')}) that overlaps the window {window.label} of late "
            f"events, and target-orb did not create it (it is not in {self.record.path}). "
            "Orb allows no two pending backfills with overlapping timeframes, and target-orb "
            "never writes into another tool's or a person's backfill, so nothing of this "
            "window was sent and no STATE was written past it. Wait until it closes at "
            f"{backfill.get('close_time')} (or, if whoever created it has finished, close it: "
            f"POST /v1/events/backfills/{bid}/close), then rerun."
        )

    def _call_failed(self, doing: str, response: Response) -> str:
        return (
            f"Orb answered HTTP {response.status} when target-orb tried to {doing} "
            f"({orb_error_summary(response.body, 200)}). Nothing of the late events concerned "
            "was sent and no STATE was written past them. Check that the API key (`api_key`) "
            "may manage backfills and that `api_url` is right, then rerun."
        )

    def _create(self, window: Window) -> tuple[str, str]:
        """Create the window's backfill; returns (id, Idempotency-Key)."""
        for attempt in range(2):
            now = self._now().replace(microsecond=0)
            payload = {
                "timeframe_start": format_orb(window.start),
                "timeframe_end": format_orb(window.end),
                # A second attempt (after an overlap was resolved) must not replay the first
                # answer: its payload, and so its key, differs by the close time.
                "close_time": format_orb(now + CLOSE_AFTER + attempt * _SECOND),
                # Sent explicitly: Orb's default is true (replace every customer's events).
                "replace_existing_events": False,
            }
            # The key also carries how many creates the ownership record already holds for
            # this window: a create made in the same second as an earlier one of this window
            # (after Orb closed that one) must get a new backfill, not Orb's stored answer
            # for the earlier create. A retry of one create reuses its key.
            made = sum(
                1 for e in self.record.entries()
                if e.get("timeframe_start") == payload["timeframe_start"]
            )
            digest = hashlib.sha256(jsonutil.dumps_sorted([payload, made])).hexdigest()
            key = f"target-orb-backfill-{digest[:44]}"
            self.record.add_intent(payload, key, now)
            response = self._request(
                "POST", BACKFILLS_PATH, body=payload, headers={"Idempotency-Key": key},
                limiter=self._write_limiter,
            )
            body = response.body
            if classify(response.status) is Outcome.OK and isinstance(body, dict) and body.get(
                "id"
            ):
                break
            # The intent stays `creating`: if Orb made the backfill after all (an answer
            # lost to a 5xx), its timeframe and close time still identify it as ours.
            if attempt == 0 and response.status == 400:
                # Most likely a pending backfill overlapping the window appeared since the
                # list was read (or a create whose answer was lost made one): look again;
                # this stops the run if it is another's.
                self._clear_overlaps(window, refresh=True)
                continue
            raise OrbFatalError(
                self._call_failed(f"create a backfill for {window.label}", response)
            )
        backfill_id = str(body["id"])
        self.record.update(key, self._now(), id=backfill_id, state="pending")
        if body.get("replace_existing_events") is True:
            # Never a replacing backfill: undo it before it can be reflected.
            self._request(
                "POST", f"{BACKFILLS_PATH}/{quote(backfill_id, safe='')}/revert",
                limiter=self._write_limiter,
            )
            self.record.update(key, self._now(), state="closed")
            msg = (
                f"Orb created backfill {backfill_id} as a replacing backfill although target-orb "
                "sent replace_existing_events: false; it was reverted and nothing was sent. "
                "Check `api_url` points at Orb."
            )
            raise OrbFatalError(msg)
        LOGGER.info(
            "Created backfill %s for %s (replace_existing_events: false, close_time %s).",
            backfill_id, window.label, payload["close_time"],
        )
        with self._stats.lock:
            self._stats.backfills_created += 1
        return backfill_id, key

    def _fetch(self, backfill_id: str, deliverer: Deliverer | None = None) -> dict[str, t.Any]:
        response = self._request(
            "GET", f"{BACKFILLS_PATH}/{quote(backfill_id, safe='')}",
            limiter=self._read_limiter, deliverer=deliverer,
        )
        if classify(response.status) is not Outcome.OK or not isinstance(response.body, dict):
            raise OrbFatalError(self._call_failed(f"read backfill {backfill_id}", response))
        return response.body

    def _close(self, backfill_id: str, deliverer: Deliverer | None = None) -> dict[str, t.Any]:
        response = self._request(
            "POST", f"{BACKFILLS_PATH}/{quote(backfill_id, safe='')}/close",
            limiter=self._write_limiter, deliverer=deliverer,
        )
        if classify(response.status) is Outcome.OK and isinstance(response.body, dict):
            return response.body
        # Already closed (close_time passed, or a replayed close)? Then Orb says so.
        current = self._fetch(backfill_id, deliverer)
        close = _instant(current.get("close_time"))
        if current.get("status") != "pending" or (close is not None and close <= self._now()):
            return current
        raise OrbFatalError(self._call_failed(f"close backfill {backfill_id}", response))

    def _wait_settled(self, backfill_id: str, window: Window) -> None:
        """Poll until Orb no longer lists the backfill as pending / pending_revert."""
        started = self._monotonic()
        delay = 0.2
        while True:
            current = self._fetch(backfill_id)
            if current.get("status") not in PENDING:
                return
            if self._monotonic() - started + delay > self._budget or self._aborted():
                msg = (
                    f"Backfill {backfill_id} overlapping {window.label} is still "
                    f"{current.get('status')} in Orb after {self._budget:g} s "
                    "(`max_retry_seconds`). Orb allows no overlapping pending backfills, so "
                    "nothing of this window was sent; rerun once Orb shows it `reflected` or "
                    "`reverted`."
                )
                raise OrbFatalError(msg)
            self._sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- end of run --------------------------------------------------------------

    def finish(self, *, failed: bool, closer: Deliverer | None = None) -> None:
        """Close every backfill this run created (and leftovers of killed runs on success).

        Called once on every exit path; never raises. A backfill that cannot be closed is
        logged with what to do (it closes by itself at its `close_time`).

        Args:
            failed: The run failed (leftovers of earlier runs are then left alone).
            closer: Retries for the close calls (the pipeline's deliverer stops retrying
                once the run is stopping).
        """
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._closing = True
        if self.dry_run:
            self._log_plan()
            return
        for load in sorted(self._loads(), key=lambda w: w.window):
            if load.backfill_id is None:
                continue
            try:
                closed = self._close(load.backfill_id, closer)
            except Exception as exc:  # noqa: BLE001 - logged with what to do; never raises
                load.status = "pending (close failed)"
                LOGGER.error(
                    "Could not close backfill %s (%s): %s. Its %d events are in it and Orb "
                    "reflects them at its close_time by itself; to reflect them now: POST "
                    "/v1/events/backfills/%s/close.",
                    load.backfill_id, load.window.label, exc, load.events, load.backfill_id,
                )
            else:
                status = str(closed.get("status") or "closed")
                if status == "pending":  # Orb reflects asynchronously: look once more
                    try:
                        status = str(self._fetch(load.backfill_id, closer).get("status"))
                    except Exception:  # noqa: BLE001 - the close itself succeeded
                        status = "pending"
                load.status = (
                    "reflected" if status == "reflected"
                    else "closed, Orb is reflecting it" if status == "pending"
                    else f"closed ({status})"
                )
                try:
                    self.record.update(
                        load.key, self._now(), state="closed", events=load.events
                    )
                except OSError as exc:
                    LOGGER.error("Could not update the backfill record: %s", exc)
        if not failed:
            self._close_leftovers(closer)
        self._report()

    def _close_leftovers(self, closer: Deliverer | None) -> None:
        """Close pending backfills earlier (killed) runs created and this run did not meet."""
        mine = {w.backfill_id for w in self._loads()}
        leftovers = [
            e for e in self.record.entries()
            if e.get("state") in ("creating", "pending") and e.get("id") not in mine
            and e.get("api_url") == self.record.api_url
        ]
        if not leftovers:
            return
        try:
            pending = self._pending_backfills(refresh=True)
            for backfill in pending:
                owned = self.record.owner_entry(backfill)
                if owned is None or backfill.get("id") in mine:
                    continue
                bid = str(backfill["id"])
                LOGGER.warning(
                    "Closing backfill %s (%s..%s) left pending by an earlier target-orb run.",
                    bid, backfill.get("timeframe_start"), backfill.get("timeframe_end"),
                )
                self._close(bid, closer)
                self.record.update(
                    owned.get("idempotency_key") or "", self._now(), id=bid, state="closed"
                )
            still = {str(b.get("id")) for b in pending}
            for item in leftovers:
                if item.get("id") is not None and item["id"] not in still:
                    self.record.update("", self._now(), id=item["id"], state="closed")
                elif item.get("id") is None:
                    close = _instant(item.get("close_time"))
                    if close is not None and close <= self._now():
                        self.record.update(item["idempotency_key"], self._now(), state="closed")
        except Exception as exc:  # noqa: BLE001 - a leftover closes at its close_time anyway
            LOGGER.warning("Could not close backfills left by an earlier run: %s", exc)

    @staticmethod
    def _row(load: _WindowLoad, status: str) -> dict[str, t.Any]:
        return {
            "id": load.backfill_id,
            "timeframe_start": format_orb(load.window.start),
            "timeframe_end": format_orb(load.window.end),
            "events": load.events,
            "status": status,
        }

    def _report(self) -> None:
        rows = []
        for load in sorted(self._loads(), key=lambda w: w.window):
            rows.extend(load.finished)
            if load.backfill_id is not None:
                rows.append(self._row(load, load.status))
        with self._stats.lock:
            self._stats.backfills = rows

    def _log_plan(self) -> None:
        if not self._plan:
            return
        lines = [
            f"  {window.label}: {count} events"
            for window, count in sorted(self._plan.items())
        ]
        LOGGER.info(
            "DRY RUN: backfill plan (late_event_policy: backfill), one non-replacing "
            "backfill per window:\n%s\nNothing was created and Orb was not asked which keys it "
            "already holds: a dry run makes no request.",
            "\n".join(lines),
        )
        with self._stats.lock:
            self._stats.backfill_plan = [
                {
                    "timeframe_start": format_orb(w.start),
                    "timeframe_end": format_orb(w.end),
                    "events": n,
                }
                for w, n in sorted(self._plan.items())
            ]


_SECOND = datetime.timedelta(seconds=1)
