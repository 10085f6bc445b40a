"""Concurrent delivery with a STATE gate: STATE is written only once everything before it settled.

The SDK writes STATE at the end of `drain_all` once every `process_batch` returned. Here
`process_batch` hands its request to a bounded pool and returns, so reading goes on while
requests are in flight; in exchange the target routes each STATE through `offer_state`,
which holds it until every request submitted before it was accepted by Orb or durably
dead-lettered. Memory stays O(batch size x max_concurrent_requests): `submit` blocks while
that many requests are in flight.
"""

from __future__ import annotations

import _thread
import logging
import queue
import threading
import typing as t
from dataclasses import dataclass, field

from target_orb import jsonutil
from target_orb.deadletter import DeadLetterEntry, DeadLetterWriter, entry
from target_orb.delivery import Deliverer
from target_orb.errors import DeliveryAbortedError, OrbInvalidEventError
from target_orb.stats import RunStats

LOGGER = logging.getLogger("target_orb.pipeline")


@dataclass(slots=True)
class JobResult:
    """What one unit of delivery work settled: acknowledged items and dead-letter lines.

    `rejected` entries go through `invalid_event_policy` (dead-lettered, skipped or fatal)
    before the job counts as settled, so STATE never passes an item that is neither
    acknowledged nor durably set aside.
    """

    accepted: int = 0  # Orb events acknowledged (live or backfill); other work counts its own
    rejected: list[DeadLetterEntry] = field(default_factory=list)
    requests: int = 0


Job = t.Callable[[], JobResult]
"""A unit of delivery work run on a delivery thread (an ingest request, a backfill load,
customer updates…); raising fails the run, returning settles it."""


@dataclass(slots=True)
class _Batch:
    seq: int
    stream: str
    job: Job
    count: int


