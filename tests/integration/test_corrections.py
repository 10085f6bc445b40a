"""`load_method: upsert` over real sockets: the installed `target-orb` against the stand-in Orb.

Each test runs the target two or three times against one stand-in, as a warehouse feed
would between syncs: the first run ingests, later runs carry changed, unchanged and
deleted rows. What Orb bills is read from the stand-in (`events()`, `amendments()`).
"""

from __future__ import annotations

import datetime
import http.server
import json
import threading
import typing as t
import urllib.request

import pytest

from fake_orb import FakeOrb
from tests.conftest import API_KEY, base_config, recent, run_target, singer_lines

UTC = datetime.timezone.utc
CUSTOMERS = ("cust_0", "cust_1", "cust_2")

pytestmark = pytest.mark.skipif(
    not hasattr(FakeOrb, "add_customer"),
    reason="the stand-in Orb has no amend/deprecate/search yet (branch standin)",
)


@pytest.fixture
def corr_orb() -> t.Iterator[FakeOrb]:
    fake = FakeOrb(api_key=API_KEY)
    fake.start()
    for customer in CUSTOMERS:
        fake.add_customer(customer)
    try:
        yield fake
    finally:
        fake.stop()


TS = recent(30)


def row(n: int, tokens: int = 1, **fields: t.Any) -> dict[str, t.Any]:
    record = {
        "type": "track",
        "messageId": f"m{n}",
        "userId": f"cust_{n % 3}",
        "event": "API Request",
        "timestamp": TS,
        "properties": {"tokens": tokens, "region": "eu"},
    }
    record.update(fields)
    return record


def upsert_config(orb: FakeOrb, tmp_path, **over: t.Any) -> dict[str, t.Any]:
    return base_config(orb, tmp_path, **{"load_method": "upsert", **over})


def run(orb: FakeOrb, tmp_path, records, *, sub: str, **over: t.Any):
    """One `target-orb` run; every run of a test shares the dead-letter folder (and so the
    default ledger file), as one Meltano project would."""
    config = upsert_config(orb, tmp_path, **over)
    return run_target(config, singer_lines(records), tmp_path / sub)


def metrics(stderr: str) -> dict[str, t.Any]:
    line = next(x for x in stderr.splitlines() if "target-orb metrics:" in x)
    return json.loads(line.split("target-orb metrics:", 1)[1])


def corrections(stderr: str) -> dict[str, t.Any]:
    return metrics(stderr)["corrections"]


def billed(orb: FakeOrb) -> dict[str, dict[str, t.Any]]:
    """key → properties of the version Orb bills (latest amendment; deprecated ones left out)."""
    deprecated = {c["id"] for c in orb.corrections() if c["deprecated"]}
    return {
        e["idempotency_key"]: orb.amendments(e["idempotency_key"])[-1]["properties"]
        for e in orb.events()
        if e["idempotency_key"] not in deprecated
    }


def requests_since(orb: FakeOrb, start: int) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in orb.requests[start:]]


def test_changed_amount_amends_and_a_second_correction_amends_again(corr_orb, tmp_path):
    first = run(corr_orb, tmp_path, [row(1), row(2)], sub="r1")
    assert first.returncode == 0, first.stderr
    assert billed(corr_orb)["m1"]["tokens"] == 1
    second = run(corr_orb, tmp_path, [row(1, tokens=5), row(2)], sub="r2")
    assert second.returncode == 0, second.stderr
    assert billed(corr_orb)["m1"]["tokens"] == 5
    third = run(corr_orb, tmp_path, [row(1, tokens=7), row(2)], sub="r3")
    assert third.returncode == 0, third.stderr
    # Search no longer finds m1 (amended); only the ledger knows it: amended, not re-sent.
    assert billed(corr_orb)["m1"]["tokens"] == 7
    assert [v["properties"]["tokens"] for v in corr_orb.amendments("m1")] == [1, 5, 7]
    assert len(corr_orb.events()) == 2
    assert corrections(third.stderr)["amended"] == 1
    assert corrections(third.stderr)["unchanged"] == 1
    for result in (first, second, third):
        assert result.states[-1] == {"bookmarks": {"tracks": {"seq": 2}}}
        assert not result.dead_letters


