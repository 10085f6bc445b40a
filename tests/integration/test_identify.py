"""Identify → Orb customer metadata over real sockets: installed `target-orb` vs the stand-in.

Each test seeds the stand-in's customers, runs the CLI on a Singer feed and asserts on what
the stand-in holds afterwards (each customer's metadata), on every customer request it
received, on the events that landed, the dead-letter lines, STATE and stderr
(CONTRACT.md "Identify → customer metadata"; orb-billing resources/customers/customers.py,
`update_by_external_id`; issue 9).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import typing as t
from pathlib import Path
from urllib.parse import quote

import pytest

from fake_orb import FakeOrb
from tests.conftest import (
    API_KEY,
    RunResult,
    assert_no_secret,
    base_config,
    recent,
    run_target,
    singer_lines,
    track,
)

MAPPING = {
    "order_completed_last_30days": "order_completed_last_30days",
    "lifetime_value": "ltv",
    "plan": "plan",
    "seats": "seats",
    "company.tier": "company_tier",
    "seq": "last_seq",
}
# Personal traits a feed carries; none of these may reach Orb or a log line.
EMAIL = "ann.private@example.com"
PHONE = "+1 555 0100 77"
STREET = "42 Hidden Lane"
PERSONAL = {"email": EMAIL, "phone": PHONE, "address": {"street": STREET, "city": "Lyon"},
            "name": "Ann Privé"}
PERSONAL_VALUES = (EMAIL, PHONE, STREET, "Ann Priv")
CUSTOMERS_PATH = "/v1/customers/external_customer_id/"


def identify(user: t.Any, traits: t.Any, n: int = 0, **fields: t.Any) -> dict[str, t.Any]:
    """A raw Segment Identify call."""
    record = {
        "type": "identify",
        "messageId": f"i{n}",
        "userId": user,
        "timestamp": recent(),
        "traits": traits,
        "context": {"library": {"name": "analytics.js"}},
    }
    record.update(fields)
    return record


def id_config(orb: FakeOrb, tmp_path: Path, **overrides: t.Any) -> dict[str, t.Any]:
    config = base_config(
        orb, tmp_path, identify_policy="customer_metadata", traits_mapping=MAPPING,
    )
    config.update(overrides)
    return config


def metadata_of(orb: FakeOrb, customer: str) -> dict[str, str]:
    found = orb.customer(customer)
    assert found is not None, customer
    return found["metadata"]


def updates_by_customer(orb: FakeOrb) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for update in orb.customer_updates():
        out.setdefault(update["external_customer_id"], []).append(update)
    return out


def customer_paths(orb: FakeOrb) -> list[str]:
    """Raw (still URL-encoded) paths of every customer request the stand-in received."""
    with orb.lock:
        return [r["path"] for r in orb.requests if r["path"].startswith(CUSTOMERS_PATH)]


def metrics(result: RunResult) -> dict[str, t.Any]:
    line = next(x for x in result.stderr.splitlines() if "target-orb metrics: " in x)
    return json.loads(line.split("target-orb metrics: ", 1)[1])


def assert_clean(result: RunResult, returncode: int = 0) -> None:
    assert result.returncode == returncode, result.stderr
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def assert_nothing_personal_left(orb: FakeOrb, result: RunResult) -> None:
    """No personal trait value in any request the stand-in received, nor in stderr."""
    sent = json.dumps(orb.customer_updates(), ensure_ascii=False)
    sent += json.dumps(orb.events(), ensure_ascii=False)
    sent += json.dumps(customer_paths(orb), ensure_ascii=False)
    for value in PERSONAL_VALUES:
        assert value not in sent, f"{value!r} was sent to Orb"
        assert value not in result.stderr, f"{value!r} is in a log line"
        assert quote(value) not in result.stderr


def final_seq(result: RunResult, stream: str = "tracks") -> list[int]:
    return [s["bookmarks"][stream]["seq"] for s in result.states]


@pytest.fixture
def seeded(orb: FakeOrb) -> FakeOrb:
    for n in range(5):
        orb.add_customer(f"cus_{n}", metadata={"region": "eu"})
    return orb


# --------------------------------------------------------------------------- Engage audience sync


def test_engage_audience_first_sync_then_only_changes(seeded, tmp_path):
    orb = seeded
    audience = "order_completed_last_30days"
    first = [identify(f"cus_{n}", {audience: True, **PERSONAL}, n) for n in range(5)]
    first.insert(2, track(100, userId="cus_1"))
    result = run_target(id_config(orb, tmp_path), singer_lines(first), tmp_path / "first")
    assert_clean(result)
    for n in range(5):
        assert metadata_of(orb, f"cus_{n}") == {"region": "eu", audience: "true"}
    assert sorted(
        (u["external_customer_id"], json.dumps(u["body"]), u["status"])
        for u in orb.customer_updates()
    ) == [(f"cus_{n}", json.dumps({"metadata": {audience: "true"}}), 200) for n in range(5)]
    assert list(orb.landed) == ["m100"]
    assert final_seq(result) == [6]
    assert result.dead_letters == []
    identify_metrics = metrics(result)["identify"]
    assert identify_metrics == {
        "identifies_read": 5, "customers_updated": 5, "updates_merged": 0,
        "customers_not_found": 0, "skipped": {},
    }
    assert "customers updated:     5" in result.stderr
    assert_nothing_personal_left(orb, result)

    # A later sync sends only the changes: two users left the audience.
    before = len(orb.customer_updates())
    changes = [identify("cus_1", {audience: False}, 11), identify("cus_3", {audience: False}, 13)]
    result = run_target(id_config(orb, tmp_path), singer_lines(changes), tmp_path / "second")
    assert_clean(result)
    later = orb.customer_updates()[before:]
    assert sorted((u["external_customer_id"], u["body"]) for u in later) == [
        ("cus_1", {"metadata": {audience: "false"}}),
        ("cus_3", {"metadata": {audience: "false"}}),
    ]
    for n in range(5):
        expected = "false" if n in (1, 3) else "true"
        assert metadata_of(orb, f"cus_{n}") == {"region": "eu", audience: expected}
    assert final_seq(result) == [2]


def test_computed_traits_numbers_and_strings(orb, tmp_path):
    orb.add_customer("cus_A", metadata={"plan": "free", "seats": "1", "keep": "me"})
    record = identify("cus_A", {
        "lifetime_value": 1234.50, "seats": 12, "plan": "pro", "company": {"tier": "gold"},
        "seq": 0,
    })
    lines = singer_lines([record])
    # A float with trailing zeros and an exponent, exactly as a tap writes them.
    lines[1] = lines[1].replace('"lifetime_value": 1234.5', '"lifetime_value": 1234.50')
    result = run_target(id_config(orb, tmp_path), lines, tmp_path)
    assert_clean(result)
    (update,) = orb.customer_updates()
    assert update["body"] == {"metadata": {
        "ltv": "1234.5", "plan": "pro", "seats": "12", "company_tier": "gold", "last_seq": "0",
    }}
    assert metadata_of(orb, "cus_A") == {
        "plan": "pro", "seats": "12", "keep": "me", "ltv": "1234.5", "company_tier": "gold",
        "last_seq": "0",
    }

    # Exponent notation in, plain decimal out; a null trait deletes its key.
    more = identify("cus_A", {"lifetime_value": 0, "seats": None, "plan": True}, 1)
    lines = singer_lines([more])
    lines[1] = lines[1].replace('"lifetime_value": 0', '"lifetime_value": 1.5E-7')
    result = run_target(id_config(orb, tmp_path), lines, tmp_path / "2")
    assert_clean(result)
    assert orb.customer_updates()[-1]["body"] == {
        "metadata": {"ltv": "0.00000015", "plan": "true", "seats": None},
    }
    assert metadata_of(orb, "cus_A") == {
        "plan": "true", "keep": "me", "ltv": "0.00000015", "company_tier": "gold",
        "last_seq": "0",
    }


def test_personal_traits_never_leave_the_process(orb, tmp_path):
    orb.add_customer("cus_A")
    records = [
        identify("cus_A", {"plan": "pro", **PERSONAL}, 1),
        identify("cus_ghost", {"plan": "pro", **PERSONAL}, 2),  # dead-lettered by Orb
        identify("cus_A", {**PERSONAL}, 3),  # nothing mapped: nothing sent
        identify(None, {"plan": "pro", **PERSONAL}, 4),  # no customer: dead-lettered locally
        identify("cus_A", {"plan": "__BIG__", **PERSONAL}, 5),  # a value Orb cannot hold
        track(6, userId="cus_A", properties={"tokens": 1, "email": EMAIL}),
    ]
    lines = [line.replace('"__BIG__"', "1E+5000") for line in singer_lines(records)]
    result = run_target(
        id_config(orb, tmp_path), lines, tmp_path, env={"TARGET_ORB_LOGLEVEL": "DEBUG"},
    )
    assert_clean(result)
    assert [u["body"] for u in orb.customer_updates()] == [{"metadata": {"plan": "pro"}}] * 2
    assert list(orb.landed) == ["m6"]
    assert orb.events()[0]["properties"] == {"tokens": 1}
    assert metadata_of(orb, "cus_A") == {"plan": "pro"}
    assert_nothing_personal_left(orb, result)
    assert "DEBUG" in result.stderr  # the check above ran over debug logs too
    # The dead-letter file keeps the original records: it stays on the user's machine.
    letters = {d["record"]["messageId"]: d for d in result.dead_letters}
    assert sorted(letters) == ["i2", "i4", "i5"]
    assert letters["i2"]["record"]["traits"]["email"] == EMAIL
    assert letters["i2"]["event"] == {"external_customer_id": "cus_ghost",
                                      "metadata": {"plan": "pro"}}
    assert metrics(result)["identify"]["skipped"] == {"no_traits": 1}


# --------------------------------------------------------------------------- outcomes


def test_customer_that_does_not_exist_is_dead_lettered_and_the_run_goes_on(orb, tmp_path):
    orb.add_customer("cus_A")
    records = [
        identify("cus_ghost", {"plan": "pro", **PERSONAL}, 1),
        track(2, userId="cus_ghost"),  # Orb takes events for unknown customers
        identify("cus_ghost", {"seats": 3}, 3),
        identify("cus_A", {"plan": "team"}, 4),
    ]
    result = run_target(id_config(orb, tmp_path), singer_lines(records), tmp_path)
    assert_clean(result)
    assert metadata_of(orb, "cus_A") == {"plan": "team"}
    assert orb.customer("cus_ghost") is None
    assert list(orb.landed) == ["m2"]
    ghost = updates_by_customer(orb)["cus_ghost"]
    assert [(u["body"], u["status"]) for u in ghost] == [
        ({"metadata": {"plan": "pro", "seats": "3"}}, 404),  # merged: one request
    ]
    letters = result.dead_letters
    assert [d["record"] for d in letters] == [records[0], records[2]]
    for line in letters:
        assert line["source"] == "orb"
        assert line["stream"] == "tracks"
        assert "404 resource-not-found" in line["reason"]
        assert "Create the customer in Orb first" in line["reason"]
    assert final_seq(result) == [4]
    assert metrics(result)["identify"]["customers_not_found"] == 1
    assert "customers not found:   1" in result.stderr
    assert "dead-lettered:         2" in result.stderr
    assert_nothing_personal_left(orb, result)


class UrlNotFoundOrb(FakeOrb):
    """A stand-in whose customer routes are missing (a wrong deployment or base path)."""

    def _http_customer(self, req, ext):  # the stand-in's private hook
        from fake_orb import _Outcome, error_body

        return _Outcome(404, error_body(404, "404-url-not-found", detail="No such route"))


def test_url_not_found_is_fatal_and_writes_no_state(tmp_path):
    with UrlNotFoundOrb(api_key=API_KEY) as orb:
        records = [track(1), identify("cus_A", {"plan": "pro"}, 2), track(3)]
        result = run_target(
            id_config(orb, tmp_path), singer_lines(records, state_every=1), tmp_path,
        )
    assert_clean(result, returncode=1)
    assert "HTTP 404" in result.stderr
    assert "url-not-found" in result.stderr
    assert "Check `api_url`" in result.stderr
    assert all(seq < 2 for seq in final_seq(result)), result.stdout
    assert result.dead_letters == []


# --------------------------------------------------------------------------- merging and ids


def test_updates_of_one_customer_in_a_batch_are_merged_in_input_order(orb, tmp_path):
    orb.add_customer("cus_A", metadata={"seats": "1", "vip": "true"})
    orb.add_customer("cus_B")
    records = [
        identify("cus_A", {"plan": "free", "seats": 2}, 1),
        identify("cus_B", {"plan": "pro"}, 2),
        identify("cus_A", {"plan": "team", "lifetime_value": 10}, 3),
        identify("cus_A", {"seats": None}, 4),
        identify("cus_A", {"lifetime_value": 12.50, "seats": 5}, 5),
    ]
    lines = singer_lines(records)
    result = run_target(id_config(orb, tmp_path), lines, tmp_path)
    assert_clean(result)
    by_customer = updates_by_customer(orb)
    assert [u["body"] for u in by_customer["cus_A"]] == [
        {"metadata": {"plan": "team", "seats": "5", "ltv": "12.5"}},
    ]
    assert [u["body"] for u in by_customer["cus_B"]] == [{"metadata": {"plan": "pro"}}]
    assert metadata_of(orb, "cus_A") == {"vip": "true", "plan": "team", "seats": "5",
                                         "ltv": "12.5"}
    assert metrics(result)["identify"]["updates_merged"] == 3
    assert "updates merged:        3" in result.stderr


AWKWARD = ["en/cus/?1500", "a b", "zoë 東京", "100%", "#frag&x=1+2", "a/../b", "...", " x"]


def test_awkward_customer_ids_are_url_encoded_in_the_path(orb, tmp_path):
    for n, customer in enumerate(AWKWARD):
        orb.add_customer(customer.strip() or customer, metadata={"n": str(n)})
    records = [identify(c, {"plan": f"p{n}"}, n) for n, c in enumerate(AWKWARD)]
    records += [identify(".", {"plan": "x"}, 90), identify("..", {"plan": "x"}, 91)]
    result = run_target(id_config(orb, tmp_path), singer_lines(records), tmp_path)
    assert_clean(result)
    for n, customer in enumerate(AWKWARD):
        assert metadata_of(orb, customer.strip()) == {"n": str(n), "plan": f"p{n}"}, customer
    paths = customer_paths(orb)
    assert sorted(paths) == sorted(CUSTOMERS_PATH + quote(c.strip(), safe="") for c in AWKWARD)
    for path in paths:
        tail = path[len(CUSTOMERS_PATH):]
        assert not set(tail) & set("/? #&+"), path
    # `.` and `..` are path segments no request can address: dead-lettered locally.
    letters = result.dead_letters
    assert [(d["record"]["userId"], d["source"]) for d in letters] == [(".", "local"),
                                                                      ("..", "local")]
    assert all("cannot be addressed" in d["reason"] for d in letters)


# --------------------------------------------------------------------------- warehouse shape

WAREHOUSE_SCHEMA = {"type": "object", "properties": {}, "additionalProperties": True}


def warehouse_identify(n: int, user: str, **traits: t.Any) -> dict[str, t.Any]:
    row = {
        "id": f"djs-{n}", "user_id": user, "anonymous_id": f"anon-{n}",
        "received_at": recent(), "sent_at": recent(), "timestamp": recent(),
        "original_timestamp": recent(), "uuid_ts": recent(), "context_ip": "203.0.113.9",
        "context_library_name": "analytics.js", "_sdc_extracted_at": recent(),
        "email": EMAIL, "phone": PHONE,
    }
    row.update(traits)
    return row


def warehouse_track(n: int, user: str) -> dict[str, t.Any]:
    return {"id": f"w{n}", "user_id": user, "event": "api_request", "event_text": "API Request",
            "timestamp": recent(), "received_at": recent(), "tokens": n}


@pytest.mark.parametrize("stream", ["identifies", "public-identifies"])
def test_warehouse_identifies_stream_rows_are_identify_calls(orb, tmp_path, stream):
    orb.add_customer("cus_A")
    orb.add_customer("cus_B")
    config = id_config(orb, tmp_path, record_preset="segment_warehouse")
    del config["external_customer_id_field"]  # the preset's `user_id`
    del config["properties_mapping"]
    identifies = [
        warehouse_identify(1, "cus_A", order_completed_last_30days=True, plan="pro"),
        warehouse_identify(2, "cus_B", order_completed_last_30days=False),
    ]
    lines = singer_lines(identifies, stream=stream, schema=WAREHOUSE_SCHEMA, final_state=False)
    lines += singer_lines([warehouse_track(3, "cus_A")], stream="public-tracks",
                          schema=WAREHOUSE_SCHEMA)
    result = run_target(config, lines, tmp_path)
    assert_clean(result)
    assert metadata_of(orb, "cus_A") == {"order_completed_last_30days": "true", "plan": "pro"}
    assert metadata_of(orb, "cus_B") == {"order_completed_last_30days": "false"}
    assert orb.events() == [{
        "idempotency_key": "w3", "event_name": "API Request", "external_customer_id": "cus_A",
        "timestamp": orb.events()[0]["timestamp"], "properties": {"tokens": 3},
    }]
    assert final_seq(result, "public-tracks") == [1]
    assert_nothing_personal_left(orb, result)


def test_identify_streams_names_other_identify_streams(orb, tmp_path):
    orb.add_customer("cus_A")
    rows = [{"userId": "cus_A", "traits": {"plan": "pro", "email": EMAIL}}]
    config = id_config(orb, tmp_path, identify_streams=["crm-traits"])
    lines = singer_lines(rows, stream="crm-traits", schema=WAREHOUSE_SCHEMA)
    result = run_target(config, lines, tmp_path)
    assert_clean(result)
    assert metadata_of(orb, "cus_A") == {"plan": "pro"}
    assert_nothing_personal_left(orb, result)


# --------------------------------------------------------------------------- Track unchanged


MIXED = [
    track(1, userId="cus_0"),
    identify("cus_0", {"order_completed_last_30days": True, **PERSONAL}, 2),
    track(3, userId="cus_1"),
    identify("cus_1", {"plan": "pro"}, 4, type="Identify"),
    track(5, userId="cus_2", properties={"tokens": 5, "region": "us", "email": EMAIL}),
    {"type": "page", "messageId": "p6", "userId": "cus_2", "timestamp": recent()},
]


@pytest.mark.parametrize("policy", ["skip", "customer_metadata", None])
def test_track_delivery_is_the_same_under_every_identify_policy(seeded, tmp_path, policy):
    orb = seeded
    config = id_config(orb, tmp_path, identify_policy=policy)
    if policy is None:
        for key in ("identify_policy", "traits_mapping"):
            del config[key]
    result = run_target(config, singer_lines(MIXED, state_every=2), tmp_path)
    assert_clean(result)
    assert orb.events() == [
        {"idempotency_key": f"m{n}", "event_name": "API Request",
         "external_customer_id": f"cus_{n // 2}", "timestamp": MIXED[n - 1]["timestamp"],
         "properties": {"tokens": tokens, "region": region}}
        for n, tokens, region in ((1, 1, "eu"), (3, 3, "eu"), (5, 5, "us"))
    ]
    assert final_seq(result)[-1] == 6
    assert result.dead_letters == []
    got = metrics(result)
    if policy == "customer_metadata":
        assert sorted(u["external_customer_id"] for u in orb.customer_updates()) == [
            "cus_0", "cus_1"]
        assert got["skipped"] == {"type": 1}  # the page call
        assert got["identify"]["customers_updated"] == 2
    else:
        # `skip` (and no setting at all) exactly as before: Identify calls are skipped by
        # type and counted; no customer request; no new summary lines or metrics.
        assert orb.customer_updates() == []
        assert customer_paths(orb) == []
        assert got["skipped"] == {"type": 3}
        assert "identify" not in got
        assert "identifies read" not in result.stderr
    assert_nothing_personal_left(orb, result)


def test_skip_leaves_a_warehouse_identifies_stream_as_it_was(orb, tmp_path):
    """Under `skip` an `identifies` stream is read as before (as Track rows): routing is opt-in."""
    orb.add_customer("cus_A")
    config = base_config(orb, tmp_path, record_preset="segment_warehouse")
    del config["external_customer_id_field"]
    rows = [warehouse_identify(1, "cus_A", plan="pro")]
    lines = singer_lines(rows, stream="public-identifies", schema=WAREHOUSE_SCHEMA)
    result = run_target(config, lines, tmp_path)
    assert_clean(result)
    assert orb.customer_updates() == []
    assert [d["reason"] for d in result.dead_letters] == ["no event name at `event_text`"]


# --------------------------------------------------------------------------- order and STATE

# Lowers the SDK's drain age so a short run drains (and offers STATE) after every record.
_FAST_DRAIN = (
    "import sys; from target_orb.target import TargetOrb; "
    "TargetOrb._MAX_RECORD_AGE_IN_MINUTES = float(sys.argv.pop(1)); TargetOrb.cli()"
)


class SlowCustomersOrb(FakeOrb):
    """Answers some customer updates late: `delays` maps a `last_seq` value to seconds."""

    def __init__(self, delays: dict[str, float], **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self.delays = delays

    def _http_customer(self, req, ext):  # the stand-in's private hook
        try:
            seq = json.loads(req.body)["metadata"].get("last_seq")
        except (ValueError, TypeError, KeyError, AttributeError):
            seq = None
        self._stopping.wait(self.delays.get(seq, 0.0))
        return super()._http_customer(req, ext)


def run_watched(orb: FakeOrb, config: dict, lines: list[str], tmp_path: Path,
                timeout: float = 60) -> tuple[RunResult, list[tuple[dict, dict, set]]]:
    """Run the CLI (drain after every record), noting Orb's state at each STATE line.

    Returns the result and, per STATE line: the STATE, {customer: highest `last_seq` Orb
    applied} and the messageIds already in the dead-letter file, read the moment the line
    arrived.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    input_path = tmp_path / "input.singer"
    input_path.write_text("\n".join(lines) + "\n")
    dead_path = Path(config["dead_letter_path"])
    cmd = [sys.executable, "-c", _FAST_DRAIN, "0", "--config", str(config_path),
           "--input", str(input_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARGET_ORB_")}
    stderr_path = tmp_path / "stderr.log"
    out: list[str] = []
    seen: list[tuple[dict, dict, set]] = []

    def snapshot() -> tuple[dict, set]:
        applied: dict[str, int] = {}
        for update in orb.customer_updates():
            seq = (update["body"] or {}).get("metadata", {}).get("last_seq")
            if update["status"] == 200 and seq is not None:
                applied[update["external_customer_id"]] = max(
                    applied.get(update["external_customer_id"], -1), int(seq))
        dead = set()
        if dead_path.exists():
            for line in dead_path.read_text().split("\n")[:-1]:
                dead.add(json.loads(line)["record"]["messageId"])
        return applied, dead

    with stderr_path.open("w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.append(line)
                if line.strip():
                    seen.append((json.loads(line), *snapshot()))
            returncode = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return RunResult(returncode, "".join(out), stderr_path.read_text(), dead_path), seen


def test_state_waits_for_customer_updates_and_one_customer_stays_in_order(tmp_path):
    # The first update of cus_A is answered late: a later update of cus_A sent in parallel
    # would land first (wrong final metadata), and STATE written before Orb answered would
    # cover an update Orb never applied.
    with SlowCustomersOrb({"1": 1.0, "4": 0.5}, api_key=API_KEY) as orb:
        for customer in ("cus_A", "cus_B"):
            orb.add_customer(customer)
        records = [
            track(0, userId="cus_A"),
            identify("cus_A", {"plan": "free", "seq": 1}, 1),
            identify("cus_B", {"plan": "pro", "seq": 2}, 2),
            identify("cus_A", {"plan": "pro", "seq": 3}, 3),
            identify("cus_ghost", {"plan": "pro", "seq": 4}, 4),
            track(5, userId="cus_B"),
            identify("cus_A", {"plan": "team", "seq": 6}, 6),
            identify("cus_B", {"plan": "team", "seq": 7}, 7),
        ]
        config = id_config(orb, tmp_path, max_concurrent_requests=4)
        result, seen = run_watched(orb, config, singer_lines(records, state_every=1), tmp_path)
        assert_clean(result)
        updates = updates_by_customer(orb)
        assert [u["body"]["metadata"]["last_seq"] for u in updates["cus_A"]] == ["1", "3", "6"]
        assert metadata_of(orb, "cus_A") == {"plan": "team", "last_seq": "6"}
        assert metadata_of(orb, "cus_B") == {"plan": "team", "last_seq": "7"}
        assert [d["record"]["messageId"] for d in result.dead_letters] == ["i4"]
        assert sorted(orb.landed) == ["m0", "m5"]
    assert seen, "no STATE line was written"
    assert seen[-1][0]["bookmarks"]["tracks"]["seq"] == len(records)
    for state, applied, dead in seen:
        covered = records[: state["bookmarks"]["tracks"]["seq"]]
        for record in covered:
            if record["type"] != "identify":
                continue
            done = applied.get(record["userId"], -1) >= record["traits"]["seq"]
            assert done or record["messageId"] in dead, (
                f"STATE {state} was written before {record['messageId']} was applied or "
                "dead-lettered"
            )
