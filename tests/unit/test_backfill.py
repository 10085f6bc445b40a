"""Unit tests of `late_event_policy: backfill` with a scripted in-process Orb (no sockets).

The scripted Orb keeps Orb's documented backfill rules (Orb API reference: event backfills,
event search): 31-day limit, no two pending backfills overlapping, nothing visible before
close, request `Idempotency-Key` replay, search by id within a timeframe. Every test checks
what reached it, so it fails if a late event goes live, lands twice, or a backfill is left open.
"""

from __future__ import annotations

import datetime
import json
import threading
import typing as t
from collections import Counter

import pytest

from target_orb import jsonutil
from target_orb.backfill.manager import BackfillManager
from target_orb.backfill.ownership import OwnershipRecord, record_path_for
from target_orb.backfill.requests import CLOSE_AFTER, PENDING
from target_orb.backfill.windows import Window, group_by_window, month_window, window_of
from target_orb.config_checks import config_problems
from target_orb.errors import OrbFatalError
from target_orb.mapping.fields import Invalid
from target_orb.mapping.spec import build_mapping_spec
from target_orb.mapping.track import Mapped, map_record
from target_orb.orb.delivery import Deliverer, Response, TransportError
from target_orb.orb.search import search_existing
from target_orb.pipeline.stats import RunStats

UTC = datetime.timezone.utc
NOW = datetime.datetime(2024, 5, 20, 12, 0, tzinfo=UTC)
API = "http://orb.test/v1"


