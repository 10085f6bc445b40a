"""Fixtures for end-to-end tests against a real PostgreSQL warehouse.

- `postgres` (session): a throwaway PostgreSQL cluster on 127.0.0.1 (tests/e2e/postgres.py).
  Missing PostgreSQL skips the tests that use it, with the reason, except in CI (`CI=true`),
  where Debian's package is installed once or the tests fail.
- `warehouse_project` (session): the project's meltano.yml in a temp dir with `tap-warehouse`
  (meltanolabs-tap-postgres from PyPI) and `target-orb-warehouse` installed once per run.
- `warehouse_pipeline` (function): a factory for `WarehousePipeline`s (one `meltano run`
  configuration: database, stand-in Orb, target settings, own state id and dead-letter file).

For a test that changes rows between runs (corrections, issue 12; see
tests/e2e/test_warehouse_update_helper.py, which runs this shape):

    from tests.e2e import warehouse as wh

    def test_update(postgres, warehouse_pipeline):
        db = postgres.create_database("corrections", timezone=wh.READ_TIMEZONE)
        wh.create_tracks_table(db)
        wh.insert_rows(db, [wh.segment_row("m1", when, user_id="acct", event="api_request",
                                           event_text="API Request", loaded=now, tokens=5)])
        ledger = postgres.create_database("ledger")  # ledger.url: postgresql://...
        with FakeOrb() as orb:
            env = {"TARGET_ORB_WAREHOUSE_LOAD_METHOD": "upsert"}
            p = warehouse_pipeline(db, orb, target_env=env)
            p.run().check()
            # sets the columns and bumps uuid_ts (the tap's bookmark) so the next run reads it
            wh.update_rows(db, "m1", {"tokens": 4})
            p.run().check()          # p.dead_letters(), p.state(), p.runs[-1].stderr
            wh.delete_rows(db, "m1")  # a hard delete (no incremental tap sees it)
"""

from __future__ import annotations

import re
import time
import typing as t
from pathlib import Path

import pytest

from tests.e2e import postgres as pg
from tests.e2e.meltano_harness import (
    TAP,
    TARGET,
    MeltanoProject,
    WarehousePipeline,
    find_meltano,
)

if t.TYPE_CHECKING:
    from fake_orb import FakeOrb

# Seconds spent on setup, printed in the terminal summary (CI timing).
TIMINGS: dict[str, float] = {}


def _unavailable(reason: str) -> t.NoReturn:
    if pg.in_ci():
        pytest.fail(f"CI must run the PostgreSQL end-to-end tests: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> t.Iterator[pg.PostgresServer]:
    started = time.monotonic()
    try:
        bindir = pg.ensure_bindir()
        server = pg.PostgresServer(bindir).start()
    except pg.PostgresUnavailable as exc:
        _unavailable(str(exc))
    TIMINGS["postgres: find/install + initdb + start"] = time.monotonic() - started
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def warehouse_project(tmp_path_factory: pytest.TempPathFactory) -> MeltanoProject:
    meltano = find_meltano()
    if meltano is None:
        _unavailable(
            "meltano is not installed (next to the interpreter or on PATH): "
            "pip install -e '.[test]'"
        )
    project = MeltanoProject.copy_of_repo(tmp_path_factory.mktemp("meltano-warehouse"), meltano)
    TIMINGS["meltano install tap-warehouse + target-orb-warehouse"] = project.install(
        ("extractor", TAP), ("loader", TARGET)
    )
    return project


_SAFE = re.compile(r"[^a-z0-9_]+")


@pytest.fixture
def warehouse_pipeline(
    warehouse_project: MeltanoProject, tmp_path: Path
) -> t.Callable[..., WarehousePipeline]:
    """`warehouse_pipeline(db, orb, name=None, target_env=None, tap_env=None)`."""
    made: list[str] = []

    def make(
        db: pg.Database,
        orb: FakeOrb,
        *,
        name: str | None = None,
        target_env: dict[str, str] | None = None,
        tap_env: dict[str, str] | None = None,
    ) -> WarehousePipeline:
        label = _SAFE.sub("_", (name or f"{db.name}_{len(made)}").lower()).strip("_")
        made.append(label)
        workdir = tmp_path / label
        workdir.mkdir()
        return WarehousePipeline(
            project=warehouse_project,
            db=db,
            orb=orb,
            workdir=workdir,
            name=label,
            target_env=dict(target_env or {}),
            tap_env=dict(tap_env or {}),
        )

    return make


def pytest_terminal_summary(terminalreporter: t.Any) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "e2e setup timings")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{seconds:7.1f}s  {what}")
