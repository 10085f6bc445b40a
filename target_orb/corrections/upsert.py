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
from urllib.parse import quote

from sqlalchemy.exc import SQLAlchemyError

from target_orb.corrections.decisions import Action, customer_of, decide, orb_body, refusal_reason
from target_orb.errors import DeliveryAbortedError, OrbFatalError
from target_orb.mapping.fields import Invalid, get_path
from target_orb.mapping.timestamps import TimestampError, parse_and_format
from target_orb.mapping.track import Mapped, Skip, map_record, source_key
from target_orb.orb.answers import (
    Outcome,
    already_deprecated,
    classify,
    config_hint,
    is_not_found,
    orb_error_summary,
    refusal_code,
)
from target_orb.pipeline.deadletter import DeadLetterEntry, entry
from target_orb.pipeline.gate import JobResult
from target_orb.state.digests import Known, amendment_body, body_digest
from target_orb.state.ledger import Ledger, Write, describe

if t.TYPE_CHECKING:
    from target_orb.mapping.spec import MappingSpec
    from target_orb.orb.client import OrbClient
    from target_orb.orb.delivery import Deliverer, DeliveryResult, Limiter, Response
    from target_orb.pipeline.gate import Pipeline

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.upsert")
DELETED_FIELD = "_sdc_deleted_at"
_UTC = datetime.timezone.utc
_ONE_SECOND = datetime.timedelta(seconds=1)


BackfillLoad = t.Callable[[str, list[dict[str, t.Any]], list[t.Any]], JobResult]
"""(stream, late events, their records) → what the backfill load settled."""


class OrbPort(t.Protocol):
    """The Orb calls corrections make, each already retried (`Deliverer` rules)."""

    def search(
        self, keys: list[str], start: datetime.datetime, end: datetime.datetime
    ) -> dict[str, dict[str, t.Any]]: ...
    def deliver(self, events: list[dict[str, t.Any]]) -> DeliveryResult: ...
    def amend(self, key: str, body: dict[str, t.Any]) -> Response: ...
    def deprecate(self, key: str) -> Response: ...


@dataclass(slots=True)
class Item:
    """One record under upsert: its key, the event it maps to, and whether it was deleted."""

    key: str
    event: dict[str, t.Any] | None  # None: a deleted record that only yielded its key
    record: t.Any
    deleted: bool = False
    late: bool = False  # older than the late-event threshold (matters for new keys only)


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


def event_time(event: t.Mapping[str, t.Any]) -> datetime.datetime | None:
    """The event's timestamp as an aware datetime (None if it cannot be read)."""
    try:
        return parse_and_format(event.get("timestamp"))[0]
    except (TimestampError, TypeError, ValueError):
        return None


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
        run_stats: t.Any = None,
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
            run_stats: The run's RunStats (`events_sent`), when there is one.
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
        self.run_stats = run_stats
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
                return _BatchRun(self, stream, batch).run()
            finally:
                self.order.release(ticket)

        return run


def _customer_text(body: t.Mapping[str, t.Any] | None) -> str | None:
    customer = customer_of(body)
    return f"{customer[0]}:{customer[1]}" if customer else None


