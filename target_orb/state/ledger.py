"""The corrections ledger: what Orb acknowledged per idempotency key, in SQLite or PostgreSQL.

Under `load_method: upsert` target-orb must know, for each key, whether Orb holds it and
with which body. Orb's search cannot say so for amended events (it never finds them), so
the ledger records every write Orb acknowledged: the body digest (and the body, so a
refused correction can show both versions), timestamp, customer, whether it was amended
or deprecated, and when.

Two rules keep it honest (reference: issue "Corrections reach the bill"):
- An entry's body is only ever what Orb acknowledged (written after the 200, before the
  job settles and STATE can move).
- Before a write is sent, the key is marked *pending* (the operation and the digest being
  sent). A crash between Orb's 200 and the ledger update leaves the mark, and the next run
  treats the key as "Orb may hold either body" and amends, instead of trusting search or
  re-ingesting a body Orb would silently drop.

SQLAlchemy Core only: one table, portable between SQLite (the default, a file beside the
dead-letter file) and PostgreSQL (containers, several jobs sharing one Orb account).
"""

from __future__ import annotations

import datetime
import os
import threading
import typing as t
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from target_orb import jsonutil
from target_orb.errors import OrbFatalError
from target_orb.state import schema
from target_orb.state.digests import Known

LEDGER_FILE_NAME = "target-orb-ledger.sqlite"
TABLE_NAME = "target_orb_ledger"
# Orb lets an event be corrected only inside the customer's current billing period (or the
# previous period's grace): beyond a yearly period plus a month, no correction can succeed,
# so older entries are pruned. A pruned key that changes again is a new key to target-orb,
# and the late-event rules dead-letter it (Orb would refuse it anyway).
RETENTION = datetime.timedelta(days=400)
_IN_CHUNK = 500  # keys per SELECT … IN (…)

