"""The store's tables and their version: created on first use, checked on every open.

One SQLAlchemy `MetaData` holds every table of target-orb's store at `state_url`:
- `target_orb_ledger` (state/ledger.py): what Orb acknowledged per idempotency key;
- `target_orb_backfills`: the backfills target-orb created (the ownership record), per job;
- `target_orb_dead_letters`: the dead letters, when `dead_letter_target: state`;
- `target_orb_schema`: one row `version` (the schema's version, so a later release can
  migrate), and one row per legacy `….backfills.json` already imported.

Every write is a row-level insert, upsert or update (no table locks), so several jobs can
share one PostgreSQL store.
"""

from __future__ import annotations

import datetime
import time
import typing as t

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

SCHEMA_VERSION = 1
metadata = sa.MetaData()

schema_table = sa.Table(
    "target_orb_schema",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

backfills_table = sa.Table(
    "target_orb_backfills",
    metadata,
    # The create's Idempotency-Key: written before the request, so it is known first.
    sa.Column("idempotency_key", sa.String(255), primary_key=True),
    sa.Column("job_name", sa.String(255), nullable=False, index=True),
    sa.Column("api_url", sa.String(1000), nullable=False),
    sa.Column("backfill_id", sa.String(255), nullable=True, index=True),
    sa.Column("timeframe_start", sa.String(40), nullable=False),
    sa.Column("timeframe_end", sa.String(40), nullable=False),
    sa.Column("close_time", sa.String(40), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    # creating (intent written, no answer yet) | pending | closed
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("events", sa.Integer, nullable=False, default=0),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

dead_letters_table = sa.Table(
    "target_orb_dead_letters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # What makes two dead letters the same (pipeline/deadletter.py `entry_digest`), in hex:
    # a record dead-lettered again for the same reason is counted, not stored again.
    sa.Column("digest", sa.String(16), nullable=False, unique=True),
    sa.Column("job_name", sa.String(255), nullable=False),
    sa.Column("stream", sa.String(1000), nullable=False),
    sa.Column("record", sa.Text, nullable=True),
    sa.Column("event", sa.Text, nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
)


class SchemaVersionError(Exception):
    """The store was written by a newer target-orb (a schema version this one does not know)."""


def ensure(engine: sa.Engine, now: datetime.datetime) -> bool:
    """Create the missing tables and the version row; refuse a newer schema.

    Args:
        engine: The store's engine.
        now: Current time.

    Returns:
        Whether the ledger table was new (the store had no ledger yet).

    Raises:
        SchemaVersionError: The store's schema is newer than this release's.
    """
    created = not sa.inspect(engine).has_table("target_orb_ledger")
    _create_tables(engine)
    with engine.begin() as conn:
        found = conn.execute(
            sa.select(schema_table.c.value).where(schema_table.c.name == "version")
        ).scalar()
        if found is None:
            insert = _insert_ignore(engine, schema_table).values(
                name="version", value=str(SCHEMA_VERSION), updated_at=now,
            )
            conn.execute(insert)
        elif int(found) > SCHEMA_VERSION:
            msg = (
                f"the store's schema is version {found}, newer than this target-orb's "
                f"({SCHEMA_VERSION}); upgrade target-orb, or point `state_url` at another store"
            )
            raise SchemaVersionError(msg)
    return created


# Any fixed number: the PostgreSQL advisory lock that serialises schema creation between jobs.
_SCHEMA_LOCK_KEY = 0x7A726F62  # "zrob"


def _create_tables(engine: sa.Engine) -> None:
    """Create the missing tables; safe when several jobs open a new store at once.

    On PostgreSQL the creation holds a transaction-scoped advisory lock, so a second job
    waits and then finds the tables; on SQLite (or a lock-less race) a job that loses the
    race to create a table looks again and finds it.
    """
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
                    )
                metadata.create_all(conn, checkfirst=True)
            return
        except SQLAlchemyError:
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def version(engine: sa.Engine) -> int | None:
    """The schema version the store records (None: no version row)."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(schema_table.c.value).where(schema_table.c.name == "version")
        ).scalar()
    return None if found is None else int(found)


def insert_for(engine: sa.Engine, table: sa.Table) -> t.Any:
    """The dialect's INSERT (with `on_conflict_do_*`) for `table`."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert  # noqa: PLC0415

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert  # noqa: PLC0415

    return sqlite_insert(table)


def _insert_ignore(engine: sa.Engine, table: sa.Table) -> t.Any:
    return insert_for(engine, table).on_conflict_do_nothing()