class _BatchRun:
    """One batch's decisions and writes (runs on a delivery thread)."""

    def __init__(self, owner: Upserter, stream: str, items: list[Item]) -> None:
        self.o = owner
        self.stream = stream
        self.items = items
        self.result = JobResult()
        self.stats = owner.stats
        self.known: dict[str, Known] = {}

    # -- ledger calls with a clear failure --------------------------------------------------

    def _ledger(self, what: str, call: t.Callable[..., t.Any], *args: t.Any) -> t.Any:
        try:
            return call(*args)
        except SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
            msg = (
                f"The corrections ledger (`ledger_url` {describe(self.o.ledger.url)}) could "
                f"not {what}: {detail}. No STATE was written past this batch; keys sent "
                "before the failure stay marked pending, so the next run amends them rather "
                "than trusting a stale entry. Fix the database, then rerun."
            )
            raise OrbFatalError(msg) from None

    def run(self) -> JobResult:
        items = self.items
        known = self._ledger("be read", self.o.ledger.lookup, [i.key for i in items])
        self.known = known
        self._search_unknown()
        ingest: list[Item] = []
        backfill: list[Item] = []
        amend: list[tuple[Item, Action]] = []
        deprecate: list[Item] = []
        for item in items:
            new_body = amendment_body(item.event) if item.event is not None else None
            decision = decide(new_body, deleted=item.deleted, known=self.known.get(item.key))
            action = decision.action
            if action is Action.UNCHANGED or action is Action.ALREADY_DEPRECATED:
                with self.stats.lock:
                    self.stats.unchanged += 1
            elif action is Action.DEPRECATED_IN_ORB:
                self._refuse_local(item, "deprecated_in_orb", decision.reason)
            elif action is Action.INGEST:
                if item.late and self.o.spec.late_event_policy == "backfill" and (
                    self.o.backfill_load is not None
                ):
                    backfill.append(item)  # a late new key: through an Orb backfill
                    continue
                if item.late and not self._late_allowed(item):
                    continue
                ingest.append(item)
            elif action is Action.DEPRECATE:
                deprecate.append(item)
            else:
                amend.append((item, action))
        self._mark_pending(
            [(i, "ingest") for i in [*ingest, *backfill]]
            + [(i, "amend") for i, _ in amend]
            + [(i, "deprecate") for i in deprecate],
        )
        self._ingest(ingest)
        self._backfill(backfill)
        fallback = self._amend(amend)
        self._deprecate(deprecate)
        if fallback:
            self._mark_pending([(i, "ingest") for i in fallback])
            self._ingest(fallback)
        return self.result

    # -- lookups ----------------------------------------------------------------------------

    def _search_unknown(self) -> None:
        """Keys the ledger does not know for sure are looked up in Orb (500 a call)."""
        unknown = [
            i for i in self.items
            if i.event is not None
            and ((k := self.known.get(i.key)) is None or not k.confirmed)
        ]
        if not unknown:
            return
        times = [w for i in unknown if (w := event_time(i.event or {})) is not None]
        if not times:
            return
        start = min(times).replace(microsecond=0)
        end = max(times).replace(microsecond=0) + _ONE_SECOND
        found = self.o.port.search([i.key for i in unknown], start, end)
        self.result.requests += (len(unknown) + 499) // 500
        customer_key = self.o.spec.customer_key
        learned: list[Write] = []
        for item in unknown:
            raw = found.get(item.key)
            if raw is None:
                continue
            body = orb_body(raw, customer_key)
            digest = body_digest(body)
            deprecated = bool(raw.get("deprecated"))
            self.known[item.key] = Known(
                body=body, digest=digest, deprecated=deprecated, source="search",
            )
            learned.append(Write(
                item.key, "deprecate" if deprecated else "seen", digest, body,
                body.get("timestamp"), _customer_text(body),
            ))
        with self.stats.lock:
            self.stats.searches += 1
            self.stats.decided_by_search += len(unknown)
        # What Orb holds is now known; remember it so the next run need not search.
        self._ledger("be written", self.o.ledger.acknowledge, learned)

    def _late_allowed(self, item: Item) -> bool:
        """A new key older than the grace period follows `late_event_policy`."""
        policy = self.o.spec.late_event_policy
        if policy == "send":
            return True
        event = item.event or {}
        if policy == "backfill":
            reason = (
                f"timestamp {event.get('timestamp')} is older than the "
                f"{self.o.spec.grace_period_hours} h grace period and Orb does not hold this "
                "key, and no Orb backfill could be used for it"
            )
        else:
            reason = (
                f"timestamp {event.get('timestamp')} is older than the "
                f"{self.o.spec.grace_period_hours} h grace period (settings "
                "`grace_period_hours`, `late_event_policy`) and Orb does not hold this key; "
                "Orb only takes it through a backfill"
            )
        self.result.rejected.append(entry(self.stream, item.record, reason, "local", item.event))
        return False

    # -- writes -------------------------------------------------------------------------------

    def _mark_pending(self, writes: list[tuple[Item, str]]) -> None:
        rows = []
        for item, op in writes:
            body = amendment_body(item.event) if item.event is not None else None
            rows.append(Write(
                item.key, op, body_digest(body) if body is not None else None, None,
                body.get("timestamp") if body else None, _customer_text(body),
            ))
        self._ledger("be written", self.o.ledger.mark_pending, rows)

    def _ingest(self, items: list[Item]) -> None:
        if not items:
            return
        events = [t.cast("dict[str, t.Any]", i.event) for i in items]
        for start in range(0, len(events), 500):
            part_items = items[start:start + 500]
            part = events[start:start + 500]
            if self.o.run_stats is not None:
                with self.o.run_stats.lock:
                    self.o.run_stats.events_sent += len(part)
            result = self.o.port.deliver(part)
            self.result.requests += result.requests
            acked = [part_items[i] for i in result.accepted]
            self._ack(acked, "ingest")
            refused = []
            for index, reason in result.rejected:
                item = part_items[index]
                refused.append(item.key)
                self.result.rejected.append(
                    entry(self.stream, item.record, reason, "orb", item.event),
                )
            self._ledger("be written", self.o.ledger.clear_pending, refused)
            self.result.accepted += len(acked)
            with self.stats.lock:
                self.stats.new += len(acked)

    def _backfill(self, items: list[Item]) -> None:
        """Late new keys through the backfill manager (non-replacing, search first)."""
        if not items or self.o.backfill_load is None:
            return
        events = [t.cast("dict[str, t.Any]", i.event) for i in items]
        done = self.o.backfill_load(self.stream, events, [i.record for i in items])
        refused = {
            (line.get("event") or {}).get("idempotency_key") for line in done.rejected
        }
        acked = [i for i in items if i.key not in refused]
        self._ack(acked, "ingest")
        self._ledger("be written", self.o.ledger.clear_pending,
                     [i.key for i in items if i.key in refused])
        self.result.accepted += done.accepted
        self.result.rejected.extend(done.rejected)
        self.result.requests += done.requests
        with self.stats.lock:
            self.stats.new += len(acked)

    def _ack(self, items: list[Item], op: str) -> None:
        rows = []
        for item in items:
            body = amendment_body(item.event) if item.event is not None else None
            rows.append(Write(
                item.key, op, body_digest(body) if body is not None else None, body,
                body.get("timestamp") if body else None, _customer_text(body),
            ))
        self._ledger("be written", self.o.ledger.acknowledge, rows)

    def _amend(self, todo: list[tuple[Item, Action]]) -> list[Item]:
        """PUT each amendment; returns unconfirmed ingests Orb does not hold (to ingest)."""
        fallback: list[Item] = []
        for item, action in todo:
            body = amendment_body(t.cast("dict[str, t.Any]", item.event))
            response = self.o.port.amend(item.key, body)
            self.result.requests += 1
            outcome = classify(response.status)
            if outcome is Outcome.OK:
                self._ack([item], "amend")
                with self.stats.lock:
                    self.stats.amended += 1
                continue
            self._fatal_if_config(response, "amend")
            if action is Action.AMEND_OR_INGEST and is_not_found(response.status, response.body):
                fallback.append(item)
                continue
            self._refuse(item, "amend", response)
        return fallback

    def _deprecate(self, items: list[Item]) -> None:
        for item in items:
            response = self.o.port.deprecate(item.key)
            self.result.requests += 1
            if classify(response.status) is Outcome.OK or already_deprecated(response.body):
                self._ack([item], "deprecate")
                with self.stats.lock:
                    self.stats.deprecated += 1
                continue
            self._fatal_if_config(response, "deprecate")
            if is_not_found(response.status, response.body):
                # Nothing to stop counting: the row was never billed (or not in this account).
                self._ledger("be written", self.o.ledger.clear_pending, [item.key])
                with self.stats.lock:
                    self.stats.deleted_not_in_orb += 1
                continue
            self._refuse(item, "deprecate", response)

    @staticmethod
    def _fatal_if_config(response: Response, op: str) -> None:
        """401/403 and a 404 for a wrong URL stop the run, as for ingest."""
        text = orb_error_summary(response.body, 500).lower()
        if response.status in (401, 403) or (response.status == 404 and "url-not-found" in text):
            hint = config_hint(
                response.status,
                unauthorized="Check `api_key` (TARGET_ORB_API_KEY).",
                forbidden=f"The API key is not allowed to {op} events; check its permissions in "
                "Orb.",
                not_found="Check `api_url`; it should end in /v1.",
            )
            msg = (
                f"Orb answered HTTP {response.status} to an event {op} "
                f"({orb_error_summary(response.body, 160)}). {hint} No STATE was written past "
                "this batch; rerun after fixing the setting."
            )
            raise OrbFatalError(msg)

    def _refuse(self, item: Item, op: str, response: Response) -> None:
        code = refusal_code(response.status, response.body)
        stored = self.known.get(item.key)
        reason = refusal_reason(
            code, op=op, key=item.key, stored=stored.body if stored else None,
            new=amendment_body(item.event) if item.event is not None else None,
            status=response.status, body=response.body,
        )
        self._ledger("be written", self.o.ledger.clear_pending, [item.key])
        self._dead_letter(item, code, reason, "orb", op)

    def _refuse_local(self, item: Item, code: str, reason: str) -> None:
        self._dead_letter(item, code, reason, "local", "amend")

    def _dead_letter(
        self, item: Item, code: str, reason: str, source: t.Literal["local", "orb"], op: str
    ) -> None:
        line: DeadLetterEntry = entry(self.stream, item.record, reason, source, item.event)
        stored = self.known.get(item.key)
        extra = t.cast("dict[str, t.Any]", line)
        extra["correction"] = op
        extra["orb_event"] = (
            {"idempotency_key": item.key, **stored.body}
            if stored is not None and stored.body is not None else None
        )
        extra["orb_event_from"] = stored.source if stored is not None else None
        self.result.rejected.append(line)
        with self.stats.lock:
            self.stats.refused[code] += 1


