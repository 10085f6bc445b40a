"""target-orb's store on SQLite (issue 17): versioned schema, backfill ownership per job,
dead letters with the file's "already dead-lettered" rule, and `target-orb-deadletter
--state-url` (list, export, replay once)."""

from __future__ import annotations

import datetime
import json
import threading

import pytest
import sqlalchemy as sa

from target_orb import deadletter as cli
from target_orb.backfill.ownership import OwnershipRecord, StoreOwnershipRecord
from target_orb.errors import OrbFatalError
from target_orb.pipeline.deadletter import entry, entry_digest
from target_orb.settings import job_name
from target_orb.state import schema
from target_orb.state.backfills import BackfillRows
from target_orb.state.deadletters import DeadLetterStore, stored_entries
from target_orb.state.ledger import Ledger

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 3, 1, 12, tzinfo=UTC)
API = "http://127.0.0.1:9/v1"
PAYLOAD = {"timeframe_start": "2026-01-01T00:00:00Z", "timeframe_end": "2026-02-01T00:00:00Z",
           "close_time": "2099-03-02T12:00:00Z", "replace_existing_events": False}


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'store.sqlite'}"


@pytest.fixture
def store(url):
    led = Ledger(url)
    led.open()
    yield led
    led.close()


def _record(store, job, tmp_path):
    rec = StoreOwnershipRecord(BackfillRows(store), api_url=API, job_name=job,
                               legacy_path=str(tmp_path / "dl.backfills.json"))
    rec.load()
    return rec


def test_schema_is_created_once_and_versioned(store, url):
    assert schema.version(store.engine) == schema.SCHEMA_VERSION
    names = set(sa.inspect(store.engine).get_table_names())
    assert {"target_orb_schema", "target_orb_ledger", "target_orb_backfills",
            "target_orb_dead_letters"} <= names
    again = Ledger(url)
    again.open()  # a second open changes nothing
    assert again.created is False and schema.version(again.engine) == schema.SCHEMA_VERSION
    again.close()


def test_a_newer_schema_is_refused_naming_the_setting(store, url):
    with store.engine.begin() as conn:
        conn.execute(sa.update(schema.schema_table).values(value="99"))
    with pytest.raises(OrbFatalError, match=r"`state_url`.*version 99.*upgrade target-orb"):
        Ledger(url).open()


def test_ownership_is_per_job_and_never_claims_another_jobs_backfill(store, tmp_path):
    mine, theirs = _record(store, "job-a", tmp_path), _record(store, "job-b", tmp_path)
    mine.add_intent(PAYLOAD, "key-a", NOW)
    backfill = {"id": "bf_1", **PAYLOAD}
    # Answer lost: recognised by timeframe and close time, by its own job only.
    assert mine.owner_entry(backfill)["idempotency_key"] == "key-a"
    assert theirs.owner_entry(backfill) is None
    assert theirs.other_job(backfill) == "job-a"
    mine.update("key-a", NOW, id="bf_1", state="pending")
    assert theirs.owner_entry(backfill) is None and theirs.other_job(backfill) == "job-a"
    assert mine.other_job(backfill) is None
    # An update by id from another job never touches job-a's entry.
    theirs.update("", NOW, id="bf_1", state="closed")
    assert mine.entries()[0]["state"] == "pending"
    mine.update("", NOW, id="bf_1", state="closed", events=7)
    assert mine.entries()[0] | {"job_name": "job-a", "state": "closed", "events": 7} == (
        mine.entries()[0]
    )
    assert theirs.entries() == []


def test_intents_of_two_jobs_matching_one_backfill_count_as_the_other_jobs(store, tmp_path):
    mine, theirs = _record(store, "job-a", tmp_path), _record(store, "job-b", tmp_path)
    mine.add_intent(PAYLOAD, "key-a", NOW)
    theirs.add_intent(PAYLOAD, "key-b", NOW)
    backfill = {"id": "bf_x", **PAYLOAD}
    assert mine.owner_entry(backfill) is None and theirs.owner_entry(backfill) is None
    assert mine.other_job(backfill) == "job-b" and theirs.other_job(backfill) == "job-a"


def test_a_legacy_json_record_is_imported_once(store, tmp_path):
    legacy = OwnershipRecord(str(tmp_path / "dl.backfills.json"), API)
    legacy.add_intent(PAYLOAD, "key-old", NOW)
    legacy.update("key-old", NOW, id="bf_old", state="pending")
    rec = _record(store, "job-a", tmp_path)
    assert [(e["id"], e["state"]) for e in rec.entries()] == [("bf_old", "pending")]
    rec.update("", NOW, id="bf_old", state="closed")
    rec.load()  # a second run does not import it again (the closed state stays)
    assert [(e["id"], e["state"]) for e in rec.entries()] == [("bf_old", "closed")]


