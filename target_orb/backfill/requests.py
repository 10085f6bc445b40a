"""The backfill manager's state and its Orb calls: fetch, close, list pending, invoices."""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
import typing as t
from dataclasses import dataclass, field
from urllib.parse import quote

from target_orb.backfill.invoices import INVOICES_PATH, ISSUED_STATUSES, IssuedIndex, issued_periods
from target_orb.backfill.windows import Window, instant, utcnow
from target_orb.errors import OrbFatalError
from target_orb.mapping.timestamps import format_orb
from target_orb.orb.answers import Outcome, classify, orb_error_summary
from target_orb.orb.delivery import Deliverer, Response

if t.TYPE_CHECKING:
    from target_orb.backfill.ownership import OwnershipRecord, StoreOwnershipRecord
    from target_orb.orb.client import OrbClient
    from target_orb.orb.delivery import Limiter
    from target_orb.pipeline.deadletter import DeadLetterEntry
    from target_orb.pipeline.stats import RunStats
    from target_orb.state.ledger import Ledger

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.backfill")


BACKFILLS_PATH = "/events/backfills"
CLOSE_AFTER = datetime.timedelta(hours=24)  # explicit close_time: creation + Orb's default
PENDING = frozenset({"pending", "pending_revert"})  # block overlapping creates (§3.1)
MAX_ROTATIONS = 3  # new backfills for one window in one run when Orb closed ours under us
# The clocks of this machine and Orb may differ: a backfill's timeframe ends this much
# before now - grace by our clock, so Orb's "at or before its grace boundary" holds.
SKEW_MARGIN = datetime.timedelta(minutes=2)
MAX_CREATE_ATTEMPTS = 4  # creates of one backfill refused for a pending backfill of ours


class BackfillNotPendingError(Exception):
    """Orb refused an ingest because the backfill no longer takes events (closed by its
    close_time or by someone): the window needs a new backfill, the events are fine."""

    def __init__(self, backfill_id: str, response: Response) -> None:
        detail = orb_error_summary(response.body)
        super().__init__(f"backfill {backfill_id} refused events: {detail}")
        self.backfill_id = backfill_id
        self.response = response


@dataclass(slots=True)
class WindowLoad:
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
class Part:
    """Late events of one stream and one window, with their source records."""

    stream: str
    events: list[dict[str, t.Any]]
    records: list[t.Any]


@dataclass(slots=True)
class Loaded:
    accepted: int = 0
    rejected: list[DeadLetterEntry] = field(default_factory=list)
    requests: int = 0


SECOND = datetime.timedelta(seconds=1)