def test_amendment_body_is_exactly_the_amended_event_fields(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1)], sub="r1")
    start = len(corr_orb.requests)
    result = run(corr_orb, tmp_path, [row(1, tokens=3)], sub="r2")
    assert result.returncode == 0, result.stderr
    puts = [r for r in corr_orb.requests[start:] if r["method"] == "PUT"]
    assert [p["path"] for p in puts] == ["/v1/events/m1"]
    assert corr_orb.amendments("m1")[-1] == {
        "idempotency_key": "m1", "event_name": "API Request", "external_customer_id": "cust_1",
        "timestamp": corr_orb.amendments("m1")[0]["timestamp"],
        "properties": {"tokens": 3, "region": "eu"},
    }


def test_unchanged_replay_sends_nothing(corr_orb, tmp_path):
    records = [row(n) for n in range(1, 11)]
    assert run(corr_orb, tmp_path, records, sub="r1").returncode == 0
    start = len(corr_orb.requests)
    again = run(corr_orb, tmp_path, records, sub="r2")
    assert again.returncode == 0, again.stderr
    assert requests_since(corr_orb, start) == [("GET", "/v1/ping")]
    assert corrections(again.stderr)["unchanged"] == 10
    assert again.states[-1] == {"bookmarks": {"tracks": {"seq": 10}}}


def test_empty_ledger_against_an_orb_that_already_holds_the_events(corr_orb, tmp_path):
    # Loaded before upsert was turned on (append-only: no ledger).
    plain = base_config(corr_orb, tmp_path)
    loaded = run_target(plain, singer_lines([row(1), row(2), row(3)]), tmp_path / "r0")
    assert loaded.returncode == 0, loaded.stderr
    assert not (tmp_path / "target-orb-ledger.sqlite").exists()
    start = len(corr_orb.requests)
    result = run(corr_orb, tmp_path, [row(1), row(2, tokens=9), row(3), row(4)], sub="r1")
    assert result.returncode == 0, result.stderr
    kinds = requests_since(corr_orb, start)
    assert kinds.count(("POST", "/v1/events/search")) == 1
    assert ("PUT", "/v1/events/m2") in kinds
    ingests = [r for r in corr_orb.ingest_requests() if "m4" in r["keys"]]
    assert [r["keys"] for r in ingests] == [["m4"]]
    c = corrections(result.stderr)
    assert (c["unchanged"], c["amended"], c["new"], c["decided_by_search"]) == (2, 1, 1, 4)
    assert "keys decided by search alone (not in the ledger): 4" in result.stderr
    assert billed(corr_orb)["m2"]["tokens"] == 9
    # What search found is in the ledger now: the next run asks Orb nothing.
    start = len(corr_orb.requests)
    assert run(corr_orb, tmp_path, [row(1), row(2, tokens=9), row(3)], sub="r2").returncode == 0
    assert requests_since(corr_orb, start) == [("GET", "/v1/ping")]


def test_deleted_row_deprecates_when_allowed(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1), row(2)], sub="r1")
    deleted = row(1, _sdc_deleted_at="2026-01-01T00:00:00Z")
    only_key = {"messageId": "m2", "_sdc_deleted_at": "2026-01-01T00:00:00Z"}
    result = run(corr_orb, tmp_path, [deleted, only_key, {**row(3), "_sdc_deleted_at": "x"}],
                 sub="r2", deprecate_deleted_events=True)
    assert result.returncode == 0, result.stderr
    assert billed(corr_orb) == {}
    c = corrections(result.stderr)
    assert (c["deprecated"], c["deleted_not_in_orb"]) == (2, 1)
    assert result.states[-1] == {"bookmarks": {"tracks": {"seq": 3}}}
    assert not result.dead_letters


