"""`late_event_policy: backfill`: windows, the ownership record, and the backfill manager.

How history is loaded (README "Loading history"; Orb API reference: event backfills, event search):

- **Windows.** A late event belongs to the calendar month (UTC) of its timestamp:
  `[YYYY-MM-01T00:00:00Z, first of next month)`, at most 31 whole UTC days, so every rerun
  makes the same windows for every month wholly past the grace boundary.
- **The grace boundary.** Orb accepts a backfill whose timeframe ends after now - grace
  period only with a `deprecation_filter` (orb-billing 4.90 `events/backfills.py`, create:
  "When `deprecation_filter` is provided, the timeframe may extend to `now` rather than the
  event reporting grace boundary"); target-orb never sets one. So a backfill's
  `timeframe_end` is the window's end or `boundary()` at the create (now - grace -
  `SKEW_MARGIN` for the clocks of this machine and Orb, whole seconds), whichever is first:
  the open month's backfill ends at the boundary. An event newer than the current
  backfill's end waits until the boundary has passed it (at most `SKEW_MARGIN` plus the
  clock difference; bounded by `max_retry_seconds`), then the window continues in a new
  backfill reaching past it. Events are late (mapping.backfill_threshold) exactly when they
  are older than now - grace: newer ones go live, and one Orb's live ingest refuses as too
  old comes here.
- **Create.** `POST /v1/events/backfills` with `replace_existing_events: false` sent
  explicitly (Orb's default is `true`, which would replace every customer's events in the
  timeframe), an explicit `close_time` (creation + 24 h, Orb's own default made explicit),
  and no customer scope (not needed: a non-replacing backfill only adds). When Orb refuses a
  create because of a pending backfill target-orb owns (this run's, for another window or an
  earlier timeframe, or one the ownership record names), target-orb closes it, waits until
  Orb reflected it and creates the next; after one such refusal for a backfill that does not
  overlap, the run keeps at most one backfill pending at a time (Orb's support pages: a new
  backfill cannot be created while another is still being reflected). The request carries
  `Idempotency-Key: target-orb-backfill-<sha256 of the payload and the window's create
  count>`: a retried create (timeout, 5xx, 409) sends the same payload and key, so Orb
  replays the first answer instead of making a second backfill; a later create (a later run,
  or a window whose backfill Orb closed) has a new close time or count, hence a new key, and
  never replays an old, closed backfill.
- **Ownership record.** Orb keeps no label on a backfill, so target-orb writes what it
  creates to a small JSON file beside the dead-letter file (`<dead_letter_path without
  .jsonl>.backfills.json`, e.g. `target-orb-dead-letter.backfills.json`), fsynced and replaced
  atomically: the create's payload and key *before* the request, the backfill id once Orb
  answered, `closed` once closed. A pending backfill overlapping a window is target-orb's when
  its id is in the record, or when it matches an unanswered create of the record (same
  timeframe and the same `close_time`, to the second). Any other pending backfill (another
  tool's, a person's) stops the run before anything of that window is sent, naming it, its
  close time and what to do; target-orb never writes into it.
- **Before ingesting** a batch into a window's backfill, keys target-orb itself delivered
  (live or backfill; kept in the store at `state_url`, because search does not see amended
  events) are left out and counted "already delivered"; then `POST /v1/events/search` (500
  ids a call, the window as timeframe) says which other keys Orb already holds; those are
  left out and counted "already in Orb".
- **Issued invoices.** Orb does not change or re-issue an issued invoice when a backfill
  closes (Orb's support pages on backfills: a closed backfill updates draft invoices only).
  Before a window is loaded, `GET /v1/invoices` (statuses issued, paid, synced; invoice date
  from the window's start; every page) says which customers have an issued invoice whose
  line items' service period overlaps the window; their events in that period follow
  `issued_period_policy` (`backfill`: loaded and reported; `dead_letter`: dead-lettered with
  the invoice named; `fail`: the run stops), and the summary counts them per customer and
  window. Search cannot see a still-pending backfill, so keys this run put
  into its own backfills are remembered in memory, and a pending backfill left by a killed
  run is never written into again: the rerun closes it (its events are then billed once),
  waits until Orb reflects it, and only then searches and loads the rest of the window
  through a new backfill. Each backfill ingest request also carries a deterministic
  `Idempotency-Key` (backfill id + body), so a retried request is a replay, not a second copy.
- **Close.** Every backfill a run created is closed before the run exits: at the end of the
  input, and on failure and SIGTERM/SIGINT paths too (`_Runtime.finish_backfills`). A run
  killed outright leaves it pending until its `close_time`; the next run closes it.
- **STATE** moves past a late event once it is ingested into a backfill (Orb reflects it at
  close or at `close_time`, so it is not lost), found already in Orb, or dead-lettered: the
  loads run as pipeline jobs (`Pipeline.submit_job`).
- **Boundary events.** An event Orb's live `/ingest` rejects as too old is loaded through a
  backfill (once the boundary has passed it), not dead-lettered.
"""

