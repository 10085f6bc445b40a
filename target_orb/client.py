"""Orb HTTP I/O: one pooled requests.Session, Bearer auth, explicit timeouts, TLS verified."""

from __future__ import annotations

import importlib.metadata
import logging
import typing as t

import requests
from requests.adapters import HTTPAdapter

from target_orb import jsonutil
from target_orb.delivery import Response, TransportError
from target_orb.errors import OrbFatalError
from target_orb.policy import orb_error_summary

LOGGER = logging.getLogger("target_orb.client")
try:
    USER_AGENT = f"target-orb/{importlib.metadata.version('target-orb')}"
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    USER_AGENT = "target-orb"
CONNECT_TIMEOUT_CAP = 10.0


def _decode(response: requests.Response) -> t.Any:
    content = response.content
    if not content:
        return None
    try:
        return jsonutil.loads(content)
    except ValueError:
        return content[:500].decode("utf-8", "replace")


class OrbClient:
    """Talks to Orb. Shared by all sinks and delivery threads."""

    def __init__(self, api_url: str, api_key: str, *, timeout: float, pool_size: int) -> None:
        """Create the session.

        Args:
            api_url: Base URL, e.g. https://api.withorb.com/v1.
            api_key: Orb API key (kept only in the session's headers; never logged).
            timeout: Read timeout in seconds; the connect timeout is min(timeout, 10).
            pool_size: Connections to keep (the number of concurrent requests).
        """
        self.api_url = api_url.rstrip("/")
        self.ingest_url = f"{self.api_url}/ingest"
        self.ping_url = f"{self.api_url}/ping"
        self._timeout = (min(float(timeout), CONNECT_TIMEOUT_CAP), float(timeout))
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1), max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.verify = True  # never configurable: TLS is always verified
        session.trust_env = False  # no proxies or netrc credentials picked up implicitly
        session.headers.update(
            {
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
        )
        self._session = session

    def _request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        *,
        params: t.Mapping[str, str] | None = None,
        headers: t.Mapping[str, str] | None = None,
    ) -> Response:
        try:
            raw = self._session.request(
                method, url, data=data, params=params, headers=headers, timeout=self._timeout
            )
        except requests.exceptions.ConnectTimeout as exc:
            raise TransportError("connect timeout", type(exc).__name__) from None
        except requests.exceptions.ReadTimeout as exc:
            raise TransportError("read timeout", type(exc).__name__) from None
        except requests.exceptions.SSLError as exc:
            raise TransportError("TLS error", str(exc)[:200]) from None
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            raise TransportError("connection error", type(exc).__name__) from None
        return Response(status=raw.status_code, headers=dict(raw.headers), body=_decode(raw))

    def post_ingest(
        self,
        body: bytes,
        count: int,
        backfill_id: str | None = None,
        headers: t.Mapping[str, str] | None = None,
    ) -> Response:
        """POST one ingest request.

        Args:
            body: The encoded `{"events": [...]}`.
            count: Number of events (for debug logs).
            backfill_id: Ingest into this backfill (`?backfill_id=`) instead of live.
            headers: Extra headers (e.g. a request-level `Idempotency-Key`).

        Returns:
            The response.
        """
        LOGGER.debug("POST %s (%d events, %d bytes)", self.ingest_url, count, len(body))
        params = {"backfill_id": backfill_id} if backfill_id is not None else None
        return self._request("POST", self.ingest_url, body, params=params, headers=headers)

    def url(self, path: str) -> str:
        """`{api_url}{path}`; `path` starts with `/` and has its variable parts URL-encoded.

        Args:
            path: E.g. `/events/backfills`.

        Returns:
            The absolute URL.
        """
        return f"{self.api_url}{path}"

    def call(
        self,
        method: str,
        path: str,
        *,
        body: t.Any = None,
        params: t.Mapping[str, str] | None = None,
        headers: t.Mapping[str, str] | None = None,
    ) -> Response:
        """One attempt at any other Orb endpoint (no retries: wrap in `Deliverer.request`).

        Args:
            method: HTTP method.
            path: Path under `api_url`, variable parts already URL-encoded.
            body: JSON-encodable body (Decimal-safe), or None for no body.
            params: Query parameters.
            headers: Extra headers (e.g. `Idempotency-Key`).

        Returns:
            The response.

        Raises:
            TransportError: No HTTP answer.
        """
        data = jsonutil.dumps(body) if body is not None else None
        LOGGER.debug("%s %s", method, self.url(path))
        return self._request(method, self.url(path), data, params=params, headers=headers)

    def ping(self) -> None:
        """GET /ping: fail fast on a wrong key or URL.

        Raises:
            OrbFatalError: With what answered and which setting to check.
        """
        try:
            response = self._request("GET", self.ping_url)
        except TransportError as exc:
            msg = (
                f"Cannot reach Orb at GET {self.ping_url}: {exc.kind} ({exc.detail}). Check "
                "`api_url` (TARGET_ORB_API_URL) and the network; no data was read yet."
            )
            raise OrbFatalError(msg) from None
        if response.status == 200:
            LOGGER.info("Orb ping OK (%s).", self.ping_url)
            return
        if response.status >= 500 or response.status in (408, 409, 429):
            LOGGER.warning(
                "Orb answered HTTP %d to GET %s; going on (ingest requests are retried).",
                response.status, self.ping_url,
            )
            return
        hint = {
            401: "Orb rejected the API key. Check `api_key` (TARGET_ORB_API_KEY); test-mode "
                 "and live keys differ.",
            403: "The API key is not allowed here; check its permissions in Orb.",
            404: "Nothing answers there. Check `api_url` (TARGET_ORB_API_URL); it should end "
                 "in /v1, e.g. https://api.withorb.com/v1.",
        }.get(response.status, "Check `api_url` and Orb's status page, then rerun.")
        msg = (
            f"Orb answered HTTP {response.status} to GET {self.ping_url} "
            f"({orb_error_summary(response.body, 160)}). {hint}"
        )
        raise OrbFatalError(msg)

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()
