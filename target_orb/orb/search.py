"""Which idempotency keys Orb already holds: `POST /v1/events/search`, 500 ids a call.

Used before ingesting into a backfill (keys Orb holds are left out, so a replay never
double-bills) and reusable for corrections (key → the Orb event, to compare bodies).
Reference: Orb API reference, Search events. Search matches ids case-sensitively, finds only
events that were not amended, defaults to the last week when no timeframe is given (so a
timeframe is always sent here), and is eventually consistent: an event ingested seconds ago,
or one in a backfill that is still pending, may not be found yet.
"""

from __future__ import annotations

import datetime
import typing as t

from target_orb.errors import OrbFatalError
from target_orb.mapping.timestamps import format_orb
from target_orb.orb.answers import Outcome, classify, orb_error_summary

if t.TYPE_CHECKING:
    from target_orb.orb.client import OrbClient
    from target_orb.orb.delivery import Deliverer, Limiter, Response

MAX_IDS_PER_SEARCH = 500  # EventSearchCriteria.event_ids: 1-500 items (Orb's OpenAPI spec)
SEARCH_PATH = "/events/search"

OrbEventRecord = dict[str, t.Any]
"""Orb's `Event`: `{id, customer_id, external_customer_id, event_name, properties,
timestamp, deprecated}` (`id` is the idempotency key)."""


def search_existing(
    client: OrbClient,
    deliverer: Deliverer,
    keys: t.Iterable[str],
    *,
    timeframe_start: datetime.datetime,
    timeframe_end: datetime.datetime,
    limiter: Limiter | None = None,
    on_request: t.Callable[[], None] | None = None,
) -> dict[str, OrbEventRecord]:
    """Look idempotency keys up in Orb; return the ones Orb holds.

    Each call carries at most 500 distinct keys and the given timeframe, goes through
    `deliverer.request` (ingest's retry rules and time budget) and draws from `limiter`
    (Orb's rate-limit page counts every POST/PUT/PATCH/DELETE but ingest as a write, search
    included).

    Args:
        client: The Orb client.
        deliverer: Retries for the call.
        keys: Idempotency keys (duplicates are looked up once).
        timeframe_start: Inclusive; must cover the events' timestamps.
        timeframe_end: Exclusive; must be after every event's timestamp.
        limiter: The writes budget (the runtime's `write_limiter`).
        on_request: Called once per search call made (for counters).

    Returns:
        key → Orb's event, for each key Orb holds in the timeframe (deprecated ones included,
        with `deprecated: true`). Keys Orb does not hold are absent.

    Raises:
        OrbFatalError: Orb refused the search with an answer that retrying cannot fix.
        ValueError: The timeframe is empty.
    """
    if timeframe_end <= timeframe_start:
        msg = f"empty search timeframe {timeframe_start} .. {timeframe_end}"
        raise ValueError(msg)
    wanted = list(dict.fromkeys(keys))
    found: dict[str, OrbEventRecord] = {}
    start = format_orb(timeframe_start)
    end = format_orb(timeframe_end)
    url = client.url(SEARCH_PATH)
    for offset in range(0, len(wanted), MAX_IDS_PER_SEARCH):
        chunk = wanted[offset : offset + MAX_IDS_PER_SEARCH]
        body = {"event_ids": chunk, "timeframe_start": start, "timeframe_end": end}

        def once(body: dict[str, t.Any] = body) -> t.Any:
            return client.call("POST", SEARCH_PATH, body=body)

        response = deliverer.request(once, what=f"POST {url}", limiter=limiter)
        if on_request is not None:
            on_request()
        asked = set(chunk)
        for item in _found_events(response, url, len(chunk), start, end):
            if isinstance(item, dict) and item.get("id") in asked:
                found[item["id"]] = item
    return found


def _found_events(response: Response, url: str, count: int, start: str, end: str) -> list[t.Any]:
    """The `data` of Orb's answer to one search, or the fatal error it means.

    Args:
        response: Orb's answer (after retries).
        url: The search URL, for messages.
        count: Keys looked up in this call.
        start: The timeframe's start, as sent.
        end: The timeframe's end, as sent.

    Returns:
        The events Orb returned.

    Raises:
        OrbFatalError: Orb refused the search, or its answer has no `data` list.
    """
    if classify(response.status) is not Outcome.OK or not isinstance(response.body, dict):
        msg = (
            f"Orb answered HTTP {response.status} to POST {url} "
            f"({orb_error_summary(response.body, 200)}) when target-orb looked up which "
            f"of {count} events it already holds (between {start} and {end}). "
            "Nothing of these events was sent and no STATE was written past them. Check "
            "that the API key may read events (`api_key`) and `api_url`, then rerun."
        )
        raise OrbFatalError(msg)
    data = response.body.get("data")
    if not isinstance(data, list):
        msg = (
            f"Orb's answer to POST {url} has no `data` list "
            f"({orb_error_summary(response.body, 200)}); cannot tell which events Orb "
            "already holds, so nothing of them was sent. Check `api_url` points at Orb."
        )
        raise OrbFatalError(msg)
    return data
