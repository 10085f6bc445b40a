"""Windows: a late event belongs to the calendar month (UTC) of its timestamp."""

from __future__ import annotations

import datetime
import typing as t
from dataclasses import dataclass

from target_orb.mapping.timestamps import TimestampError, format_orb, to_utc

_UTC = datetime.timezone.utc


def utcnow() -> datetime.datetime:
    """The current time, aware UTC."""
    return datetime.datetime.now(_UTC)


@dataclass(frozen=True, slots=True, order=True)
class Window:
    """One backfill timeframe: a calendar month, UTC, `[start, end)`."""

    start: datetime.datetime
    end: datetime.datetime

    @property
    def label(self) -> str:
        """`2024-03-01T00:00:00Z..2024-04-01T00:00:00Z`."""
        return f"{format_orb(self.start)}..{format_orb(self.end)}"

    def overlaps(self, start: datetime.datetime, end: datetime.datetime) -> bool:
        """Whether `[start, end)` shares any instant with this window."""
        return start < self.end and self.start < end


def month_window(year: int, month: int) -> Window:
    """The window of one calendar month (UTC).

    Args:
        year: Year.
        month: Month 1-12.

    Returns:
        `[first of the month, first of the next month)`.
    """
    start = datetime.datetime(year, month, 1, tzinfo=_UTC)
    end = (
        datetime.datetime(year + 1, 1, 1, tzinfo=_UTC)
        if month == 12
        else datetime.datetime(year, month + 1, 1, tzinfo=_UTC)
    )
    return Window(start, end)


_WINDOWS: dict[str, Window] = {}


def window_of(timestamp: str) -> Window:
    """The window of an Orb event timestamp (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, as mapped).

    Args:
        timestamp: The event's `timestamp` as sent to Orb.

    Returns:
        Its calendar-month window.
    """
    prefix = timestamp[:7]
    window = _WINDOWS.get(prefix)
    if window is None:
        window = month_window(int(prefix[:4]), int(prefix[5:7]))
        _WINDOWS[prefix] = window
    return window


def group_by_window(events: t.Sequence[dict[str, t.Any]]) -> dict[Window, list[int]]:
    """Indexes of `events` by window, windows in time order.

    Args:
        events: Mapped Orb events.

    Returns:
        window → indexes (input order).
    """
    groups: dict[Window, list[int]] = {}
    for index, event in enumerate(events):
        groups.setdefault(window_of(event["timestamp"]), []).append(index)
    return dict(sorted(groups.items()))


def instant(value: t.Any) -> datetime.datetime | None:
    """An Orb timestamp as aware UTC, or None when absent or unreadable."""
    if value is None:
        return None
    try:
        return to_utc(value)
    except TimestampError:
        return None
