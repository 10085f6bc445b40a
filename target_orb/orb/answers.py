"""Pure response policy: what an Orb answer means, how long to wait, which events Orb named."""

from __future__ import annotations

import email.utils
import enum
import time
import typing as t

from target_orb import jsonutil

# Plus every 5xx (docs.withorb.com/reference/reliability, .../reference/error-responses).
RETRYABLE_STATUSES = frozenset({408, 409, 429})
FATAL_STATUSES = frozenset({401, 403, 404})
MAX_BACKOFF_SECONDS = 30.0  # cap of the retry schedule (orb.delivery.retry_delays)


class Outcome(enum.Enum):
    """What to do with a response."""

    OK = "ok"
    RETRY = "retry"
    SPLIT = "split"  # 413: halve the request
    QUARANTINE = "quarantine"  # 400 and other 4xx: dead-letter named/isolated events
    FATAL = "fatal"


def classify(status: int) -> Outcome:
    """Map an HTTP status to an outcome.

    Args:
        status: HTTP status code.

    Returns:
        The outcome.
    """
    if 200 <= status < 300:
        return Outcome.OK
    if status in RETRYABLE_STATUSES or status >= 500:
        return Outcome.RETRY
    if status == 413:
        return Outcome.SPLIT
    if status in FATAL_STATUSES:
        return Outcome.FATAL
    return Outcome.QUARANTINE


# What to check when Orb says the setup is wrong (401/403/404), in every message that says so.
API_KEY_HINT = "Check `api_key` (TARGET_ORB_API_KEY); test-mode and live keys differ."
API_URL_HINT = (
    "Check `api_url` (TARGET_ORB_API_URL); it should end in /v1, e.g. https://api.withorb.com/v1."
)


def config_hint(
    status: int,
    *,
    forbidden: str,
    unauthorized: str = API_KEY_HINT,
    not_found: str = API_URL_HINT,
    other: str | None = None,
) -> str:
    """The hint a user sees when Orb's answer means a setting must be fixed.

    Args:
        status: HTTP status (401, 403, 404, or another the caller treats as fatal).
        forbidden: The hint for 403 (what the key is not allowed to do).
        unauthorized: The hint for 401.
        not_found: The hint for 404 (and for any other status when `other` is None).
        other: The hint for any other status.

    Returns:
        The hint.
    """
    if status == 401:
        return unauthorized
    if status == 403:
        return forbidden
    if status == 404 or other is None:
        return not_found
    return other


