"""The backfills target-orb created, as rows of `target_orb_backfills` in the store.

Rows carry the same fields as the entries of the earlier JSON ownership record
(`….backfills.json`) plus the job that created them, so jobs sharing one store recognise
each other's backfills. Each write is committed before it returns: the intent before the
create request, the id once Orb answered, `closed` once closed.
"""

from __future__ import annotations

import datetime
import typing as t

import sqlalchemy as sa

from target_orb.state.schema import backfills_table, insert_for, schema_table

if t.TYPE_CHECKING:
    from target_orb.state.ledger import Ledger

# Columns that are entry fields under the same name (the JSON record's `id` is `backfill_id`).
_FIELDS = ("api_url", "timeframe_start", "timeframe_end", "close_time", "created_at",
           "state", "events")


def _entry(row: t.Any) -> dict[str, t.Any]:
    item = {name: getattr(row, name) for name in _FIELDS}
    item["id"] = row.backfill_id
    item["idempotency_key"] = row.idempotency_key
    item["job_name"] = row.job_name
    item["events"] = int(row.events or 0)
    return item


class BackfillRows:
    """Reads and writes of `target_orb_backfills` over an open store (a `Ledger`)."""

    def __init__(self, store: Ledger) -> None:
        """Use the store's engine (opened by the runtime before the backfills start).

        Args:
            store: The open store.
        """
        self.store = store

    def all(self, api_url: str) -> list[dict[str, t.Any]]:
        """Every row of `api_url` (every job), oldest first, as ownership entries."""
        c = backfills_table.c
        query = sa.select(backfills_table).where(c.api_url == api_url).order_by(c.created_at)
        with self.store.engine.connect() as conn:
            return [_entry(row) for row in conn.execute(query)]

    def insert(self, job_name: str, item: t.Mapping[str, t.Any]) -> None:
        """Commit one new entry (the intent, before the create request)."""
        values = {name: item[name] for name in _FIELDS}
        values.update(
            idempotency_key=item["idempotency_key"], job_name=job_name,
            backfill_id=item.get("id"), updated_at=self.store.now(),
        )
        stmt = insert_for(self.store.engine, backfills_table).values(**values)
        stmt = stmt.on_conflict_do_nothing(index_elements=["idempotency_key"])
        with self.store.guard(), self.store.engine.begin() as conn:
            conn.execute(stmt)

    def update(self, key: str, changes: t.Mapping[str, t.Any]) -> None:
        """Commit changes to the entry of an Idempotency-Key."""
        values = {("backfill_id" if k == "id" else k): v for k, v in changes.items()
                  if k in (*_FIELDS, "id")}
        values["updated_at"] = self.store.now()
        stmt = sa.update(backfills_table).where(backfills_table.c.idempotency_key == key)
        with self.store.guard(), self.store.engine.begin() as conn:
            conn.execute(stmt.values(**values))

    def prune(self, before: str) -> int:
        """Delete closed entries whose close time is before `before` (Orb timestamp text)."""
        c = backfills_table.c
        stmt = sa.delete(backfills_table).where(c.state == "closed", c.close_time < before)
        with self.store.guard(), self.store.engine.begin() as conn:
            return int(conn.execute(stmt).rowcount or 0)

    def imported(self, marker: str) -> bool:
        """Whether the legacy record named by `marker` was imported already."""
        query = sa.select(schema_table.c.value).where(schema_table.c.name == marker)
        with self.store.engine.connect() as conn:
            return conn.execute(query).scalar() is not None

    def import_legacy(
        self, marker: str, job_name: str, entries: t.Sequence[t.Mapping[str, t.Any]]
    ) -> int:
        """Import the entries of a legacy `….backfills.json` once (one transaction).

        Returns:
            Entries imported (0 when `marker` says it was done before).
        """
        now = self.store.now()
        rows = []
        for item in entries:
            if not item.get("idempotency_key") or not item.get("timeframe_start"):
                continue
            row = {name: item.get(name) for name in _FIELDS}
            row["events"] = int(item.get("events") or 0)
            row.update(idempotency_key=item["idempotency_key"], job_name=job_name,
                       backfill_id=item.get("id"), updated_at=now)
            rows.append(row)
        engine = self.store.engine
        with self.store.guard(), engine.begin() as conn:
            mark = insert_for(engine, schema_table).values(
                name=marker, value=job_name, updated_at=now,
            ).on_conflict_do_nothing(index_elements=["name"])
            if not conn.execute(mark).rowcount:
                return 0  # another run imported it first
            if rows:
                stmt = insert_for(engine, backfills_table).on_conflict_do_nothing(
                    index_elements=["idempotency_key"],
                )
                conn.execute(stmt, rows)
        return len(rows)


def utc_text(when: datetime.datetime) -> str:
    """Orb's timestamp text (`…Z`, seconds) for comparisons with stored close times."""
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
