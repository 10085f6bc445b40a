"""The corrections ledger on SQLite: acknowledged bodies, pending marks, pruning, failures."""

from __future__ import annotations

import datetime
import os
import threading

import pytest
import sqlalchemy as sa

from target_orb.errors import OrbFatalError
from target_orb.state import ledger as ledger_module
from target_orb.state.digests import body_digest
from target_orb.state.ledger import LEDGER_FILE_NAME, RETENTION, Ledger, Write, default_url

UTC = datetime.timezone.utc
BODY = {"event_name": "api", "timestamp": "2026-01-02T03:04:05Z",
        "properties": {"n": 1}, "external_customer_id": "c1"}


def _write(key: str, op: str, body: dict | None = BODY) -> Write:
    return Write(key, op, body_digest(body) if body else None, body,
                 (body or {}).get("timestamp", "2026-01-02T03:04:05Z"), "external_customer_id:c1")


# The same code path on PostgreSQL: set TARGET_ORB_TEST_POSTGRES_URL (e.g.
# postgresql://postgres@127.0.0.1:5432/postgres); each test gets a schema of its own.
_PG_URL = os.environ.get("TARGET_ORB_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def make_ledger(request, tmp_path):
    opened: list[Ledger] = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    else:
        if not _PG_URL:
            pytest.skip("no PostgreSQL (set TARGET_ORB_TEST_POSTGRES_URL)")
        url = _pg_schema_url(_PG_URL, f"ledger_{abs(hash(request.node.nodeid)) % 10**9}")

    def make(clock=None) -> Ledger:
        led = Ledger(url, clock=clock)
        led.open()
        opened.append(led)
        return led

    yield make
    for led in opened:
        led.close()


def _pg_schema_url(base: str, schema: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture
def ledger(make_ledger):
    return make_ledger()


def _entries(ledger: Ledger) -> int:
    """Rows in the ledger table, read with SQL beside the ledger (it has no count of its own)."""
    engine = sa.create_engine(ledger_module._driver_url(ledger.url))
    try:
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(ledger_module.ledger_table)
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_default_url_is_a_sqlite_file_beside_the_dead_letter_file(tmp_path):
    dead = tmp_path / "sub" / "dl.jsonl"
    assert default_url(str(dead)) == f"sqlite:///{tmp_path / 'sub' / LEDGER_FILE_NAME}"


def test_folders_of_the_sqlite_file_are_created(tmp_path):
    led = Ledger(f"sqlite:///{tmp_path / 'deep' / 'dir' / 'l.sqlite'}")
    led.open()
    led.close()
    assert (tmp_path / "deep" / "dir" / "l.sqlite").exists()


def test_acknowledged_entry_is_read_back_and_survives_reopening(make_ledger):
    led = make_ledger()
    led.acknowledge([_write("k1", "ingest")])
    led.close()
    known = make_ledger().lookup(["k1", "k2"])
    assert set(known) == {"k1"}
    k = known["k1"]
    assert k.digest == body_digest(BODY) and k.body == BODY
    assert (k.amended, k.deprecated, k.pending_op, k.confirmed) == (False, False, None, True)


def test_pending_mark_never_looks_acknowledged(ledger):
    ledger.mark_pending([_write("k1", "ingest")])
    k = ledger.lookup(["k1"])["k1"]
    assert k.digest is None and k.body is None and not k.confirmed
    assert (k.pending_op, k.pending_digest) == ("ingest", body_digest(BODY))


def test_pending_amend_keeps_what_orb_acknowledged_until_the_200(ledger):
    ledger.acknowledge([_write("k1", "ingest")])
    changed = {**BODY, "properties": {"n": 2}}
    ledger.mark_pending([_write("k1", "amend", changed)])
    k = ledger.lookup(["k1"])["k1"]
    assert k.digest == body_digest(BODY)  # still the acknowledged body
    assert (k.pending_op, k.pending_digest) == ("amend", body_digest(changed))
    ledger.acknowledge([_write("k1", "amend", changed)])
    k = ledger.lookup(["k1"])["k1"]
    assert (k.digest, k.amended, k.pending_op) == (body_digest(changed), True, None)


def test_amended_flag_sticks_once_set(ledger):
    ledger.acknowledge([_write("k1", "amend")])
    ledger.acknowledge([_write("k1", "seen")])
    assert ledger.lookup(["k1"])["k1"].amended is True


def test_deprecation_keeps_the_last_body(ledger):
    ledger.acknowledge([_write("k1", "ingest")])
    ledger.acknowledge([Write("k1", "deprecate", None, None, None, None)])
    k = ledger.lookup(["k1"])["k1"]
    assert k.deprecated and k.body == BODY and k.confirmed


def test_clear_pending_drops_never_acknowledged_rows_and_keeps_acknowledged_ones(ledger):
    ledger.acknowledge([_write("k1", "ingest")])
    ledger.mark_pending([_write("k1", "amend", {**BODY, "properties": {"n": 9}}),
                         _write("k2", "ingest")])
    ledger.clear_pending(["k1", "k2"])
    known = ledger.lookup(["k1", "k2"])
    assert set(known) == {"k1"}
    assert known["k1"].pending_op is None and known["k1"].digest == body_digest(BODY)


def test_lookup_of_more_keys_than_one_in_clause(ledger):
    ledger.acknowledge([_write(f"k{i}", "ingest") for i in range(1203)])
    assert len(ledger.lookup([f"k{i}" for i in range(1300)])) == 1203
    assert _entries(ledger) == 1203


def test_prune_drops_entries_past_the_correction_window_but_not_pending_ones(make_ledger):
    now = datetime.datetime(2027, 6, 1, tzinfo=UTC)
    old = (now - RETENTION - datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    recent = (now - datetime.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    led = make_ledger(clock=lambda: now)
    led.acknowledge([_write("old", "ingest", {**BODY, "timestamp": old}),
                     _write("new", "ingest", {**BODY, "timestamp": recent})])
    led.mark_pending([_write("old-pending", "ingest", {**BODY, "timestamp": old})])
    assert led.prune() == 1
    assert set(led.lookup(["old", "new", "old-pending"])) == {"new", "old-pending"}


def test_concurrent_writers_on_one_sqlite_file(ledger):
    def work(n: int) -> None:
        for i in range(20):
            key = f"t{n}-{i}"
            ledger.mark_pending([_write(key, "ingest")])
            ledger.acknowledge([_write(key, "ingest")])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert _entries(ledger) == 80


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://u@localhost/db", "SQLite"),
        ("not a url", "not a SQLAlchemy URL"),
    ],
)
def test_unusable_urls_fail_with_the_setting_named(url, expected):
    with pytest.raises(OrbFatalError, match="state_url") as info:
        Ledger(url).open()
    assert expected in str(info.value)


def test_unusable_location_fails_clearly_without_a_traceback(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(OrbFatalError, match="Cannot open the corrections ledger"):
        Ledger(f"sqlite:///{not_a_folder / 'l.sqlite'}").open()


def test_password_never_in_the_message():
    with pytest.raises(OrbFatalError) as info:
        Ledger("postgresql://user:s3cret-pw@127.0.0.1:1/db?connect_timeout=1").open()
    assert "s3cret-pw" not in str(info.value)
    assert "state_url" in str(info.value)


def test_open_says_whether_it_created_the_ledger(make_ledger):
    assert make_ledger().created is True
    assert make_ledger().created is False