def test_deleted_row_is_skipped_and_counted_when_not_allowed(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1)], sub="r1")
    start = len(corr_orb.requests)
    result = run(corr_orb, tmp_path, [row(1, _sdc_deleted_at="2026-01-01T00:00:00Z")], sub="r2")
    assert result.returncode == 0, result.stderr
    assert requests_since(corr_orb, start) == [("GET", "/v1/ping")]
    assert billed(corr_orb) == {"m1": {"tokens": 1, "region": "eu"}}
    assert metrics(result.stderr)["skipped"] == {"deleted": 1}
    assert corrections(result.stderr)["deleted_skipped"] == 1


def _refused(result, code: str) -> dict[str, t.Any]:
    assert result.returncode == 0, result.stderr
    [line] = result.dead_letters
    assert line["source"] == "orb", line
    assert f"({code})" in line["reason"], line["reason"]
    assert corrections(result.stderr)["refused"] == {code: 1}
    # STATE moves past a refused correction once it is dead-lettered.
    assert result.states[-1] == {"bookmarks": {"tracks": {"seq": 1}}}
    return line


def test_refused_timestamp_change_dead_letters_both_versions(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1)], sub="r1")
    moved = recent(20)
    line = _refused(run(corr_orb, tmp_path, [row(1, timestamp=moved)], sub="r2"),
                    "timestamp_changed")
    assert line["orb_event"]["timestamp"] != line["event"]["timestamp"]
    assert line["event"]["timestamp"][:19] == moved[:19]
    assert "new idempotency key" in line["reason"]
    assert len(corr_orb.events()) == 1  # never re-sent under another key
    assert corr_orb.amendments("m1")[-1]["timestamp"] == line["orb_event"]["timestamp"]


def test_refused_customer_change_dead_letters_both_versions(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1)], sub="r1")
    line = _refused(run(corr_orb, tmp_path, [row(1, userId="cust_2")], sub="r2"),
                    "customer_changed")
    assert line["orb_event"]["external_customer_id"] == "cust_1"
    assert line["event"]["external_customer_id"] == "cust_2"
    assert billed(corr_orb) == {"m1": {"tokens": 1, "region": "eu"}}


def test_refused_unknown_customer(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1, userId="not_in_orb")], sub="r1")
    line = _refused(run(corr_orb, tmp_path, [row(1, userId="not_in_orb", properties={
        "tokens": 2})], sub="r2"), "unknown_customer")
    assert "Create the customer in Orb" in line["reason"]
    assert line["orb_event"]["properties"]["tokens"] == 1
    assert line["event"]["properties"]["tokens"] == 2


def test_refused_closed_period_needs_a_credit_note_or_backfill(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1)], sub="r1")
    now = datetime.datetime.now(UTC)
    # The customer's open periods now end before the event: its period is closed.
    corr_orb.set_billing_period("cust_1", now - datetime.timedelta(days=60),
                                now - datetime.timedelta(days=30))
    line = _refused(run(corr_orb, tmp_path, [row(1, tokens=4)], sub="r2"), "closed_period")
    assert "needs a credit note or an Orb backfill" in line["reason"]
    assert line["orb_event"]["properties"]["tokens"] == 1


def test_refused_over_the_per_customer_cap(tmp_path):
    with FakeOrb(api_key=API_KEY, amend_cap=1) as orb:
        orb.add_customer("cust_1")
        run(orb, tmp_path, [row(1), row(4)], sub="r1")  # both cust_1
        result = run(orb, tmp_path, [row(1, tokens=2), row(4, tokens=2)], sub="r2")
        assert result.returncode == 0, result.stderr
        [line] = result.dead_letters
        assert line["source"] == "orb" and "(amendment_cap)" in line["reason"]
        assert corrections(result.stderr)["amended"] == 1


