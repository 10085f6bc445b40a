"""The STATE gate as a unit: scripted jobs settle in the order a test chooses.

Every job blocks until the test releases it, so each ordering below is forced, not hoped
for; waits are bounded (a broken gate fails in about a second instead of hanging).
"""

from __future__ import annotations

import json
import threading
import time
import typing as t

import pytest

from target_orb.errors import (
    DeliveryAbortedError,
    OrbInvalidEventError,
    PipelineClosedError,
    StateWriteError,
)
from target_orb.orb.delivery import Deliverer, Response
from target_orb.pipeline.deadletter import DeadLetterWriter, entry
from target_orb.pipeline.gate import JobResult, Pipeline
from target_orb.pipeline.stats import RunStats

BOUND = 2.0  # seconds any single wait may take before the test fails


def wait_for(predicate: t.Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class Job:
    """A unit of work that blocks until released, then returns or raises as scripted."""

    def __init__(self, result: JobResult | None = None, error: BaseException | None = None):
        self.result = result if result is not None else JobResult(accepted=1, requests=1)
        self.error = error
        self.started = threading.Event()
        self._release = threading.Event()

    def release(self) -> None:
        self._release.set()

    def __call__(self) -> JobResult:
        self.started.set()
        assert self._release.wait(BOUND), "job never released"
        if self.error is not None:
            raise self.error
        return self.result


class Gate:
    """A pipeline with scripted jobs and a recording STATE writer."""

    def __init__(self, tmp_path, *, policy: str = "dead_letter", max_in_flight: int = 4,
                 writer: t.Callable[[dict], None] | None = None, dry_run: bool = False):
        self.written: list[dict] = []
        self.stats = RunStats()
        self.dead_letters = DeadLetterWriter(str(tmp_path / "dl.jsonl"))
        self.pipeline = Pipeline(
            deliverer=None, dead_letters=self.dead_letters, stats=self.stats,
            invalid_policy=policy, max_in_flight=max_in_flight,
            state_writer=writer or self.written.append, dry_run=dry_run,
        )

    def submit(self, job: Job, count: int = 1) -> Job:
        self.pipeline.submit_job("s", job, count)
        return job

    def offer(self, n: int) -> None:
        self.pipeline.offer_state({"n": n})

    def states(self) -> list[int]:
        return [s["n"] for s in self.written]

    def settled(self, pending: int) -> None:
        wait_for(lambda: self.stats.pending == pending, f"{pending} items pending")

    def dead_lettered(self) -> list[dict]:
        try:
            with open(self.dead_letters.path, encoding="utf-8") as handle:
                return [json.loads(line) for line in handle]
        except FileNotFoundError:
            return []


@pytest.fixture
def gate(tmp_path):
    gates: list[Gate] = []

    def make(**kwargs: t.Any) -> Gate:
        gates.append(Gate(tmp_path, **kwargs))
        return gates[-1]

    yield make
    for g in gates:
        g.pipeline.close(timeout=1.0)


def rejected(reason: str = "bad value") -> JobResult:
    return JobResult(
        accepted=0, rejected=[entry("s", {"id": 1}, reason, "orb", {"idempotency_key": "k"})],
        requests=1,
    )


# --- the basic promise ---------------------------------------------------------------------


def test_state_with_nothing_in_flight_is_written_at_once_on_the_calling_thread(gate):
    g = gate()
    threads: list[threading.Thread] = []
    g.pipeline._state_writer = lambda s: (threads.append(threading.current_thread()),
                                          g.written.append(s))
    g.offer(1)
    assert g.states() == [1]
    assert threads == [threading.current_thread()]


def test_state_waits_for_the_job_submitted_before_it(gate):
    g = gate()
    a = g.submit(Job())
    g.offer(1)
    assert a.started.wait(BOUND)
    assert g.states() == []
    a.release()
    g.pipeline.wait_all()
    assert g.states() == [1]
    assert (g.stats.events_accepted, g.stats.requests, g.stats.pending) == (1, 1, 0)


def test_out_of_order_acknowledgements_hold_state_until_everything_before_it_settled(gate):
    g = gate()
    a = g.submit(Job())
    g.offer(1)
    b = g.submit(Job())
    g.offer(2)
    b.release()  # the later request is acknowledged first
    g.settled(pending=1)
    assert g.states() == []  # neither STATE: both come after the unsettled first request
    a.release()
    g.pipeline.wait_all()
    assert g.states() == [2]  # both ready at once: only the newest is written


def test_states_come_out_in_order_each_once_when_jobs_settle_in_order(gate):
    g = gate()
    a = g.submit(Job())
    g.offer(1)
    b = g.submit(Job())
    g.offer(2)
    a.release()
    wait_for(lambda: g.states() == [1], "STATE 1")
    b.release()
    g.pipeline.wait_all()
    g.offer(3)
    assert g.states() == [1, 2, 3]


def test_a_state_offered_before_a_job_does_not_wait_for_it(gate):
    g = gate()
    g.offer(1)
    a = g.submit(Job())
    g.offer(2)
    assert g.states() == [1]
    a.release()
    g.pipeline.wait_all()
    assert g.states() == [1, 2]


# --- rejections between two STATE messages ---------------------------------------------------


def test_rejection_between_two_states_is_on_disk_before_the_second_state(gate):
    g = gate()
    seen_at_write: list[int] = []
    g.pipeline._state_writer = lambda s: (seen_at_write.append(len(g.dead_lettered())),
                                          g.written.append(s))
    g.offer(1)
    a = g.submit(Job(rejected()))
    g.offer(2)
    a.release()
    g.pipeline.wait_all()
    assert g.states() == [1, 2]
    assert seen_at_write == [0, 1]  # the dead letter was durable when STATE 2 was written
    assert g.dead_lettered()[0]["reason"] == "bad value"
    assert (g.stats.dead_lettered, g.stats.rejected_by_orb, g.stats.pending) == (1, 1, 0)


def test_rejection_with_policy_fail_stops_the_state_after_it(gate):
    g = gate(policy="fail")
    g.offer(1)
    a = g.submit(Job(rejected()))
    g.offer(2)
    a.release()
    with pytest.raises(OrbInvalidEventError, match="invalid_event_policy"):
        g.pipeline.wait_all()
    g.offer(3)
    assert g.states() == [1]
    assert g.dead_lettered() == []


def test_rejection_with_policy_skip_lets_the_state_through_without_a_dead_letter(gate):
    g = gate(policy="skip")
    a = g.submit(Job(rejected()))
    g.offer(1)
    a.release()
    g.pipeline.wait_all()
    assert g.states() == [1]
    assert g.dead_lettered() == []


def test_a_dead_letter_that_cannot_be_written_stops_the_state(gate, tmp_path):
    g = gate()
    g.dead_letters.path = str(tmp_path)  # a directory: open() fails
    a = g.submit(Job(rejected()))
    g.offer(1)
    a.release()
    with pytest.raises(OSError):
        g.pipeline.wait_all()
    assert g.states() == []


# --- failures --------------------------------------------------------------------------------


def test_failure_while_state_waits_means_no_state_ever(gate):
    g = gate()
    a = g.submit(Job(error=RuntimeError("Orb said no")))
    g.offer(1)
    b = g.submit(Job())
    g.offer(2)
    b.release()
    g.settled(pending=1)
    a.release()
    with pytest.raises(RuntimeError, match="Orb said no"):
        g.pipeline.wait_all()
    g.offer(3)
    assert g.states() == []
    with pytest.raises(RuntimeError, match="Orb said no"):
        g.submit(Job())
    assert g.pipeline.error_reported
    assert g.stats.pending == 1  # the failed job's events stay unacknowledged


def test_no_state_after_a_failure_even_when_the_earlier_job_then_succeeds(gate):
    g = gate()
    a = g.submit(Job())
    g.offer(1)
    b = g.submit(Job(error=RuntimeError("later request failed")))
    b.release()
    wait_for(lambda: g.pipeline.error is not None, "the failure")
    a.release()
    g.settled(pending=1)
    assert g.states() == []
    assert str(g.pipeline.error) == "later request failed"


def test_first_failure_wins(gate):
    g = gate()
    a = g.submit(Job(error=RuntimeError("first")))
    b = g.submit(Job(error=RuntimeError("second")))
    a.release()
    wait_for(lambda: g.pipeline.error is not None, "the first failure")
    b.release()
    with pytest.raises(RuntimeError, match="first"):
        g.pipeline.wait_all()


def test_a_failing_state_write_is_one_clear_error_and_ends_state(gate):
    calls: list[dict] = []

    def broken_stdout(state: dict) -> None:
        calls.append(state)
        raise BrokenPipeError(32, "Broken pipe")

    g = gate(writer=broken_stdout)
    a = g.submit(Job())
    g.offer(1)
    a.release()  # the delivery thread settles it and tries to write STATE 1
    with pytest.raises(StateWriteError, match="Could not write STATE to stdout") as info:
        g.pipeline.wait_all()
    assert not isinstance(info.value, OSError)  # not reported as a dead-letter file problem
    g.offer(2)
    assert calls == [{"n": 1}]
    assert g.stats.pending == 0  # the job itself settled once; the write failed afterwards


def test_a_failing_state_write_on_the_reading_thread_raises_there(gate):
    def broken_stdout(state: dict) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    g = gate(writer=broken_stdout)
    with pytest.raises(StateWriteError):
        g.offer(1)
    with pytest.raises(StateWriteError):
        g.submit(Job())


# --- STATE is written outside the lock -------------------------------------------------------


def test_a_slow_stdout_blocks_neither_delivery_nor_submit(gate):
    unblock = threading.Event()
    writing = threading.Event()
    written: list[int] = []

    def slow_stdout(state: dict) -> None:
        writing.set()
        assert unblock.wait(BOUND)
        written.append(state["n"])

    g = gate(writer=slow_stdout)
    a = g.submit(Job())
    g.offer(1)
    a.release()
    assert writing.wait(BOUND)  # a delivery thread is now stuck writing STATE 1
    b = g.submit(Job())  # submitting still works...
    b.release()
    g.settled(pending=0)  # ...and so does settling
    g.offer(2)  # ready, but the writer is busy: this returns at once
    assert written == []
    unblock.set()
    g.pipeline.wait_all()  # returns only once the last STATE is out
    assert written == [1, 2]


def test_wait_all_returns_only_after_the_final_state_is_written(gate):
    unblock = threading.Event()
    written: list[int] = []

    def slow_stdout(state: dict) -> None:
        assert unblock.wait(BOUND)
        written.append(state["n"])

    g = gate(writer=slow_stdout)
    a = g.submit(Job())
    g.offer(1)
    a.release()
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (g.pipeline.wait_all(), done.set()))
    waiter.start()
    assert not done.wait(0.05)
    unblock.set()
    waiter.join(BOUND)
    assert done.is_set()
    assert written == [1]