from __future__ import annotations

import contextlib
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

from sqlalchemy.exc import SQLAlchemyError

from target_orb import jsonutil
from target_orb.errors import DeliveryAbortedError, OrbFatalError
from target_orb.mapping.timestamps import TimestampError, format_orb, to_utc
from target_orb.mapping.track import backfill_threshold
from target_orb.orb.answers import (
    Outcome,
    classify,
    orb_error_summary,
    refuses_backfill,
)
from target_orb.orb.delivery import Deliverer, Response
from target_orb.orb.search import search_existing
from target_orb.pipeline.deadletter import DeadLetterEntry, entry
from target_orb.pipeline.gate import JobResult
from target_orb.state.digests import amendment_body, body_digest
from target_orb.state.ledger import Write, describe

if t.TYPE_CHECKING:
    from target_orb.orb.client import OrbClient
    from target_orb.orb.delivery import Limiter
    from target_orb.pipeline.gate import Job
    from target_orb.pipeline.stats import RunStats
    from target_orb.state.ledger import Ledger

LOGGER = logging.getLogger("target_orb.backfill.manager")
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
# The clocks of this machine and Orb may differ: a backfill's timeframe ends this much
# before now - grace by our clock, so Orb's "at or before its grace boundary" holds.
SKEW_MARGIN = datetime.timedelta(minutes=2)
MAX_CREATE_ATTEMPTS = 4  # creates of one backfill refused for a pending backfill of ours
INVOICES_PATH = "/invoices"
# Invoices Orb will not change (GET /v1/invoices lists these by default: orb-billing 4.90
# `invoices.py`, list: "By default, this only returns invoices that are `issued`, `paid`,
# or `synced`"; a `draft` is updated by a closed backfill, a `void` bills nothing).
ISSUED_STATUSES = ("issued", "paid", "synced")


class BackfillNotPendingError(Exception):
    """Orb refused an ingest because the backfill no longer takes events (closed by its
    close_time or by someone): the window needs a new backfill, the events are fine."""

    def __init__(self, backfill_id: str, response: Response) -> None:
        detail = orb_error_summary(response.body)
        super().__init__(f"backfill {backfill_id} refused events: {detail}")
        self.backfill_id = backfill_id
        self.response = response


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


# ----------------------------------------------------------------------------- issued invoices


@dataclass(frozen=True, slots=True)
class IssuedPeriod:
    """A service period of one customer that an issued invoice already billed."""

    invoice: str  # for messages: `inv_… (number …, status issued)`
    start: datetime.datetime
    end: datetime.datetime


IssuedIndex = dict[str, list[IssuedPeriod]]
"""Customer (`ext:<external_customer_id>` or `id:<customer_id>`) → issued periods."""


def customer_keys(event: t.Mapping[str, t.Any]) -> tuple[str, ...]:
    """An event's (or an invoice customer's) keys into an `IssuedIndex`."""
    keys = []
    if event.get("external_customer_id") not in (None, ""):
        keys.append(f"ext:{event['external_customer_id']}")
    if event.get("customer_id") not in (None, ""):
        keys.append(f"id:{event['customer_id']}")
    if event.get("id") not in (None, "") and "customer_id" not in event:
        keys.append(f"id:{event['id']}")  # an invoice's `customer` object
    return tuple(keys)