def test_mixed_batch_of_new_unchanged_changed_and_deleted(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(n) for n in range(1, 7)], sub="r1")
    records = [
        row(1), row(2, tokens=2), row(3), row(4, tokens=4),
        row(5, _sdc_deleted_at="2026-01-01T00:00:00Z"), row(7), row(8),
    ]
    result = run(corr_orb, tmp_path, records, sub="r2", deprecate_deleted_events=True,
                 batch_size_rows=3)
    assert result.returncode == 0, result.stderr
    c = corrections(result.stderr)
    assert (c["new"], c["unchanged"], c["amended"], c["deprecated"]) == (2, 2, 2, 1)
    assert {k: v["tokens"] for k, v in billed(corr_orb).items()} == {
        "m1": 1, "m2": 2, "m3": 1, "m4": 4, "m6": 1, "m7": 1, "m8": 1,
    }
    assert result.states[-1] == {"bookmarks": {"tracks": {"seq": 7}}}


def test_a_row_updated_twice_in_one_run_ends_at_its_latest_version(corr_orb, tmp_path):
    records = [row(1, tokens=1), row(2), row(1, tokens=2), row(3), row(1, tokens=3)]
    # One row per batch: the three versions of m1 are three jobs that must stay in order.
    result = run(corr_orb, tmp_path, records, sub="r1", batch_size_rows=1,
                 max_concurrent_requests=4)
    assert result.returncode == 0, result.stderr
    assert billed(corr_orb)["m1"]["tokens"] == 3
    assert not result.dead_letters


