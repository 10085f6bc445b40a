"""A throwaway PostgreSQL server for end-to-end tests (loopback only, stopped at session end).

`postgres_server()` finds Debian's PostgreSQL binaries (`/usr/lib/postgresql/<v>/bin`) or an
`initdb` on PATH; when there are none and the run is in CI (`CI=true`) as root with apt-get,
it installs Debian's `postgresql` package once (`apt-get update`, `apt-get install -y
postgresql`, each bounded in time). It then creates a cluster with `initdb` in a fresh temp
directory and starts it with `pg_ctl` on 127.0.0.1 and a free port. PostgreSQL refuses to run
as root, so under root the cluster belongs to the `postgres` user the package creates.

Nothing here needs a Python database driver: SQL goes through the cluster's own `psql`.

Used by tests/e2e/conftest.py (the session-scoped `postgres` fixture) and reusable:

    db = postgres.create_database("warehouse")      # a fresh, empty database
    db.execute("UPDATE web_app.tracks SET amount = 0 WHERE id = 'x'")
    rows = db.query("SELECT id, amount FROM web_app.tracks")   # list of dicts (JSON types)
    db.url                                           # postgresql://user:pw@127.0.0.1:port/db
    db.tap_env("TAP_WAREHOUSE")                      # env for a Meltano tap-postgres plugin
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

PG_USER = "orb_test"  # the cluster's superuser (a database role, not an OS user)
PG_PASSWORD = "orb-test-password"  # throwaway cluster, loopback only
OS_USER_WHEN_ROOT = "postgres"  # created by Debian's postgresql-common

APT_UPDATE_TIMEOUT = 300
APT_INSTALL_TIMEOUT = 600
INITDB_TIMEOUT = 120
PG_CTL_TIMEOUT = 60  # seconds pg_ctl waits for start/stop (its own -t)
PSQL_TIMEOUT = 60

_DEBIAN_BINDIRS = "/usr/lib/postgresql"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


# Run by `python -c` beside each server: argv = owner pid, postmaster.pid path, base dir.
_WATCHDOG = """
import os, shutil, signal, sys, time
owner, pidfile, base = int(sys.argv[1]), sys.argv[2], sys.argv[3]
while os.path.isdir(base):
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        break
    time.sleep(0.5)
else:
    sys.exit(0)
try:
    with open(pidfile) as fh:
        os.kill(int(fh.readline()), signal.SIGQUIT)
except (OSError, ValueError):
    pass
time.sleep(2)
shutil.rmtree(base, ignore_errors=True)
"""


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be had here; the message says why and what to do."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------------------- binaries


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """The directory holding `initdb`, `pg_ctl` and `psql`, or None.

    `PG_BINDIR` wins when set; then Debian/Ubuntu's newest `/usr/lib/postgresql/<v>/bin` (not
    on PATH there); then an `initdb` on PATH (Homebrew, other distributions).
    """
    wanted = ("initdb", "pg_ctl", "psql")
    override = os.environ.get("PG_BINDIR")
    if override:
        path = Path(override)
        return path if all((path / name).is_file() for name in wanted) else None
    candidates = sorted(Path(_DEBIAN_BINDIRS).glob("*/bin/initdb"), key=_version_key)
    for initdb in reversed(candidates):
        if all((initdb.parent / name).is_file() for name in wanted):
            return initdb.parent
    on_path = shutil.which("initdb")
    if on_path:
        path = Path(on_path).resolve().parent
        if all((path / name).is_file() for name in wanted):
            return path
    return None


def _run_bounded(cmd: list[str], timeout: float, what: str, **kwargs: t.Any) -> str:
    """Run a command with a time limit; raise PostgresUnavailable with its output on failure."""
    try:
        res = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as exc:
        raise PostgresUnavailable(
            f"{what}: `{' '.join(cmd)}` did not finish within {timeout:.0f} s"
        ) from exc
    except OSError as exc:
        raise PostgresUnavailable(f"{what}: cannot run `{cmd[0]}`: {exc}") from exc
    if res.returncode != 0:
        raise PostgresUnavailable(
            f"{what}: `{' '.join(cmd)}` exited {res.returncode}\n"
            f"{(res.stdout + res.stderr)[-3000:]}"
        )
    return res.stdout


def apt_install_postgresql() -> float:
    """`apt-get update` then `apt-get install -y postgresql`; returns the seconds it took."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    _run_bounded(["apt-get", "update"], APT_UPDATE_TIMEOUT, "apt-get update", env=env)
    _run_bounded(
        ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
        APT_INSTALL_TIMEOUT,
        "Installing Debian's postgresql package",
        env=env,
    )
    return time.monotonic() - started


