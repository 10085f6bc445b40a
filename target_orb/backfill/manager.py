"""The backfill manager: late events into Orb backfills, one window at a time, and the run's end."""

from __future__ import annotations

import datetime
import re
import threading
import typing as t

from sqlalchemy.exc import SQLAlchemyError

from target_orb.backfill.issued import IssuedPolicy
from target_orb.backfill.requests import (
    LOGGER,
    SECOND,
    SKEW_MARGIN,
    BackfillNotPendingError,
    Loaded,
    Part,
    WindowLoad,
)
from target_orb.backfill.windows import Window, group_by_window, instant
from target_orb.errors import DeliveryAbortedError, OrbFatalError
from target_orb.mapping.timestamps import format_orb
from target_orb.mapping.track import backfill_threshold
from target_orb.orb.delivery import Deliverer
from target_orb.orb.search import search_existing
from target_orb.pipeline.deadletter import DeadLetterEntry, entry
from target_orb.pipeline.gate import JobResult
from target_orb.state.digests import amendment_body, body_digest
from target_orb.state.ledger import Write, describe

if t.TYPE_CHECKING:
    from target_orb.pipeline.gate import Job

_UTC = datetime.timezone.utc

# Orb's live /ingest answer for an event past the grace period (the stand-in says "older than
# the grace period ... use a backfill"; Orb documents only "validation errors").
_TOO_OLD = re.compile(r"grace|too old|older than|backfill", re.IGNORECASE)


# ----------------------------------------------------------------------------- manager


class BackfillManager(IssuedPolicy):
    """Creates, continues and closes backfills and loads late events into them.

    Thread-safe: loads run as pipeline jobs on the delivery threads. One instance per run.
    """

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
                    # Counted when the live request went out (Deliverer); each counts again
                    # in the request that sends it into a backfill, and once in all.
                    self._stats.events_sent -= len(old)
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
        when = instant(event.get("timestamp"))
        return when is not None and when < threshold

    # -- delivery threads --------------------------------------------------------

    def _window_load(self, window: Window) -> WindowLoad:
        with self._lock:
            load = self._windows.get(window)
            if load is None:
                load = self._windows[window] = WindowLoad(window)
            return load

    def _load(
        self, stream: str, events: list[dict[str, t.Any]], records: list[t.Any]
    ) -> Loaded:
        total = Loaded()
        for window, indexes in group_by_window(events).items():
            load = self._window_load(window)
            self._check_window(load)
            part = Part(stream, [events[i] for i in indexes], [records[i] for i in indexes])
            self._hold_until_past_boundary(part)
            done = self._load_window(load, part)
            total.accepted += done.accepted
            total.rejected.extend(done.rejected)
            total.requests += done.requests
        return total

    def _learn_edge(self, refused: t.Sequence[dict[str, t.Any]]) -> None:
        """Orb refused these events live as older than its grace period, so its boundary is
        past them: a backfill may end at the second after the newest. Waits 1.5 s so Orb's
        boundary has also passed that rounded-up second before anything is created."""
        newest = max(
            (w for w in (instant(e.get("timestamp")) for e in refused) if w is not None),
            default=None,
        )
        if newest is None:
            return
        edge = newest.replace(microsecond=0) + SECOND
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

    def _hold_until_past_boundary(self, part: Part) -> None:
        """Wait until the grace boundary has passed every event of `part`.

        A late event newer than the boundary (late by this machine's clock, but inside the
        skew margin; or refused by Orb's live ingest as too old while this machine's clock
        says it is not) cannot go into a backfill yet: its job waits, so STATE does not move
        past it, and it is loaded as soon as a backfill can hold it.
        """
        newest = max(
            (w for w in (instant(e.get("timestamp")) for e in part.events) if w is not None),
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

    def _load_window(self, load: WindowLoad, part: Part) -> Loaded:
        """Search, then ingest what Orb does not hold yet into the window's backfill.

        Keys are claimed per window so two jobs never send one key into a backfill at once;
        a job that meets a key another job is sending waits for that send to settle.
        """
        done = Loaded()
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
        self, load: WindowLoad, part: Part, mine: list[int], done: Loaded, acked: list[str]
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
        self, load: WindowLoad, part: Part, mine: list[int], done: Loaded, acked: list[str]
    ) -> None:
        events = part.events
        window = load.window
        todo = self._not_delivered(part, mine, acked)
        send = self._not_in_orb(load, part, todo, done, acked)
        send, issued = self._issued_policy_apply(load, part, send, done)
        if not send:
            return  # nothing new: no backfill is created for it
        newest = max(t.cast("datetime.datetime", instant(events[i]["timestamp"])) for i in send)
        deliverer = self._ensure_backfill(load, newest)
        batch = [events[i] for i in send]
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

    def _not_in_orb(
        self, load: WindowLoad, part: Part, todo: list[int], done: Loaded, acked: list[str]
    ) -> list[int]:
        """`todo` less the keys Orb's search finds in the window (counted, acked)."""
        events = part.events
        keys = [events[i]["idempotency_key"] for i in todo]
        if not keys:
            return todo
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
            timeframe_start=window.start, timeframe_end=max(end, window.start + SECOND),
            limiter=self._write_limiter, on_request=count_search,
        )
        done.requests += searches
        send = [i for i in todo if events[i]["idempotency_key"] not in found]
        already = len(todo) - len(send)
        acked.extend(k for k in keys if k in found)
        if already:
            with self._stats.lock:
                self._stats.already_in_orb += already
            with load.lock:
                load.already += already
        return send

    def _not_delivered(self, part: Part, mine: list[int], acked: list[str]) -> list[int]:
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
                except (OSError, OrbFatalError) as exc:
                    LOGGER.error("Could not update the backfill record: %s", exc)
        if not failed:
            self._close_leftovers(closer)
        self._report()

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
            (w.start, min(w.end, max(boundary, w.start + SECOND)), n)
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