def retry_after_seconds(
    headers: t.Mapping[str, str], *, now: float | None = None
) -> float | None:
    """Read `retry-after-ms`, then `Retry-After` (seconds or an HTTP date).

    Args:
        headers: Response headers (case-insensitive mapping, or lower-case keys).
        now: Current epoch seconds, for HTTP dates (injected in tests).

    Returns:
        Seconds to wait, or None when no usable header is present.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0:
            return value
    raw = lower.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def orb_error_summary(body: t.Any, limit: int = 300) -> str:
    """A one-line summary of an Orb error body: type suffix, title, detail (truncated).

    Args:
        body: Decoded JSON body, or raw text.
        limit: Maximum length.

    Returns:
        Text for logs and dead-letter reasons.
    """
    if isinstance(body, t.Mapping):
        parts = []
        kind = body.get("type")
        if isinstance(kind, str):
            parts.append(kind.rsplit("#", 1)[-1])
        for name in ("title", "detail"):
            value = body.get(name)
            if isinstance(value, str) and value:
                parts.append(value)
        text = ": ".join(parts) if parts else str(body)
    else:
        text = str(body)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rejected_keys(body: t.Any, keys: t.Collection[str]) -> dict[str, list[str]]:
    """The events Orb named in a 400 (or a 200's `validation_failed`), with Orb's reasons.

    Items may be objects `{idempotency_key, validation_errors}` or plain strings that
    mention a key (Orb's OpenAPI spec, `POST /ingest` responses); only keys of this request count.

    Args:
        body: Decoded JSON response body.
        keys: The idempotency keys in the request.

    Returns:
        key → reasons. Empty when the body names no key of this request.
    """
    if not isinstance(body, t.Mapping):
        return {}
    items: list[t.Any] = []
    for field in ("validation_errors", "validation_failed"):
        value = body.get(field)
        if isinstance(value, list):
            items.extend(value)
    known = set(keys)
    found: dict[str, list[str]] = {}
    by_length = None
    for item in items:
        if isinstance(item, t.Mapping):
            key = item.get("idempotency_key")
            if isinstance(key, str) and key in known:
                reasons = item.get("validation_errors")
                if isinstance(reasons, str):
                    reasons = [reasons]
                elif not isinstance(reasons, list) or not reasons:
                    reasons = [orb_error_summary(body)]
                found.setdefault(key, []).extend(str(r) for r in reasons)
        elif isinstance(item, str):
            if by_length is None:
                by_length = sorted(known, key=len, reverse=True)
            for key in by_length:
                if key and key in item:
                    found.setdefault(key, []).append(item)
                    break
    return found


# Error type suffixes Orb sends with a 404 (orb-billing `_exceptions.py`, `NotFoundError` types).
NOT_FOUND_TYPE = "404-resource-not-found"


class Answer(enum.Enum):
    """What Orb's answer to a metadata update means (after retries)."""

    DONE = "done"
    NOT_FOUND = "not_found"  # 404 resource-not-found: no customer with that external id yet
    REJECTED = "rejected"  # 400 and other 4xx: this update cannot be applied as it is
    FATAL = "fatal"  # 401, 403, any other 404: configuration must be fixed


def classify_answer(status: int, body: t.Any) -> Answer:
    """Map a non-retryable answer to a metadata update onto what to do.

    Args:
        status: HTTP status.
        body: Decoded body.

    Returns:
        The answer.
    """
    if 200 <= status < 300:
        return Answer.DONE
    if status == 404:
        kind = body.get("type") if isinstance(body, t.Mapping) else None
        if isinstance(kind, str) and kind.rsplit("#", 1)[-1] == NOT_FOUND_TYPE:
            return Answer.NOT_FOUND
        return Answer.FATAL
    if status in (401, 403):
        return Answer.FATAL
    return Answer.REJECTED


REFUSAL_CODES = (
    "timestamp_changed",
    "customer_changed",
    "unknown_customer",
    "closed_period",
    "amendment_cap",
    "event_not_found",
    "other",
)


def refusal_code(status: int, body: t.Any) -> str:
    """Which of Orb's correction rules a refusal names (orb-billing events.py, update/deprecate).

    Orb's error bodies carry a `type` and a prose `title`/`detail`; the rule is read from
    the prose, so an unknown wording falls back to `other` (the reason then quotes Orb).

    Args:
        status: HTTP status (4xx).
        body: Decoded error body.

    Returns:
        One of REFUSAL_CODES.
    """
    text = orb_error_summary(body, 2000).lower()
    if "timestamp" in text and any(w in text for w in ("match", "differ", "same", "change")):
        return "timestamp_changed"
    if any(w in text for w in ("amend", "deprecat", "correction", "event")) and any(
        w in text for w in ("limit", "cap ", "exceed", "too many", "100 events", "quota")
    ):
        return "amendment_cap"
    if "customer" in text and any(
        w in text for w in ("not found", "does not exist", "no customer", "unknown", "not exist")
    ):
        return "unknown_customer"
    if "customer" in text and any(w in text for w in ("match", "differ", "same", "change")):
        return "customer_changed"
    if any(
        w in text
        for w in ("billing period", "grace", "invoiced", "closed period", "period", "too old")
    ):
        return "closed_period"
    if status == 404 or ("event" in text and "not found" in text):
        return "event_not_found"
    return "other"


def is_not_found(status: int, body: t.Any) -> bool:
    """Orb says it holds no event under the key (not a wrong URL, not a missing customer).

    Args:
        status: HTTP status.
        body: Decoded error body.

    Returns:
        True for a resource-not-found answer about the event.
    """
    if status != 404 and refusal_code(status, body) != "event_not_found":
        return False
    text = orb_error_summary(body, 2000).lower()
    if "url-not-found" in text or "customer" in text:
        return False
    return status != 404 or "resource-not-found" in text or "event" in text


def already_deprecated(body: t.Any) -> bool:
    """Orb's refusal says the event is already deprecated (a retried deprecation)."""
    text = orb_error_summary(body, 2000).lower()
    return "already deprecated" in text or "already been deprecated" in text


def refuses_backfill(answer: t.Any, body: bytes) -> bool:
    """An ingest answer that refuses the backfill itself (not any event in the request).

    Args:
        answer: The decoded body of Orb's answer to an ingest into a backfill.
        body: The request body that was sent.

    Returns:
        True when Orb refuses the backfill, naming none of the request's events.
    """
    if not isinstance(answer, dict):
        return False
    text = orb_error_summary(answer, 2000).lower()
    if "backfill" not in text:
        return False
    try:
        keys = [e.get("idempotency_key") for e in jsonutil.loads(body).get("events", [])]
    except (ValueError, AttributeError):
        return False
    return not rejected_keys(answer, [k for k in keys if isinstance(k, str)])