class Pipeline:
    """Owns the delivery threads, the dead-letter policy and the STATE gate."""

    def __init__(
        self,
        *,
        deliverer: Deliverer | None,
        dead_letters: DeadLetterWriter,
        stats: RunStats,
        invalid_policy: str,
        max_in_flight: int,
        state_writer: t.Callable[[dict], None],
        dry_run: bool = False,
        ingest_url: str = "",
        interrupt_main_on_failure: bool = False,
        progress_interval: float = 0,
    ) -> None:
        """Start the delivery threads (none in dry-run mode).

        Args:
            deliverer: Sends one request's events; None in dry-run mode.
            dead_letters: The dead-letter writer.
            stats: Run counters.
            invalid_policy: `dead_letter`, `skip` or `fail`.
            max_in_flight: Requests in flight at once.
            state_writer: Writes one STATE value to stdout.
            dry_run: Log payloads instead of sending; never write STATE.
            ingest_url: For dry-run logs.
            interrupt_main_on_failure: Interrupt the reading thread when delivery fails, so
                a CLI run stops at once instead of at the next record.
            progress_interval: Seconds between progress lines; 0 for none.
        """
        self._deliverer = deliverer
        self._dead_letters = dead_letters
        self._stats = stats
        self._policy = invalid_policy
        self._max_in_flight = max(1, max_in_flight)
        self._state_writer = state_writer
        self._dry_run = dry_run or deliverer is None
        self._ingest_url = ingest_url
        self._interrupt = interrupt_main_on_failure
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._seq = 0
        self._in_flight = 0
        self._unsettled: set[int] = set()
        self._states: list[tuple[int, dict]] = []
        self._error: BaseException | None = None
        self.error_reported = False
        self._states_written = 0
        self._workers: list[threading.Thread] = []
        self._progress_interval = progress_interval
        self._progress: threading.Thread | None = None

    def _start_threads(self) -> None:
        """Start the delivery threads and the progress reporter on first use."""
        for n in range(self._max_in_flight):
            worker = threading.Thread(target=self._work, name=f"orb-send-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        if self._progress_interval > 0:
            self._progress = threading.Thread(
                target=self._report_progress, args=(self._progress_interval,),
                name="orb-progress", daemon=True,
            )
            self._progress.start()

    # -- reading thread -------------------------------------------------------------

    @property
    def error(self) -> BaseException | None:
        """The first delivery failure, if any."""
        return self._error

    @property
    def states_written(self) -> int:
        """How many STATE lines were written."""
        return self._states_written

    @property
    def unacknowledged(self) -> int:
        """Events submitted but not settled."""
        return self._stats.pending

    def sleep(self, seconds: float) -> bool:
        """Wait for a retry; True when delivery must stop (shutdown or another failure).

        Args:
            seconds: How long.

        Returns:
            Whether to abort.
        """
        return self._abort.wait(seconds)

    def raise_if_failed(self) -> None:
        """Re-raise a delivery failure on the reading thread.

        Raises:
            BaseException: The first failure seen by a delivery thread.
        """
        if self._error is not None:
            self.error_reported = True
            raise self._error

    def reject_local(self, stream: str, items: t.Sequence[DeadLetterEntry]) -> None:
        """Handle records that could not become events, per `invalid_event_policy`.

        Args:
            stream: Stream name (for messages).
            items: Dead-letter lines (source `local`).

        Raises:
            OrbInvalidEventError: With `invalid_event_policy: fail`.
        """
        if not items:
            return
        self._apply_policy(stream, items)

    def submit(self, stream: str, events: list[dict[str, t.Any]], records: list[t.Any]) -> None:
        """Queue one request; blocks while `max_in_flight` requests are in flight.

        Args:
            stream: Stream name.
            events: Unique-keyed Orb events (≤ 500).
            records: The source record of each event, for dead-letter lines.
        """
        self.raise_if_failed()
        if not events:
            return
        if self._dry_run:
            self._stats.events_sent += len(events)
            LOGGER.info(
                "DRY RUN: would POST %s with %d events: %s",
                self._ingest_url, len(events), jsonutil.dumps_str({"events": events}),
            )
            return
        with self._stats.lock:
            self._stats.events_sent += len(events)
        self.submit_job(stream, self._ingest_job(stream, events, records), len(events))

    def submit_job(self, stream: str, job: Job, count: int) -> None:
        """Queue one unit of delivery work behind the STATE gate.

        STATE offered after this call is written only once `job` returned and its
        rejected entries were handled; a job that raises fails the run. Blocks while
        `max_in_flight` jobs are in flight. Jobs run concurrently on the delivery threads:
        work that must stay ordered (two updates of one customer, one backfill window)
        orders itself.

        Args:
            stream: Stream name (for messages).
            job: The work; returns what was acknowledged and what was rejected.
            count: Items the job carries (counted as pending until it settles).
        """
        self.raise_if_failed()
        if not self._workers:
            self._start_threads()
        with self._cond:
            while self._in_flight >= self._max_in_flight and self._error is None:
                self._cond.wait(0.5)
            self.raise_if_failed()
            self._seq += 1
            seq = self._seq
            self._in_flight += 1
            self._unsettled.add(seq)
            with self._stats.lock:
                self._stats.pending += count
        self._queue.put(_Batch(seq, stream, job, count))

    def _ingest_job(
        self, stream: str, events: list[dict[str, t.Any]], records: list[t.Any]
    ) -> Job:
        deliverer = self._deliverer
        assert deliverer is not None

        def run() -> JobResult:
            result = deliverer.deliver(events)
            rejected = [
                entry(stream, records[i], reason, "orb", events[i])
                for i, reason in result.rejected
            ]
            return JobResult(len(result.accepted), rejected, result.requests)

        return run

    def offer_state(self, state: dict) -> None:
        """Write `state` once every request submitted so far is settled.

        Args:
            state: The tap's STATE value.
        """
        if self._dry_run:
            LOGGER.info("DRY RUN: STATE not written (a dry run never moves the bookmark).")
            return
        with self._cond:
            if self._error is not None:
                return
            self._states.append((self._seq, state))
            self._emit_ready()

    def wait_all(self) -> None:
        """Block until every submitted request settled; re-raise a failure."""
        with self._cond:
            while self._unsettled and self._error is None:
                self._cond.wait(0.5)
        self.raise_if_failed()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads; requests still in flight are abandoned (never acknowledged).

        Args:
            timeout: Seconds to wait for each thread.
        """
        self._abort.set()
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout)
        self._workers = []

    # -- delivery threads -----------------------------------------------------------

    def _emit_ready(self) -> None:
        """Write the newest STATE all of whose requests settled (caller holds the lock)."""
        low = min(self._unsettled) if self._unsettled else None
        ready = None
        while self._states and (low is None or self._states[0][0] < low):
            ready = self._states.pop(0)[1]
        if ready is not None and self._error is None:
            self._state_writer(ready)
            self._states_written += 1

    def _apply_policy(self, stream: str, items: t.Sequence[DeadLetterEntry]) -> None:
        if self._policy == "fail":
            first = items[0]
            msg = (
                f"Stream '{stream}': {len(items)} record(s) could not be delivered and "
                f"`invalid_event_policy` is `fail`. First reason ({first['source']}): "
                f"{first['reason']}. Fix the record or the mapping settings, or set "
                "`invalid_event_policy: dead_letter` to set such records aside."
            )
            raise OrbInvalidEventError(msg)
        if self._policy == "skip":
            LOGGER.warning(
                "Stream '%s': skipped %d record(s) that could not be delivered (first: %s).",
                stream, len(items), items[0]["reason"],
            )
            return
        self._dead_letters.write(items)
        with self._stats.lock:
            self._stats.dead_lettered += len(items)
        LOGGER.warning(
            "Stream '%s': dead-lettered %d record(s) to %s (first reason: %s).",
            stream, len(items), self._dead_letters.path, items[0]["reason"],
        )

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._abort.is_set():
                continue
            try:
                self._deliver(batch)
            # Whatever a delivery thread meets is handed to the reading thread, which
            # re-raises it: nothing is swallowed.
            except BaseException as exc:  # noqa: BLE001
                self._fail(exc)

    def _deliver(self, batch: _Batch) -> None:
        result = batch.job()
        if result.rejected:
            self._apply_policy(batch.stream, result.rejected)
        with self._cond:
            stats = self._stats
            with stats.lock:
                stats.events_accepted += result.accepted
                stats.rejected_by_orb += sum(1 for e in result.rejected if e["source"] == "orb")
                stats.requests += result.requests
                stats.pending -= batch.count
            self._in_flight -= 1
            self._unsettled.discard(batch.seq)
            self._emit_ready()
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            first = self._error is None
            if first:
                self._error = exc
            self._in_flight -= 1
            self._abort.set()
            self._cond.notify_all()
        if first and not isinstance(exc, DeliveryAbortedError) and self._interrupt:
            _thread.interrupt_main()

    def _report_progress(self, interval: float) -> None:
        while not self._abort.wait(interval):
            LOGGER.info(self._stats.progress_line())