def ts(value: datetime.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def event(n: int, when: datetime.datetime, customer: str = "c1") -> dict[str, t.Any]:
    return {
        "idempotency_key": f"k{n}",
        "event_name": "api",
        "external_customer_id": customer,
        "timestamp": ts(when),
        "properties": {"n": n},
    }


def parse(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


# ----------------------------------------------------------------------------- scripted Orb


class ScriptedOrb:
    """An OrbClient stand-in: backfills, search and ingest, in memory, with Orb's rules."""

    def __init__(self, now: datetime.datetime = NOW) -> None:
        self.now = now
        self.backfills: dict[str, dict[str, t.Any]] = {}
        self.backfill_events: dict[str, dict[str, dict]] = {}
        self.live: dict[str, dict] = {}  # visible (searchable) events
        self.billed: Counter[str] = Counter()  # times each key became billable
        self.replays: dict[str, tuple[str, Response]] = {}
        self.calls: list[tuple[str, str, t.Any, t.Any, t.Any]] = []
        self.faults: list[tuple[str, str, t.Any]] = []  # (method, path prefix, fault)
        self.reflect_after_fetches = 0
        self.grace = datetime.timedelta(hours=12)
        self.one_pending = False  # Orb's support pages: one backfill pending at a time
        self.invoices: list[dict[str, t.Any]] = []
        self.invoice_page = 2
        self._fetches: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._n = 0

    # client surface -------------------------------------------------------
    def url(self, path: str) -> str:
        return API + path

    def call(self, method, path, *, body=None, params=None, headers=None) -> Response:
        with self.lock:
            self.calls.append((method, path, body, params, dict(headers or {})))
            fault = self._take_fault(method, path)
        if fault == "timeout":
            raise TransportError("read timeout", "ReadTimeout")
        if isinstance(fault, Response):
            return fault
        with self.lock:
            response = self._route(method, path, body, params, headers or {})
        if fault == "timeout_after":
            raise TransportError("read timeout", "ReadTimeout")
        if fault == "503_after":  # done, but answered 503 (not stored for replay)
            with self.lock:
                self.replays = {k: v for k, v in self.replays.items() if v[1] is not response}
            return Response(503, {}, None)
        return response

    def post_ingest(self, body: bytes, count: int, backfill_id=None, headers=None) -> Response:
        return self.call(
            "POST", "/ingest", body=json.loads(body),
            params={"backfill_id": backfill_id} if backfill_id else None, headers=headers,
        )

    # helpers --------------------------------------------------------------
    def _take_fault(self, method: str, path: str) -> t.Any:
        for i, (m, prefix, fault) in enumerate(self.faults):
            if m == method and path.startswith(prefix):
                del self.faults[i]
                return fault
        return None

    def add_backfill(self, start, end, *, close_time, status="pending", bid=None, replace=False):
        self._n += 1
        bid = bid or f"foreign_{self._n}"
        self.backfills[bid] = {
            "id": bid, "status": status, "timeframe_start": ts(start), "timeframe_end": ts(end),
            "close_time": ts(close_time), "created_at": ts(self.now), "events_ingested": 0,
            "replace_existing_events": replace, "customer_id": None, "reverted_at": None,
            "deprecation_filter": None,
        }
        self.backfill_events[bid] = {}
        return bid

    def add_invoice(self, customer: str, start, end, *, status="issued", number="INV-1"):
        self._n += 1
        self.invoices.append({
            "id": f"inv_{self._n}", "invoice_number": number, "status": status,
            "invoice_date": ts(end),
            "customer": {"id": f"cus_{customer}", "external_customer_id": customer},
            "line_items": [{"id": f"li_{self._n}", "start_date": ts(start), "end_date": ts(end)}],
        })

    def settle(self) -> None:
        """Orb finishes reflecting every closed backfill (asynchronous in Orb)."""
        for bid, item in self.backfills.items():
            if item["status"] == "closing":
                self._reflect(bid)

    def calls_to(self, method: str, prefix: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == method and c[1].startswith(prefix)]

    def pending(self) -> list[str]:
        return [b for b, v in self.backfills.items() if v["status"] in PENDING]

    @staticmethod
    def _ok(body: t.Any, status: int = 200) -> Response:
        return Response(status, {}, body)

    @staticmethod
    def _err(status: int, detail: str) -> Response:
        return Response(status, {}, {"type": f"x#{status}", "status": status, "detail": detail})

    def _route(self, method, path, body, params, headers) -> Response:
        key = headers.get("Idempotency-Key")
        if method == "POST" and key:
            replay = self.replays.get(key)
            canonical = json.dumps([path, body, params], sort_keys=True, default=str)
            if replay is not None:
                if replay[0] != canonical:
                    return self._err(409, "idempotency key reused with another payload")
                return replay[1]
            response = self._dispatch(method, path, body, params)
            if response.status < 500:
                self.replays[key] = (canonical, response)
            return response
        return self._dispatch(method, path, body, params)

    def _dispatch(self, method, path, body, params) -> Response:
        if method == "POST" and path == "/events/backfills":
            return self._create(body)
        if method == "GET" and path == "/events/backfills":
            shown = [
                b | {"status": "pending"} if b["status"] == "closing" else b
                for b in reversed(self.backfills.values())
            ]
            return self._ok({"data": shown,
                             "pagination_metadata": {"has_more": False, "next_cursor": None}})
        if path.startswith("/events/backfills/"):
            rest = path[len("/events/backfills/"):]
            bid, _, action = rest.partition("/")
            if bid not in self.backfills:
                return self._err(404, "no such backfill")
            if method == "GET" and not action:
                self._fetches[bid] += 1
                item = self.backfills[bid]
                if item["status"] == "closing" and self._fetches[bid] > self.reflect_after_fetches:
                    self._reflect(bid)
                shown = dict(item)
                if shown["status"] == "closing":
                    shown["status"] = "pending"
                return self._ok(shown)
            if method == "POST" and action == "close":
                item = self.backfills[bid]
                if item["status"] != "pending":
                    return self._err(400, "backfill is not pending")
                item["close_time"] = ts(self.now)
                item["status"] = "closing"
                self._fetches[bid] = 0
                if self.reflect_after_fetches == 0:
                    self._reflect(bid)
                shown = dict(item)
                if shown["status"] == "closing":
                    shown["status"] = "pending"
                return self._ok(shown)
        if method == "GET" and path == "/invoices":
            statuses = params["status[]"]
            since = parse(params["invoice_date[gte]"])
            matching = [
                i for i in self.invoices
                if i["status"] in statuses and parse(i["invoice_date"]) >= since
            ]
            offset = int(params.get("cursor") or 0)
            page = matching[offset:offset + self.invoice_page]
            more = offset + self.invoice_page < len(matching)
            return self._ok({"data": page, "pagination_metadata": {
                "has_more": more, "next_cursor": str(offset + self.invoice_page) if more else None,
            }})
        if method == "POST" and path == "/events/search":
            ids = body["event_ids"]
            assert 1 <= len(ids) <= 500
            start, end = parse(body["timeframe_start"]), parse(body["timeframe_end"])
            found = [
                {"id": k, **{f: v for f, v in e.items() if f != "idempotency_key"},
                 "deprecated": False}
                for k, e in self.live.items()
                if k in ids and start <= parse(e["timestamp"]) < end
            ]
            return self._ok({"data": found})
        if method == "POST" and path == "/ingest":
            return self._ingest(body, params)
        return self._err(404, f"no route {method} {path}")

    def _reflect(self, bid: str) -> None:
        item = self.backfills[bid]
        item["status"] = "reflected"
        for key, ev in self.backfill_events[bid].items():
            self.live.setdefault(key, ev)
            self.billed[key] += 1

    def _create(self, body: dict) -> Response:
        assert set(body) <= {"timeframe_start", "timeframe_end", "close_time",
                             "replace_existing_events", "customer_id", "external_customer_id",
                             "deprecation_filter"}
        start, end = parse(body["timeframe_start"]), parse(body["timeframe_end"])
        if end - start > datetime.timedelta(days=31):
            return self._err(400, "backfills may span at most 31 days")
        if end > self.now - self.grace and not body.get("deprecation_filter"):
            return self._err(400, "timeframe_end is after the grace boundary")
        if self.one_pending:
            for other in self.backfills.values():
                if other["status"] in ("pending", "pending_revert", "closing"):
                    return self._err(400, f"backfill {other['id']} is still pending")
        for other in self.backfills.values():
            if other["status"] in ("pending", "pending_revert", "closing") and (
                start < parse(other["timeframe_end"]) and parse(other["timeframe_start"]) < end
            ):
                return self._err(400, f"overlaps pending backfill {other['id']}")
        self._n += 1
        bid = f"bf_{self._n}"
        self.add_backfill(start, end, close_time=parse(body["close_time"]), bid=bid,
                          replace=body.get("replace_existing_events", True))
        return self._ok(dict(self.backfills[bid]), 201)

    def _ingest(self, body: dict, params: dict | None) -> Response:
        bid = (params or {}).get("backfill_id")
        events = body["events"]
        if bid is None:
            oldest = self.now - self.grace
            bad = [
                {"idempotency_key": e["idempotency_key"],
                 "validation_errors": ["timestamp is older than the grace period; use a backfill"]}
                for e in events if parse(e["timestamp"]) < oldest
            ]
            if bad:
                return Response(400, {}, {"type": "x#400-request-validation-errors",
                                          "validation_errors": bad})
            for e in events:
                if e["idempotency_key"] not in self.live:
                    self.live[e["idempotency_key"]] = e
                    self.billed[e["idempotency_key"]] += 1
            return self._ok({"validation_failed": []})
        item = self.backfills.get(bid)
        if item is None or item["status"] != "pending":
            return self._err(400, "backfill is not accepting events")
        start, end = parse(item["timeframe_start"]), parse(item["timeframe_end"])
        outside = [e for e in events if not start <= parse(e["timestamp"]) < end]
        if outside:
            return Response(400, {}, {"validation_errors": [
                {"idempotency_key": e["idempotency_key"],
                 "validation_errors": ["outside the backfill timeframe"]} for e in outside]})
        for e in events:
            # Undocumented in Orb; the strict assumption: a key sent twice bills twice.
            self.backfill_events[bid][e["idempotency_key"] + "#" * len(
                [k for k in self.backfill_events[bid] if k.rstrip("#") == e["idempotency_key"]]
            )] = e
        return self._ok({"validation_failed": []})


def billed_twice(orb: ScriptedOrb) -> dict[str, int]:
    counts = Counter()
    for key, n in orb.billed.items():
        counts[key.rstrip("#")] += n
    return {k: n for k, n in counts.items() if n > 1}


# ----------------------------------------------------------------------------- fixtures


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> bool:
        self.t += seconds
        return False


def make_manager(
    orb: ScriptedOrb, tmp_path, *, dry_run=False, stats=None, budget=30.0, orb_clock=False,
    **options: t.Any,
):
    """A manager over `orb`; `orb_clock`: waits also advance Orb's (and the manager's) now."""
    clock = Clock()
    if orb_clock:
        plain_sleep = clock.sleep

        def sleep_both(seconds: float) -> bool:
            orb.now += datetime.timedelta(seconds=seconds)
            return plain_sleep(seconds)

        clock.sleep = sleep_both  # type: ignore[method-assign]

    def deliverer(send):
        return Deliverer(send, url=API + "/ingest", max_retry_seconds=budget, clock=clock,
                         sleep=clock.sleep, rand=lambda: 0.0)

    record = OwnershipRecord(record_path_for(str(tmp_path / "dl.jsonl")), API)
    manager = BackfillManager(
        client=None if dry_run else orb,
        deliverer=None if dry_run else deliverer(orb.post_ingest),
        make_ingest_deliverer=None if dry_run else deliverer,
        stats=stats or RunStats(),
        record=record,
        write_limiter=None,
        read_limiter=None,
        grace_period_hours=12,
        max_retry_seconds=budget,
        now=lambda: orb.now,
        sleep=clock.sleep,
        monotonic=clock,
        **options,
    )
    manager.start()
    return manager


def load(manager, events):
    return manager.load_job("tracks", events, [{"rec": e["idempotency_key"]} for e in events])()


MARCH = datetime.datetime(2024, 3, 10, tzinfo=UTC)
APRIL = datetime.datetime(2024, 4, 2, tzinfo=UTC)


# ----------------------------------------------------------------------------- windows


def test_windows_are_calendar_months_of_whole_utc_days_at_most_31():
    for year in (2023, 2024):
        for month in range(1, 13):
            w = month_window(year, month)
            assert w.start.day == 1 and w.start.time() == datetime.time(0)
            assert w.end.time() == datetime.time(0) and w.end.day == 1
            assert datetime.timedelta(days=28) <= w.end - w.start <= datetime.timedelta(days=31)
    assert month_window(2024, 12).end == datetime.datetime(2025, 1, 1, tzinfo=UTC)
    assert window_of("2024-02-29T23:59:59.999999Z") == Window(
        datetime.datetime(2024, 2, 1, tzinfo=UTC), datetime.datetime(2024, 3, 1, tzinfo=UTC)
    )
    assert window_of("2024-03-01T00:00:00Z").start == datetime.datetime(2024, 3, 1, tzinfo=UTC)


def test_group_by_window_keeps_input_order_within_and_time_order_across():
    events = [event(1, APRIL), event(2, MARCH), event(3, APRIL)]
    groups = group_by_window(events)
    assert [w.start.month for w in groups] == [3, 4]
    assert list(groups.values()) == [[1], [0, 2]]


def test_record_path_is_beside_the_dead_letter_file():
    path = record_path_for("target-orb-dead-letter.jsonl")
    assert path == "target-orb-dead-letter.backfills.json"
    assert record_path_for("/x/y/dl.txt") == "/x/y/dl.txt.backfills.json"


# ----------------------------------------------------------------------------- mapping


def spec(**config):
    base = {"external_customer_id_field": "userId"}
    base.update(config)
    assert config_problems(base) == []
    return build_mapping_spec(base)


def record_at(when: datetime.datetime) -> dict:
    return {"type": "track", "messageId": "m1", "userId": "u", "event": "e",
            "timestamp": when.isoformat(), "properties": {}}


def test_backfill_is_accepted_by_the_settings():
    config = {"external_customer_id_field": "u", "late_event_policy": "backfill"}
    assert config_problems(config) == []


def test_under_backfill_an_event_is_late_exactly_past_the_grace_boundary():
    # No margin: an event still inside the grace period goes live (a backfill could not hold
    # it: its timeframe ends at or before now - grace, orb-billing events/backfills.py).
    s = spec(late_event_policy="backfill")
    grace = datetime.timedelta(hours=12)
    second = datetime.timedelta(seconds=1)
    old = map_record(record_at(NOW - datetime.timedelta(days=3)), "s", s, NOW)
    assert isinstance(old, Mapped) and old.late
    just_past = map_record(record_at(NOW - grace - second), "s", s, NOW)
    assert isinstance(just_past, Mapped) and just_past.late
    inside = map_record(record_at(NOW - grace + second), "s", s, NOW)
    assert isinstance(inside, Mapped) and not inside.late, "inside the grace period goes live"
    # `reject` keeps the same boundary.
    r = map_record(record_at(NOW - grace + second), "r", spec(), NOW)
    assert isinstance(r, Mapped) and not r.late
    assert isinstance(map_record(record_at(NOW - grace - second), "r", spec(), NOW), Invalid)


def test_backfill_threshold_never_passes_now_with_a_zero_grace_period():
    s = spec(late_event_policy="backfill", grace_period_hours=0)
    soon = map_record(record_at(NOW + datetime.timedelta(minutes=1)), "s", s, NOW)
    assert isinstance(soon, Mapped) and not soon.late


# ----------------------------------------------------------------------------- loading


def test_history_lands_once_through_closed_non_replacing_backfills(tmp_path):
    orb = ScriptedOrb()
    stats = RunStats()
    m = make_manager(orb, tmp_path, stats=stats)
    events = [event(i, MARCH + datetime.timedelta(hours=i)) for i in range(5)]
    events += [event(10 + i, APRIL + datetime.timedelta(hours=i)) for i in range(3)]
    result = load(m, events)
    assert (result.accepted, result.rejected) == (8, [])
    assert orb.live == {}, "nothing is visible before close"
    creates = orb.calls_to("POST", "/events/backfills")
    creates = [c for c in creates if c[1] == "/events/backfills"]
    assert len(creates) == 2
    for _, _, body, _, headers in creates:
        assert body["replace_existing_events"] is False  # sent explicitly
        assert parse(body["close_time"]) == NOW + CLOSE_AFTER
        assert "customer_id" not in body and "external_customer_id" not in body
        assert headers["Idempotency-Key"].startswith("target-orb-backfill-")
        assert len(headers["Idempotency-Key"]) <= 64
    assert {(c[2]["timeframe_start"], c[2]["timeframe_end"]) for c in creates} == {
        ("2024-03-01T00:00:00Z", "2024-04-01T00:00:00Z"),
        ("2024-04-01T00:00:00Z", "2024-05-01T00:00:00Z"),
    }
    # Search came before ingest, and no late event went into a live request.
    ingests = orb.calls_to("POST", "/ingest")
    assert ingests and all(c[3] and c[3]["backfill_id"] for c in ingests)
    assert all(c[4]["Idempotency-Key"].startswith("target-orb-bfi-") for c in ingests)
    first_search = orb.calls.index(orb.calls_to("POST", "/events/search")[0])
    assert first_search < orb.calls.index(ingests[0])
    m.finish(failed=False)
    assert orb.pending() == []
    assert sorted(orb.live) == sorted(e["idempotency_key"] for e in events)
    assert billed_twice(orb) == {}
    rows = [(r["events"], r["status"]) for r in stats.backfills]
    assert rows == [(5, "reflected"), (3, "reflected")]
    assert stats.events_backfilled == 8 and stats.already_in_orb == 0
    record = json.loads((tmp_path / "dl.backfills.json").read_text())
    assert {b["state"] for b in record["backfills"]} == {"closed"}
    assert sorted(b["id"] for b in record["backfills"]) == sorted(orb.backfills)


def test_a_replay_lands_nothing_new_and_counts_already_in_orb(tmp_path):
    orb = ScriptedOrb()
    events = [event(i, MARCH + datetime.timedelta(hours=i)) for i in range(4)]
    first = make_manager(orb, tmp_path)
    load(first, events)
    first.finish(failed=False)
    billed = dict(orb.billed)
    stats = RunStats()
    second = make_manager(orb, tmp_path, stats=stats)
    result = load(second, events)
    second.finish(failed=False)
    assert result.accepted == 0 and result.rejected == []
    assert stats.already_in_orb == 4 and stats.events_backfilled == 0
    assert dict(orb.billed) == billed
    assert orb.pending() == []
    assert len(orb.backfills) == 1, "a replay that finds everything creates no backfill"


def test_keys_already_live_are_left_out_and_only_new_ones_are_ingested(tmp_path):
    orb = ScriptedOrb()
    events = [event(i, MARCH + datetime.timedelta(hours=i)) for i in range(3)]
    orb.live["k1"] = events[1]
    stats = RunStats()
    m = make_manager(orb, tmp_path, stats=stats)
    assert load(m, events).accepted == 2
    sent = [e["idempotency_key"] for c in orb.calls_to("POST", "/ingest") for e in c[2]["events"]]
    assert sent == ["k0", "k2"]
    assert stats.already_in_orb == 1
    m.finish(failed=False)
    assert billed_twice(orb) == {}


def test_the_same_key_in_two_batches_of_one_run_is_sent_once(tmp_path):
    orb = ScriptedOrb()
    m = make_manager(orb, tmp_path)
    ev = event(1, MARCH)
    assert load(m, [ev]).accepted == 1
    assert load(m, [ev]).accepted == 0  # search cannot see the pending backfill
    m.finish(failed=False)
    assert billed_twice(orb) == {} and list(orb.billed) == ["k1"]


def test_concurrent_jobs_with_one_key_send_it_once(tmp_path):
    orb = ScriptedOrb()
    m = make_manager(orb, tmp_path)
    batches = [[event(1, MARCH), event(i + 2, MARCH)] for i in range(8)]
    results: list = []
    threads = [threading.Thread(target=lambda b=b: results.append(load(m, b))) for b in batches]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert sum(r.accepted for r in results) == 9
    m.finish(failed=False)
    assert billed_twice(orb) == {} and len(orb.live) == 9
    assert len([c for c in orb.calls if c[:2] == ("POST", "/events/backfills")]) == 1


def test_search_asks_at_most_500_ids_a_call_with_a_timeframe_covering_the_events(tmp_path):
    orb = ScriptedOrb()
    m = make_manager(orb, tmp_path)
    events = [event(i, MARCH + datetime.timedelta(minutes=i)) for i in range(1200)]
    load(m, events)
    searches = orb.calls_to("POST", "/events/search")
    assert [len(c[2]["event_ids"]) for c in searches] == [500, 500, 200]
    for c in searches:
        assert parse(c[2]["timeframe_start"]) <= MARCH
        assert parse(c[2]["timeframe_end"]) > MARCH + datetime.timedelta(minutes=1200)
    m.finish(failed=False)


def test_search_existing_returns_key_to_event_and_ignores_unasked_ids():
    orb = ScriptedOrb()
    orb.live["a"] = event(1, MARCH) | {"idempotency_key": "a"}
    orb.live["zz"] = event(2, MARCH) | {"idempotency_key": "zz"}
    clock = Clock()
    d = Deliverer(orb.post_ingest, url=API, max_retry_seconds=5, clock=clock, sleep=clock.sleep)
    found = search_existing(
        orb, d, ["a", "b", "a"], timeframe_start=MARCH - datetime.timedelta(days=1),
        timeframe_end=MARCH + datetime.timedelta(days=1),
    )
    assert list(found) == ["a"] and found["a"]["external_customer_id"] == "c1"
    assert orb.calls[-1][2]["event_ids"] == ["a", "b"]
    orb.faults.append(("POST", "/events/search", Response(403, {}, {"detail": "nope"})))
    with pytest.raises(OrbFatalError, match="403"):
        search_existing(orb, d, ["a"], timeframe_start=MARCH, timeframe_end=APRIL)


@pytest.mark.parametrize("fault", ["timeout_after", "timeout", Response(503, {}, None),
                                   Response(409, {}, None)])
def test_a_retried_create_makes_one_backfill(tmp_path, fault):
    orb = ScriptedOrb()
    orb.faults.append(("POST", "/events/backfills", fault))
    m = make_manager(orb, tmp_path)
    assert load(m, [event(1, MARCH)]).accepted == 1
    creates = [c for c in orb.calls if c[:2] == ("POST", "/events/backfills")]
    assert len(creates) == 2
    assert creates[0][2] == creates[1][2] and creates[0][4] == creates[1][4]
    assert len(orb.backfills) == 1
    m.finish(failed=False)
    assert orb.pending() == [] and list(orb.live) == ["k1"]


def test_a_later_run_uses_a_new_create_key(tmp_path):
    orb = ScriptedOrb()
    first = make_manager(orb, tmp_path)
    load(first, [event(1, MARCH)])
    first.finish(failed=False)
    orb.now += datetime.timedelta(minutes=5)
    second = make_manager(orb, tmp_path)
    load(second, [event(2, MARCH)])
    second.finish(failed=False)
    keys = [c[4]["Idempotency-Key"] for c in orb.calls if c[:2] == ("POST", "/events/backfills")]
    assert len(set(keys)) == 2 and len(orb.backfills) == 2
    assert sorted(orb.live) == ["k1", "k2"]


def test_a_foreign_pending_backfill_stops_the_window_before_anything_is_sent(tmp_path):
    orb = ScriptedOrb()
    close = NOW + datetime.timedelta(hours=5)
    fid = orb.add_backfill(datetime.datetime(2024, 3, 5, tzinfo=UTC),
                           datetime.datetime(2024, 3, 20, tzinfo=UTC), close_time=close)
    m = make_manager(orb, tmp_path)
    with pytest.raises(OrbFatalError) as info:
        load(m, [event(1, MARCH)])
    text = str(info.value)
    assert fid in text and ts(close) in text
    assert "did not create" in text and f"/v1/events/backfills/{fid}/close" in text
    assert "rerun" in text
    assert orb.calls_to("POST", "/ingest") == []
    assert orb.calls_to("POST", "/events/search") == []
    assert [c for c in orb.calls if c[:2] == ("POST", "/events/backfills")] == []
    # Another window still loads; the foreign backfill is never written to nor closed.
    assert load(m, [event(2, APRIL)]).accepted == 1
    m.finish(failed=True)
    assert orb.backfills[fid]["status"] == "pending"
    assert orb.backfill_events[fid] == {}
    assert orb.calls_to("POST", f"/events/backfills/{fid}") == []


def test_a_foreign_backfill_past_its_close_time_is_waited_for_not_written(tmp_path):
    orb = ScriptedOrb()
    fid = orb.add_backfill(datetime.datetime(2024, 3, 1, tzinfo=UTC),
                           datetime.datetime(2024, 3, 31, tzinfo=UTC),
                           close_time=NOW - datetime.timedelta(minutes=1), status="closing")
    orb.reflect_after_fetches = 2
    m = make_manager(orb, tmp_path)
    assert load(m, [event(1, MARCH)]).accepted == 1
    assert orb.backfills[fid]["status"] == "reflected"
    assert orb.backfill_events[fid] == {}
    m.finish(failed=False)


def test_a_rerun_closes_its_own_pending_backfill_and_loads_the_rest_once(tmp_path):
    """A killed run left backfill B pending with some keys in it (search cannot see them)."""
    orb = ScriptedOrb()
    events = [event(i, MARCH + datetime.timedelta(hours=i)) for i in range(6)]
    killed = make_manager(orb, tmp_path)
    load(killed, events[:4])  # ...then SIGKILL: no finish()
    (old_id,) = orb.pending()
    orb.now += datetime.timedelta(minutes=10)
    orb.reflect_after_fetches = 1
    stats = RunStats()
    rerun = make_manager(orb, tmp_path, stats=stats)
    result = load(rerun, events)  # the whole input again: STATE never moved
    rerun.finish(failed=False)
    assert [r["status"] for r in stats.backfills] == ["closed, Orb is reflecting it"]
    orb.settle()
    assert result.accepted == 2 and stats.already_in_orb == 4
    assert billed_twice(orb) == {}
    assert sorted(orb.live) == sorted(e["idempotency_key"] for e in events)
    assert orb.pending() == []
    into_old = [c for c in orb.calls_to("POST", "/ingest") if c[3]["backfill_id"] == old_id]
    assert sum(len(c[2]["events"]) for c in into_old) == 4, "nothing more into the old one"
    assert orb.calls_to("POST", f"/events/backfills/{old_id}/close")


def test_a_create_killed_before_its_answer_is_recognised_by_timeframe_and_close_time(tmp_path):
    orb = ScriptedOrb()
    orb.faults.append(("POST", "/events/backfills", "timeout_after"))
    m = make_manager(orb, tmp_path, budget=0.1)  # no time to retry: the run dies
    with pytest.raises(Exception, match="retry budget"):
        load(m, [event(1, MARCH)])
    (bid,) = orb.pending()
    record = json.loads((tmp_path / "dl.backfills.json").read_text())["backfills"]
    assert [(e["id"], e["state"]) for e in record] == [(None, "creating")]
    orb.now += datetime.timedelta(minutes=1)
    rerun = make_manager(orb, tmp_path)
    assert load(rerun, [event(1, MARCH)]).accepted == 1
    rerun.finish(failed=False)
    assert orb.backfills[bid]["status"] == "reflected" and orb.pending() == []
    assert list(orb.live) == ["k1"]


def test_leftover_pending_backfills_of_a_killed_run_are_closed_at_the_end(tmp_path):
    orb = ScriptedOrb()
    killed = make_manager(orb, tmp_path)
    load(killed, [event(1, MARCH)])
    rerun = make_manager(orb, tmp_path)
    load(rerun, [event(2, APRIL)])  # another window: never meets the March backfill
    rerun.finish(failed=False)
    assert orb.pending() == []
    assert sorted(orb.live) == ["k1", "k2"]


def test_backfills_are_closed_on_failure_and_a_close_error_never_raises(tmp_path, caplog):
    orb = ScriptedOrb()
    stats = RunStats()
    m = make_manager(orb, tmp_path, stats=stats)
    load(m, [event(1, MARCH), event(2, APRIL)])
    april = next(b for b, v in orb.backfills.items() if v["timeframe_start"].startswith("2024-04"))
    orb.faults.append(("POST", f"/events/backfills/{april}/close", Response(403, {}, {})))
    orb.faults.append(("GET", f"/events/backfills/{april}", Response(403, {}, {})))
    m.finish(failed=True)
    statuses = {r["timeframe_start"][:7]: r["status"] for r in stats.backfills}
    assert statuses == {"2024-03": "reflected", "2024-04": "pending (close failed)"}
    assert f"POST /v1/events/backfills/{april}/close" in caplog.text
    m.finish(failed=True)  # idempotent
    assert len(orb.calls_to("POST", f"/events/backfills/{april}/close")) == 1


def test_events_orb_rejects_in_a_backfill_are_dead_lettered_with_the_reason(tmp_path):
    orb = ScriptedOrb()
    orb.faults.append(("POST", "/ingest", Response(400, {}, {"validation_errors": [
        {"idempotency_key": "k2", "validation_errors": ["customer_id does not exist"]}]})))
    m = make_manager(orb, tmp_path)
    result = load(m, [event(1, MARCH), event(2, MARCH)])
    assert result.accepted == 1
    (line,) = result.rejected
    assert line["source"] == "orb" and line["record"] == {"rec": "k2"}
    assert "customer_id does not exist" in line["reason"] and "backfill bf_" in line["reason"]
    m.finish(failed=False)


def test_live_events_orb_rejects_as_too_old_are_routed_to_a_backfill(tmp_path):
    orb = ScriptedOrb()
    stats = RunStats()
    m = make_manager(orb, tmp_path, stats=stats)
    fresh = event(1, NOW - datetime.timedelta(hours=1))
    aged = event(2, NOW - datetime.timedelta(hours=11, minutes=59))
    orb.now += datetime.timedelta(minutes=5)  # it aged past Orb's grace while queued
    job = m.live_job("tracks", [fresh, aged], [{"r": 1}, {"r": 2}])
    result = job()
    assert (result.accepted, result.rejected) == (2, [])
    assert stats.late_rerouted == 1
    backfilled = [c for c in orb.calls_to("POST", "/ingest") if c[3]]
    assert [e["idempotency_key"] for c in backfilled for e in c[2]["events"]] == ["k2"]
    m.finish(failed=False)
    assert sorted(orb.live) == ["k1", "k2"] and billed_twice(orb) == {}


def test_dry_run_plans_windows_and_makes_no_request(tmp_path, caplog):
    stats = RunStats()
    m = make_manager(ScriptedOrb(), tmp_path, dry_run=True, stats=stats)
    m.plan([event(1, MARCH), event(2, MARCH), event(3, APRIL)])
    caplog.set_level("INFO")
    m.finish(failed=False)
    assert stats.backfill_plan == [
        {"timeframe_start": "2024-03-01T00:00:00Z", "timeframe_end": "2024-04-01T00:00:00Z",
         "events": 2},
        {"timeframe_start": "2024-04-01T00:00:00Z", "timeframe_end": "2024-05-01T00:00:00Z",
         "events": 1},
    ]
    assert "2024-03-01T00:00:00Z..2024-04-01T00:00:00Z: 2 events" in caplog.text
    assert not (tmp_path / "dl.backfills.json").exists()


def test_a_corrupt_ownership_record_stops_before_anything_is_sent(tmp_path):
    (tmp_path / "dl.backfills.json").write_text("{not json")
    with pytest.raises(OrbFatalError, match="not a target-orb backfill record"):
        make_manager(ScriptedOrb(), tmp_path)


def test_a_replacing_backfill_from_orb_is_reverted_and_the_run_stops(tmp_path):
    orb = ScriptedOrb()
    original = orb._create

    def replacing(body):
        response = original(body)
        orb.backfills[response.body["id"]]["replace_existing_events"] = True
        return Response(response.status, {}, dict(orb.backfills[response.body["id"]]))

    orb._create = replacing
    m = make_manager(orb, tmp_path)
    with pytest.raises(OrbFatalError, match="replacing"):
        load(m, [event(1, MARCH)])
    assert orb.calls_to("POST", "/ingest") == []
    assert orb.calls_to("POST", "/events/backfills/bf_1/revert")


def test_summary_and_metrics_list_every_backfill(tmp_path):
    orb = ScriptedOrb()
    stats = RunStats()
    m = make_manager(orb, tmp_path, stats=stats)
    stats.late_events = 2
    load(m, [event(1, MARCH), event(2, APRIL)])
    m.finish(failed=False)
    text = stats.summary(dead_letter_path=None, dry_run=False, failed=False)
    assert "already in Orb:        0" in text
    for bid in orb.backfills:
        assert f"backfill {bid}: " in text
    metrics = json.loads(jsonutil.dumps_str(stats.as_dict()))
    assert [b["id"] for b in metrics["backfills"]] == list(orb.backfills)
    assert metrics["already_in_orb"] == 0 and metrics["events_backfilled"] == 2


def test_a_backfill_closed_under_a_long_run_is_replaced_and_nothing_lands_twice(tmp_path):
    orb = ScriptedOrb()
    stats = RunStats()
    m = make_manager(orb, tmp_path, stats=stats)
    assert load(m, [event(1, MARCH), event(2, MARCH)]).accepted == 2
    (first,) = orb.pending()
    orb.now += CLOSE_AFTER  # its close_time passed: Orb closed and reflected it
    orb.backfills[first]["status"] = "closing"
    orb.settle()
    result = load(m, [event(2, MARCH), event(3, MARCH)])
    assert (result.accepted, result.rejected) == (1, [])
    m.finish(failed=False)
    assert billed_twice(orb) == {} and sorted(orb.live) == ["k1", "k2", "k3"]
    rows = [(r["id"], r["events"], r["status"]) for r in stats.backfills]
    assert rows[0] == (first, 2, "reflected") and rows[1][1:] == (1, "reflected")
    assert len(orb.backfills) == 2 and orb.pending() == []


def test_a_backfill_closed_in_the_same_second_is_replaced_not_replayed(tmp_path):
    # Someone closes target-orb's backfill and the next create happens within the same
    # second: the same payload must not replay Orb's stored answer (the closed backfill).
    orb = ScriptedOrb()
    m = make_manager(orb, tmp_path)
    assert load(m, [event(1, MARCH)]).accepted == 1
    (first,) = orb.pending()
    orb.backfills[first]["status"] = "closing"
    orb.settle()
    result = load(m, [event(2, MARCH)])
    assert (result.accepted, result.rejected) == (1, [])
    m.finish(failed=False)
    keys = [c[4]["Idempotency-Key"] for c in orb.calls if c[:2] == ("POST", "/events/backfills")]
    assert len(set(keys)) == 2 and len(orb.backfills) == 2
    assert billed_twice(orb) == {} and sorted(orb.live) == ["k1", "k2"]


def test_a_refusal_from_a_backfill_that_is_still_open_fails_the_run(tmp_path):
    orb = ScriptedOrb()
    m = make_manager(orb, tmp_path)
    load(m, [event(1, MARCH)])
    orb.faults.append(("POST", "/ingest", Response(400, {}, {"detail": "backfill is locked"})))
    with pytest.raises(OrbFatalError, match="still open"):
        load(m, [event(2, MARCH)])


def test_a_create_done_but_answered_5xx_is_recognised_and_nothing_is_lost(tmp_path):
    """Orb made the backfill but answered 503 and kept no replay: the retry is refused as
    overlapping; the first one is recognised as target-orb's (record), closed, replaced."""
    orb = ScriptedOrb()
    orb.faults.append(("POST", "/events/backfills", "503_after"))
    m = make_manager(orb, tmp_path)
    assert load(m, [event(1, MARCH)]).accepted == 1
    m.finish(failed=False)
    orb.settle()
    assert orb.pending() == [] and list(orb.live) == ["k1"] and billed_twice(orb) == {}
    assert [len(v) for v in orb.backfill_events.values()] == [0, 1]
