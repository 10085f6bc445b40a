"""Run the project's meltano.yml from a temp copy: `meltano install` once, `meltano run` many times.

`WarehousePipeline` is `meltano run tap-warehouse target-orb-warehouse` (PyPI
meltanolabs-tap-postgres -> this checkout's target-orb) pointed at one PostgreSQL database and
one stand-in Orb, with its own Meltano state id and its own dead-letter file, so several
scenarios share one installed project (tests/e2e/conftest.py: `warehouse_project`,
`warehouse_pipeline`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import pytest

if t.TYPE_CHECKING:
    from fake_orb import FakeOrb
    from tests.e2e.postgres import Database

REPO = Path(__file__).resolve().parents[2]
MELTANO_YML = REPO / "meltano.yml"

INSTALL_TIMEOUT = 480
RUN_TIMEOUT = 240
CLI_TIMEOUT = 60

TAP = "tap-warehouse"
TARGET = "target-orb-warehouse"
TAP_ENV = "TAP_WAREHOUSE"
TARGET_ENV = "TARGET_ORB_WAREHOUSE"
_FOREIGN_ENV = ("TARGET_ORB_", "TAP_SEGMENT_", "TAP_WAREHOUSE_", "MELTANO_", "PG")


def find_meltano() -> str | None:
    beside = Path(sys.executable).with_name("meltano")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("meltano")


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    def check(self) -> Result:
        assert self.returncode == 0, (
            f"{shlex.join(self.args)} exited {self.returncode}\n"
            f"--- stdout (tail) ---\n{self.stdout[-3000:]}\n--- stderr (tail) ---\n"
            f"{self.stderr[-8000:]}"
        )
        return self


@dataclass
class MeltanoProject:
    root: Path
    meltano: str

    @classmethod
    def copy_of_repo(cls, root: Path, meltano: str) -> MeltanoProject:
        """meltano.yml copied to `root`, target-orb's `pip_url: -e .` pointed at this checkout.

        With the `postgres` extra (psycopg's binary wheel, one small install), so the
        warehouse tests can put the corrections ledger in PostgreSQL (`ledger_url`);
        `target-orb-warehouse` shares this venv, as it does in the real project.
        """
        text = MELTANO_YML.read_text(encoding="utf-8")
        assert text.count("pip_url: -e .\n") == 1, "meltano.yml: expected `pip_url: -e .`"
        spec = shlex.quote(f"{REPO}[postgres]")
        text = text.replace("pip_url: -e .\n", f"pip_url: -e {spec}\n")
        (root / "meltano.yml").write_text(text, encoding="utf-8")
        return cls(root=root, meltano=meltano)

    def base_env(self) -> dict[str, str]:
        # Nothing from the developer's shell may reach the plugins: no real Orb key or URL,
        # no database settings, no other Meltano system database.
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
        env["PATH"] = os.pathsep.join([str(Path(self.meltano).parent), env.get("PATH", "")])
        env["MELTANO_SEND_ANONYMOUS_USAGE_STATS"] = "false"
        env["MELTANO_ENVIRONMENT"] = "dev"
        return env

    def run(self, *args: str, timeout: float, env: dict[str, str] | None = None) -> Result:
        """Run `meltano ARGS` in the project; on timeout kill its whole process group."""
        import time

        cmd = [self.meltano, *args]
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env={**self.base_env(), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group: tap and target die with it
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(
                f"{shlex.join(cmd)} still running after {timeout}s; killed\n"
                f"--- stderr (tail) ---\n{err[-6000:]}"
            )
        return Result(cmd, proc.returncode, out, err, time.monotonic() - started)

    def install(self, *plugins: tuple[str, str]) -> float:
        """`meltano install <type> <name>` for each (type, name); returns the seconds taken."""
        total = 0.0
        for kind, name in plugins:
            total += self.run("install", kind, name, timeout=INSTALL_TIMEOUT).check().seconds
        return total


@dataclass
class WarehousePipeline:
    """`meltano run tap-warehouse target-orb-warehouse` from one database into one Orb.

    `target_env` adds target settings as Meltano env vars, e.g.
    `{"TARGET_ORB_WAREHOUSE_LATE_EVENT_POLICY": "backfill"}`; `tap_env` likewise for the tap.
    Every pipeline has its own Meltano state id (`--state-id-suffix`) and dead-letter file, so
    reruns of one pipeline continue from its own bookmark and scenarios never share either.
    """

    project: MeltanoProject
    db: Database
    orb: FakeOrb
    workdir: Path
    name: str
    target_env: dict[str, str] = field(default_factory=dict)
    tap_env: dict[str, str] = field(default_factory=dict)
    runs: list[Result] = field(default_factory=list)

    @property
    def dead_letter_path(self) -> Path:
        return self.workdir / "dead-letter.jsonl"

    @property
    def state_id(self) -> str:
        return f"dev:{TAP}-to-{TARGET}:{self.name}"

    def env(self) -> dict[str, str]:
        env = self.db.tap_env(TAP_ENV)
        env[f"{TARGET_ENV}_API_URL"] = self.orb.url
        env[f"{TARGET_ENV}_API_KEY"] = self.orb.api_key
        env[f"{TARGET_ENV}_DEAD_LETTER_PATH"] = str(self.dead_letter_path)
        env.update(self.tap_env)
        env.update(self.target_env)
        return env

    def run(self, *, full_refresh: bool = False, timeout: float = RUN_TIMEOUT) -> Result:
        """One `meltano run`; not checked (call `.check()`)."""
        args = ["run", f"--state-id-suffix={self.name}"]
        if full_refresh:
            args.append("--full-refresh")
        result = self.project.run(*args, TAP, TARGET, timeout=timeout, env=self.env())
        self.runs.append(result)
        return result

    def dead_letters(self) -> list[dict[str, t.Any]]:
        if not self.dead_letter_path.exists():
            return []
        with self.dead_letter_path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def state(self) -> dict[str, t.Any] | None:
        res = self.project.run("state", "get", self.state_id, timeout=CLI_TIMEOUT).check()
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[0]) if lines else None
