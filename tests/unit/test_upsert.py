"""Upsert batch jobs with a scripted Orb and a real SQLite ledger (no sockets, no sleeps)."""

from __future__ import annotations

import collections
import datetime
import threading

import pytest

from target_orb.corrections.batch import Item
from target_orb.corrections.upsert import KeyOrder, Upserter
from target_orb.errors import OrbFatalError
from target_orb.mapping.spec import build_mapping_spec
from target_orb.orb.delivery import DeliveryResult, Response
from target_orb.state.digests import amendment_body
from target_orb.state.ledger import Ledger

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC)


def ts(minutes_ago: float = 5) -> str:
    return (NOW - datetime.timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


class ScriptedOrb:
    """Orb's rules for corrections in a few lines: amended events are invisible to search."""

    def __init__(self) -> None:
        self.held: dict[str, dict] = {}  # key -> {"body", "amended", "deprecated"}
        self.calls: list[tuple[str, object]] = []
        self.refuse: dict[str, Response] = {}
        self.fail_ingest_ack = False

    def hold(self, event: dict, *, amended: bool = False) -> None:
        self.held[event["idempotency_key"]] = {
            "body": amendment_body(event), "amended": amended, "deprecated": False,
        }

    def search(self, keys, start, end):
        self.calls.append(("search", list(keys)))
        assert start < end
        out = {}
        for key in keys:
            held = self.held.get(key)
            if held and not held["amended"]:
                out[key] = {"id": key, "customer_id": "orb_1", **held["body"],
                            "deprecated": held["deprecated"]}
        return out

    def deliver(self, events):
        self.calls.append(("ingest", [e["idempotency_key"] for e in events]))
        for e in events:
            self.held.setdefault(e["idempotency_key"], {
                "body": amendment_body(e), "amended": False, "deprecated": False,
            })  # Orb keeps the first body: a re-sent key is dropped silently
        return DeliveryResult(accepted=list(range(len(events))), requests=1)

    def amend(self, key, body):
        self.calls.append(("amend", key))
        assert "idempotency_key" not in body
        if key in self.refuse:
            return self.refuse[key]
        if key not in self.held:
            return Response(404, {}, {"type": "x#404-resource-not-found",
                                      "detail": f"Event {key} not found"})
        self.held[key].update(body=body, amended=True)
        return Response(200, {}, {"amended": key})

    def deprecate(self, key):
        self.calls.append(("deprecate", key))
        if key in self.refuse:
            return self.refuse[key]
        if key not in self.held:
            return Response(404, {}, {"type": "x#404-resource-not-found",
                                      "detail": f"Event {key} not found"})
        self.held[key]["deprecated"] = True
        return Response(200, {}, {"deprecated": key})

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


def event(n: int, tokens: int = 1, **over) -> dict:
    e = {"idempotency_key": f"k{n}", "event_name": "api", "external_customer_id": "c1",
         "timestamp": ts(), "properties": {"tokens": tokens}}
    e.update(over)
    return e


@pytest.fixture
def setup(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.open()
    orb = ScriptedOrb()

    def make(**kw) -> Upserter:
        config = {"api_key": "x", "external_customer_id_field": "userId", **kw}
        return Upserter(spec=build_mapping_spec(config), ledger=ledger, port=orb,
                        pipeline=None, deprecate_deleted_events=True)

    yield make, orb, ledger
    ledger.close()


def run(up: Upserter, *items: Item):
    order = KeyOrder()
    return up._job("s", list(items), order.claim(i.key for i in items))()


def item(e: dict | None, *, key: str | None = None, deleted: bool = False, late: bool = False):
    return Item(key or e["idempotency_key"], e, {"row": key}, deleted=deleted, late=late)


def test_new_key_is_ingested_and_recorded(setup):
    make, orb, ledger = setup
    up = make()
    result = run(up, item(event(1)))
    assert orb.kinds() == ["search", "ingest"]
    assert result.accepted == 1 and not result.rejected
    assert ledger.lookup(["k1"])["k1"].confirmed
    assert up.stats.new == 1 and up.stats.decided_by_search == 1


def test_unchanged_replay_sends_nothing_and_needs_no_search(setup):
    make, orb, _ = setup
    run(make(), item(event(1)))
    orb.calls.clear()
    up = make()
    result = run(up, item(event(1)))
    assert orb.calls == []
    assert up.stats.unchanged == 1 and result.requests == 0


def test_changed_amount_amends_twice_even_though_search_no_longer_finds_it(setup):
    make, orb, ledger = setup
    run(make(), item(event(1, tokens=1)))
    up = make()
    run(up, item(event(1, tokens=2)))
    run(up, item(event(1, tokens=3)))
    assert orb.kinds()[-2:] == ["amend", "amend"]
    assert orb.held["k1"]["body"]["properties"] == {"tokens": 3}
    assert up.stats.amended == 2
    assert ledger.lookup(["k1"])["k1"].amended


def test_empty_ledger_against_an_orb_that_already_holds_the_events(setup):
    make, orb, _ = setup
    orb.hold(event(1, tokens=1))
    orb.hold(event(2, tokens=1))
    up = make()
    run(up, item(event(1, tokens=1)), item(event(2, tokens=9)), item(event(3)))
    assert orb.kinds() == ["search", "ingest", "amend"]
    assert (up.stats.unchanged, up.stats.amended, up.stats.new) == (1, 1, 1)
    assert up.stats.decided_by_search == 3
    # what search showed is remembered: the next run asks nobody
    orb.calls.clear()
    run(make(), item(event(1, tokens=1)), item(event(2, tokens=9)), item(event(3)))
    assert orb.calls == []


def test_deleted_rows_deprecate_and_unknown_ones_are_counted(setup):
    make, orb, ledger = setup
    run(make(), item(event(1)))
    up = make()
    result = run(up, item(event(1), deleted=True), item(None, key="k404", deleted=True))
    assert ("deprecate", "k1") in orb.calls and orb.held["k1"]["deprecated"]
    assert up.stats.deprecated == 1 and up.stats.deleted_not_in_orb == 1
    assert not result.rejected
    assert "k404" not in ledger.lookup(["k404"])
    orb.calls.clear()
    run(up, item(event(1), deleted=True))  # already deprecated: nothing sent
    assert orb.calls == []


def test_live_row_whose_event_was_deprecated_is_dead_lettered_locally(setup):
    make, _orb, _ = setup
    run(make(), item(event(1)))
    run(make(), item(event(1), deleted=True))
    up = make()
    result = run(up, item(event(1, tokens=4)))
    assert [e["source"] for e in result.rejected] == ["local"]
    assert up.stats.refused == collections.Counter(deprecated_in_orb=1)


@pytest.mark.parametrize(
    ("detail", "code"),
    [
        ("The timestamp of the new event must match the existing event", "timestamp_changed"),
        ("customer_id must match the original event", "customer_changed"),
        ("Customer c1 not found", "unknown_customer"),
        ("timestamp is outside the current billing period and its grace period",
         "closed_period"),
        ("no more than 100 events can be amended for a single customer in 100 days",
         "amendment_cap"),
    ],
)
def test_refused_amendment_is_dead_lettered_with_both_versions(setup, detail, code):
    make, orb, ledger = setup
    run(make(), item(event(1, tokens=1)))
    orb.refuse["k1"] = Response(400, {}, {"status": 400, "detail": detail})
    up = make()
    result = run(up, item(event(1, tokens=2)))
    [line] = result.rejected
    assert line["source"] == "orb" and f"({code})" in line["reason"] and detail in line["reason"]
    assert line["event"]["properties"] == {"tokens": 2}  # what the source says now
    assert line["orb_event"]["properties"] == {"tokens": 1}  # what Orb has
    assert line["orb_event_from"] == "ledger" and line["correction"] == "amend"
    assert up.stats.refused == collections.Counter({code: 1})
    entry = ledger.lookup(["k1"])["k1"]  # the ledger still says what Orb holds
    assert entry.pending_op is None and entry.body["properties"] == {"tokens": 1}


def test_refused_deprecation_is_dead_lettered(setup):
    make, orb, _ = setup
    run(make(), item(event(1)))
    orb.refuse["k1"] = Response(400, {}, {"detail": "billing period already invoiced"})
    up = make()
    [line] = run(up, item(event(1), deleted=True)).rejected
    assert "needs a credit note or an Orb backfill" in line["reason"]
    assert line["correction"] == "deprecate"


def test_wrong_key_on_a_correction_stops_the_run(setup):
    make, orb, _ = setup
    run(make(), item(event(1)))
    orb.refuse["k1"] = Response(401, {}, {"title": "Unauthorized"})
    with pytest.raises(OrbFatalError, match="api_key"):
        run(make(), item(event(1, tokens=2)))


def test_crash_between_orbs_200_and_the_ledger_write_never_drops_a_later_correction(setup):
    make, orb, ledger = setup
    real_ack = ledger.acknowledge

    def crash(writes):
        if any(w.op == "ingest" for w in writes):
            raise __import__("sqlalchemy").exc.OperationalError("ack", {}, Exception("disk gone"))
        return real_ack(writes)

    ledger.acknowledge = crash
    with pytest.raises(OrbFatalError, match="ledger"):
        run(make(), item(event(1, tokens=1)))
    ledger.acknowledge = real_ack
    assert orb.held["k1"]["body"]["properties"] == {"tokens": 1}  # Orb has it
    # Search lags (or the event is out of its window): it does not find k1.
    orb.search = lambda keys, start, end: {}
    up = make()
    run(up, item(event(1, tokens=2)))
    assert orb.held["k1"]["body"]["properties"] == {"tokens": 2}
    assert up.stats.amended == 1 and up.stats.new == 0


def test_crash_after_an_amendment_amends_again_rather_than_trusting_a_stale_entry(setup):
    make, orb, ledger = setup
    run(make(), item(event(1, tokens=1)))
    real_ack = ledger.acknowledge
    ledger.acknowledge = lambda writes: (_ for _ in ()).throw(
        __import__("sqlalchemy").exc.OperationalError("ack", {}, Exception("gone")))
    with pytest.raises(OrbFatalError):
        run(make(), item(event(1, tokens=2)))
    ledger.acknowledge = real_ack
    assert orb.held["k1"]["body"]["properties"] == {"tokens": 2}
    # The source went back to 1: the stale entry says "1", but Orb holds 2.
    run(make(), item(event(1, tokens=1)))
    assert orb.held["k1"]["body"]["properties"] == {"tokens": 1}


def test_unconfirmed_ingest_of_a_key_orb_never_got_falls_back_to_ingest(setup):
    make, orb, ledger = setup
    orb.deliver = lambda events: (_ for _ in ()).throw(RuntimeError("connection lost"))
    with pytest.raises(RuntimeError):
        run(make(), item(event(1, tokens=1)))
    del orb.deliver  # back to the class's method
    up = make()
    run(up, item(event(1, tokens=2)))
    assert [k for k in orb.kinds() if k != "search"] == ["amend", "ingest"]
    assert orb.held["k1"]["body"]["properties"] == {"tokens": 2}
    assert ledger.lookup(["k1"])["k1"].pending_op is None


def test_late_new_key_follows_late_event_policy_but_late_known_keys_are_corrected(setup):
    make, orb, _ = setup
    old = ts(minutes_ago=60 * 48)
    orb.hold(event(1, tokens=1, timestamp=old))
    up = make()
    result = run(up, item(event(1, tokens=2, timestamp=old), late=True),
                 item(event(2, timestamp=old), late=True))
    assert [r["event"]["idempotency_key"] for r in result.rejected] == ["k2"]
    assert "grace period" in result.rejected[0]["reason"]
    assert result.rejected[0]["source"] == "local"
    assert up.stats.amended == 1 and "ingest" not in orb.kinds()
    send = make(late_event_policy="send")
    assert not run(send, item(event(3, timestamp=old), late=True)).rejected
    assert orb.kinds()[-1] == "ingest"


def test_jobs_sharing_a_key_run_in_submission_order():
    order = KeyOrder()
    first = order.claim(["a", "b"])
    second = order.claim(["b", "c"])
    third = order.claim(["z"])
    log: list[str] = []

    def job(name, ticket):
        KeyOrder.wait(ticket, lambda: False)
        log.append(name)
        order.release(ticket)

    t2 = threading.Thread(target=job, args=("second", second))
    t2.start()
    job("third", third)  # independent keys do not wait
    t2.join(0.3)
    assert log == ["third"] and t2.is_alive()
    job("first", first)
    t2.join(5)
    assert log == ["third", "first", "second"]
    assert order._last == {}