def issued_periods(invoices: t.Iterable[t.Any], window: Window) -> IssuedIndex:
    """Which customers' periods overlapping `window` Orb has already invoiced.

    Args:
        invoices: Orb `Invoice` objects (GET /v1/invoices `data`), any status.
        window: The backfill window.

    Returns:
        Customer key → the line items' service periods (`start_date`..`end_date`) that
        overlap the window, from invoices in `ISSUED_STATUSES`.
    """
    index: IssuedIndex = {}
    for invoice in invoices:
        if not isinstance(invoice, dict) or invoice.get("status") not in ISSUED_STATUSES:
            continue
        customer = invoice.get("customer")
        if not isinstance(customer, dict):
            continue
        label = f"{invoice.get('id')}"
        if invoice.get("invoice_number"):
            label += f" (number {invoice['invoice_number']}, {invoice.get('status')})"
        else:
            label += f" ({invoice.get('status')})"
        periods: list[IssuedPeriod] = []
        items = invoice.get("line_items")
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            start, end = _instant(item.get("start_date")), _instant(item.get("end_date"))
            if start is None or end is None or not window.overlaps(start, end):
                continue
            if not any(p.start == start and p.end == end for p in periods):
                periods.append(IssuedPeriod(label, start, end))
        for key in customer_keys(customer) if periods else ():
            index.setdefault(key, []).extend(periods)
    return index


