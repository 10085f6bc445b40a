"""The dead-letter writer: lines on disk before `write` returns, and a new file's name too."""

from __future__ import annotations

import json
import os
import stat

from target_orb.pipeline import deadletter
from target_orb.pipeline.deadletter import DeadLetterWriter, entry


def test_a_new_file_and_its_directory_entry_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(deadletter.os, "fsync", recording_fsync)
    writer = DeadLetterWriter(str(tmp_path / "new" / "dl.jsonl"))
    writer.write([entry("s", {"id": 1}, "bad", "local")])
    assert synced == ["file", "dir"]  # the file's data, then the directory holding its name
    writer.write([entry("s", {"id": 2}, "bad", "local")])
    assert synced == ["file", "dir", "file"]  # appending to an existing file: data only
    lines = [json.loads(x) for x in (tmp_path / "new" / "dl.jsonl").read_text().splitlines()]
    assert [x["record"]["id"] for x in lines] == [1, 2]


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_an_entry_already_in_the_file_is_not_appended_again(tmp_path):
    path = tmp_path / "dl.jsonl"
    record = {"messageId": "m1", "event": "x", "_sdc_extracted_at": "2026-01-01T00:00:00Z"}
    assert DeadLetterWriter(str(path)).write([entry("s", record, "no customer", "local")]) == 1
    # A scheduled rerun re-reads the same record (the tap stamped it anew).
    again = dict(record, _sdc_extracted_at="2026-01-02T00:00:00Z")
    writer = DeadLetterWriter(str(path))
    assert writer.write([entry("s", again, "no customer", "local")]) == 0
    assert len(_lines(path)) == 1
    # Another reason, another stream or another record is a new dead letter.
    assert writer.write([
        entry("s", again, "late", "local"),
        entry("t", again, "no customer", "local"),
        entry("s", {"messageId": "m2"}, "no customer", "local"),
    ]) == 3
    assert len(_lines(path)) == 4


def test_an_event_is_known_by_stream_idempotency_key_and_reason(tmp_path):
    path = tmp_path / "dl.jsonl"
    event = {"idempotency_key": "k1", "event_name": "e"}
    DeadLetterWriter(str(path)).write([entry("s", {"a": 1}, "rejected", "orb", event)])
    writer = DeadLetterWriter(str(path))
    assert writer.write([entry("s", {"a": 1, "b": 2}, "rejected", "orb", event)]) == 0
    assert writer.write([entry("s", {"a": 1}, "rejected", "orb", {"idempotency_key": "k2"})]) == 1


def test_duplicates_inside_one_write_are_appended_once(tmp_path):
    path = tmp_path / "dl.jsonl"
    writer = DeadLetterWriter(str(path))
    line = entry("s", {"id": 1}, "bad", "local")
    assert writer.write([line, line]) == 1
    assert writer.write([line]) == 0
    assert len(_lines(path)) == 1


def test_a_torn_last_line_is_not_counted_as_written(tmp_path):
    path = tmp_path / "dl.jsonl"
    DeadLetterWriter(str(path)).write([entry("s", {"id": 1}, "bad", "local")])
    with path.open("a") as fh:
        fh.write('{"stream": "s", "record": {"id": 2}, "rea')  # a crash mid-write
    writer = DeadLetterWriter(str(path))
    assert writer.write([entry("s", {"id": 1}, "bad", "local")]) == 0
    assert writer.write([entry("s", {"id": 2}, "bad", "local")]) == 1


def test_the_index_holds_digests_not_lines(tmp_path):
    path = tmp_path / "dl.jsonl"
    big = {"blob": "x" * 10_000}
    DeadLetterWriter(str(path)).write([entry("s", dict(big, id=i), "bad", "local")
                                       for i in range(50)])
    writer = DeadLetterWriter(str(path))
    assert writer.write([entry("s", dict(big, id=0), "bad", "local")]) == 0
    index = writer._index
    assert index is not None and len(index) == 50
    assert all(isinstance(d, int) and d.bit_length() <= 64 for d in index)
