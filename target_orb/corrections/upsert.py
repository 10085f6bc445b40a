"""`load_method: upsert`: per batch, ask the ledger (then Orb's search) what Orb holds, then
ingest new keys, skip unchanged ones, amend changed ones and deprecate deleted ones.

Each batch is one job behind the pipeline's STATE gate (`Pipeline.submit_job`), so STATE
passes a correction only once Orb acknowledged it or it is dead-lettered. Jobs run on
several delivery threads; `KeyOrder` makes the jobs that share a key run in input order (a
row updated twice in one run is ingested, then amended, never raced). The decisions are in
target_orb/corrections/decisions.py; the I/O comes in through `OrbPort` so every path is unit-tested
with scripted answers.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import threading
import typing as t
from dataclasses import dataclass, field

from target_orb.corrections.batch import BatchRun, Item, event_time
from target_orb.corrections.port import OrbPort
from target_orb.errors import DeliveryAbortedError
from target_orb.mapping.fields import Invalid, get_path
from target_orb.mapping.track import Mapped, Skip, map_record, source_key
from target_orb.pipeline.deadletter import entry
from target_orb.pipeline.gate import JobResult
from target_orb.state.ledger import Ledger

if t.TYPE_CHECKING:
    from target_orb.mapping.spec import MappingSpec
    from target_orb.pipeline.gate import Pipeline

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.upsert")
DELETED_FIELD = "_sdc_deleted_at"
_UTC = datetime.timezone.utc


BackfillLoad = t.Callable[[str, list[dict[str, t.Any]], list[t.Any]], JobResult]
"""(stream, late events, their records) → what the backfill load settled."""


class CorrectionStats:
    """Counters of `upsert` runs (updated under `lock` by the delivery threads)."""

    def __init__(self) -> None:
        """All zero."""
        self.lock = threading.Lock()
        self.new = 0
        self.unchanged = 0
        self.amended = 0
        self.deprecated = 0
        self.deleted_skipped = 0
        self.deleted_not_in_orb = 0
        self.superseded = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.decided_by_search = 0
        self.searches = 0

    def as_dict(self) -> dict[str, t.Any]:
        """Structured metrics (the `corrections` entry of the summary metrics)."""
        return {
            "new": self.new,
            "unchanged": self.unchanged,
            "amended": self.amended,
            "deprecated": self.deprecated,
            "deleted_skipped": self.deleted_skipped,
            "deleted_not_in_orb": self.deleted_not_in_orb,
            "superseded_in_batch": self.superseded,
            "refused": dict(self.refused),
            "decided_by_search": self.decided_by_search,
            "searches": self.searches,
        }

    def summary_lines(self) -> list[str]:
        """Lines appended to the end-of-run summary."""
        refused = sum(self.refused.values())
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.refused.items()))
        return [
            f"  corrections (upsert):  {self.new} new, {self.unchanged} unchanged, "
            f"{self.amended} amended, {self.deprecated} deprecated",
            f"  corrections refused:   {refused}" + (f" ({detail})" if detail else ""),
            f"  deleted rows:          {self.deleted_skipped} skipped "
            f"(deprecate_deleted_events off), {self.deleted_not_in_orb} not in Orb",
            f"  keys decided by search alone (not in the ledger): {self.decided_by_search}",
        ]


class KeyOrder:
    """Jobs that share a key run in the order they were submitted."""

    @dataclass(slots=True)
    class Ticket:
        """One job's claim on its keys."""

        keys: list[str]
        before: list[threading.Event]
        done: threading.Event = field(default_factory=threading.Event)

    def __init__(self) -> None:
        """No claims yet."""
        self._lock = threading.Lock()
        self._last: dict[str, threading.Event] = {}

    def claim(self, keys: t.Iterable[str]) -> KeyOrder.Ticket:
        """Claim keys on the submitting thread, in input order.

        Args:
            keys: The job's keys.

        Returns:
            The ticket to `wait` on and `release`.
        """
        ticket = KeyOrder.Ticket(keys=list(keys), before=[])
        with self._lock:
            seen: set[int] = set()
            for key in ticket.keys:
                previous = self._last.get(key)
                if previous is not None and id(previous) not in seen:
                    seen.add(id(previous))
                    ticket.before.append(previous)
                self._last[key] = ticket.done
        return ticket

    @staticmethod
    def wait(ticket: KeyOrder.Ticket, aborted: t.Callable[[], bool]) -> None:
        """Block until every earlier job with one of these keys finished.

        Raises:
            DeliveryAbortedError: The run is stopping.
        """
        for event in ticket.before:
            while not event.wait(0.2):
                if aborted():
                    msg = "delivery aborted while waiting for an earlier correction"
                    raise DeliveryAbortedError(msg)

    def release(self, ticket: KeyOrder.Ticket) -> None:
        """Let later jobs with these keys go."""
        ticket.done.set()
        with self._lock:
            for key in ticket.keys:
                if self._last.get(key) is ticket.done:
                    del self._last[key]


