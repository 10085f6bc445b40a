"""``POST /v1/events/search`` for the stand-in Orb."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fake_orb.common import (
    _Outcome,
    _Request,
    fmt_time,
    parse_datetime,
    parse_event_timestamp,
    schema_errors,
    validation_failed,
)
from fake_orb.store import EventStore

#: Orb: search looks back one week unless given a timeframe_start.
SEARCH_DEFAULT_LOOKBACK = timedelta(days=7)


class Search(EventStore):
    """Search by event id (case-sensitive), never finding an amended event."""

    def _http_search(self, req: _Request) -> _Outcome:
        refusal = self._no_query(req)
        body, refusal = (None, refusal) if refusal else self._json_body(req)
        if refusal is not None:
            return refusal
        errors = schema_errors("EventSearchCriteria", body)
        if errors:
            return validation_failed(errors)
        now = self.now()
        try:
            start = (
                parse_datetime(body["timeframe_start"])
                if body.get("timeframe_start") is not None
                else now - SEARCH_DEFAULT_LOOKBACK
            )
            end = (
                parse_datetime(body["timeframe_end"])
                if body.get("timeframe_end") is not None
                else now
            )
        except ValueError as exc:
            return validation_failed([str(exc)])
        if not start < end:
            return validation_failed(
                [f"timeframe_start {fmt_time(start)} must be before timeframe_end {fmt_time(end)}"]
            )
        return _Outcome(200, {"data": self.search(body["event_ids"], start, end)})

    def search(
        self, event_ids: list[str], start: datetime | None = None, end: datetime | None = None
    ) -> list[dict[str, Any]]:
        """What ``POST /v1/events/search`` answers: the events Orb holds with these ids
        (case-sensitive) and a timestamp in [start, end), never an amended one."""
        self._tick()
        now = self.now()
        start = start or now - SEARCH_DEFAULT_LOOKBACK
        end = end or now
        out = []
        with self.lock:
            recs = [r for k in set(event_ids) for r in self._by_key.get(k, ())]
            for rec in sorted(recs, key=lambda r: r.seq):
                if rec.versions:
                    continue
                ev = rec.original
                when = parse_event_timestamp(ev["timestamp"])
                if not start <= when < end:
                    continue
                cid, ext = self._who(ev)
                out.append(
                    {
                        "id": rec.key,
                        "customer_id": cid,
                        "external_customer_id": ext,
                        "event_name": ev["event_name"],
                        "properties": dict(ev["properties"]),
                        "timestamp": fmt_time(when),
                        "deprecated": rec.deprecated is not None,
                    }
                )
        return out
