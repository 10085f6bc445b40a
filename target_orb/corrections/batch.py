"""One batch under `load_method: upsert`: decide each key, then ingest, amend, deprecate, ack."""

from __future__ import annotations

import datetime
import typing as t
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from target_orb.corrections.decisions import Action, customer_of, decide, orb_body, refusal_reason
from target_orb.errors import OrbFatalError
from target_orb.mapping.timestamps import TimestampError, parse_and_format
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
from target_orb.state.ledger import Write, describe

if t.TYPE_CHECKING:
    from target_orb.corrections.upsert import Upserter
    from target_orb.orb.delivery import Response

_ONE_SECOND = datetime.timedelta(seconds=1)


@dataclass(slots=True)
class Item:
    """One record under upsert: its key, the event it maps to, and whether it was deleted."""

    key: str
    event: dict[str, t.Any] | None  # None: a deleted record that only yielded its key
    record: t.Any
    deleted: bool = False
    late: bool = False  # older than the late-event threshold (matters for new keys only)


def event_time(event: t.Mapping[str, t.Any]) -> datetime.datetime | None:
    """The event's timestamp as an aware datetime (None if it cannot be read)."""
    try:
        return parse_and_format(event.get("timestamp"))[0]
    except (TimestampError, TypeError, ValueError):
        return None


def _customer_text(body: t.Mapping[str, t.Any] | None) -> str | None:
    customer = customer_of(body)
    return f"{customer[0]}:{customer[1]}" if customer else None


class BatchRun:
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


