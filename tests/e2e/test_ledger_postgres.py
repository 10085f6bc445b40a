"""The corrections ledger in a real PostgreSQL (`ledger_url: postgresql://…`), end to end:
the installed `target-orb` against the stand-in Orb, the ledger in the session's server."""

from __future__ import annotations

import json

from fake_orb import FakeOrb
from target_orb.state.ledger import Ledger
from tests.conftest import API_KEY, base_config, recent, run_target, singer_lines

TS = recent(30)


def _row(tokens: int) -> dict:
    return {"type": "track", "messageId": "m1", "userId": "cust_1", "event": "API Request",
            "timestamp": TS, "properties": {"tokens": tokens}}


def test_ledger_in_postgresql_amends_twice_and_replays_nothing(postgres, tmp_path):
    db = postgres.create_database("orb_ledger_e2e")
    with FakeOrb(api_key=API_KEY) as orb:
        orb.add_customer("cust_1")
        config = base_config(orb, tmp_path, load_method="upsert", ledger_url=db.url)
        for n, tokens in enumerate((1, 2, 3, 3)):
            result = run_target(config, singer_lines([_row(tokens)]), tmp_path / f"r{n}")
            assert result.returncode == 0, result.stderr
            assert postgres.password not in result.stderr
        assert [v["properties"]["tokens"] for v in orb.amendments("m1")] == [1, 2, 3]
        assert not [r for r in orb.requests[-1:] if r["method"] != "GET"]  # replay: ping only
    assert not list(tmp_path.rglob("*.sqlite"))  # nothing fell back to a local file
    assert db.scalar(
        "SELECT amended::text || ' ' || (body::json->'properties'->>'tokens') "
        "FROM target_orb_ledger WHERE idempotency_key = 'm1'"
    ) == "true 3"
    ledger = Ledger(db.url)
    ledger.open()
    try:
        known = ledger.lookup(["m1"])["m1"]
        assert known.amended and json.dumps(known.body["properties"]) == '{"tokens": 3}'
    finally:
        ledger.close()