def test_dead_letters_are_stored_once_per_reason_and_replayed_once(store, capsys):
    writer = DeadLetterStore(store, job_name="job-a", digest=entry_digest)
    ev = {"idempotency_key": "k1", "event_name": "api"}
    batch = [entry("s", {"id": 1}, "bad", "orb", ev), entry("s", {"id": 2}, "worse", "local")]
    assert writer.write(batch) == 2
    assert writer.write(batch) == 0  # already dead-lettered for the same reason
    assert writer.write([entry("s", {"id": 2}, "another reason", "local")]) == 1
    assert [item for _, item, _ in stored_entries(store)] == [
        {"stream": "s", "record": {"id": 1}, "event": ev, "reason": "bad", "source": "orb"},
        {"stream": "s", "record": {"id": 2}, "reason": "worse", "source": "local"},
        {"stream": "s", "record": {"id": 2}, "reason": "another reason", "source": "local"},
    ]
    assert cli.main(["--state-url", store.url, "replay"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["type"] for x in first] == ["SCHEMA", "RECORD", "RECORD", "RECORD"]
    assert cli.main(["--state-url", store.url, "replay"]) == 0
    assert capsys.readouterr().out == ""  # nothing new
    # Dead-lettered again (the replay did not cure it): the next replay sends it again.
    assert writer.write([batch[0]]) == 0
    assert cli.main(["--state-url", store.url, "replay"]) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [m.get("record") for m in again] == [None, {"id": 1}]


def test_export_is_json_lines_oldest_first_and_list_names_the_job(store, capsys):
    writer = DeadLetterStore(store, job_name="job-a", digest=entry_digest)
    writer.write([entry("s", {"id": n}, f"r{n}", "local") for n in range(3)])
    assert cli.main(["--state-url", store.url, "export"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["record"]["id"] for x in lines] == [0, 1, 2]
    assert set(lines[0]) == {"stream", "record", "reason", "source"}
    assert cli.main(["--state-url", store.url, "list"]) == 0
    out = capsys.readouterr()
    assert out.out.count("job-a") == 3 and "3 dead letter(s), 3 not replayed" in out.err


def test_concurrent_dead_letter_writers_store_each_entry_once(store):
    writers = [DeadLetterStore(store, job_name=f"j{n}", digest=entry_digest) for n in range(4)]
    batch = [entry("s", {"id": n}, "bad", "local") for n in range(50)]
    counts: list[int] = []
    threads = [threading.Thread(target=lambda w=w: counts.append(w.write(batch)))
               for w in writers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sum(counts) == 50 and len(list(stored_entries(store))) == 50


def test_cli_errors_name_the_option_and_hide_the_password(capsys):
    code = cli.main(["--state-url", "postgresql://u:pw-SECRET@127.0.0.1:9/db?connect_timeout=2",
                     "export"])
    err = capsys.readouterr().err
    assert code == 1 and "--state-url" in err and "pw-SECRET" not in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["list"])  # neither a file nor the store
    assert "--state-url" in capsys.readouterr().err


def test_job_name_defaults_to_the_meltano_state_id(monkeypatch):
    assert job_name({"job_name": "nightly"}, {}) == "nightly"
    assert job_name({}, {}) == "target-orb"
    env = {"MELTANO_ENVIRONMENT": "prod", "MELTANO_EXTRACTOR_NAME": "tap-segment",
           "MELTANO_LOADER_NAME": "target-orb"}
    assert job_name({}, env) == "prod:tap-segment-to-target-orb"
    assert job_name({}, {**env, "MELTANO_STATE_ID": "custom"}) == "custom"


def test_a_store_failure_is_a_clear_error_naming_the_setting(store, tmp_path):
    rec = _record(store, "job-a", tmp_path)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE target_orb_backfills"))
    with pytest.raises(OrbFatalError, match=r"`state_url`.*could not record a backfill create"):
        rec.add_intent(PAYLOAD, "key-a", NOW)
    writer = DeadLetterStore(store, job_name="job-a", digest=entry_digest)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE target_orb_dead_letters"))
    with pytest.raises(OSError, match="cannot write dead letters to the store at `state_url`"):
        writer.write([entry("s", {"id": 1}, "bad", "local")])


def test_state_url_goes_before_or_after_the_command(store, capsys):
    DeadLetterStore(store, job_name="job-a", digest=entry_digest).write(
        [entry("s", {"id": 1}, "bad", "local")]
    )
    assert cli.main(["export", "--state-url", store.url]) == 0
    after = capsys.readouterr().out
    assert cli.main(["--state-url", store.url, "export"]) == 0
    assert capsys.readouterr().out == after and json.loads(after)["record"] == {"id": 1}
    assert cli.main(["export", "--state-url", store.url, "--job", "job-b"]) == 0
    assert capsys.readouterr().out == ""


def test_list_and_export_read_a_dead_letter_file_too(tmp_path, capsys):
    path = tmp_path / "dl.jsonl"
    lines = [json.dumps(entry("s", {"id": n}, f"r{n}", "local")) for n in range(2)]
    path.write_text("\n".join(lines) + "\n")
    assert cli.main(["export", str(path)]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == [
        json.loads(x) for x in lines
    ]
    assert cli.main(["list", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.count("\n") == 2 and "2 dead letter(s)" in out.err
    with pytest.raises(SystemExit):
        cli.main(["export", str(path), "--state-url", "sqlite:///x.sqlite"])
