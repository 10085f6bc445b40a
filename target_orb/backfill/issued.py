"""`issued_period_policy`: late events of a period whose invoice Orb has already issued.

Orb does not change or re-issue an issued invoice when a backfill closes (Orb's support pages
on backfills): such events are loaded and reported (`backfill`), dead-lettered naming the
invoice (`dead_letter`), or stop the run (`fail`). Layered between the lifecycle and the
manager (one object at run time).
"""

from __future__ import annotations

import logging
import typing as t

from target_orb.backfill.invoices import IssuedPeriod, issued_period_of
from target_orb.backfill.lifecycle import BackfillLifecycle
from target_orb.backfill.windows import Window
from target_orb.errors import OrbFatalError
from target_orb.mapping.timestamps import format_orb
from target_orb.pipeline.deadletter import entry

if t.TYPE_CHECKING:
    from target_orb.backfill.requests import Loaded, Part, WindowLoad

LOGGER = logging.getLogger("target_orb.backfill")


class IssuedPolicy(BackfillLifecycle):
    """Applies `issued_period_policy` to the events about to go into a backfill."""

    def _count_issued(
        self, event: t.Mapping[str, t.Any], window: Window, period: IssuedPeriod, action: str
    ) -> None:
        """Count one event of an issued period (caller holds the stats lock)."""
        customer = event.get("external_customer_id") or event.get("customer_id")
        row = (str(customer), window.label, period.invoice, action)
        self._stats.issued_period_events[row] += 1

    def _issued_policy_apply(
        self, load: WindowLoad, part: Part, send: list[int], done: Loaded
    ) -> tuple[list[int], dict[int, IssuedPeriod]]:
        """Apply `issued_period_policy` to the events about to be sent.

        Returns:
            The events still to send, and those of them that fall in an issued period.
        """
        if not load.issued:
            return send, {}
        events = part.events
        hits = {
            i: period for i in send
            if (period := issued_period_of(load.issued, events[i])) is not None
        }
        if not hits:
            return send, {}
        policy = self._issued_policy
        first = next(iter(hits.values()))
        customers = sorted({
            str(events[i].get("external_customer_id") or events[i].get("customer_id"))
            for i in hits
        })
        if policy == "fail":
            msg = (
                f"{len(hits)} late event(s) of customer(s) {', '.join(customers[:5])} fall in a "
                f"period Orb has already invoiced (invoice {first.invoice}, "
                f"{format_orb(first.start)}..{format_orb(first.end)}). Orb does not change or "
                "re-issue an issued invoice, so loading them would not bill them "
                "(`issued_period_policy: fail`). These events were not sent and no STATE was "
                "written past them. Decide with whoever owns billing: set "
                "`issued_period_policy: backfill` to load them for usage reporting (then "
                "adjust the invoice or issue a credit note in Orb), or `dead_letter` to keep "
                "them out of Orb and on record; then rerun."
            )
            raise OrbFatalError(msg)
        if policy == "dead_letter":
            with self._stats.lock:
                for i, period in hits.items():
                    self._count_issued(events[i], load.window, period, "dead-lettered")
            for i, period in hits.items():
                customer = events[i].get("external_customer_id") or events[i].get("customer_id")
                reason = (
                    f"Orb already issued invoice {period.invoice} for customer {customer} "
                    f"covering {format_orb(period.start)}..{format_orb(period.end)}; Orb does "
                    "not change or re-issue an issued invoice, so this late event would never "
                    "be billed (issued_period_policy: dead_letter). Adjust the invoice or "
                    "issue a credit note in Orb if it should be billed; to load it for usage "
                    "reporting, replay it with issued_period_policy: backfill."
                )
                done.rejected.append(entry(part.stream, part.records[i], reason, "orb", events[i]))
            return [i for i in send if i not in hits], {}
        LOGGER.warning(
            "%d late event(s) of customer(s) %s fall in a period Orb has already invoiced "
            "(e.g. invoice %s); loading them (issued_period_policy: backfill): Orb shows "
            "them in usage but does not re-bill an issued invoice.",
            len(hits), ", ".join(customers[:5]), first.invoice,
        )
        return send, hits

    # -- backfill lifecycle ------------------------------------------------------

    # -- end of run --------------------------------------------------------------

