"""The dead-letter writer: lines on disk before `write` returns, and a new file's name too."""

from __future__ import annotations

import json
import os
import stat

from target_orb import deadletter
from target_orb.deadletter import DeadLetterWriter, entry


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