# --- back-pressure, close, dry run -----------------------------------------------------------


def test_submit_blocks_at_max_in_flight_until_a_job_settles(gate):
    g = gate(max_in_flight=1)
    a = g.submit(Job())
    b = Job()
    submitted = threading.Event()
    submitter = threading.Thread(target=lambda: (g.submit(b), submitted.set()))
    submitter.start()
    assert not submitted.wait(0.05)
    a.release()
    assert submitted.wait(BOUND)
    b.release()
    submitter.join(BOUND)
    g.pipeline.wait_all()


def test_submit_after_close_raises_instead_of_hanging(gate):
    g = gate()
    g.pipeline.close()
    g.pipeline.close()  # idempotent
    started = time.monotonic()
    with pytest.raises(PipelineClosedError, match="after the delivery pipeline was closed"):
        g.submit(Job())
    assert time.monotonic() - started < 0.5
    g.offer(1)
    assert g.states() == []


def test_a_submit_waiting_for_room_is_released_by_close(gate):
    g = gate(max_in_flight=1)
    a = g.submit(Job())
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            g.submit(Job())
        except PipelineClosedError as exc:
            errors.append(exc)

    submitter = threading.Thread(target=submit)
    submitter.start()
    time.sleep(0.02)
    g.pipeline.close(timeout=0.1)
    submitter.join(BOUND)
    assert len(errors) == 1
    a.release()