_UTC = datetime.timezone.utc
metadata = schema.metadata  # one MetaData for the whole store (state/schema.py)
ledger_table = sa.Table(
    TABLE_NAME,
    metadata,
    sa.Column("idempotency_key", sa.String(255), primary_key=True),
    # What Orb acknowledged (NULL while only a write was attempted).
    sa.Column("body_digest", sa.String(64), nullable=True),
    sa.Column("body", sa.Text, nullable=True),
    sa.Column("event_timestamp", sa.String(40), nullable=True, index=True),
    sa.Column("customer", sa.String(255), nullable=True),
    sa.Column("amended", sa.Boolean, nullable=False, default=False),
    sa.Column("deprecated", sa.Boolean, nullable=False, default=False),
    # A write that was sent and whose answer is not recorded yet.
    sa.Column("pending_op", sa.String(16), nullable=True),
    sa.Column("pending_digest", sa.String(64), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True, slots=True)
class Write:
    """One key's write: attempted (`mark_pending`) or acknowledged (`acknowledge`).

    `op` is `ingest`, `amend`, `deprecate`, or `seen` (Orb's search showed the body).
    """

    key: str
    op: str
    digest: str | None
    body: dict[str, t.Any] | None
    timestamp: str | None
    customer: str | None


def default_url(dead_letter_path: str) -> str:
    """The default `state_url`: `target-orb-ledger.sqlite` in the dead-letter file's folder.

    Args:
        dead_letter_path: The `dead_letter_path` setting.

    Returns:
        A SQLAlchemy SQLite URL with an absolute path.
    """
    folder = os.path.dirname(os.path.abspath(dead_letter_path))
    return f"sqlite:///{os.path.join(folder, LEDGER_FILE_NAME)}"


def _driver_url(url: str) -> sa.URL:
    """Parse `state_url`; plain `postgresql://` uses psycopg 3 when psycopg2 is absent."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        try:
            import psycopg2  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401, PLC0415
        except ImportError:
            parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def describe(url: str) -> str:
    """`state_url` without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


class Ledger:
    """Thread-safe access to the ledger table (one short transaction per call)."""

    def __init__(
        self,
        url: str,
        *,
        clock: t.Callable[[], datetime.datetime] | None = None,
        setting: str = "state_url",
    ) -> None:
        """Remember the URL; nothing is opened until `open`.

        Args:
            url: SQLAlchemy URL (sqlite:///… or postgresql://…).
            clock: Current aware UTC time (tests inject one).
            setting: The setting the URL came from (`state_url`, or its earlier name
                `ledger_url`), named in messages.
        """
        self.url = url
        self.setting = setting
        self._clock = clock or (lambda: datetime.datetime.now(_UTC))
        self._engine: sa.Engine | None = None
        self._dialect = ""
        self.created = False  # `open` made a new, empty ledger
        # SQLite has one writer at a time; serialising here avoids "database is locked".
        self._lock: threading.Lock | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        """Connect, create the store's tables if needed and check the schema version.

        Raises:
            OrbFatalError: The URL, driver or database cannot be used (names the setting).
        """
        shown = describe(self.url)
        name = self.setting
        try:
            url = _driver_url(self.url)
            backend = url.get_backend_name()
            if backend not in ("sqlite", "postgresql"):
                msg = (
                    f"`{name}` {shown} uses {backend!r}; target-orb's store runs on "
                    "SQLite (sqlite:///path/to/file.sqlite) or PostgreSQL "
                    "(postgresql://user@host/db)."
                )
                raise OrbFatalError(msg)
            kwargs: dict[str, t.Any] = {"future": True}
            if backend == "sqlite":
                database = url.database or ""
                if database and database != ":memory:":
                    os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
                kwargs["connect_args"] = {"timeout": 30}  # busy timeout: waits for a lock
                self._lock = threading.Lock()
            else:
                kwargs["pool_pre_ping"] = True
            engine = sa.create_engine(url, **kwargs)
            self.created = schema.ensure(engine, self._clock())
        except OrbFatalError:
            raise
        except schema.SchemaVersionError as exc:
            msg = f"`{name}` {shown}: {exc}. Nothing was read or sent."
            raise OrbFatalError(msg) from None
        except (NoSuchModuleError, ImportError, ModuleNotFoundError) as exc:
            msg = (
                f"`{name}` {shown}: no database driver for it ({exc}). For PostgreSQL "
                "install target-orb with the `postgres` extra (pip install "
                "'target-orb[postgres]', or that as the Meltano pip_url)."
            )
            raise OrbFatalError(msg) from None
        except (ArgumentError, ValueError) as exc:
            msg = (
                f"`{name}` {shown} is not a SQLAlchemy URL ({exc}); use e.g. "
                "sqlite:///ledger.sqlite or postgresql://user@host/db."
            )
            raise OrbFatalError(msg) from None
        except (SQLAlchemyError, OSError) as exc:
            msg = (
                f"Cannot open the corrections ledger (target-orb's store) at `{name}` {shown}: "
                f"{_short_error(exc)}. Check the path or database, its permissions and that "
                "it is reachable; nothing was read or sent."
            )
            raise OrbFatalError(msg) from None
        self._engine = engine
        self._dialect = backend

    @property
    def engine(self) -> sa.Engine:
        """The open engine (the store's other tables share it)."""
        return self._engine_or_fail()

    def guard(self) -> t.ContextManager[t.Any]:
        """Serialise writers in-process on SQLite (one writer at a time); a no-op otherwise."""
        return self._guard()

    def now(self) -> datetime.datetime:
        """The store's clock (aware UTC)."""
        return self._clock()

    def close(self) -> None:
        """Release connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- reads ---------------------------------------------------------------------------

    def lookup(self, keys: t.Iterable[str]) -> dict[str, Known]:
        """What the ledger knows for these keys.

        Args:
            keys: Idempotency keys.

        Returns:
            key → Known (source `ledger`); keys the ledger does not hold are absent.
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Known] = {}
        c = ledger_table.c
        columns = (c.idempotency_key, c.body_digest, c.body, c.amended, c.deprecated,
                   c.pending_op, c.pending_digest)
        with self._guard(), self._connect() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start:start + _IN_CHUNK]
                rows = conn.execute(sa.select(*columns).where(c.idempotency_key.in_(chunk)))
                for key, digest, body, amended, deprecated, pending_op, pending_digest in rows:
                    found[key] = Known(
                        body=jsonutil.loads(body) if body else None,
                        digest=digest,
                        amended=bool(amended),
                        deprecated=bool(deprecated),
                        pending_op=pending_op,
                        pending_digest=pending_digest,
                        source="ledger",
                    )
        return found

    # -- writes --------------------------------------------------------------------------

    def mark_pending(self, writes: t.Sequence[Write]) -> None:
        """Record that these writes are about to be sent (before the request).

        An existing entry keeps what Orb acknowledged; only the pending mark changes.

        Args:
            writes: One per key.
        """
        if not writes:
            return
        now = self._clock()
        rows = [
            {
                "idempotency_key": w.key,
                "body_digest": None,
                "body": None,
                "event_timestamp": w.timestamp,
                "customer": w.customer,
                "amended": False,
                "deprecated": False,
                "pending_op": w.op,
                "pending_digest": w.digest,
                "updated_at": now,
            }
            for w in writes
        ]
        self._upsert(rows, ("pending_op", "pending_digest", "updated_at"))

    def acknowledge(self, writes: t.Sequence[Write]) -> None:
        """Record what Orb acknowledged (after the 200), clearing the pending marks.

        Args:
            writes: One per key; `op` says what Orb acknowledged (`seen`: search showed it).
        """
        if not writes:
            return
        now = self._clock()
        stmt = self._insert()
        excluded = stmt.excluded
        c = ledger_table.c
        for group in _by_op(writes):
            op = group[0].op
            rows = [
                {
                    "idempotency_key": w.key,
                    "body_digest": w.digest,
                    "body": jsonutil.dumps_str(w.body) if w.body is not None else None,
                    "event_timestamp": w.timestamp,
                    "customer": w.customer,
                    "amended": op == "amend",
                    "deprecated": op == "deprecate",
                    "pending_op": None,
                    "pending_digest": None,
                    "updated_at": now,
                }
                for w in group
            ]
            if op == "deprecate":
                # Keep the body Orb had; a deprecation carries none.
                update = {
                    "deprecated": excluded.deprecated,
                    "body_digest": sa.func.coalesce(c.body_digest, excluded.body_digest),
                    "body": sa.func.coalesce(c.body, excluded.body),
                    "event_timestamp": sa.func.coalesce(
                        c.event_timestamp, excluded.event_timestamp,
                    ),
                    "customer": sa.func.coalesce(c.customer, excluded.customer),
                }
            else:
                update = {
                    "body_digest": excluded.body_digest,
                    "body": excluded.body,
                    "event_timestamp": excluded.event_timestamp,
                    "customer": excluded.customer,
                    "deprecated": excluded.deprecated,
                    # Once amended, always amended: search will never find it again.
                    "amended": sa.or_(c.amended, excluded.amended),
                }
            update.update(pending_op=excluded.pending_op, pending_digest=excluded.pending_digest,
                          updated_at=excluded.updated_at)
            upsert = stmt.on_conflict_do_update(index_elements=["idempotency_key"], set_=update)
            with self._guard(), self._begin() as conn:
                conn.execute(upsert, rows)

    def clear_pending(self, keys: t.Sequence[str]) -> None:
        """Orb refused these writes (nothing changed in Orb): drop the pending marks, and
        drop entries that never held anything Orb acknowledged.

        Args:
            keys: Idempotency keys.
        """
        if not keys:
            return
        c = ledger_table.c
        with self._guard(), self._begin() as conn:
            for start in range(0, len(keys), _IN_CHUNK):
                chunk = list(keys[start:start + _IN_CHUNK])
                conn.execute(
                    sa.delete(ledger_table).where(
                        c.idempotency_key.in_(chunk),
                        c.body_digest.is_(None),
                        sa.not_(c.deprecated),
                    ),
                )
                conn.execute(
                    sa.update(ledger_table)
                    .where(c.idempotency_key.in_(chunk))
                    .values(pending_op=None, pending_digest=None, updated_at=self._clock()),
                )

    def prune(self, now: datetime.datetime | None = None) -> int:
        """Delete entries whose event is older than `RETENTION` (past any correction window).

        Entries with a pending mark are kept.

        Args:
            now: Current time (aware UTC).

        Returns:
            Entries deleted.
        """
        cutoff = (now or self._clock()) - RETENTION
        text = cutoff.strftime("%Y-%m-%dT%H:%M:%S")
        c = ledger_table.c
        with self._guard(), self._begin() as conn:
            result = conn.execute(
                sa.delete(ledger_table).where(
                    c.event_timestamp < text, c.pending_op.is_(None),
                ),
            )
            return int(result.rowcount or 0)

    # -- helpers ---------------------------------------------------------------------------

    def _insert(self) -> t.Any:
        if self._dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert  # noqa: PLC0415

            return pg_insert(ledger_table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert  # noqa: PLC0415

        return sqlite_insert(ledger_table)

    def _upsert(self, rows: list[dict[str, t.Any]], update_columns: t.Sequence[str]) -> None:
        stmt = self._insert()
        upsert = stmt.on_conflict_do_update(
            index_elements=["idempotency_key"],
            set_={name: stmt.excluded[name] for name in update_columns},
        )
        with self._guard(), self._begin() as conn:
            conn.execute(upsert, rows)

    def _engine_or_fail(self) -> sa.Engine:
        if self._engine is None:
            msg = "the corrections ledger is not open"
            raise RuntimeError(msg)
        return self._engine

    def _connect(self) -> t.ContextManager[sa.Connection]:
        return self._engine_or_fail().connect()

    def _begin(self) -> t.ContextManager[sa.Connection]:
        return self._engine_or_fail().begin()

    def _guard(self) -> t.ContextManager[t.Any]:
        return self._lock if self._lock is not None else _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _by_op(writes: t.Sequence[Write]) -> list[list[Write]]:
    groups: dict[str, list[Write]] = {}
    for w in writes:
        groups.setdefault(w.op, []).append(w)
    return list(groups.values())


def _short_error(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
