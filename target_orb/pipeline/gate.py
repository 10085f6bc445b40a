"""Concurrent delivery with a STATE gate: STATE is written only once everything before it settled.

The SDK writes STATE at the end of `drain_all` once every `process_batch` returned. Here
`process_batch` hands its request to a bounded pool and returns, so reading goes on while
requests are in flight; in exchange the target routes each STATE through `offer_state`,
which holds it until every request submitted before it was accepted by Orb or durably
dead-lettered. Memory stays O(batch size x max_concurrent_requests): `submit` blocks while
that many requests are in flight.

The gate's rules (tests/unit/test_pipeline.py checks each with scripted jobs):

- a STATE is written only once every job submitted before it settled (acknowledged, or its
  rejections handled by `invalid_event_policy`); when several are ready only the newest
  is written, and STATE lines come out in the order they were offered, each at most once;
- after the first failure (a job raised, `invalid_event_policy: fail`, a STATE write
  failed) no STATE is written any more, and the failure is re-raised on the reading thread;
- STATE is written outside the lock, by one thread at a time, so a slow stdout holds up
  neither the delivery threads nor the reading thread's next `submit`;
- the pipeline and the deliverer share one abort signal (`abort`): a failure or `close()`
  wakes every retry wait at once;
- after `close()` nothing can be queued (`PipelineClosedError`) and no STATE is written.
"""

from __future__ import annotations

import _thread
import collections
import logging
import queue
import threading
import typing as t
from dataclasses import dataclass, field

from target_orb import jsonutil
from target_orb.errors import (
    DeliveryAbortedError,
    OrbInvalidEventError,
    PipelineClosedError,
    StateWriteError,
)
from target_orb.orb.delivery import Deliverer
from target_orb.pipeline.deadletter import DeadLetterEntry, DeadLetterSink, entry
from target_orb.pipeline.stats import RunStats