class Upserter:
    """Record intake (reading thread) and batch jobs (delivery threads) for `upsert`."""

    def __init__(
        self,
        *,
        spec: MappingSpec,
        ledger: Ledger,
        port: OrbPort,
        pipeline: Pipeline,
        deprecate_deleted_events: bool,
        aborted: t.Callable[[], bool] = lambda: False,
        late_threshold: t.Callable[[datetime.datetime], datetime.datetime] | None = None,
        note_derived_key: t.Callable[[str], None] | None = None,
        backfill_load: BackfillLoad | None = None,
    ) -> None:
        """Wire the corrections path.

        Args:
            spec: The mapping spec (its late-event policy applies to new keys only).
            ledger: The open ledger.
            port: Orb calls.
            pipeline: Where batch jobs are queued behind the STATE gate.
            deprecate_deleted_events: Deleted rows deprecate their event (else skipped).
            aborted: True once the run is stopping.
            late_threshold: now → the time before which a new key is late.
            note_derived_key: Called when a record had no key (warning once).
            backfill_load: Loads late new events through Orb backfills
                (`late_event_policy: backfill`; the backfill manager's job, run inline).
        """
        self.spec = spec
        # Map every record whatever its age: under upsert only new keys are late.
        self.map_spec = dataclasses.replace(spec, late_event_policy="send")
        self.ledger = ledger
        self.port = port
        self.pipeline = pipeline
        self.deprecate_deleted = deprecate_deleted_events
        self.aborted = aborted
        self.late_threshold = late_threshold or (
            lambda now: now - datetime.timedelta(hours=spec.grace_period_hours)
        )
        self.note_derived_key = note_derived_key
        self.backfill_load = backfill_load
        self.stats = CorrectionStats()
        self.order = KeyOrder()
        self._threshold_cache: tuple[datetime.datetime | None, datetime.datetime] = (
            None, datetime.datetime.min.replace(tzinfo=_UTC),
        )

    # -- reading thread ------------------------------------------------------------------

    def add_record(
        self,
        stream: str,
        record: t.Any,
        context: dict,
        now: datetime.datetime,
        counters: t.Any,
    ) -> None:
        """Map one record into the batch context (items, invalid entries, skips).

        Args:
            stream: Stream name.
            record: The record.
            context: The sink's batch context.
            now: Current time (aware UTC).
            counters: RunStats (skipped/invalid counters of the read path).
        """
        deleted = isinstance(record, dict) and record.get(DELETED_FIELD) not in (None, "")
        if deleted and not self.deprecate_deleted:
            counters.skipped["deleted"] += 1
            with self.stats.lock:
                self.stats.deleted_skipped += 1
            return
        result = map_record(record, stream, self.map_spec, now)
        if type(result) is Mapped:
            if result.key_derived and self.note_derived_key is not None:
                self.note_derived_key(stream)
            event = result.event
            late = False
            if not deleted:
                when = event_time(event)
                late = when is not None and when < self._threshold(now)
            item = Item(event["idempotency_key"], event, record, deleted=deleted, late=late)
            context.setdefault("upsert_items", []).append(item)
        elif type(result) is Skip:
            counters.skipped[result.reason] += 1
        else:
            assert isinstance(result, Invalid)
            key = (
                source_key(get_path(record, self.spec.idempotency_key_field))
                if deleted else None
            )
            if key is not None:
                # A delete often carries only the primary key: deprecating needs no more.
                context.setdefault("upsert_items", []).append(
                    Item(key, None, record, deleted=True),
                )
                return
            reason = result.reason
            if deleted:
                reason += (
                    f" (a deleted row needs its idempotency key at "
                    f"`{self.spec.idempotency_key_field}` to deprecate its Orb event)"
                )
            counters.invalid[result.code] += 1
            context.setdefault("invalid", []).append(entry(stream, record, reason, "local"))

    def _threshold(self, now: datetime.datetime) -> datetime.datetime:
        cached_now, value = self._threshold_cache
        if cached_now is not now:
            value = self.late_threshold(now)
            self._threshold_cache = (now, value)
        return value

    def submit_batch(self, stream: str, context: dict) -> None:
        """Dead-letter local rejects, then queue the batch's corrections job.

        Within a batch the last version of a key wins (a row updated twice between two
        syncs is corrected to its latest state).

        Args:
            stream: Stream name.
            context: The sink's batch context.
        """
        items: list[Item] = context.get("upsert_items", [])
        latest: dict[str, Item] = {}
        for item in items:
            latest.pop(item.key, None)  # keep the position of the last version
            latest[item.key] = item
        superseded = len(items) - len(latest)
        if superseded:
            with self.stats.lock:
                self.stats.superseded += superseded
        self.pipeline.reject_local(stream, context.get("invalid", []))
        batch = list(latest.values())
        if not batch:
            return
        ticket = self.order.claim(item.key for item in batch)
        self.pipeline.submit_job(stream, self._job(stream, batch, ticket), len(batch))

    def _job(
        self, stream: str, batch: list[Item], ticket: KeyOrder.Ticket
    ) -> t.Callable[[], JobResult]:
        def run() -> JobResult:
            try:
                self.order.wait(ticket, self.aborted)
                return BatchRun(self, stream, batch).run()
            finally:
                self.order.release(ticket)

        return run


