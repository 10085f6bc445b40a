"""``POST /v1/ingest`` for the stand-in Orb: parsing, scripted faults, validation
(vendored schema and Orb's prose rules) and storing."""

from __future__ import annotations

import collections
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from fake_orb.backfills import Backfills
from fake_orb.common import (
    _VALIDATION_TITLE,
    _VALIDATION_TYPE,
    _canonical,
    _no_duplicate_keys,
    _Outcome,
    _Parsed,
    _property_problem,
    _reject_constant,
    _Request,
    _timestamp_errors,
    _validator,
    error_body,
)
from fake_orb.ratelimit import RateLimit

#: Upper bound for a scripted ``hang`` so a typo can never wedge a test run.
MAX_HANG_SECONDS = 600.0

_FAULT_KEYS = {
    "status",
    "headers",
    "body",
    "store_first",
    "bad_keys",
    "bad_keys_as_strings",
    "type",
    "action",
    "seconds",
}


def _normalize_fault(fault: Any) -> dict[str, Any]:
    """Validate a scripted fault and give it a ``name`` (raises ValueError)."""
    if not isinstance(fault, dict):
        raise ValueError(f"a fault must be a dict, got {fault!r}")
    unknown = set(fault) - _FAULT_KEYS
    if unknown:
        raise ValueError(f"unknown fault keys {sorted(unknown)} in {fault!r}")
    out = dict(fault)
    store_first = bool(out.get("store_first", False))
    out["store_first"] = store_first
    suffix = "+store_first" if store_first else ""
    if "action" in out:
        action = out["action"]
        if action not in ("hang", "reset"):
            raise ValueError(f"unknown fault action {action!r} (use 'hang' or 'reset')")
        if "status" in out:
            raise ValueError("a fault has either 'action' or 'status', not both")
        if action == "hang":
            seconds = out.get("seconds", 5)
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
                raise ValueError(f"hang seconds must be a non-negative number, got {seconds!r}")
            out["seconds"] = min(float(seconds), MAX_HANG_SECONDS)
        out["name"] = action + suffix
        return out
    status = out.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise ValueError(f"fault status must be an int in 400..599, got {status!r}")
    headers = out.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in headers.items()
    ):
        raise ValueError(f"fault headers must be a dict of str -> str, got {headers!r}")
    out["headers"] = {k: str(v) for k, v in headers.items()}
    if "body" in out and not isinstance(out["body"], dict | list | str):
        raise ValueError("fault body must be a dict, a list or a str")
    name = str(status)
    if "bad_keys" in out:
        if status != 400:
            raise ValueError("bad_keys is only supported with status 400")
        bad = out["bad_keys"]
        if isinstance(bad, list | tuple):
            bad = {k: ["scripted validation failure"] for k in bad}
        if not isinstance(bad, dict) or not bad:
            raise ValueError("bad_keys must be a non-empty dict of key -> [reason, ...]")
        out["bad_keys"] = {
            str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in bad.items()
        }
        name += ":bad_keys" + (":as_strings" if out.get("bad_keys_as_strings") else "")
    if "type" in out:
        if not isinstance(out["type"], str) or not out["type"]:
            raise ValueError("fault type must be a non-empty string")
        t = out["type"]
        if not t.startswith("http") and not t.startswith(f"{status}-"):
            t = f"{status}-{t}"
        out["type"] = t
        name += ":" + t.rsplit("#", 1)[-1]
    out["name"] = name + suffix
    return out



@dataclass
class _Validation:
    key_errors: dict[str, list[str]] = field(default_factory=dict)
    plain_errors: list[str] = field(default_factory=list)
    request_level: bool = False  # the whole request is rejected, store nothing
    valid_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.key_errors or self.plain_errors)


