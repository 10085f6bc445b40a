"""The throwaway PostgreSQL the warehouse tests use: found, installed in CI, bounded, non-root."""

from __future__ import annotations

import os
import stat
import typing as t
from pathlib import Path

import pytest

from tests.e2e import postgres as pg

if t.TYPE_CHECKING:
    from tests.e2e.postgres import PostgresServer


def _fake_apt(tmp_path: Path, body: str) -> Path:
    """A fake `apt-get` first on PATH that logs its arguments and runs `body`."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    script = bin_dir / "apt-get"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/apt.log"\n{body}\n', encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.fixture
def no_postgres(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """PG_BINDIR names an empty directory: nothing is found until something fills it."""
    bindir = tmp_path / "pgbin"
    bindir.mkdir()
    monkeypatch.setenv("PG_BINDIR", str(bindir))
    return bindir


def test_outside_ci_missing_postgres_is_a_clear_reason_and_installs_nothing(
    no_postgres: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_apt(tmp_path, "exit 0")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(pg.PostgresUnavailable, match=r"not found: install PostgreSQL"):
        pg.ensure_bindir(ci=False)
    assert not (tmp_path / "apt.log").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs only as root")
def test_in_ci_as_root_apt_installs_postgresql_once(
    no_postgres: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake install puts initdb, pg_ctl and psql where PG_BINDIR points.
    fake = _fake_apt(
        tmp_path,
        f'case "$1" in install) touch "{no_postgres}/initdb" "{no_postgres}/pg_ctl" '
        f'"{no_postgres}/psql";; esac',
    )
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert pg.ensure_bindir(ci=True) == no_postgres
    calls = (tmp_path / "apt.log").read_text(encoding="utf-8").splitlines()
    assert calls == ["update", "install -y --no-install-recommends postgresql"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs only as root")
def test_in_ci_a_failed_install_fails_with_apts_output(
    no_postgres: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_apt(tmp_path, 'echo "E: Unable to locate package postgresql" >&2; exit 100')
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(pg.PostgresUnavailable, match=r"exited 100\n.*Unable to locate package"):
        pg.ensure_bindir(ci=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs only as root")
def test_in_ci_apt_is_bounded_in_time(
    no_postgres: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_apt(tmp_path, "exec sleep 30")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(pg, "APT_UPDATE_TIMEOUT", 1)
    with pytest.raises(pg.PostgresUnavailable, match=r"did not finish within 1 s"):
        pg.ensure_bindir(ci=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the install path is taken")
def test_in_ci_without_root_it_says_it_cannot_install(no_postgres: Path) -> None:
    with pytest.raises(pg.PostgresUnavailable, match=r"cannot install"):
        pg.ensure_bindir(ci=True)


def _postmaster_pid(server: PostgresServer) -> int:
    return int((server.datadir / "postmaster.pid").read_text().splitlines()[0])


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    (line,) = [ln for ln in status.splitlines() if ln.startswith("Uid:")]
    return int(line.split()[1])


def test_the_server_runs_as_a_non_root_user_on_loopback(postgres: PostgresServer) -> None:
    if Path("/proc/self/status").exists():
        assert _uid_of(_postmaster_pid(postgres)) != 0
    db = postgres.create_database("fixture_check", timezone="Asia/Kolkata")
    (row,) = db.query(
        "SELECT current_setting('listen_addresses') AS listen, "
        "current_setting('TimeZone') AS tz, current_user AS usr"
    )
    assert row == {"listen": "127.0.0.1", "tz": "Asia/Kolkata", "usr": pg.PG_USER}
    assert db.tap_env("TAP_WAREHOUSE") == {
        "TAP_WAREHOUSE_HOST": "127.0.0.1",
        "TAP_WAREHOUSE_PORT": str(postgres.port),
        "TAP_WAREHOUSE_USER": pg.PG_USER,
        "TAP_WAREHOUSE_PASSWORD": pg.PG_PASSWORD,
        "TAP_WAREHOUSE_DATABASE": "fixture_check",
    }


def test_a_server_stops_and_leaves_nothing_behind(postgres: PostgresServer) -> None:
    server = pg.PostgresServer(postgres.bindir).start()
    base = server.base
    assert base is not None
    pid = _postmaster_pid(server)
    server.stop()
    server.stop()  # idempotent
    assert not base.exists()
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Alive and not a zombie (the postmaster is reparented to PID 1, which reaps it late)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    (state,) = [ln for ln in status.splitlines() if ln.startswith("State:")]
    return state.split()[1] not in ("Z", "X")


def test_a_killed_test_run_leaves_no_server_running(postgres: PostgresServer) -> None:
    """SIGKILL skips atexit and fixture finalizers: the watchdog shuts the server down."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from tests.e2e import postgres as pg\n"
            f"s = pg.PostgresServer(Path({str(postgres.bindir)!r})).start()\n"
            "pid = (s.datadir / 'postmaster.pid').read_text().splitlines()[0]\n"
            "print(pid, s.base, flush=True)\n"
            "time.sleep(120)\n",
        ],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        pid_text, base_text = child.stdout.readline().split()
    finally:
        child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    pid, base = int(pid_text), Path(base_text)
    deadline = time.monotonic() + 15
    while (_running(pid) or base.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(pid), "the postmaster outlived the killed test run"
    assert not base.exists()