# Named as before the package had folders: log lines and logging configs name it.
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
        dead_letters: DeadLetterSink,
        stats: RunStats,
        invalid_policy: str,
        max_in_flight: int,
        state_writer: t.Callable[[dict], None],
        abort: threading.Event | None = None,
        dry_run: bool = False,
        ingest_url: str = "",
        interrupt_main_on_failure: bool = False,
        progress_interval: float = 0,
    ) -> None:
        """Set up the pipeline; the delivery threads start on the first job.

        Args:
            deliverer: Sends one ingest request's events (`submit`); None in dry-run mode
                or when only `submit_job` is used.
            dead_letters: The dead-letter writer.
            stats: Run counters.
            invalid_policy: `dead_letter`, `skip` or `fail`.
            max_in_flight: Jobs in flight at once.
            state_writer: Writes one STATE value to stdout.
            abort: The abort signal shared with the deliverers (their retry waits); set on
                the first failure and on `close()`. A new one when None.
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
        self._abort = abort if abort is not None else threading.Event()
        self._dry_run = dry_run
        self._ingest_url = ingest_url
        self._interrupt = interrupt_main_on_failure
        self._progress_interval = progress_interval
        # Everything below is guarded by _cond.
        self._cond = threading.Condition()
        self._seq = 0  # jobs submitted so far; job n has seq n
        self._in_flight = 0
        self._unsettled: set[int] = set()
        self._states: collections.deque[tuple[int, dict]] = collections.deque()
        self._ready: dict | None = None  # newest STATE whose jobs settled, not yet written
        self._writing = False  # one thread at a time writes STATE, outside the lock
        self._error: BaseException | None = None
        self._closed = False
        self.error_reported = False
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._progress: threading.Thread | None = None

    # -- reading thread -------------------------------------------------------------

    @property
    def abort(self) -> threading.Event:
        """The abort signal shared with the deliverers: set on failure and on close."""
        return self._abort

    @property
    def error(self) -> BaseException | None:
        """The first delivery failure, if any."""
        return self._error

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
        """Queue one ingest request; blocks while `max_in_flight` jobs are in flight.

        Args:
            stream: Stream name.
            events: Unique-keyed Orb events (≤ 500).
            records: The source record of each event, for dead-letter lines.
        """
        self.raise_if_failed()
        if not events:
            return
        if self._dry_run:
            LOGGER.info(
                "DRY RUN: would POST %s with %d events: %s",
                self._ingest_url, len(events), jsonutil.dumps_str({"events": events}),
            )
            return
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

        Raises:
            PipelineClosedError: The pipeline was closed (a bug in the caller).
        """
        with self._cond:
            self._check_open()
            if not self._workers:
                self._start_threads()
            while self._in_flight >= self._max_in_flight and self._error is None:
                # A timeout keeps the reading thread responsive to signals while it waits.
                self._cond.wait(0.5)
                self._check_open()
            self.raise_if_failed()
            self._seq += 1
            seq = self._seq
            self._in_flight += 1
            self._unsettled.add(seq)
            with self._stats.lock:
                self._stats.pending += count
        self._queue.put(_Batch(seq, stream, job, count))

    def offer_state(self, state: dict) -> None:
        """Write `state` once every job submitted so far is settled.

        Written at once (on this thread) when nothing is in flight; otherwise by the
        delivery thread that settles the last job before it.

        Args:
            state: The tap's STATE value.
        """
        if self._dry_run:
            LOGGER.info("DRY RUN: STATE not written (a dry run never moves the bookmark).")
            return
        with self._cond:
            if self._error is not None or self._closed:
                return
            self._states.append((self._seq, state))
            write = self._advance()
        if write:
            self._write_ready()
            self.raise_if_failed()

    def wait_all(self) -> None:
        """Block until every submitted job settled and its STATE was written.

        Raises:
            BaseException: The first failure.
        """
        with self._cond:
            while (
                (self._unsettled or self._writing) and self._error is None and not self._closed
            ):
                self._cond.wait(0.5)
        self.raise_if_failed()
        if self._unsettled:
            self._check_open()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads; jobs still in flight are abandoned (never acknowledged).

        Idempotent. Afterwards `submit`/`submit_job` raise and no STATE is written.

        Args:
            timeout: Seconds to wait for each thread.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._abort.set()
        for _ in self._workers:
            self._queue.put(None)
        for thread in [*self._workers, self._progress]:
            if thread is not None:
                thread.join(timeout)

    # -- internals ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            msg = (
                "target-orb bug: work was queued after the delivery pipeline was closed; "
                "nothing after the last STATE was acknowledged, so a rerun resends it."
            )
            raise PipelineClosedError(msg)

    def _start_threads(self) -> None:
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

    def _ingest_job(
        self, stream: str, events: list[dict[str, t.Any]], records: list[t.Any]
    ) -> Job:
        deliverer = self._deliverer
        if deliverer is None:
            msg = "target-orb bug: an ingest request was queued on a pipeline without deliverer"
            raise RuntimeError(msg)

        def run() -> JobResult:
            result = deliverer.deliver(events)
            rejected = [
                entry(stream, records[i], reason, "orb", events[i])
                for i, reason in result.rejected
            ]
            return JobResult(len(result.accepted), rejected, result.requests)

        return run

    def _advance(self) -> bool:
        """Move the newest STATE whose jobs all settled to `_ready` (caller holds the lock).

        Returns:
            True when the caller must now write it (no other thread is writing).
        """
        low = min(self._unsettled) if self._unsettled else None
        while self._states and (low is None or self._states[0][0] < low):
            self._ready = self._states.popleft()[1]
        if self._ready is None or self._writing or self._error is not None:
            return False
        self._writing = True
        return True

    def _write_ready(self) -> None:
        """Write ready STATE outside the lock until none is left (this thread is the writer)."""
        while True:
            with self._cond:
                state = self._ready
                self._ready = None
                if state is None or self._error is not None or self._closed:
                    self._writing = False
                    self._cond.notify_all()
                    return
            try:
                self._state_writer(state)
            except Exception as exc:  # noqa: BLE001 - reported as the run's one failure
                msg = (
                    f"Could not write STATE to stdout ({type(exc).__name__}: {exc}). The "
                    "process reading target-orb's output (e.g. Meltano) may have stopped; "
                    "no later STATE was written, so a rerun resends everything after the "
                    "last STATE it saved (same idempotency keys, Orb deduplicates)."
                )
                with self._cond:
                    self._writing = False
                self._record_failure(StateWriteError(msg))
                return

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
        written = self._dead_letters.write(items)
        known = len(items) - written
        with self._stats.lock:
            self._stats.dead_lettered += written
            self._stats.already_dead_lettered += known
        if written:
            LOGGER.warning(
                "Stream '%s': dead-lettered %d record(s) to %s (first reason: %s).",
                stream, written, self._dead_letters.path, items[0]["reason"],
            )
        if known:
            LOGGER.warning(
                "Stream '%s': %d record(s) were already in %s for the same reason (a rerun "
                "over the same input?); counted as already dead-lettered, not appended again.",
                stream, known, self._dead_letters.path,
            )

    # -- delivery threads -----------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._abort.is_set():
                self._settle(batch, None)  # abandoned: stays unsettled, never acknowledged
                continue
            try:
                result = batch.job()
                if result.rejected:
                    self._apply_policy(batch.stream, result.rejected)
            # Whatever a delivery thread meets is handed to the reading thread, which
            # re-raises it: nothing is swallowed.
            except BaseException as exc:  # noqa: BLE001
                self._settle(batch, None)
                self._record_failure(exc)
                continue
            if self._settle(batch, result):
                self._write_ready()

    def _settle(self, batch: _Batch, result: JobResult | None) -> bool:
        """Count a finished job; None leaves it unsettled (STATE never passes it).

        Returns:
            True when this thread must now write the STATE it made ready.
        """
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()
            if result is None:
                return False
            stats = self._stats
            with stats.lock:
                stats.events_accepted += result.accepted
                stats.rejected_by_orb += sum(1 for e in result.rejected if e["source"] == "orb")
                stats.requests += result.requests
                stats.pending -= batch.count
            self._unsettled.discard(batch.seq)
            return self._advance()

    def _record_failure(self, exc: BaseException) -> None:
        """Keep the first failure, wake every waiter and every retry wait."""
        with self._cond:
            first = self._error is None
            if first:
                self._error = exc
            self._cond.notify_all()
        self._abort.set()
        if (
            first
            and self._interrupt
            and not isinstance(exc, DeliveryAbortedError)
            and threading.current_thread() is not threading.main_thread()
        ):
            _thread.interrupt_main()

    def _report_progress(self, interval: float) -> None:
        while not self._abort.wait(interval):
            LOGGER.info(self._stats.progress_line())