class Ingest(Backfills):
    """The ingest route: auth, rate limit, scripted fault, checks, store."""

    # Provided by FakeOrb.
    accept_all: bool
    max_body_bytes: int | None
    max_events_per_request: int
    store_valid_on_400: bool
    rate_limit: RateLimit | None
    key_send_counts: collections.Counter[str]
    fail_keys: dict[str, str]
    events_over_413: int | None
    _script: collections.deque[dict[str, Any]]

    def _parse(self, req: _Request) -> _Parsed:
        if req.body is None:
            return _Parsed(error="body too large")
        raw = req.body
        encoding = (req.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                raw = gzip.decompress(raw)
            elif encoding == "deflate":
                raw = zlib.decompress(raw)
            elif encoding != "identity":
                return _Parsed(error=f"unsupported Content-Encoding {encoding!r}")
        except (OSError, EOFError, zlib.error) as exc:
            return _Parsed(error=f"cannot decode {encoding} body: {exc}")
        try:
            text = raw.decode("utf-8")
            if self.accept_all:
                body = json.loads(text, parse_constant=_reject_constant)
            else:
                body = json.loads(
                    text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
                )
        except (UnicodeDecodeError, ValueError) as exc:
            return _Parsed(error=f"request body is not valid JSON: {exc}")
        events = body.get("events") if isinstance(body, dict) else None
        return _Parsed(body=body, events=events if isinstance(events, list) else None)

    def _ingest(self, req: _Request, record: dict[str, Any]) -> _Outcome:
        query = parse_qs(req.query, keep_blank_values=True)
        if query.get("backfill_id"):
            record["backfill_id"] = query["backfill_id"][-1]
        parsed = self._parse(req)
        if parsed.events is not None:
            keys = [
                ev["idempotency_key"]
                for ev in parsed.events
                if isinstance(ev, dict) and isinstance(ev.get("idempotency_key"), str)
            ]
            record["event_count"] = len(parsed.events)
            record["keys"] = keys
            with self.lock:
                self.key_send_counts.update(keys)
        if not record["authorization_ok"]:
            return _Outcome(401, error_body(401, detail="Missing or invalid API key"), delay=True)
        if self.rate_limit is not None and not self.rate_limit.admit(record["event_count"]):
            record["rate_limited"] = True
            return _Outcome(429, error_body(429, detail="Rate limit exceeded"), delay=True)
        with self.lock:
            fault = self._script.popleft() if self._script else None
        if fault is None:
            return self._ingest_normal(req, query, parsed, record)
        outcome = self._apply_fault(fault, req, query, parsed, record)
        record["fault"] = fault["name"]
        return outcome

    def _apply_fault(
        self,
        fault: dict[str, Any],
        req: _Request,
        query: dict[str, list[str]],
        parsed: _Parsed,
        record: dict[str, Any],
    ) -> _Outcome:
        if fault["store_first"]:
            # Process (validate + store) exactly as a normal request would,
            # then throw the real answer away.
            self._ingest_normal(req, query, parsed, record)
        action = fault.get("action")
        if action == "hang":
            return _Outcome(None, action="hang", seconds=fault["seconds"])
        if action == "reset":
            return _Outcome(None, action="reset")
        status = fault["status"]
        headers = fault["headers"]
        if "bad_keys" in fault:
            bad: dict[str, list[str]] = fault["bad_keys"]
            if self.store_valid_on_400 and not fault["store_first"] and parsed.events is not None:
                if self.accept_all:
                    candidates = self._accept_all_events(parsed.events) or []
                else:
                    candidates = self._validate(parsed.body).valid_events
                self._store([ev for ev in candidates if ev["idempotency_key"] not in bad])
            body = fault.get("body") or self._validation_body(
                bad, [], as_strings=bool(fault.get("bad_keys_as_strings"))
            )
            return _Outcome(status, body, headers, delay=True)
        if "body" in fault:
            body = fault["body"]
        else:
            body = error_body(status, fault.get("type"), detail=f"scripted fault ({fault['name']})")
        return _Outcome(status, body, headers, delay=True)

    def _ingest_normal(
        self,
        req: _Request,
        query: dict[str, list[str]],
        parsed: _Parsed,
        record: dict[str, Any],
    ) -> _Outcome:
        refusal = self._request_refusal(req, query, parsed)
        if refusal is not None:
            return refusal
        backfill = None
        if "backfill_id" in query:
            found = self._backfill_for_ingest(query["backfill_id"][-1])
            if isinstance(found, _Outcome):
                found.delay = True
                return found
            backfill = found
        events = parsed.events
        if events is not None and len(events) > self.max_events_per_request:
            return self._reject(
                [
                    f"too many events in one request: {len(events)} > "
                    f"{self.max_events_per_request}; the whole request was rejected"
                ]
            )
        with self.lock:
            over = self.events_over_413
            fail_keys = dict(self.fail_keys)
        if over is not None and events is not None and len(events) > over:
            record["fault"] = "413_if_events_over"
            return _Outcome(
                413,
                error_body(413, detail=f"{len(events)} events exceeds the limit of {over}"),
                delay=True,
            )
        result = self._checked(parsed, backfill)
        if isinstance(result, _Outcome):
            return result
        self._apply_bad_keys(result, record, fail_keys)
        if result.failed:
            if self.store_valid_on_400 and not result.request_level:
                self._store_into(backfill, result.valid_events)
            return _Outcome(
                400, self._validation_body(result.key_errors, result.plain_errors), delay=True
            )
        self._store_into(backfill, result.valid_events)
        return _Outcome(200, {"validation_failed": []}, delay=True)

    def _request_refusal(
        self, req: _Request, query: dict[str, list[str]], parsed: _Parsed
    ) -> _Outcome | None:
        """The refusal of an ingest request as a whole: body too large, unknown query
        parameter, wrong Content-Type, not JSON (None: none of these)."""
        if req.body is None:
            return _Outcome(
                413,
                error_body(
                    413,
                    detail=f"request body of {req.body_len} bytes exceeds {self.max_body_bytes}",
                ),
                delay=True,
            )
        unknown = sorted(set(query) - {"backfill_id"})
        if unknown:
            return self._reject([f"unknown query parameter(s): {', '.join(unknown)}"])
        ctype = (req.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return self._reject([f"Content-Type must be application/json, got {ctype!r}"])
        if parsed.error is not None:
            return self._reject([parsed.error])
        return None

    def _checked(self, parsed: _Parsed, backfill: dict[str, Any] | None) -> _Validation | _Outcome:
        """The events checked (or, with ``accept_all``, only their shape)."""
        if self.accept_all:
            accepted = self._accept_all_events(parsed.events)
            if accepted is None:
                return self._reject(
                    [
                        "body must be an object whose 'events' is a list of objects "
                        "with a string idempotency_key"
                    ]
                )
            return _Validation(valid_events=accepted)
        return self._validate(parsed.body, backfill)

    @staticmethod
    def _apply_bad_keys(
        result: _Validation, record: dict[str, Any], fail_keys: dict[str, str]
    ) -> None:
        """The persistent ``set_bad_keys`` rule: those keys fail with their reason."""
        hit = [k for k in dict.fromkeys(record["keys"]) if k in fail_keys]
        if hit:
            record["fault"] = "bad_keys"
            for k in hit:
                result.key_errors.setdefault(k, []).append(fail_keys[k])
            result.valid_events = [
                ev for ev in result.valid_events if ev["idempotency_key"] not in fail_keys
            ]

    def _reject(self, plain: list[str]) -> _Outcome:
        return _Outcome(400, self._validation_body({}, plain), delay=True)

    @staticmethod
    def _validation_body(
        key_errors: dict[str, list[str]], plain: list[str], *, as_strings: bool = False
    ) -> dict[str, Any]:
        items: list[Any]
        if as_strings:
            items = [f"{k}: {'; '.join(v)}" for k, v in key_errors.items()]
        else:
            items = [{"idempotency_key": k, "validation_errors": v} for k, v in key_errors.items()]
        items.extend(plain)
        n = len(key_errors)
        detail = f"{n} event(s) failed validation" if n else "The request failed validation"
        if plain and n:
            detail += f"; {len(plain)} other error(s)"
        return error_body(
            400, _VALIDATION_TYPE, title=_VALIDATION_TITLE, detail=detail, validation_errors=items
        )

    @staticmethod
    def _accept_all_events(events: list[Any] | None) -> list[dict[str, Any]] | None:
        if events is None:
            return None
        for ev in events:
            if not isinstance(ev, dict) or not isinstance(ev.get("idempotency_key"), str):
                return None
        return events

    def _store(self, events: list[dict[str, Any]]) -> None:
        with self.lock:
            for ev in events:
                key = ev["idempotency_key"]
                if key in self.landed:
                    self.duplicates += 1
                else:
                    self._hold(ev, None)

    def _store_into(self, backfill: dict[str, Any] | None, events: list[dict[str, Any]]) -> None:
        if backfill is None:
            self._store(events)
        else:
            self._store_backfill(backfill, events)

    # ------------------------------------------------------------------ validation

    def _validate(self, body: Any, backfill: dict[str, Any] | None = None) -> _Validation:
        result = _Validation()
        events: list[Any] = []
        if isinstance(body, dict) and isinstance(body.get("events"), list):
            events = body["events"]
        keys: list[str | None] = []
        for ev in events:
            k = ev.get("idempotency_key") if isinstance(ev, dict) else None
            keys.append(k if isinstance(k, str) and k else None)
        bad_idx: set[int] = set()

        def add(index: int | None, reason: str) -> None:
            if index is None:
                result.plain_errors.append(reason)
                result.request_level = True
                return
            bad_idx.add(index)
            key = keys[index]
            if key is None:
                result.plain_errors.append(f"events[{index}]: {reason}")
            else:
                result.key_errors.setdefault(key, []).append(reason)

        for err in _validator().iter_errors(body):
            path = list(err.absolute_path)
            if len(path) >= 2 and path[0] == "events" and isinstance(path[1], int):
                where = ".".join(str(p) for p in path[2:])
                add(path[1], f"{where}: {err.message}" if where else err.message)
            else:
                where = "/".join(str(p) for p in path)
                add(None, f"{where}: {err.message}" if where else err.message)

        now = self.now()
        # A backfill takes events older than the grace period (not future ones).
        oldest = None if backfill else now - timedelta(hours=self.grace_period_hours)
        newest = now + timedelta(seconds=self.future_tolerance_seconds)
        bodies: dict[str, set[str]] = {}
        for i, ev in enumerate(events):
            if not isinstance(ev, dict):
                continue
            for reason in self._prose_errors(ev, oldest, newest):
                add(i, reason)
            for reason in self._backfill_event_errors(backfill, ev) if backfill else ():
                add(i, reason)
            deprecated = self._deprecated_key_error(keys[i])
            if deprecated:
                add(i, deprecated)
            if keys[i] is not None:
                bodies.setdefault(keys[i], set()).add(_canonical(ev))  # type: ignore[arg-type]
        self._reject_conflicting_bodies(result, bodies)
        result.valid_events = [
            ev
            for i, ev in enumerate(events)
            if i not in bad_idx and keys[i] is not None and keys[i] not in result.key_errors
        ]
        return result

    @staticmethod
    def _reject_conflicting_bodies(result: _Validation, bodies: dict[str, set[str]]) -> None:
        """A key sent twice in one request with different bodies rejects the request."""
        for key, variants in bodies.items():
            if len(variants) > 1:
                result.key_errors.setdefault(key, []).append(
                    "idempotency_key appears more than once in this request with different "
                    "event bodies; the entire request is rejected"
                )
                result.request_level = True

    @staticmethod
    def _prose_errors(
        ev: dict[str, Any], oldest: datetime | None, newest: datetime
    ) -> Iterator[str]:
        customer_fields = ("customer_id", "external_customer_id")
        given = [f for f in customer_fields if ev.get(f) not in (None, "")]
        for f in customer_fields:
            if ev.get(f) == "":
                yield f"{f} must not be an empty string"
        if not given:
            yield f"exactly one of {' or '.join(customer_fields)} must be specified (neither was)"
        elif len(given) > 1:
            yield f"exactly one of {' or '.join(customer_fields)} must be specified (both were)"

        if ev.get("idempotency_key") == "":
            yield "idempotency_key must not be empty"
        name = ev.get("event_name")
        if isinstance(name, str) and not name.strip():
            yield "event_name must not be empty"

        props = ev.get("properties")
        if isinstance(props, dict):
            for k, v in props.items():
                problem = _property_problem(v)
                if problem:
                    yield f"properties.{k}: {problem}"

        ts = ev.get("timestamp")
        if isinstance(ts, str):
            yield from _timestamp_errors(ts, oldest, newest)