def issued_period_of(index: IssuedIndex, event: t.Mapping[str, t.Any]) -> IssuedPeriod | None:
    """The issued period holding `event` (its customer and timestamp), if any."""
    if not index:
        return None
    when = _instant(event.get("timestamp"))
    if when is None:
        return None
    for key in customer_keys(event):
        for period in index.get(key, ()):
            if period.start <= when < period.end:
                return period
    return None


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
    end: datetime.datetime | None = None  # the current backfill's timeframe_end
    issued: IssuedIndex = field(default_factory=dict)  # issued invoices' periods (customers)
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
        ledger: Ledger | None = None,
        issued_policy: str = "backfill",
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
            write_limiter: Orb's writes budget: every POST/PUT/PATCH/DELETE but ingest
                (create, close, revert, search).
            read_limiter: Orb's reads budget (GET: backfill list and fetch, invoices).
            grace_period_hours: The account's grace period (the boundary of a backfill's
                timeframe, and recognising events Orb rejects as too old).
            max_retry_seconds: Budget for waiting on a backfill Orb is still reflecting,
                and for holding an event until the grace boundary has passed it.
            ledger: The store of keys target-orb delivered (never re-sent into a backfill);
                None in dry-run mode.
            issued_policy: `issued_period_policy`: `backfill`, `dead_letter` or `fail`.
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
        self._ledger = ledger
        self._issued_policy = issued_policy
        # One pending backfill at a time, once Orb refused a create for a pending backfill of
        # ours that does not overlap it; loads then take `_slot` one at a time.
        self._single = False
        self._slot = threading.RLock()
        # Orb's own grace boundary is at least this: it refused an event this old as too old
        # (its grace period may be shorter than `grace_period_hours`, or its clock ahead).
        self._orb_edge: datetime.datetime | None = None
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
        self._create_lock = threading.Lock()

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
            self._remember([events[i] for i in result.accepted])
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
                    "(they aged past it while being sent, or the clocks of this machine and "
                    "Orb differ); loading them through a backfill.",
                    stream, len(old),
                )
                with self._stats.lock:
                    self._stats.late_rerouted += len(old)
                self._learn_edge([events[i] for i in old])
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
            self._hold_until_past_boundary(part)
            done = self._load_window(load, part)
            total.accepted += done.accepted
            total.rejected.extend(done.rejected)
            total.requests += done.requests
        return total

    def boundary(self, now: datetime.datetime | None = None) -> datetime.datetime:
        """The latest `timeframe_end` Orb accepts in a create now: now - grace, less
        `SKEW_MARGIN`, in whole seconds (orb-billing `events/backfills.py`, create); or, when
        later, the second after the newest event Orb's live ingest refused as too old (Orb's
        boundary had passed it then: `_learn_edge`)."""
        now = self._now() if now is None else now
        edge = (now - datetime.timedelta(hours=self._grace) - SKEW_MARGIN).replace(microsecond=0)
        learned = self._orb_edge
        return edge if learned is None else max(edge, learned)

    def _learn_edge(self, refused: t.Sequence[dict[str, t.Any]]) -> None:
        """Orb refused these events live as older than its grace period, so its boundary is
        past them: a backfill may end at the second after the newest. Waits 1.5 s so Orb's
        boundary has also passed that rounded-up second before anything is created."""
        newest = max(
            (w for w in (_instant(e.get("timestamp")) for e in refused) if w is not None),
            default=None,
        )
        if newest is None:
            return
        edge = newest.replace(microsecond=0) + _SECOND
        with self._lock:
            known = self._orb_edge
            if known is not None and known >= edge:
                return
            self._orb_edge = edge
        ours = self._now() - datetime.timedelta(hours=self._grace)
        if newest > ours + SKEW_MARGIN:
            LOGGER.warning(
                "Orb refused an event at %s as older than its grace period, %.0f min inside "
                "`grace_period_hours` (%g) by this machine's clock: Orb's grace period is "
                "shorter, or its clock is ahead of this machine's. Loading such events through "
                "backfills; set `grace_period_hours` to your account's grace period.",
                format_orb(newest), (newest - ours).total_seconds() / 60, self._grace,
            )
        self._sleep(1.5)

    def _hold_until_past_boundary(self, part: _Part) -> None:
        """Wait until the grace boundary has passed every event of `part`.

        A late event newer than the boundary (late by this machine's clock, but inside the
        skew margin; or refused by Orb's live ingest as too old while this machine's clock
        says it is not) cannot go into a backfill yet: its job waits, so STATE does not move
        past it, and it is loaded as soon as a backfill can hold it.
        """
        newest = max(
            (w for w in (_instant(e.get("timestamp")) for e in part.events) if w is not None),
            default=None,
        )
        if newest is None or newest < self.boundary():
            return
        wait = (newest - self.boundary()).total_seconds() + 1.0
        if wait > max(self._budget, SKEW_MARGIN.total_seconds() + 5.0):
            msg = (
                f"A late event at {format_orb(newest)} (one Orb refused as older than its grace "
                f"period) is {wait:.0f} s too new for a backfill by this machine's clock: Orb "
                "takes a backfill only up to now - grace period (`grace_period_hours` "
                f"{self._grace:g}). Either this machine's clock is behind Orb's, or the "
                "account's grace period is shorter than `grace_period_hours`: fix the clock "
                "(NTP) or the setting, then rerun. Nothing of these events was sent and no "
                "STATE was written past them."
            )
            raise OrbFatalError(msg)
        LOGGER.info(
            "Stream '%s': %d late event(s) are newer than the backfill boundary (now - "
            "grace - %d s for clock skew); holding them %.0f s until a backfill can take "
            "them.", part.stream, len(part.events), SKEW_MARGIN.total_seconds(), wait,
        )
        with self._stats.lock:
            self._stats.late_held += len(part.events)
        deadline = self._monotonic() + wait
        while True:
            left = deadline - self._monotonic()
            if left <= 0 or newest < self.boundary():
                return
            if self._aborted():
                raise DeliveryAbortedError("backfill load aborted")
            self._sleep(min(left, 0.5))

    def _remember(self, events: t.Sequence[dict[str, t.Any]]) -> None:
        """Record keys Orb acknowledged in the store at `state_url`: target-orb never sends
        them into a backfill again (search cannot see amended events)."""
        if self._ledger is None or not events:
            return
        rows = []
        for event in events:
            body = amendment_body(event)
            customer = body.get("external_customer_id") or body.get("customer_id")
            rows.append(Write(
                event["idempotency_key"], "ingest", body_digest(body), body,
                body.get("timestamp"), str(customer) if customer is not None else None,
            ))
        self._ledger_call("be written", self._ledger.acknowledge, rows)

    def _ledger_call(self, what: str, call: t.Callable[..., t.Any], *args: t.Any) -> t.Any:
        try:
            return call(*args)
        except SQLAlchemyError as exc:
            assert self._ledger is not None
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
            msg = (
                f"target-orb's store (`state_url` {describe(self._ledger.url)}) could not "
                f"{what}: {detail}. No STATE was written past these events. Fix the database, "
                "then rerun."
            )
            raise OrbFatalError(msg) from None

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
                    with self._one_at_a_time():
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
        client = self._client
        assert client is not None and self._deliverer is not None
        window = load.window
        todo = self._not_delivered(part, mine, acked)
        keys = [events[i]["idempotency_key"] for i in todo]
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
            limiter=self._write_limiter, on_request=count_search,
        ) if keys else {}
        done.requests += searches
        send = [i for i in todo if events[i]["idempotency_key"] not in found]
        already = len(todo) - len(send)
        acked.extend(k for k in keys if k in found)
        if already:
            with self._stats.lock:
                self._stats.already_in_orb += already
            with load.lock:
                load.already += already
        send, issued = self._issued_policy_apply(load, part, send, done)
        if not send:
            return  # nothing new: no backfill is created for it
        newest = max(t.cast("datetime.datetime", _instant(events[i]["timestamp"])) for i in send)
        deliverer = self._ensure_backfill(load, newest)
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
        accepted = [batch[i] for i in result.accepted]
        self._remember(accepted)
        acked.extend(e["idempotency_key"] for e in accepted)
        with load.lock:
            load.events += len(result.accepted)
        with self._stats.lock:
            self._stats.events_backfilled += len(result.accepted)
            for i in result.accepted:
                period = issued.get(send[i])
                if period is not None:
                    self._count_issued(batch[i], window, period, "loaded")
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

    def _not_delivered(self, part: _Part, mine: list[int], acked: list[str]) -> list[int]:
        """`mine` less the keys the store says target-orb delivered (counted, acked)."""
        if self._ledger is None:
            return mine
        events = part.events
        known = self._ledger_call(
            "be read", self._ledger.lookup, [events[i]["idempotency_key"] for i in mine]
        )
        delivered = {k for k, v in known.items() if v.digest is not None}
        if not delivered:
            return mine
        todo = [i for i in mine if events[i]["idempotency_key"] not in delivered]
        acked.extend(events[i]["idempotency_key"] for i in mine if i not in set(todo))
        with self._stats.lock:
            self._stats.already_delivered += len(mine) - len(todo)
        return todo

    def _count_issued(
        self, event: t.Mapping[str, t.Any], window: Window, period: IssuedPeriod, action: str
    ) -> None:
        """Count one event of an issued period (caller holds the stats lock)."""
        customer = event.get("external_customer_id") or event.get("customer_id")
        row = (str(customer), window.label, period.invoice, action)
        self._stats.issued_period_events[row] += 1

    def _issued_policy_apply(
        self, load: _WindowLoad, part: _Part, send: list[int], done: _Loaded
    ) -> tuple[list[int], dict[int, IssuedPeriod]]:
        """Apply `issued_period_policy` to the events about to be sent.

        Returns:
            The events still to send, and those of them that fall in an issued period.
        """
        if not load.issued:
            return send, {}
        events = part.events
        hits = {
            i: period for i in send
            if (period := issued_period_of(load.issued, events[i])) is not None
        }
        if not hits:
            return send, {}
        policy = self._issued_policy
        first = next(iter(hits.values()))
        customers = sorted({
            str(events[i].get("external_customer_id") or events[i].get("customer_id"))
            for i in hits
        })
        if policy == "fail":
            msg = (
                f"{len(hits)} late event(s) of customer(s) {', '.join(customers[:5])} fall in a "
                f"period Orb has already invoiced (invoice {first.invoice}, "
                f"{format_orb(first.start)}..{format_orb(first.end)}). Orb does not change or "
                "re-issue an issued invoice, so loading them would not bill them "
                "(`issued_period_policy: fail`). These events were not sent and no STATE was "
                "written past them. Decide with whoever owns billing: set "
                "`issued_period_policy: backfill` to load them for usage reporting (then "
                "adjust the invoice or issue a credit note in Orb), or `dead_letter` to keep "
                "them out of Orb and on record; then rerun."
            )
            raise OrbFatalError(msg)
        if policy == "dead_letter":
            with self._stats.lock:
                for i, period in hits.items():
                    self._count_issued(events[i], load.window, period, "dead-lettered")
            for i, period in hits.items():
                customer = events[i].get("external_customer_id") or events[i].get("customer_id")
                reason = (
                    f"Orb already issued invoice {period.invoice} for customer {customer} "
                    f"covering {format_orb(period.start)}..{format_orb(period.end)}; Orb does "
                    "not change or re-issue an issued invoice, so this late event would never "
                    "be billed (issued_period_policy: dead_letter). Adjust the invoice or "
                    "issue a credit note in Orb if it should be billed; to load it for usage "
                    "reporting, replay it with issued_period_policy: backfill."
                )
                done.rejected.append(entry(part.stream, part.records[i], reason, "orb", events[i]))
            return [i for i in send if i not in hits], {}
        LOGGER.warning(
            "%d late event(s) of customer(s) %s fall in a period Orb has already invoiced "
            "(e.g. invoice %s); loading them (issued_period_policy: backfill): Orb shows "
            "them in usage but does not re-bill an issued invoice.",
            len(hits), ", ".join(customers[:5]), first.invoice,
        )
        return send, hits

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
                load.issued = self._issued_index(load.window)
            except BaseException as exc:
                load.error = exc
                raise
            load.checked = True

    def _one_at_a_time(self) -> t.ContextManager[t.Any]:
        """Once Orb showed it takes one pending backfill at a time: one load at a time, so a
        load's backfill is never closed under a request being sent into it."""
        return self._slot if self._single else contextlib.nullcontext()

    def _ensure_backfill(self, load: _WindowLoad, newest: datetime.datetime) -> Deliverer:
        """Make sure the window has an open backfill this run created whose timeframe holds
        `newest` (created lazily, so a replay that finds everything in Orb creates none).

        The open month's backfill ends at the grace boundary of its create: an event newer
        than that needs the next backfill, made once this one is closed and reflected.

        Returns:
            The deliverer into that backfill (if another job closes it meanwhile, Orb
            refuses the request and the window moves on to the next backfill: `_rotate`).
        """
        if (current := self._current(load, newest)) is not None:
            return current
        with self._one_at_a_time(), self._creation_lock(load.window):
            if load.error is not None:
                raise load.error
            if (current := self._current(load, newest)) is not None:
                return current
            try:
                if load.backfill_id is not None:
                    why = f"its timeframe ends before an event at {format_orb(newest)}"
                    self._retire(load, why)
                if self._single:
                    for other in self._loads():
                        if other is not load and other.backfill_id is not None:
                            self._retire(other, "Orb takes one pending backfill at a time")
                backfill_id, key, end = self._create(load)
            except BaseException as exc:
                load.error = exc
                raise
            self._use(load, backfill_id, key, end)
            assert load.deliverer is not None
            return load.deliverer

    @staticmethod
    def _current(load: _WindowLoad, newest: datetime.datetime) -> Deliverer | None:
        with load.lock:
            if load.deliverer is not None and load.end is not None and newest < load.end:
                return load.deliverer
        return None

    def _retire(self, load: _WindowLoad, why: str) -> None:
        """Close the window's current backfill and wait until Orb reflected it; the window
        continues in a new backfill when more of its events come."""
        gone = load.backfill_id
        if gone is None:
            return
        LOGGER.info(
            "Closing backfill %s (%s, %d events) before the next one: %s.",
            gone, self._label(load), load.events, why,
        )
        self._close(gone)
        with load.lock:
            load.finished.append(self._row(load, "reflected"))
            load.backfill_id = None
            load.deliverer = None
            load.end = None
        self.record.update(load.key, self._now(), state="closed", events=load.events)
        self._wait_settled(gone, load.window)

    def _use(
        self, load: _WindowLoad, backfill_id: str, key: str, end: datetime.datetime
    ) -> None:
        """Make `backfill_id` the window's backfill (ingest goes there from now on)."""
        client = self._client
        assert client is not None and self._make_ingest_deliverer is not None

        def send(body: bytes, count: int) -> Response:
            # A deterministic request key: a retried request is a replay, never a 2nd copy.
            digest = hashlib.sha256(backfill_id.encode("utf-8") + b"\0" + body).hexdigest()
            headers = {"Idempotency-Key": f"target-orb-bfi-{digest[:48]}"}
            response = client.post_ingest(body, count, backfill_id=backfill_id, headers=headers)
            if response.status in (400, 404, 409) and refuses_backfill(response.body, body):
                raise BackfillNotPendingError(backfill_id, response)
            return response

        deliverer = self._make_ingest_deliverer(send)
        with load.lock:
            load.deliverer = deliverer
            load.key = key
            load.status = "pending"
            load.events = 0
            load.end = end
            load.backfill_id = backfill_id

    def _rotate(self, load: _WindowLoad, gone: str, exc: BackfillNotPendingError) -> None:
        """Replace the window's backfill `gone`, which Orb says takes no more events."""
        with self._one_at_a_time(), self._creation_lock(load.window):
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
            backfill_id, key, end = self._create(load)
            self._use(load, backfill_id, key, end)

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

    def _resolve_conflict(self, load: _WindowLoad, refusal: Response) -> bool:
        """Orb refused a create: clear what may be in its way. Returns whether anything was.

        Orb allows no backfill overlapping a pending one (orb-billing 4.90
        `events/backfills.py`, create), and its support pages say a new backfill cannot be
        created while another is still being reflected. So a pending backfill of target-orb's
        own (this run's, of another window or an earlier timeframe; or one the ownership
        record names) is closed and waited for, whatever its timeframe; from then on the run
        keeps one backfill pending at a time. Another's that is closing is waited for. An
        open one of another's stops the run, naming it.
        """
        window = load.window
        now = self._now()
        this_run = {w.backfill_id: w for w in self._loads() if w.backfill_id is not None}
        pending = self._pending_backfills(refresh=True)
        cleared = False
        foreign_open: dict[str, t.Any] | None = None
        for backfill in pending:
            bid = str(backfill.get("id"))
            start = _instant(backfill.get("timeframe_start"))
            end = _instant(backfill.get("timeframe_end"))
            overlaps = start is not None and end is not None and window.overlaps(start, end)
            close = _instant(backfill.get("close_time"))
            open_ = backfill.get("status") == "pending" and (close is None or close > now)
            other = this_run.get(bid)
            owned = other is not None or self.record.owner_entry(backfill) is not None
            if owned and not overlaps:
                self._single = True
                LOGGER.warning(
                    "Orb refused a backfill for %s while target-orb's backfill %s is pending: "
                    "from now on this run keeps one backfill pending at a time.",
                    window.label, bid,
                )
            if other is not None:
                self._retire(other, "Orb takes one pending backfill at a time")
                cleared = True
            elif owned:
                if open_:
                    self._close(bid)
                self._wait_settled(bid, window)
                self.record.update("", self._now(), id=bid, state="closed")
                cleared = True
            elif not open_:
                self._wait_settled(bid, window)
                cleared = True
            elif overlaps:
                raise OrbFatalError(self._foreign_message(backfill, window))
            else:
                foreign_open = backfill
        if not cleared and foreign_open is not None:
            other_id = foreign_open.get("id")
            msg = (
                f"Orb refused target-orb's backfill for {window.label} "
                f"({orb_error_summary(refusal.body, 200)}) while backfill {other_id} "
                f"({foreign_open.get('timeframe_start')} to {foreign_open.get('timeframe_end')}, "
                f"closes at {foreign_open.get('close_time')}), which target-orb did not create, "
                "is pending. target-orb never closes another tool's or a person's backfill: "
                "nothing of this window was sent and no STATE was written past it. Wait until "
                f"it closes at {foreign_open.get('close_time')} (or close it: POST "
                f"/v1/events/backfills/{other_id}/close, if whoever created it has finished), then "
                "rerun."
            )
            raise OrbFatalError(msg)
        return cleared

    def _issued_index(self, window: Window) -> IssuedIndex:
        """Customers' periods overlapping `window` whose invoices Orb has already issued
        (GET /v1/invoices, every page; a read)."""
        invoices: list[t.Any] = []
        cursor: str | None = None
        while True:
            params: dict[str, str | list[str]] = {
                "status[]": list(ISSUED_STATUSES),
                # An invoice billing usage of this window is dated at or after its start.
                "invoice_date[gte]": format_orb(window.start),
                "limit": "100",
            }
            if cursor:
                params["cursor"] = cursor
            response = self._request(
                "GET", INVOICES_PATH, params=params, limiter=self._read_limiter
            )
            body = response.body
            if classify(response.status) is not Outcome.OK or not isinstance(body, dict):
                raise OrbFatalError(self._call_failed(
                    f"list the issued invoices that cover {window.label}", response
                ))
            data = body.get("data")
            invoices.extend(data if isinstance(data, list) else [])
            meta = body.get("pagination_metadata")
            cursor = meta.get("next_cursor") if isinstance(meta, dict) else None
            if not (isinstance(meta, dict) and meta.get("has_more") and cursor):
                break
        index = issued_periods(invoices, window)
        if index:
            LOGGER.info(
                "Orb has issued invoices for %d customer(s) in %s: their late events there "
                "follow issued_period_policy: %s.",
                len({p.invoice for periods in index.values() for p in periods}),
                window.label, self._issued_policy,
            )
        return index

    def _label(self, load: _WindowLoad) -> str:
        end = load.end or load.window.end
        return f"{format_orb(load.window.start)}..{format_orb(end)}"

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

    def _create(self, load: _WindowLoad) -> tuple[str, str, datetime.datetime]:
        """Create the window's next backfill; returns (id, Idempotency-Key, timeframe_end).

        Its timeframe ends at the window's end or at the grace boundary, whichever is first.
        Creates are made one at a time; one Orb refuses because of a pending backfill
        target-orb owns closes that backfill, waits until Orb reflected it, and tries again.
        """
        window = load.window
        with self._create_lock:
            for attempt in range(MAX_CREATE_ATTEMPTS):
                now = self._now().replace(microsecond=0)
                end = min(window.end, self.boundary(now))
                payload = {
                    "timeframe_start": format_orb(window.start),
                    "timeframe_end": format_orb(end),
                    # A later attempt (after a conflict was resolved) must not replay the
                    # earlier answer: its payload, and so its key, differs by the close time.
                    "close_time": format_orb(now + CLOSE_AFTER + attempt * _SECOND),
                    # Sent explicitly: Orb's default is true (replace every customer's events).
                    "replace_existing_events": False,
                }
                # The key also carries how many creates the ownership record already holds
                # for this window: a create made in the same second as an earlier one of this
                # window (after Orb closed that one) must get a new backfill, not Orb's stored
                # answer for the earlier create. A retry of one create reuses its key.
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
                if classify(response.status) is Outcome.OK and isinstance(body, dict) and (
                    body.get("id")
                ):
                    break
                # The intent stays `creating`: if Orb made the backfill after all (an answer
                # lost to a 5xx), its timeframe and close time still identify it as ours.
                if (
                    response.status == 400
                    and attempt + 1 < MAX_CREATE_ATTEMPTS
                    and self._resolve_conflict(load, response)
                ):
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
            "Created backfill %s for %s..%s (replace_existing_events: false, close_time %s).",
            backfill_id, payload["timeframe_start"], payload["timeframe_end"],
            payload["close_time"],
        )
        with self._stats.lock:
            self._stats.backfills_created += 1
        return backfill_id, key, end

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
            "timeframe_end": format_orb(load.end or load.window.end),
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
        boundary = self.boundary()
        windows = [
            (w.start, min(w.end, max(boundary, w.start + _SECOND)), n)
            for w, n in sorted(self._plan.items())
        ]
        lines = [f"  {format_orb(s)}..{format_orb(e)}: {n} events" for s, e, n in windows]
        LOGGER.info(
            "DRY RUN: backfill plan (late_event_policy: backfill), one non-replacing "
            "backfill per window (the current month's ends at the grace boundary):\n%s\n"
            "Nothing was created and Orb was not asked which keys it already holds or which "
            "invoices it has issued: a dry run makes no request.",
            "\n".join(lines),
        )
        with self._stats.lock:
            self._stats.backfill_plan = [
                {"timeframe_start": format_orb(s), "timeframe_end": format_orb(e), "events": n}
                for s, e, n in windows
            ]


_SECOND = datetime.timedelta(seconds=1)