class LiveOrbPort:
    """`OrbPort` over the real client: searches, amendments and deprecations draw from Orb's
    writes budget (every POST/PUT/PATCH/DELETE but ingest, Orb's rate-limit page), all with
    ingest's retry rules."""

    def __init__(
        self,
        client: OrbClient,
        deliverer: Deliverer,
        *,
        write_limiter: Limiter,
    ) -> None:
        """Wire the calls.

        Args:
            client: The Orb client.
            deliverer: Retries (and ingest).
            write_limiter: The runtime's `write_limiter`.
        """
        self._client = client
        self._deliverer = deliverer
        self._write = write_limiter

    def search(
        self, keys: list[str], start: datetime.datetime, end: datetime.datetime
    ) -> dict[str, dict[str, t.Any]]:
        """Orb's stored events for these keys (never-amended ones only)."""
        from target_orb.orb.search import search_existing  # noqa: PLC0415

        return search_existing(
            self._client, self._deliverer, keys,
            timeframe_start=start, timeframe_end=end, limiter=self._write,
        )

    def deliver(self, events: list[dict[str, t.Any]]) -> DeliveryResult:
        """Ingest new events (413 split, 400 quarantine as for append-only)."""
        return self._deliverer.deliver(events)

    def amend(self, key: str, body: dict[str, t.Any]) -> Response:
        """`PUT /v1/events/{key}` with exactly the AmendedEvent fields."""
        path = f"/events/{quote(key, safe='')}"
        return self._deliverer.request(
            lambda: self._client.call("PUT", path, body=body),
            what=f"PUT {self._client.url(path)}", limiter=self._write,
        )

    def deprecate(self, key: str) -> Response:
        """`PUT /v1/events/{key}/deprecate` (no body)."""
        path = f"/events/{quote(key, safe='')}/deprecate"
        return self._deliverer.request(
            lambda: self._client.call("PUT", path),
            what=f"PUT {self._client.url(path)}", limiter=self._write,
        )
