"""Customer metadata updates: one PUT per customer per batch, in order, behind the STATE gate.

Each merged update is one pipeline job (`Pipeline.submit_job`), so STATE waits for it like
for an ingest request. Jobs run concurrently; two updates of one customer are kept in input
order by a per-customer chain: a job waits for the previous update of its customer to settle
before it sends, and never sends when that one failed.
"""

from __future__ import annotations

import logging
import threading
import typing as t
from dataclasses import dataclass, field
from urllib.parse import quote

from target_orb import jsonutil
from target_orb.errors import DeliveryAbortedError, OrbFatalError
from target_orb.mapping.traits import MergedUpdate, Update, merge_updates
from target_orb.orb.answers import (
    API_KEY_HINT,
    API_URL_HINT,
    Answer,
    classify_answer,
    config_hint,
    orb_error_summary,
)
from target_orb.pipeline.deadletter import DeadLetterEntry, entry
from target_orb.pipeline.gate import JobResult

if t.TYPE_CHECKING:
    from target_orb.orb.client import OrbClient
    from target_orb.orb.delivery import Deliverer, Limiter, Response
    from target_orb.pipeline.gate import Pipeline
    from target_orb.pipeline.stats import RunStats

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.customers")
_WAIT_STEP = 0.05  # seconds between checks for a shutdown while waiting for an earlier update
_ABORT_GRACE = 10.0  # seconds to let a failed earlier update report its own error first


@dataclass(slots=True)
class _Ticket:
    """One update's place in its customer's chain; `ok` is valid once `done` is set."""

    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False


class _CustomerChains:
    """The last queued update of each customer (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, _Ticket] = {}

    def take(self, customer: str) -> tuple[_Ticket | None, _Ticket]:
        """A new ticket behind the customer's previous one (taken in input order)."""
        ticket = _Ticket()
        with self._lock:
            previous = self._last.get(customer)
            self._last[customer] = ticket
        return previous, ticket

    def settle(self, customer: str, ticket: _Ticket, *, ok: bool) -> None:
        """Release the next update of this customer (after `ok` is recorded)."""
        ticket.ok = ok
        with self._lock:
            if self._last.get(customer) is ticket:
                del self._last[customer]
        ticket.done.set()


