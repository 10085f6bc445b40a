"""Dead letters in the store (`dead_letter_target: state`): the file's fields, in a table.

Each batch is committed before `write` returns, at the point where the file writer fsyncs,
so STATE never passes a dead letter the store does not hold. The file's "already
dead-lettered" rule holds here too: an entry with the digest of one already stored (same
stream, key or record, and reason) is counted, not stored again; if that one was replayed,
it is marked not replayed again (the replay did not cure it), so the next replay sends it.
`target-orb-deadletter --state-url URL` lists, exports and replays them.
"""

from __future__ import annotations

import datetime
import logging
import typing as t

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from target_orb import jsonutil
from target_orb.state.ledger import describe
from target_orb.state.schema import dead_letters_table, insert_for

if t.TYPE_CHECKING:
    from target_orb.state.ledger import Ledger

LOGGER = logging.getLogger("target_orb")
_IN_CHUNK = 500
FIELDS = ("stream", "record", "event", "reason", "source")


class DeadLetterStore:
    """The dead-letter writer over the store: `write` returns once the rows are committed."""

    def __init__(
        self,
        store: Ledger | None,
        *,
        job_name: str,
        digest: t.Callable[[t.Any], int | None],
    ) -> None:
        """Write through `store` (None: a dry run, which only logs).

        Args:
            store: The store at `state_url` (opened by the runtime before the first write).
            job_name: This job's name, stored with each entry.
            digest: What makes two entries the same (`pipeline.deadletter.entry_digest`).
        """
        self.store = store
        self.job_name = job_name
        self._digest = digest
        shown = describe(store.url) if store is not None else "(none: dry run)"
        # Named where the file writer names its file (logs, the run summary).
        self.path = f"the store at `state_url` {shown}"

    def check_writable(self) -> str | None:
        """Nothing to check here: the store is opened (and checked) when the run starts."""
        return None

    def write(self, entries: t.Sequence[t.Mapping[str, t.Any]]) -> int:
        """Commit the entries not already stored.

        Args:
            entries: Dead-letter entries (`pipeline.deadletter.entry`).

        Returns:
            How many were stored; the others were stored before (already dead-lettered).

        Raises:
            OSError: The store cannot be written; the batch must then not be acknowledged.
        """
        if not entries:
            return 0
        if self.store is None:
            LOGGER.info("DRY RUN: %d record(s) would be dead-lettered to the store.", len(entries))
            return len(entries)
        rows = self._rows(entries)
        try:
            return self._commit(rows)
        except SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
            msg = f"cannot write dead letters to {self.path}: {detail}"
            raise OSError(msg) from None

    def _rows(self, entries: t.Sequence[t.Mapping[str, t.Any]]) -> list[dict[str, t.Any]]:
        assert self.store is not None
        now = self.store.now()
        rows: dict[str, dict[str, t.Any]] = {}
        for item in entries:
            # Store what a file line would hold (lenient JSON), and digest that, as the file does.
            back = jsonutil.loads(jsonutil.dumps_lenient(item))
            number = self._digest(back)
            digest = f"{number:016x}" if number is not None else f"x{len(rows):015x}"
            if digest in rows:
                continue
            event = back.get("event")
            rows[digest] = {
                "digest": digest,
                "job_name": self.job_name,
                "stream": str(back.get("stream")),
                "record": jsonutil.dumps_str(back.get("record")),
                "event": jsonutil.dumps_str(event) if event is not None else None,
                "reason": str(back.get("reason")),
                "source": str(back.get("source") or "local"),
                "created_at": now,
                "replayed_at": None,
            }
        return list(rows.values())

    def _commit(self, rows: list[dict[str, t.Any]]) -> int:
        assert self.store is not None
        engine = self.store.engine
        c = dead_letters_table.c
        written = 0
        with self.store.guard(), engine.begin() as conn:
            for start in range(0, len(rows), _IN_CHUNK):
                chunk = rows[start:start + _IN_CHUNK]
                digests = [r["digest"] for r in chunk]
                known = set(conn.execute(
                    sa.select(c.digest).where(c.digest.in_(digests))
                ).scalars())
                new = [r for r in chunk if r["digest"] not in known]
                if new:
                    # RETURNING names the rows inserted: one a concurrent writer stored
                    # first is skipped and not counted.
                    stmt = insert_for(engine, dead_letters_table).on_conflict_do_nothing(
                        index_elements=["digest"],
                    ).returning(c.digest)
                    written += len(conn.execute(stmt, new).all())
                if known:
                    conn.execute(
                        sa.update(dead_letters_table)
                        .where(c.digest.in_(list(known)), c.replayed_at.is_not(None))
                        .values(replayed_at=None)
                    )
        return written


def stored_entries(
    store: Ledger, *, unreplayed_only: bool = False, job_name: str | None = None
) -> t.Iterator[tuple[int, dict[str, t.Any], dict[str, t.Any]]]:
    """The dead letters in the store, oldest first.

    Args:
        store: The open store.
        unreplayed_only: Only those not replayed yet.
        job_name: Only this job's.

    Yields:
        (row id, the entry with the file's fields, its bookkeeping: job_name, created_at,
        replayed_at).
    """
    c = dead_letters_table.c
    query = sa.select(dead_letters_table).order_by(c.created_at, c.id)
    if unreplayed_only:
        query = query.where(c.replayed_at.is_(None))
    if job_name is not None:
        query = query.where(c.job_name == job_name)
    with store.engine.connect() as conn:
        for row in conn.execute(query):
            item: dict[str, t.Any] = {
                "stream": row.stream,
                "record": jsonutil.loads(row.record) if row.record is not None else None,
            }
            if row.event is not None:
                item["event"] = jsonutil.loads(row.event)
            item["reason"] = row.reason
            item["source"] = row.source
            meta = {
                "job_name": row.job_name,
                "created_at": _text(row.created_at),
                "replayed_at": _text(row.replayed_at),
            }
            yield int(row.id), item, meta


def mark_replayed(store: Ledger, ids: t.Sequence[int]) -> None:
    """Record that these entries were replayed (a second replay skips them)."""
    c = dead_letters_table.c
    now = store.now()
    with store.guard(), store.engine.begin() as conn:
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = list(ids[start:start + _IN_CHUNK])
            conn.execute(sa.update(dead_letters_table).where(c.id.in_(chunk))
                         .values(replayed_at=now))


def _text(value: datetime.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
