"""Run counters, the progress line and the end-of-run summary."""

from __future__ import annotations

import collections
import threading
import time
import typing as t


class RunStats:
    """Counters for one run. Read-path counters are touched only by the reading thread;
    delivery counters are updated under a lock by the delivery threads."""

    def __init__(self, clock: t.Callable[[], float] = time.monotonic) -> None:
        """Start the clock.

        Args:
            clock: Monotonic seconds.
        """
        self._clock = clock
        self.started = clock()
        self.lock = threading.Lock()
        self.records_read = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.invalid: collections.Counter[str] = collections.Counter()
        self.keys_derived = 0
        self.duplicates_collapsed = 0
        self.events_sent = 0
        self.events_accepted = 0
        self.rejected_by_orb = 0
        self.dead_lettered = 0
        # Already in the dead-letter file for the same reason (not appended again).
        self.already_dead_lettered = 0
        self.retries = 0
        self.requests = 0
        self.pending = 0
        # late_event_policy: backfill (target_orb/backfill/manager.py)
        self.late_events = 0  # late events read (mapped, routed to backfills)
        self.late_rerouted = 0  # live events Orb rejected as too old, routed to backfills
        self.already_in_orb = 0  # late events whose key Orb already held (not sent)
        self.already_delivered = 0  # late events target-orb delivered before (the store)
        self.late_held = 0  # late events held until the grace boundary had passed them
        # (customer, window, invoice, action) → late events in a period Orb already invoiced
        self.issued_period_events: collections.Counter[tuple[str, str, str, str]] = (
            collections.Counter()
        )
        self.events_backfilled = 0  # events Orb acknowledged into a backfill
        self.backfills_created = 0
        self.backfills: list[dict[str, t.Any]] = []  # every backfill the run created
        self.backfill_plan: list[dict[str, t.Any]] = []  # dry run: windows and counts
        # Identify → customer metadata (identify_policy: customer_metadata).
        self.identifies_read = 0
        self.identifies_skipped: collections.Counter[str] = collections.Counter()
        self.customers_updated = 0
        self.identify_updates_merged = 0
        self.customers_not_found = 0

    def add_sent(self, events: int) -> None:
        """Count events going to Orb in a request (the Deliverer calls this, once per send)."""
        with self.lock:
            self.events_sent += events

    def add_retry(self) -> None:
        """Count one retry (called from delivery threads)."""
        with self.lock:
            self.retries += 1

    def progress_line(self) -> str:
        """One line for the periodic progress log.

        Returns:
            The text.
        """
        elapsed = max(self._clock() - self.started, 1e-9)
        return (
            f"Progress: {self.records_read} records read, {self.events_accepted} events "
            f"accepted ({self.events_accepted / elapsed:.0f}/s), {self.pending} pending, "
            f"{self.retries} retries, {self.dead_lettered} dead-lettered."
        )

    def as_dict(self) -> dict[str, t.Any]:
        """Structured metrics for the summary.

        Returns:
            Counters by name.
        """
        return {
            "records_read": self.records_read,
            "events_sent": self.events_sent,
            "events_accepted": self.events_accepted,
            "duplicates_collapsed": self.duplicates_collapsed,
            "skipped": dict(self.skipped),
            "invalid": dict(self.invalid),
            "rejected_by_orb": self.rejected_by_orb,
            "dead_lettered": self.dead_lettered,
            "already_dead_lettered": self.already_dead_lettered,
            "keys_derived": self.keys_derived,
            "requests": self.requests,
            "retries": self.retries,
            "seconds": round(self._clock() - self.started, 3),
        } | self._backfill_dict() | self._identify_metrics()

    def _backfill_dict(self) -> dict[str, t.Any]:
        if not (self.late_events or self.late_rerouted or self.backfills or self.backfill_plan):
            return {}
        out: dict[str, t.Any] = {
            "late_events": self.late_events,
            "late_rerouted": self.late_rerouted,
            "already_in_orb": self.already_in_orb,
            "already_delivered": self.already_delivered,
            "late_held": self.late_held,
            "events_backfilled": self.events_backfilled,
            "backfills": list(self.backfills),
            "issued_periods": [
                {"customer": c, "window": w, "invoice": i, "action": a, "events": n}
                for (c, w, i, a), n in sorted(self.issued_period_events.items())
            ],
        }
        if self.backfill_plan:
            out["backfill_plan"] = list(self.backfill_plan)
        return out

    def _identify_metrics(self) -> dict[str, t.Any]:
        if not self.identifies_read:
            return {}
        return {
            "identify": {
                "identifies_read": self.identifies_read,
                "customers_updated": self.customers_updated,
                "updates_merged": self.identify_updates_merged,
                "customers_not_found": self.customers_not_found,
                "skipped": dict(self.identifies_skipped),
            },
        }

    def summary(self, *, dead_letter_path: str | None, dry_run: bool, failed: bool) -> str:
        """The end-of-run block for stderr.

        Args:
            dead_letter_path: Shown when dead letters were written.
            dry_run: Mark the summary as a dry run.
            failed: Mark the summary as the summary of a failed run.

        Returns:
            Multi-line text.
        """
        head = "target-orb summary"
        if dry_run:
            head += " (DRY RUN: nothing was sent, no STATE written)"
        if failed:
            head += " (RUN FAILED: see the error above)"
        lines = [
            head,
            f"  records read:          {self.records_read}",
            f"  events sent:           {self.events_sent}",
            f"  events accepted:       {self.events_accepted}",
            f"  duplicates collapsed:  {self.duplicates_collapsed}",
            f"  skipped:               {_by_reason(self.skipped)}",
            f"  invalid:               {_by_reason(self.invalid)}",
            f"  rejected by Orb:       {self.rejected_by_orb}",
            f"  requests / retries:    {self.requests} / {self.retries}",
        ]
        lines += self._backfill_lines()
        if self.identifies_read:
            lines += [
                f"  identifies read:       {self.identifies_read}",
                f"  customers updated:     {self.customers_updated}",
                f"  updates merged:        {self.identify_updates_merged}",
                f"  customers not found:   {self.customers_not_found}",
                f"  identifies skipped:    {_by_reason(self.identifies_skipped)}",
            ]
        lines += self._tail_lines(dead_letter_path)
        return "\n".join(lines)

    def _backfill_lines(self) -> list[str]:
        """The summary's lines about late events, backfills and the dry run's plan."""
        lines: list[str] = []
        if self.late_events or self.late_rerouted or self.backfills:
            lines.append(
                f"  late events:           {self.late_events} (+{self.late_rerouted} Orb "
                "rejected as too old) -> backfills",
            )
            lines.append(f"  already in Orb:        {self.already_in_orb} (not sent again)")
            if self.already_delivered:
                lines.append(
                    f"  already delivered:     {self.already_delivered} (by target-orb before; "
                    "not sent again)",
                )
            lines.append(f"  events backfilled:     {self.events_backfilled}")
            for (customer, window, invoice, action), n in sorted(
                self.issued_period_events.items()
            ):
                lines.append(
                    f"  issued period:         {n} events of customer {customer} in {window}, "
                    f"invoice {invoice} already issued: {action} (Orb does not re-bill it)",
                )
            for row in self.backfills:
                lines.append(
                    f"  backfill {row['id']}: {row['timeframe_start']}..{row['timeframe_end']}"
                    f", {row['events']} events, {row['status']}",
                )
        for row in self.backfill_plan:
            lines.append(
                f"  backfill plan: {row['timeframe_start']}..{row['timeframe_end']}, "
                f"{row['events']} events",
            )
        return lines

    def _tail_lines(self, dead_letter_path: str | None) -> list[str]:
        """The summary's last lines: derived keys and dead letters."""
        lines: list[str] = []
        if self.keys_derived:
            lines.append(f"  keys derived (no key): {self.keys_derived}")
        if self.dead_lettered and dead_letter_path:
            lines.append(f"  dead-lettered:         {self.dead_lettered} -> {dead_letter_path}")
        if self.already_dead_lettered and dead_letter_path:
            lines.append(
                f"  already dead-lettered: {self.already_dead_lettered} (same record and reason "
                f"already in {dead_letter_path}; not appended again)"
            )
        return lines


def _by_reason(counter: collections.Counter[str]) -> str:
    """`0`, or the total and each reason's count (`3 (a: 1, b: 2)`)."""
    if not counter:
        return "0"
    items = ", ".join(f"{k}: {v}" for k, v in sorted(counter.items()))
    return f"{sum(counter.values())} ({items})"