class CustomerUpdater:
    """Turns a batch's Identify updates into ordered customer metadata PUTs."""

    def __init__(
        self,
        *,
        client: OrbClient | None,
        deliverer: Deliverer | None,
        pipeline: Pipeline,
        limiter: Limiter,
        stats: RunStats,
        api_url: str,
    ) -> None:
        """Wire the updater.

        Args:
            client: The Orb client; None in dry-run mode (nothing is sent).
            deliverer: Retries each PUT under the ingest rules; None in dry-run mode.
            pipeline: Runs the jobs behind the STATE gate.
            limiter: Orb's "other writes" budget, shared with other non-ingest writes.
            stats: Run counters.
            api_url: For messages and dry-run logs.
        """
        self._client = client
        self._deliverer = deliverer
        self._pipeline = pipeline
        self._limiter = limiter
        self._stats = stats
        self._api_url = api_url
        # Our messages and retry logs name the endpoint, not the customer (ids can be emails);
        # Orb's own error summary is quoted as Orb wrote it.
        self._what = f"PUT {api_url}{CUSTOMER_PATH}{{id}}"
        self._chains = _CustomerChains()

    def submit(self, stream: str, items: t.Sequence[tuple[Update, t.Any]]) -> None:
        """Merge one batch's updates per customer and queue one PUT each.

        Args:
            stream: Stream name.
            items: (update, source record) in input order.
        """
        merged = merge_updates([update for update, _ in items])
        with self._stats.lock:
            self._stats.identify_updates_merged += len(items) - len(merged)
        for update in merged:
            parts = [items[i] for i in update.indexes]
            if self._client is None:
                LOGGER.info(
                    "DRY RUN: would PUT %s%s with %s (%d Identify record(s)).",
                    self._api_url, customer_path(update.customer),
                    jsonutil.dumps_str({"metadata": update.metadata}), len(parts),
                )
                continue
            previous, ticket = self._chains.take(update.customer)
            try:
                self._pipeline.submit_job(
                    stream, self._job(stream, update, parts, previous, ticket), len(parts)
                )
            except BaseException:
                self._chains.settle(update.customer, ticket, ok=False)
                raise

    def _job(
        self,
        stream: str,
        update: MergedUpdate,
        parts: list[tuple[Update, t.Any]],
        previous: _Ticket | None,
        ticket: _Ticket,
    ) -> t.Callable[[], JobResult]:
        def run() -> JobResult:
            ok = False
            try:
                if previous is not None:
                    self._wait_for(previous)
                result = self._apply(stream, update, parts)
                ok = True
                return result
            finally:
                self._chains.settle(update.customer, ticket, ok=ok)

        return run

    def _wait_for(self, previous: _Ticket) -> None:
        """Block until the customer's previous update settled; never overtake a failure."""
        pipeline = self._pipeline
        while not previous.done.wait(_WAIT_STEP):
            if pipeline.abort.is_set():
                raise DeliveryAbortedError("delivery aborted before a customer update was sent")
        if not previous.ok:
            # The earlier update failed and is failing the run; let its error be the one
            # reported, then stop without sending (sending would apply updates out of order).
            pipeline.sleep(_ABORT_GRACE)
            raise DeliveryAbortedError("an earlier update of the same customer failed")

    def _send(self, customer: str, metadata: dict[str, str | None]) -> tuple[Response, int]:
        client, deliverer = self._client, self._deliverer
        assert client is not None
        assert deliverer is not None
        path = customer_path(customer)
        body = {"metadata": metadata}  # exactly this: no other customer field, never null
        attempts = 0

        def once() -> Response:
            nonlocal attempts
            attempts += 1
            return client.call("PUT", path, body=body)

        response = deliverer.request(once, what=self._what, limiter=self._limiter)
        return response, attempts

    def _apply(
        self, stream: str, update: MergedUpdate, parts: list[tuple[Update, t.Any]]
    ) -> JobResult:
        response, requests = self._send(update.customer, update.metadata)
        answer = classify_answer(response.status, response.body)
        if answer is Answer.REJECTED and len(parts) > 1:
            # One merged PUT was refused: apply the records one by one, in input order, so
            # only the update Orb refuses is set aside (as ingest isolates one bad event).
            LOGGER.warning(
                "Orb refused a merged customer metadata update (HTTP %d, %s); sending its %d "
                "Identify records one by one to isolate the refused one.",
                response.status, orb_error_summary(response.body, 120), len(parts),
            )
            rejected: list[DeadLetterEntry] = []
            for own, record in parts:
                response, more = self._send(own.customer, own.metadata)
                requests += more
                rejected += self._settle(stream, response, [(own, record)])
            return JobResult(0, rejected, requests)
        return JobResult(0, self._settle(stream, response, parts), requests)

    def _settle(
        self, stream: str, response: Response, parts: list[tuple[Update, t.Any]]
    ) -> list[DeadLetterEntry]:
        answer = classify_answer(response.status, response.body)
        stats = self._stats
        if answer is Answer.DONE:
            with stats.lock:
                stats.customers_updated += 1
            return []
        if answer is Answer.FATAL:
            raise OrbFatalError(self._fatal_message(response, len(parts)))
        if answer is Answer.NOT_FOUND:
            with stats.lock:
                stats.customers_not_found += 1
            reason = (
                "Orb has no customer with this external_customer_id (HTTP 404 "
                "resource-not-found), so its metadata cannot be updated. Create the customer "
                "in Orb first, then replay this record "
                "(`python -m target_orb.deadletter replay`)."
            )
        else:
            reason = (
                f"Orb refused the customer metadata update (HTTP {response.status}): "
                f"{_orb_reason(response.body)}"
            )
        return [
            entry(
                stream, record, reason, "orb",
                {"external_customer_id": own.customer, "metadata": own.metadata},
            )
            for own, record in parts
        ]

    def _fatal_message(self, response: Response, count: int) -> str:
        status = response.status
        hint = config_hint(
            status,
            unauthorized="Orb rejected the API key. " + API_KEY_HINT,
            forbidden="The API key (`api_key`) is not allowed to update customers; check its "
            "permissions in Orb, or set `identify_policy: skip`.",
            not_found="Nothing answers at that URL. " + API_URL_HINT,
        )
        return (
            f"Orb answered HTTP {status} to {self._what} "
            f"({orb_error_summary(response.body, 160)}). {hint} {count} Identify record(s) "
            "were not applied and no STATE was written past them; rerun after fixing the "
            "setting."
        )


def _orb_reason(body: t.Any) -> str:
    """Orb's summary plus its `validation_errors`, truncated."""
    text = orb_error_summary(body)
    errors = body.get("validation_errors") if isinstance(body, t.Mapping) else None
    if isinstance(errors, list) and errors:
        text += "; " + "; ".join(
            e if isinstance(e, str) else jsonutil.dumps_lenient(e) for e in errors[:5]
        )
    return text if len(text) <= 500 else text[:499] + "…"


CUSTOMER_PATH = "/customers/external_customer_id/"


def customer_path(customer: str) -> str:
    """`/customers/external_customer_id/{id}` with the id URL-encoded (`/`, `?`, spaces,
    unicode: as orb-billing builds it, `path_template` in resources/customers/customers.py).

    Args:
        customer: The external customer id.

    Returns:
        The path under `api_url`.
    """
    return CUSTOMER_PATH + quote(customer, safe="")
