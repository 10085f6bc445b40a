"""Orb HTTP I/O: one pooled requests.Session, Bearer auth, explicit timeouts, TLS verified."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import typing as t
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies, prepend_scheme_if_needed, select_proxy

from target_orb import jsonutil
from target_orb.errors import OrbFatalError
from target_orb.orb.answers import API_KEY_HINT, API_URL_HINT, config_hint, orb_error_summary
from target_orb.orb.delivery import Response, TransportError

# Named as before the package had folders: log lines and logging configs name it.
LOGGER = logging.getLogger("target_orb.client")
try:
    USER_AGENT = f"target-orb/{importlib.metadata.version('target-orb')}"
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    USER_AGENT = "target-orb"
CONNECT_TIMEOUT_CAP = 10.0
# Where users of requests (first two) and of Orb's own SDK / OpenSSL (last two) point at a
# private CA bundle; the first one set wins, as in requests.
CA_ENV_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
TLS_HINT = (
    "If Orb is reached through a TLS-inspecting proxy or with a private CA, point "
    "REQUESTS_CA_BUNDLE (or SSL_CERT_FILE) at a PEM bundle that includes that CA."
)


def redact_url(url: str) -> str:
    """A proxy URL without its credentials, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def ca_bundle_from_env() -> tuple[str | bool, str | None]:
    """The CA bundle the environment names, as requests/OpenSSL users expect.

    Returns:
        (path, variable) or (True, None) for the default bundle. TLS is verified either way.

    Raises:
        OrbFatalError: The variable names a path that does not exist.
    """
    for name in CA_ENV_VARS:
        value = os.environ.get(name)
        if not value:
            continue
        if not os.path.exists(value):
            msg = (
                f"{name} is set to {value!r}, which does not exist. Point it at a PEM bundle "
                "holding the CA that signs Orb's (or your proxy's) certificate, or unset it."
            )
            raise OrbFatalError(msg)
        return value, name
    return True, None


def proxies_from_env(url: str) -> dict[str, str]:
    """The proxy for `url` from HTTPS_PROXY / HTTP_PROXY / ALL_PROXY / NO_PROXY, as requests does.

    Plain http:// is only allowed for a loopback stand-in and never goes through a proxy:
    the API key would cross the proxy in clear, and a proxy cannot reach this machine's
    loopback anyway. https:// goes through a CONNECT tunnel, so the proxy never sees the key.

    Args:
        url: The Orb base URL.

    Returns:
        `{"https": proxy_url}` or `{}`.

    Raises:
        OrbFatalError: The proxy URL uses a scheme target-orb cannot use.
    """
    if urlsplit(url).scheme != "https":
        return {}
    proxy = select_proxy(url, get_environ_proxies(url, no_proxy=None))
    if not proxy:
        return {}
    proxy = prepend_scheme_if_needed(proxy, "http")
    scheme = urlsplit(proxy).scheme.lower()
    if scheme not in ("http", "https"):
        msg = (
            f"The proxy for {url} ({redact_url(proxy)}, from HTTPS_PROXY or ALL_PROXY) uses "
            f"`{scheme}://`, which target-orb does not support; use an http:// (CONNECT) "
            "proxy, or exclude the Orb host with NO_PROXY."
        )
        raise OrbFatalError(msg)
    return {"https": proxy}


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
        # TLS is always verified; a private CA from the environment replaces the default
        # bundle, as in requests. trust_env stays off so `.netrc` credentials are never
        # picked up (they would replace the Bearer key); proxies are resolved here instead.
        verify, ca_var = ca_bundle_from_env()
        session.verify = verify
        session.trust_env = False
        session.proxies = proxies_from_env(self.api_url)
        self.proxy = session.proxies.get("https")
        if self.proxy:
            LOGGER.info(
                "Reaching Orb through the proxy %s (HTTPS_PROXY/NO_PROXY).", redact_url(self.proxy)
            )
        if ca_var and self.api_url.startswith("https://"):
            LOGGER.info("Verifying Orb's TLS certificate against %s=%s.", ca_var, verify)
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
        params: t.Mapping[str, str | list[str]] | None = None,
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
        except requests.exceptions.ProxyError as exc:
            found = re.search(r"Tunnel connection failed: [^'\")]*", str(exc))
            why = found.group(0) if found else "cannot connect to the proxy"
            proxy = redact_url(self.proxy) if self.proxy else "the proxy"
            raise TransportError(
                "proxy error", f"{why} via {proxy}; check HTTPS_PROXY and NO_PROXY"
            ) from None
        except requests.exceptions.SSLError as exc:
            found = re.search(r"\[SSL[^\]]*\][^'\")]*", str(exc))
            why = found.group(0) if found else str(exc)[:200]
            raise TransportError("TLS error", f"{why}. {TLS_HINT}") from None
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
        params: t.Mapping[str, str | list[str]] | None = None,
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
        hint = config_hint(
            response.status,
            unauthorized="Orb rejected the API key. " + API_KEY_HINT,
            forbidden="The API key is not allowed here; check its permissions in Orb.",
            not_found="Nothing answers there. " + API_URL_HINT,
            other="Check `api_url` and Orb's status page, then rerun.",
        )
        msg = (
            f"Orb answered HTTP {response.status} to GET {self.ping_url} "
            f"({orb_error_summary(response.body, 160)}). {hint}"
        )
        raise OrbFatalError(msg)

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()
