"""A window's backfills: create, continue, rotate, retire; conflicts and leftovers."""

from __future__ import annotations

import datetime
import hashlib
import typing as t
from urllib.parse import quote

from target_orb import jsonutil
from target_orb.backfill.requests import (
    BACKFILLS_PATH,
    CLOSE_AFTER,
    LOGGER,
    MAX_CREATE_ATTEMPTS,
    MAX_ROTATIONS,
    PENDING,
    SECOND,
    BackfillNotPendingError,
    BackfillRequests,
    WindowLoad,
)
from target_orb.backfill.windows import Window, instant
from target_orb.errors import OrbFatalError
from target_orb.mapping.timestamps import format_orb
from target_orb.orb.answers import Outcome, classify, orb_error_summary, refuses_backfill
from target_orb.orb.delivery import Deliverer, Response


class BackfillLifecycle(BackfillRequests):
    """A window's backfills in Orb: create (resolving conflicts), use, rotate, retire, close."""

    def _check_window(self, load: WindowLoad) -> None:
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

    def _ensure_backfill(self, load: WindowLoad, newest: datetime.datetime) -> Deliverer:
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
    def _current(load: WindowLoad, newest: datetime.datetime) -> Deliverer | None:
        with load.lock:
            if load.deliverer is not None and load.end is not None and newest < load.end:
                return load.deliverer
        return None

    def _retire(self, load: WindowLoad, why: str) -> None:
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
        self, load: WindowLoad, backfill_id: str, key: str, end: datetime.datetime
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

    def _rotate(self, load: WindowLoad, gone: str, exc: BackfillNotPendingError) -> None:
        """Replace the window's backfill `gone`, which Orb says takes no more events."""
        with self._one_at_a_time(), self._creation_lock(load.window):
            if load.backfill_id != gone:
                return  # another job already replaced it
            current = self._fetch(gone)
            close = instant(current.get("close_time"))
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

    def _clear_overlaps(self, window: Window, *, refresh: bool) -> None:
        """Deal with every pending backfill overlapping `window` before creating one.

        Ours (in the record): closed, then waited for until Orb reflected it. Another's
        that is already past its close time (being reflected or reverted): waited for.
        Another's that is open: the run stops, naming it.
        """
        now = self._now()
        for backfill in self._pending_backfills(refresh=refresh):
            start = instant(backfill.get("timeframe_start"))
            end = instant(backfill.get("timeframe_end"))
            if start is None or end is None or not window.overlaps(start, end):
                continue
            bid = str(backfill.get("id"))
            if any(w.backfill_id == bid for w in self._loads()):
                continue  # created by this run for another window (windows do not overlap)
            close = instant(backfill.get("close_time"))
            owned = self.record.owner_entry(backfill)
            open_ = backfill.get("status") == "pending" and (close is None or close > now)
            if owned is None and (job := self.record.other_job(backfill)) is not None:
                self._wait_other_job(backfill, job, window)  # never written into or closed
            elif owned is not None:
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
                        instant(b.get("timeframe_start")) or window.end,
                        instant(b.get("timeframe_end")) or window.start,
                    )
                ]

    def _resolve_conflict(self, load: WindowLoad, refusal: Response) -> bool:
        """Orb refused a create: clear what may be in its way. Returns whether anything was.

        Orb allows no backfill overlapping a pending one (orb-billing 4.90
        `events/backfills.py`, create), and its support pages say a new backfill cannot be
        created while another is still being reflected. So a pending backfill of target-orb's
        own (this run's, of another window or an earlier timeframe; or one the ownership
        record names) is closed and waited for, whatever its timeframe; from then on the run
        keeps one backfill pending at a time. Another's that is closing is waited for. An
        open one of another's stops the run, naming it.
        """
        this_run = {w.backfill_id: w for w in self._loads() if w.backfill_id is not None}
        cleared = False
        foreign_open: dict[str, t.Any] | None = None
        for backfill in self._pending_backfills(refresh=True):
            if self._clear_pending(load.window, backfill, this_run):
                cleared = True
            else:
                foreign_open = backfill
        if not cleared and foreign_open is not None:
            raise OrbFatalError(self._blocked_message(load.window, refusal, foreign_open))
        return cleared

    def _clear_pending(
        self, window: Window, backfill: dict[str, t.Any], this_run: dict[str, WindowLoad]
    ) -> bool:
        """Clear one pending backfill out of the way of `window`'s create: close and wait for
        one of target-orb's own, wait for a closing one of another's. False: another's open
        backfill that does not overlap `window` (it may be what blocks the create); another's
        open one that overlaps stops the run."""
        bid = str(backfill.get("id"))
        start = instant(backfill.get("timeframe_start"))
        end = instant(backfill.get("timeframe_end"))
        overlaps = start is not None and end is not None and window.overlaps(start, end)
        close = instant(backfill.get("close_time"))
        open_ = backfill.get("status") == "pending" and (close is None or close > self._now())
        other = this_run.get(bid)
        owned = other is not None or self.record.owner_entry(backfill) is not None
        if not owned and (job := self.record.other_job(backfill)) is not None:
            self._wait_other_job(backfill, job, window)  # another job's: waited for
            return True
        if owned and not overlaps:
            self._single = True
            LOGGER.warning(
                "Orb refused a backfill for %s while target-orb's backfill %s is pending: "
                "from now on this run keeps one backfill pending at a time.",
                window.label, bid,
            )
        if other is not None:
            self._retire(other, "Orb takes one pending backfill at a time")
        elif owned:
            if open_:
                self._close(bid)
            self._wait_settled(bid, window)
            self.record.update("", self._now(), id=bid, state="closed")
        elif not open_:
            self._wait_settled(bid, window)
        elif overlaps:
            raise OrbFatalError(self._foreign_message(backfill, window))
        else:
            return False
        return True

    def _wait_other_job(self, backfill: t.Mapping[str, t.Any], job: str, window: Window) -> None:
        """Wait until Orb no longer lists another job's backfill as pending: that job closes
        it when its run ends, or Orb at its close_time. Never written into, never closed."""
        bid = str(backfill.get("id"))
        close = instant(backfill.get("close_time"))
        # Two jobs each waiting for the other's backfill would wait until the close times:
        # a job that waits holds no pending backfill (what it loaded is reflected meanwhile).
        self._single = True
        for load in self._loads():
            if load.backfill_id is not None and load.backfill_id != bid:
                self._retire(load, f"target-orb job {job!r} has backfill {bid} pending")
        LOGGER.warning(
            "Backfill %s (%s..%s) overlapping %s was created by target-orb job %r, which "
            "shares this store; waiting until Orb has reflected it (that job closes it when "
            "its run ends; Orb at its close time %s).",
            bid, backfill.get("timeframe_start"), backfill.get("timeframe_end"), window.label,
            job, backfill.get("close_time"),
        )
        delay = 0.5
        while True:
            current = self._fetch(bid)
            if current.get("status") not in PENDING:
                return
            late = close is not None and self._now() > close + datetime.timedelta(
                seconds=self._budget
            )
            if late or self._aborted():
                msg = (
                    f"Backfill {bid} of target-orb job {job!r} overlapping {window.label} is "
                    f"still {current.get('status')} in Orb past its close time "
                    f"{backfill.get('close_time')}. Nothing of this window was sent and no "
                    "STATE was written past it; rerun once Orb shows it `reflected`."
                )
                raise OrbFatalError(msg)
            self._sleep(delay)
            delay = min(delay * 2, 5.0)

    @staticmethod
    def _blocked_message(
        window: Window, refusal: Response, foreign: t.Mapping[str, t.Any]
    ) -> str:
        other_id = foreign.get("id")
        return (
            f"Orb refused target-orb's backfill for {window.label} "
            f"({orb_error_summary(refusal.body, 200)}) while backfill {other_id} "
            f"({foreign.get('timeframe_start')} to {foreign.get('timeframe_end')}, "
            f"closes at {foreign.get('close_time')}), which target-orb did not create, "
            "is pending. target-orb never closes another tool's or a person's backfill: "
            "nothing of this window was sent and no STATE was written past it. Wait until "
            f"it closes at {foreign.get('close_time')} (or close it: POST "
            f"/v1/events/backfills/{other_id}/close, if whoever created it has finished), then "
            "rerun."
        )

    def _create(self, load: WindowLoad) -> tuple[str, str, datetime.datetime]:
        """Create the window's next backfill; returns (id, Idempotency-Key, timeframe_end).

        Its timeframe ends at the window's end or at the grace boundary, whichever is first.
        Creates are made one at a time; one Orb refuses because of a pending backfill
        target-orb owns closes that backfill, waits until Orb reflected it, and tries again.
        """
        window = load.window
        with self._create_lock:
            for attempt in range(MAX_CREATE_ATTEMPTS):
                payload, key, end = self._create_payload(window, attempt)
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
        backfill_id = self._accept_created(body, key)
        LOGGER.info(
            "Created backfill %s for %s..%s (replace_existing_events: false, close_time %s).",
            backfill_id, payload["timeframe_start"], payload["timeframe_end"],
            payload["close_time"],
        )
        with self._stats.lock:
            self._stats.backfills_created += 1
        return backfill_id, key, end

    def _create_payload(
        self, window: Window, attempt: int
    ) -> tuple[dict[str, t.Any], str, datetime.datetime]:
        """The create's body, its Idempotency-Key and timeframe end; the intent is written
        to the ownership record (fsynced) before the request."""
        now = self._now().replace(microsecond=0)
        end = min(window.end, self.boundary(now))
        payload = {
            "timeframe_start": format_orb(window.start),
            "timeframe_end": format_orb(end),
            # A later attempt (after a conflict was resolved) must not replay the earlier
            # answer: its payload, and so its key, differs by the close time.
            "close_time": format_orb(now + CLOSE_AFTER + attempt * SECOND),
            # Sent explicitly: Orb's default is true (replace every customer's events).
            "replace_existing_events": False,
        }
        # The key also carries how many creates the ownership record already holds for this
        # window: a create made in the same second as an earlier one of this window (after
        # Orb closed that one) must get a new backfill, not Orb's stored answer for the
        # earlier create. A retry of one create reuses its key.
        made = sum(
            1 for e in self.record.entries()
            if e.get("timeframe_start") == payload["timeframe_start"]
        )
        # Jobs sharing a store never share a key (Orb would answer both with one backfill).
        who = [payload, made, self.record.job_name] if self.record.job_name else [payload, made]
        digest = hashlib.sha256(jsonutil.dumps_sorted(who)).hexdigest()
        key = f"target-orb-backfill-{digest[:44]}"
        self.record.add_intent(payload, key, now)
        return payload, key, end

    def _accept_created(self, body: dict[str, t.Any], key: str) -> str:
        """Record the backfill Orb made; a replacing one (never asked for) is reverted."""
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
        return backfill_id

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
                    close = instant(item.get("close_time"))
                    if close is not None and close <= self._now():
                        self.record.update(item["idempotency_key"], self._now(), state="closed")
        except Exception as exc:  # noqa: BLE001 - a leftover closes at its close_time anyway
            LOGGER.warning("Could not close backfills left by an earlier run: %s", exc)
