"""CustomerUpdater over a real Pipeline with a scripted Orb: order, outcomes, STATE gate.

No sockets: the client answers from a script and can hold a request until the test lets it
go, so the tests can prove that a later update of a customer never overtakes an earlier one.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from target_orb.errors import OrbFatalError, OrbRetryExhaustedError
from target_orb.identify.customers import CustomerUpdater
from target_orb.mapping.traits import Update
from target_orb.orb.delivery import Deliverer, Response
from target_orb.orb.ratelimit import RateLimiter
from target_orb.pipeline.deadletter import DeadLetterWriter
from target_orb.pipeline.gate import Pipeline
from target_orb.pipeline.stats import RunStats

URL = "http://127.0.0.1:9/v1"
ERRORS = "https://docs.withorb.com/reference/error-responses#"
OK = Response(200, {}, {"id": "c"})
NOT_FOUND = Response(404, {}, {"type": ERRORS + "404-resource-not-found", "status": 404,
                               "title": "A specified resource was not found."})
URL_NOT_FOUND = Response(404, {}, {"type": ERRORS + "404-url-not-found", "status": 404})
BAD = Response(400, {}, {"type": ERRORS + "400-request-validation-errors", "status": 400,
                         "title": "Request validation failed",
                         "validation_errors": ["metadata.plan: too long"]})


class ScriptedOrb:
    """`call()` records each request and answers with `answer(path, body)`."""

    def __init__(self, answer=None):
        self.answer = answer or (lambda path, body: OK)
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, dict]] = []
        self.holds: dict[str, threading.Event] = {}
        self.arrived: dict[str, threading.Event] = {}

    def hold(self, path: str) -> None:
        """The next request to `path` waits until `release(path)`."""
        self.holds[path] = threading.Event()
        self.arrived[path] = threading.Event()

    def release(self, path: str) -> None:
        self.holds.pop(path).set()

    def call(self, method, path, *, body=None, params=None, headers=None):
        with self.lock:
            self.calls.append((method, path, json.loads(json.dumps(body))))
        if path in self.arrived:
            self.arrived[path].set()
        gate = self.holds.get(path)
        if gate is not None:
            assert gate.wait(10), "test never released the request"
        return self.answer(path, body)

    def paths(self) -> list[str]:
        with self.lock:
            return [p for _, p, _ in self.calls]


class Harness:
    def __init__(self, tmp_path, orb, *, policy="dead_letter", max_in_flight=4, budget=5):
        self.orb = orb
        self.states: list[dict] = []
        self.stats = RunStats()
        self.dead = DeadLetterWriter(str(tmp_path / "dl.jsonl"))
        self.dead_path = tmp_path / "dl.jsonl"
        self.pipeline: Pipeline

        def sleep(seconds):
            return self.pipeline.sleep(min(seconds, 0.01))

        deliverer = Deliverer(
            lambda body, count: OK, url=URL + "/ingest", max_retry_seconds=budget,
            sleep=sleep, rand=lambda: 0.0, on_retry=self.stats.add_retry,
        )
        self.pipeline = Pipeline(
            deliverer=deliverer, dead_letters=self.dead, stats=self.stats,
            invalid_policy=policy, max_in_flight=max_in_flight, state_writer=self.states.append,
        )
        self.updater = CustomerUpdater(
            client=orb, deliverer=deliverer, pipeline=self.pipeline, limiter=RateLimiter(),
            stats=self.stats, api_url=URL,
        )

    def submit(self, *updates: tuple[str, dict], stream="identifies"):
        items = [(Update(c, m), {"userId": c, "n": i}) for i, (c, m) in enumerate(updates)]
        self.updater.submit(stream, items)

    def dead_letters(self):
        if not self.dead_path.exists():
            return []
        return [json.loads(line) for line in self.dead_path.read_text().splitlines()]

    def close(self):
        self.pipeline.close(1.0)


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(orb=None, **kwargs):
        h = Harness(tmp_path, orb or ScriptedOrb(), **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_one_put_per_customer_with_merged_metadata(harness):
    h = harness()
    h.submit(("a", {"plan": "free", "seats": "1"}), ("b", {"plan": "pro"}),
             ("a", {"plan": "team", "seats": None}))
    h.pipeline.offer_state({"s": 1})
    h.pipeline.wait_all()
    calls = sorted(h.orb.calls)
    assert calls == [
        ("PUT", "/customers/external_customer_id/a",
         {"metadata": {"plan": "team", "seats": None}}),
        ("PUT", "/customers/external_customer_id/b", {"metadata": {"plan": "pro"}}),
    ]
    assert h.states == [{"s": 1}]
    assert (h.stats.customers_updated, h.stats.identify_updates_merged) == (2, 1)
    assert h.stats.events_accepted == 0  # customer updates are not Orb events
    assert h.stats.requests == 2


def test_later_update_of_a_customer_never_overtakes_an_earlier_one(harness):
    orb = ScriptedOrb()
    a = "/customers/external_customer_id/a"
    b = "/customers/external_customer_id/b"
    orb.hold(a)
    h = harness(orb)
    h.submit(("a", {"plan": "free"}))  # batch 1
    assert orb.arrived[a].wait(5)
    h.pipeline.offer_state({"s": 1})
    h.submit(("a", {"plan": "pro"}), ("b", {"plan": "team"}))  # batch 2
    h.pipeline.offer_state({"s": 2})
    deadline = time.monotonic() + 5
    while b not in orb.paths() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # give a wrongly unordered second PUT of `a` time to show up
    assert orb.paths() == [a, b], "the second update of `a` went out before the first settled"
    assert h.states == []  # batch 1 is not acknowledged yet
    orb.release(a)
    h.pipeline.wait_all()
    assert [(p, body) for _, p, body in orb.calls] == [
        (a, {"metadata": {"plan": "free"}}),
        (b, {"metadata": {"plan": "team"}}),
        (a, {"metadata": {"plan": "pro"}}),
    ]
    assert h.states in ([{"s": 2}], [{"s": 1}, {"s": 2}])


def test_a_failed_update_stops_later_updates_of_that_customer(harness):
    a = "/customers/external_customer_id/a"
    orb = ScriptedOrb(lambda path, body: Response(401, {}, {"title": "bad key"})
                      if body["metadata"] == {"plan": "free"} else OK)
    orb.hold(a)
    h = harness(orb)
    h.submit(("a", {"plan": "free"}))
    assert orb.arrived[a].wait(5)
    h.submit(("a", {"plan": "pro"}))
    h.pipeline.offer_state({"s": 2})
    time.sleep(0.1)  # time for a wrongly unordered second PUT to go out
    orb.release(a)
    with pytest.raises(OrbFatalError) as info:
        h.pipeline.wait_all()
    assert "HTTP 401" in str(info.value)
    assert "api_key" in str(info.value)
    time.sleep(0.1)
    assert orb.paths() == [a]
    assert h.states == []


def test_customer_not_found_dead_letters_every_merged_record_and_goes_on(harness):
    orb = ScriptedOrb(lambda path, body: NOT_FOUND if path.endswith("/ghost") else OK)
    h = harness(orb)
    h.submit(("ghost", {"plan": "free"}), ("a", {"plan": "pro"}), ("ghost", {"vip": "true"}))
    h.pipeline.offer_state({"s": 1})
    h.pipeline.wait_all()
    lines = h.dead_letters()
    assert [line["record"] for line in lines] == [{"userId": "ghost", "n": 0},
                                                  {"userId": "ghost", "n": 2}]
    for line in lines:
        assert line["source"] == "orb"
        assert line["stream"] == "identifies"
        assert "404 resource-not-found" in line["reason"]
        assert "Create the customer in Orb first" in line["reason"]
        assert line["event"]["external_customer_id"] == "ghost"
    assert [line["event"]["metadata"] for line in lines] == [{"plan": "free"}, {"vip": "true"}]
    assert (h.stats.customers_not_found, h.stats.customers_updated) == (1, 1)
    assert h.states == [{"s": 1}]  # after the dead letters were written


def test_url_not_found_is_fatal(harness):
    h = harness(ScriptedOrb(lambda path, body: URL_NOT_FOUND))
    h.submit(("ann@example.com", {"plan": "free"}))
    h.pipeline.offer_state({"s": 1})
    with pytest.raises(OrbFatalError) as info:
        h.pipeline.wait_all()
    message = str(info.value)
    assert "HTTP 404" in message
    assert "url-not-found" in message
    assert "api_url" in message
    assert "/customers/external_customer_id/{id}" in message
    assert "ann" not in message  # the customer id (here an email) is not in the message
    assert h.states == []
    assert h.dead_letters() == []


def test_403_is_fatal(harness):
    h = harness(ScriptedOrb(lambda path, body: Response(403, {}, {})))
    h.submit(("a", {"plan": "free"}))
    with pytest.raises(OrbFatalError, match="not allowed to update customers"):
        h.pipeline.wait_all()


def test_400_on_a_single_update_dead_letters_it_with_orbs_reason(harness):
    h = harness(ScriptedOrb(lambda path, body: BAD))
    h.submit(("a", {"plan": "x" * 10}))
    h.pipeline.offer_state({"s": 1})
    h.pipeline.wait_all()
    (line,) = h.dead_letters()
    assert line["source"] == "orb"
    assert "HTTP 400" in line["reason"]
    assert "metadata.plan: too long" in line["reason"]
    assert h.states == [{"s": 1}]
    assert h.stats.customers_updated == 0


def test_400_on_a_merged_update_isolates_the_refused_record(harness):
    orb = ScriptedOrb(lambda path, body: BAD if "bad" in body["metadata"].values() or (
        len(body["metadata"]) > 1) else OK)
    h = harness(orb)
    h.submit(("a", {"plan": "free"}), ("a", {"size": "bad"}), ("a", {"tier": "gold"}))
    h.pipeline.wait_all()
    assert [body for _, _, body in orb.calls] == [
        {"metadata": {"plan": "free", "size": "bad", "tier": "gold"}},
        {"metadata": {"plan": "free"}},
        {"metadata": {"size": "bad"}},
        {"metadata": {"tier": "gold"}},
    ]
    assert [line["record"]["n"] for line in h.dead_letters()] == [1]
    assert h.stats.customers_updated == 2


def test_retryable_answers_are_retried_with_the_same_body(harness):
    answers = iter([Response(500, {}, {}), Response(429, {"Retry-After": "0"}, {}), OK])
    h = harness(ScriptedOrb(lambda path, body: next(answers)))
    h.submit(("a", {"plan": "free"}))
    h.pipeline.offer_state({"s": 1})
    h.pipeline.wait_all()
    assert len(h.orb.calls) == 3
    assert len({json.dumps(body) for _, _, body in h.orb.calls}) == 1
    assert h.stats.retries == 2
    assert h.stats.requests == 3
    assert h.states == [{"s": 1}]


def test_retry_budget_exhausted_fails_without_state(harness):
    h = harness(ScriptedOrb(lambda path, body: Response(503, {}, {})), budget=0)
    h.submit(("a", {"plan": "free"}))
    h.pipeline.offer_state({"s": 1})
    with pytest.raises(OrbRetryExhaustedError):
        h.pipeline.wait_all()
    assert h.states == []


def test_invalid_event_policy_fail_applies_to_unknown_customers(harness):
    h = harness(ScriptedOrb(lambda path, body: NOT_FOUND), policy="fail")
    h.submit(("ghost", {"plan": "free"}))
    h.pipeline.offer_state({"s": 1})
    with pytest.raises(Exception, match="invalid_event_policy"):
        h.pipeline.wait_all()
    assert h.states == []


def test_dry_run_sends_nothing(tmp_path, caplog):
    stats = RunStats()
    pipeline = Pipeline(deliverer=None, dead_letters=DeadLetterWriter(str(tmp_path / "d")),
                        stats=stats, invalid_policy="dead_letter", max_in_flight=1,
                        state_writer=lambda s: None, dry_run=True)
    updater = CustomerUpdater(client=None, deliverer=None, pipeline=pipeline,
                              limiter=RateLimiter(), stats=stats, api_url=URL)
    with caplog.at_level("INFO"):
        updater.submit("s", [(Update("a b", {"plan": "pro"}), {}),
                             (Update("a b", {"plan": None}), {})])
    assert "DRY RUN: would PUT " + URL + "/customers/external_customer_id/a%20b" in caplog.text
    assert '{"metadata":{"plan":null}}' in caplog.text
    assert stats.identify_updates_merged == 1