def test_late_rules_apply_to_new_keys_only(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1)], sub="r1")
    # The same rows two days later: m1 is known (corrected whatever its age), m9 is new.
    old = (datetime.datetime.now(UTC) - datetime.timedelta(days=2)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    corr_orb.set_billing_period("cust_1", datetime.datetime.now(UTC) - datetime.timedelta(
        days=10), datetime.datetime.now(UTC) + datetime.timedelta(days=20))
    result = run(corr_orb, tmp_path, [row(1, tokens=6), row(9, timestamp=old)], sub="r2",
                 grace_period_hours=1)
    assert result.returncode == 0, result.stderr
    assert billed(corr_orb)["m1"]["tokens"] == 6
    [line] = result.dead_letters
    assert line["source"] == "local" and "grace period" in line["reason"]
    assert line["event"]["idempotency_key"] == "m9"


def test_late_new_keys_go_through_a_backfill_under_backfill_policy(corr_orb, tmp_path):
    run(corr_orb, tmp_path, [row(1)], sub="r1", late_event_policy="backfill")
    old = (datetime.datetime.now(UTC) - datetime.timedelta(days=2)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    corr_orb.set_billing_period("cust_1", datetime.datetime.now(UTC) - datetime.timedelta(
        days=10), datetime.datetime.now(UTC) + datetime.timedelta(days=20))
    result = run(corr_orb, tmp_path, [row(1, tokens=6), row(9, timestamp=old)], sub="r2",
                 late_event_policy="backfill")
    assert result.returncode == 0, result.stderr
    assert not result.dead_letters
    [backfill] = corr_orb.backfills()
    assert backfill["status"] == "reflected" and backfill["events_ingested"] == 1
    assert billed(corr_orb) == {"m1": {"tokens": 6, "region": "eu"},
                                "m9": {"tokens": 1, "region": "eu"}}
    c = corrections(result.stderr)
    assert (c["new"], c["amended"]) == (1, 1)
    # Known now: a replay sends nothing at all, not even a search.
    start = len(corr_orb.requests)
    again = run(corr_orb, tmp_path, [row(1, tokens=6), row(9, timestamp=old)], sub="r3",
                late_event_policy="backfill")
    assert again.returncode == 0, again.stderr
    assert requests_since(corr_orb, start) == [("GET", "/v1/ping")]


def test_append_only_makes_no_extra_request_and_no_ledger(corr_orb, tmp_path):
    records = [row(1), row(2, _sdc_deleted_at="2026-01-01T00:00:00Z")]
    config = base_config(corr_orb, tmp_path)
    assert run_target(config, singer_lines(records), tmp_path / "r1").returncode == 0
    changed = [row(1, tokens=5)]
    result = run_target(config, singer_lines(changed), tmp_path / "r2")
    assert result.returncode == 0, result.stderr
    kinds = {(r["method"], r["path"]) for r in corr_orb.requests}
    assert kinds == {("GET", "/v1/ping"), ("POST", "/v1/ingest")}
    assert not list(tmp_path.rglob("*.sqlite"))
    assert "corrections" not in metrics(result.stderr)
    assert billed(corr_orb)["m1"]["tokens"] == 1  # today's behaviour: Orb keeps the first


def test_overwrite_is_refused_at_start(corr_orb, tmp_path):
    result = run(corr_orb, tmp_path, [row(1)], sub="r1", load_method="overwrite")
    assert result.returncode == 1
    assert "load_method: overwrite" in result.stderr and "replacing backfill" in result.stderr
    assert "Traceback" not in result.stderr
    assert corr_orb.requests == []
    assert result.stdout == ""


# -- STATE honesty when a correction cannot be delivered -------------------------------------


class _FailingPuts:
    """A loopback front for the stand-in that answers 503 to every PUT /v1/events/…"""

    def __init__(self, upstream: str) -> None:
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: t.Any) -> None:
                return None

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "PUT" and self.path.startswith("/v1/events/"):
                    front.failed_puts += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(
                    upstream + self.path, data=body, method=self.command,
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        status, data = resp.status, resp.read()
                except urllib.error.HTTPError as err:
                    status, data = err.code, err.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _relay

        self.failed_puts = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FailingPuts:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"


def test_no_state_past_a_correction_orb_never_acknowledged(corr_orb, tmp_path):
    assert run(corr_orb, tmp_path, [row(1), row(2)], sub="r1").returncode == 0
    with _FailingPuts(corr_orb.root_url) as front:
        config = upsert_config(corr_orb, tmp_path, api_url=front.url, max_retry_seconds=2)
        lines = singer_lines([row(1, tokens=9), row(2)], state_every=1)
        result = run_target(config, lines, tmp_path / "r2")
    assert result.returncode == 1
    assert front.failed_puts >= 2
    assert "Traceback" not in result.stderr
    assert {"bookmarks": {"tracks": {"seq": 1}}} not in result.states
    assert {"bookmarks": {"tracks": {"seq": 2}}} not in result.states
    assert billed(corr_orb)["m1"]["tokens"] == 1
    # The rerun (Orb reachable again) delivers the correction.
    again = run(corr_orb, tmp_path, [row(1, tokens=9), row(2)], sub="r3")
    assert again.returncode == 0, again.stderr
    assert billed(corr_orb)["m1"]["tokens"] == 9


def test_deleted_marker_survives_the_sdks_metadata_stripping_with_stream_maps(corr_orb, tmp_path):
    # A stream map takes the SDK's own record path, which strips `_sdc_*` columns unless
    # `add_record_metadata` is on; the delete marker must survive it.
    maps = {"stream_maps": {"tracks": {"mapped": "True"}}}
    run(corr_orb, tmp_path, [row(1)], sub="r1", **maps)
    result = run(corr_orb, tmp_path, [row(1, _sdc_deleted_at="2026-01-01T00:00:00Z")],
                 sub="r2", deprecate_deleted_events=True, **maps)
    assert result.returncode == 0, result.stderr
    assert corrections(result.stderr)["deprecated"] == 1
    assert billed(corr_orb) == {}


@pytest.mark.parametrize(
    ("ledger_url", "expected"),
    [
        ("mysql://u@127.0.0.1/db", "SQLite"),
        ("postgresql://u:pw-SECRET@127.0.0.1:9/db?connect_timeout=2", "Cannot open"),
    ],
)
def test_unusable_ledger_fails_at_start_before_anything_is_sent(
    corr_orb, tmp_path, ledger_url, expected,
):
    result = run(corr_orb, tmp_path, [row(1)], sub="r1", ledger_url=ledger_url)
    assert result.returncode == 1
    assert "ledger_url" in result.stderr and expected in result.stderr
    assert "pw-SECRET" not in result.stderr and "Traceback" not in result.stderr
    assert corr_orb.requests == [] and result.stdout == ""