def test_close_abandons_jobs_in_flight_and_writes_no_state_for_them(gate):
    g = gate()
    a = g.submit(Job())
    g.offer(1)
    assert a.started.wait(BOUND)
    g.pipeline.close(timeout=0.01)
    with pytest.raises(PipelineClosedError):
        g.pipeline.wait_all()  # instead of waiting for a job nobody will settle
    a.release()
    wait_for(lambda: not any(w.is_alive() for w in g.pipeline._workers), "the workers to stop")
    assert g.states() == []


def test_dry_run_never_writes_state(gate):
    g = gate(dry_run=True)
    g.offer(1)
    assert g.states() == []


# --- one abort signal for pipeline and deliverer ---------------------------------------------


def test_a_failure_ends_a_deliverer_retry_wait_at_once(gate):
    g = gate()
    attempted = threading.Event()

    def always_503(body: bytes, count: int) -> Response:
        attempted.set()
        return Response(503, {"retry-after": "30"}, {})

    deliverer = Deliverer(always_503, url="http://127.0.0.1:1/v1/ingest",
                          max_retry_seconds=600, abort=g.pipeline.abort)
    aborted: list[BaseException] = []

    def retrying_job() -> JobResult:
        try:
            deliverer.deliver([{"idempotency_key": "k"}])
        except DeliveryAbortedError as exc:
            aborted.append(exc)
            raise
        return JobResult()

    failing = g.submit(Job(error=RuntimeError("another request failed")))
    g.pipeline.submit_job("s", retrying_job, 1)
    assert attempted.wait(BOUND)  # the deliverer now waits 30 s to retry
    started = time.monotonic()
    failing.release()
    wait_for(lambda: aborted, "the retry wait to end")
    assert time.monotonic() - started < 1.0
    with pytest.raises(RuntimeError, match="another request failed"):
        g.pipeline.wait_all()  # the first failure is reported, not the abort it caused


def test_close_ends_a_deliverer_retry_wait_at_once(gate):
    g = gate()
    attempted = threading.Event()

    def always_503(body: bytes, count: int) -> Response:
        attempted.set()
        return Response(503, {"retry-after": "30"}, {})

    deliverer = Deliverer(always_503, url="http://127.0.0.1:1/v1/ingest",
                          max_retry_seconds=600, abort=g.pipeline.abort)
    g.pipeline.submit_job("s", lambda: (deliverer.deliver([{"idempotency_key": "k"}]),
                                        JobResult())[1], 1)
    assert attempted.wait(BOUND)
    started = time.monotonic()
    g.pipeline.close(timeout=BOUND)
    assert time.monotonic() - started < 1.0
    assert isinstance(g.pipeline.error, DeliveryAbortedError)