def ensure_bindir(*, ci: bool | None = None) -> Path:
    """Find PostgreSQL, installing Debian's package first in CI (root + apt-get only)."""
    ci = in_ci() if ci is None else ci
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    how = (
        "install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; elsewhere put "
        "`initdb`, `pg_ctl` and `psql` on PATH or set PG_BINDIR to their directory)"
    )
    if not ci:
        raise PostgresUnavailable(f"PostgreSQL server binaries (initdb) not found: {how}")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb) not found and this CI run cannot install "
            f"them (it installs only as root with apt-get): {how}"
        )
    apt_install_postgresql()
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            f"apt-get installed postgresql but no initdb is under {_DEBIAN_BINDIRS}/*/bin "
            "or on PATH"
        )
    return bindir


# ---------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@dataclass
class PostgresServer:
    """One throwaway cluster; `start()` it, `stop()` it (idempotent; also at interpreter exit)."""

    bindir: Path
    host: str = "127.0.0.1"
    port: int = 0
    user: str = PG_USER
    password: str = PG_PASSWORD
    base: Path | None = None  # temp dir holding data/, the socket dir and the server log
    _as_user: pwd.struct_passwd | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: bool = False
    _watchdog: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            try:
                self._as_user = pwd.getpwnam(OS_USER_WHEN_ROOT)
            except KeyError:
                raise PostgresUnavailable(
                    "PostgreSQL refuses to run as root and there is no "
                    f"`{OS_USER_WHEN_ROOT}` user to run it as (Debian's postgresql-common "
                    "creates it): install the postgresql package or run the tests as a "
                    "non-root user"
                ) from None
        self.base = Path(tempfile.mkdtemp(prefix="target-orb-pg-"))
        if self._as_user is not None:
            if not _traversable_by_others(self.base.parent):
                self._cleanup_dir()
                raise PostgresUnavailable(
                    f"the temp directory {self.base.parent} is not reachable by the "
                    f"`{OS_USER_WHEN_ROOT}` user; set TMPDIR to a world-traversable directory"
                )
            os.chown(self.base, self._as_user.pw_uid, self._as_user.pw_gid)
        atexit.register(self.stop)
        self._initdb()
        last: PostgresUnavailable | None = None
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = _free_port()
            try:
                self._pg_ctl_start()
                break
            except PostgresUnavailable as exc:
                last = exc
                if "could not bind" not in str(exc) and "in use" not in str(exc):
                    break
        else:
            last = last or PostgresUnavailable("PostgreSQL did not start")
        if not self._started:
            self.stop()
            assert last is not None
            raise last
        return self

    def stop(self) -> None:
        with self._lock:
            if self.base is None:
                return
            if self._started:
                try:
                    self._as_owner(
                        [
                            str(self.bindir / "pg_ctl"),
                            "stop",
                            "-D",
                            str(self.datadir),
                            "-m",
                            "fast",
                            "-w",
                            "-t",
                            str(PG_CTL_TIMEOUT),
                        ],
                        PG_CTL_TIMEOUT + 10,
                        "Stopping PostgreSQL",
                    )
                except PostgresUnavailable:
                    self._kill_postmaster()
                self._started = False
            if self._watchdog is not None:
                self._watchdog.kill()
                self._watchdog.wait(timeout=10)
                self._watchdog = None
            self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def _kill_postmaster(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGQUIT)

    # -- paths

    @property
    def datadir(self) -> Path:
        assert self.base is not None, "server not started"
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base is not None, "server not started"
        return self.base / "sock"

    @property
    def log_file(self) -> Path:
        assert self.base is not None, "server not started"
        return self.base / "server.log"

    # -- commands

    def _as_owner(self, cmd: list[str], timeout: float, what: str) -> str:
        kwargs: dict[str, t.Any] = {"cwd": str(self.base)}
        if self._as_user is not None:
            kwargs.update(
                user=self._as_user.pw_uid,
                group=self._as_user.pw_gid,
                extra_groups=[],
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": str(self.base),
                    "LC_ALL": "C",
                },
            )
        return _run_bounded(cmd, timeout, what, **kwargs)

    def _initdb(self) -> None:
        assert self.base is not None
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n", encoding="utf-8")
        self.socket_dir.mkdir()
        if self._as_user is not None:
            for path in (pwfile, self.socket_dir):
                os.chown(path, self._as_user.pw_uid, self._as_user.pw_gid)
        self._as_owner(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            INITDB_TIMEOUT,
            "initdb",
        )
        pwfile.unlink()
        with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as fh:
            fh.write(
                "\n# target-orb tests: a throwaway loopback cluster\n"
                f"listen_addresses = '{self.host}'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 30\n"
                "shared_buffers = 16MB\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "timezone = 'UTC'\n"
            )

    def _pg_ctl_start(self) -> None:
        try:
            self._as_owner(
                [
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.log_file),
                    "-o",
                    f"-p {self.port}",
                    "-w",
                    "-t",
                    str(PG_CTL_TIMEOUT),
                ],
                PG_CTL_TIMEOUT + 10,
                "Starting PostgreSQL",
            )
        except PostgresUnavailable as exc:
            log = ""
            with contextlib.suppress(OSError):
                log = self.log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
            # pg_ctl may have left a postmaster behind when it gave up waiting.
            self._kill_postmaster()
            raise PostgresUnavailable(f"{exc}\n--- server log (tail) ---\n{log}") from None
        self._started = True
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        """A detached process that shuts the server down if this process dies without stop().

        atexit does not run on SIGKILL, nor on SIGTERM without a handler (pytest has none):
        without the watchdog a killed test run would leave PostgreSQL running.
        """
        assert self.base is not None
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHDOG,
                str(os.getpid()),
                str(self.datadir / "postmaster.pid"),
                str(self.base),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # survives a kill of this process group
        )

    def psql_env(self, database: str = "postgres") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=self.user,
            PGPASSWORD=self.password,
            PGDATABASE=database,
            PGCONNECT_TIMEOUT="10",
            PGAPPNAME="target-orb-tests",
        )
        return env

    def psql(self, sql: str, *, database: str = "postgres", tuples: bool = False) -> str:
        """Run SQL (one or more statements) through psql; stop at the first error."""
        args = [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        if tuples:
            args += ["-A", "-t"]
        try:
            res = subprocess.run(
                [*args, "-f", "-"],
                input=sql,
                capture_output=True,
                text=True,
                timeout=PSQL_TIMEOUT,
                env=self.psql_env(database),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"psql did not finish within {PSQL_TIMEOUT} s:\n{sql}") from None
        if res.returncode != 0:
            raise AssertionError(
                f"psql failed ({res.returncode}): {res.stderr}\n--- SQL ---\n{sql}"
            )
        return res.stdout

    def create_database(self, name: str, *, timezone: str | None = None) -> Database:
        """A new empty database; `timezone` becomes its default session time zone."""
        if not _IDENTIFIER.match(name):
            raise ValueError(f"database name must be a plain lower-case identifier: {name!r}")
        self.psql(f"CREATE DATABASE {name};")
        if timezone is not None:
            self.psql(f"ALTER DATABASE {name} SET timezone TO '{timezone}';")
        return Database(self, name)


@dataclass(frozen=True)
class Database:
    server: PostgresServer
    name: str

    @property
    def url(self) -> str:
        """SQLAlchemy/libpq URL (e.g. a ledger_url)."""
        s = self.server
        return f"postgresql://{s.user}:{s.password}@{s.host}:{s.port}/{self.name}"

    def execute(self, sql: str) -> None:
        self.server.psql(sql, database=self.name)

    def scalar(self, sql: str) -> str:
        """The single value one statement prints (e.g. `WITH u AS (UPDATE ...) SELECT ...`)."""
        return self.server.psql(sql, database=self.name, tuples=True).strip()

    def query(self, sql: str) -> list[dict[str, t.Any]]:
        """Rows of a SELECT as dicts, through PostgreSQL's own JSON rendering.

        timestamptz comes back as ISO text in the session time zone, numeric as a JSON number
        (parsed exactly with `parse_float=Decimal`), jsonb as objects.
        """
        import decimal

        wrapped = f"SELECT coalesce(json_agg(q), '[]'::json) FROM ({sql.rstrip().rstrip(';')}) q;"
        out = self.server.psql(wrapped, database=self.name, tuples=True)
        return json.loads(out, parse_float=decimal.Decimal)

    def tap_config(self) -> dict[str, t.Any]:
        """Connection settings for meltanolabs-tap-postgres."""
        s = self.server
        return {
            "host": s.host,
            "port": s.port,
            "user": s.user,
            "password": s.password,
            "database": self.name,
        }

    def tap_env(self, prefix: str) -> dict[str, str]:
        """The same as Meltano env vars, e.g. prefix `TAP_WAREHOUSE` -> TAP_WAREHOUSE_HOST."""
        return {f"{prefix}_{k.upper()}": str(v) for k, v in self.tap_config().items()}