class BackfillRequests:
    """The manager's shared state (built once per run) and the Orb calls every layer uses.

    `BackfillLifecycle` (lifecycle.py) and `BackfillManager` (manager.py) build on it; the
    three are one object at run time, split by concern.
    """

    def __init__(
        self,
        *,
        client: OrbClient | None,
        deliverer: Deliverer | None,
        make_ingest_deliverer: t.Callable[[t.Callable[[bytes, int], Response]], Deliverer]
        | None,
        stats: RunStats,
        record: OwnershipRecord | StoreOwnershipRecord,
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
        self._aborted = aborted
        self._now = now
        self._sleep = sleep
        self._monotonic = monotonic
        self._init_run_state()

    def _init_run_state(self) -> None:
        """What the run learns and holds: locks, windows, Orb's pending backfills, the
        one-pending-at-a-time switch and Orb's learned grace boundary."""
        self._lock = threading.Lock()
        self._windows: dict[Window, WindowLoad] = {}
        self._creation_locks: dict[Window, threading.Lock] = {}
        self._pending: list[dict[str, t.Any]] | None = None
        self._plan: dict[Window, int] = {}
        self._closing = False
        self._finished = False
        self._create_lock = threading.Lock()
        # One pending backfill at a time, once Orb refused a create for a pending backfill of
        # ours that does not overlap it; loads then take `_slot` one at a time.
        self._single = False
        self._slot = threading.RLock()
        # Orb's own grace boundary is at least this: it refused an event this old as too old
        # (its grace period may be shorter than `grace_period_hours`, or its clock ahead).
        self._orb_edge: datetime.datetime | None = None

    @property
    def dry_run(self) -> bool:
        """True when nothing may be sent (plan only)."""
        return self._client is None

    def boundary(self, now: datetime.datetime | None = None) -> datetime.datetime:
        """The latest `timeframe_end` Orb accepts in a create now: now - grace, less
        `SKEW_MARGIN`, in whole seconds (orb-billing `events/backfills.py`, create); or, when
        later, the second after the newest event Orb's live ingest refused as too old (Orb's
        boundary had passed it then: `_learn_edge`)."""
        now = self._now() if now is None else now
        edge = (now - datetime.timedelta(hours=self._grace) - SKEW_MARGIN).replace(microsecond=0)
        learned = self._orb_edge
        return edge if learned is None else max(edge, learned)

    def _one_at_a_time(self) -> t.ContextManager[t.Any]:
        """Once Orb showed it takes one pending backfill at a time: one load at a time, so a
        load's backfill is never closed under a request being sent into it."""
        return self._slot if self._single else contextlib.nullcontext()

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
        found = [
            item for item in self._list_all(BACKFILLS_PATH, {}, "list the backfills")
            if isinstance(item, dict) and item.get("status") in PENDING
        ]
        with self._lock:
            self._pending = found
        return list(found)

    def _list_all(
        self, path: str, params: dict[str, str | list[str]], doing: str
    ) -> list[t.Any]:
        """Every item of one of Orb's paginated lists (`data`, `pagination_metadata`), 100 a
        page; a read."""
        items: list[t.Any] = []
        cursor: str | None = None
        while True:
            page: dict[str, str | list[str]] = {**params, "limit": "100"}
            if cursor:
                page["cursor"] = cursor
            response = self._request("GET", path, params=page, limiter=self._read_limiter)
            body = response.body
            if classify(response.status) is not Outcome.OK or not isinstance(body, dict):
                raise OrbFatalError(self._call_failed(doing, response))
            data = body.get("data")
            items.extend(data if isinstance(data, list) else [])
            meta = body.get("pagination_metadata")
            cursor = meta.get("next_cursor") if isinstance(meta, dict) else None
            if not (isinstance(meta, dict) and meta.get("has_more") and cursor):
                return items

    def _loads(self) -> list[WindowLoad]:
        with self._lock:
            return list(self._windows.values())

    def _issued_index(self, window: Window) -> IssuedIndex:
        """Customers' periods overlapping `window` whose invoices Orb has already issued
        (GET /v1/invoices, every page; a read)."""
        params: dict[str, str | list[str]] = {
            "status[]": list(ISSUED_STATUSES),
            # An invoice billing usage of this window is dated at or after its start.
            "invoice_date[gte]": format_orb(window.start),
        }
        invoices = self._list_all(
            INVOICES_PATH, params, f"list the issued invoices that cover {window.label}"
        )
        index = issued_periods(invoices, window)
        if index:
            LOGGER.info(
                "Orb has issued invoices for %d customer(s) in %s: their late events there "
                "follow issued_period_policy: %s.",
                len({p.invoice for periods in index.values() for p in periods}),
                window.label, self._issued_policy,
            )
        return index

    def _label(self, load: WindowLoad) -> str:
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
        close = instant(current.get("close_time"))
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

    @staticmethod
    def _row(load: WindowLoad, status: str) -> dict[str, t.Any]:
        return {
            "id": load.backfill_id,
            "timeframe_start": format_orb(load.window.start),
            "timeframe_end": format_orb(load.end or load.window.end),
            "events": load.events,
            "status": status,
        }
