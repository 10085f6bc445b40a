"""The Orb calls corrections make (search, ingest, amend, deprecate), each already retried."""

from __future__ import annotations

import datetime
import typing as t
from urllib.parse import quote

if t.TYPE_CHECKING:
    from target_orb.orb.client import OrbClient
    from target_orb.orb.delivery import Deliverer, DeliveryResult, Limiter, Response


class OrbPort(t.Protocol):
    """The Orb calls corrections make, each already retried (`Deliverer` rules)."""

    def search(
        self, keys: list[str], start: datetime.datetime, end: datetime.datetime
    ) -> dict[str, dict[str, t.Any]]: ...
    def deliver(self, events: list[dict[str, t.Any]]) -> DeliveryResult: ...
    def amend(self, key: str, body: dict[str, t.Any]) -> Response: ...
    def deprecate(self, key: str) -> Response: ...


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
