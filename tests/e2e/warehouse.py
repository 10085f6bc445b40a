"""A Segment-warehouse-shaped table in PostgreSQL, and the rows the end-to-end tests load.

Segment's PostgreSQL destination writes one schema per source and, per source, a `tracks`
table (and one table per event with the same system columns plus a column per property). The
columns and types below are the ones Segment creates: `id` (the messageId, NOT unique: Segment
dedupes loads only on a best-effort basis), `anonymous_id`, `user_id`, `event`, `event_text`,
the five timestamps as `timestamp with time zone`, `context_*` columns and property columns,
plus the `properties` JSONB column a dbt model often keeps.

`create_tracks_table(db)` makes the table; `insert_rows(db, rows, write_timezone=...)` writes
rows with their timestamps as *local* times under `SET TIME ZONE write_timezone`, the way a
loader running in a non-UTC session writes them (PostgreSQL converts them to instants).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import typing as t
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

if t.TYPE_CHECKING:
    from tests.e2e.postgres import Database

SCHEMA = "web_app"
TABLE = "tracks"
STREAM = f"{SCHEMA}-{TABLE}"  # tap-postgres names streams <schema>-<table>

COLUMNS: dict[str, str] = {
    "id": "varchar(1024) NOT NULL",
    "anonymous_id": "text",
    "user_id": "text",
    "event": "text",
    "event_text": "text",
    "timestamp": "timestamp with time zone",
    "original_timestamp": "timestamp with time zone",
    "sent_at": "timestamp with time zone",
    "received_at": "timestamp with time zone",
    "uuid_ts": "timestamp with time zone",
    "context_library_name": "text",
    "context_library_version": "text",
    "context_ip": "text",
    "context_page_path": "text",
    # property columns (Segment adds one per property it has seen)
    "tokens": "bigint",
    "amount": "numeric(38,10)",
    "currency": "text",
    "region": "text",
    "properties": "jsonb",
}
TIMESTAMP_COLUMNS = ("timestamp", "original_timestamp", "sent_at", "received_at", "uuid_ts")
READ_TIMEZONE = "America/New_York"  # the test databases' default: what the tap's session sees
WRITE_TIMEZONE = "Asia/Kolkata"  # the loader's session zone when the rows were inserted


def create_tracks_table(db: Database, schema: str = SCHEMA, table: str = TABLE) -> None:
    cols = ",\n  ".join(f'"{name}" {kind}' for name, kind in COLUMNS.items())
    # No primary key: Segment's tables have none, and duplicate ids happen.
    db.execute(
        f"CREATE SCHEMA IF NOT EXISTS {schema};\nCREATE TABLE {schema}.{table} (\n  {cols}\n);"
    )


def sql_literal(value: t.Any, write_zone: ZoneInfo) -> str:
    """A PostgreSQL literal for a Python value (standard_conforming_strings is on)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, decimal.Decimal)):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give rows aware datetimes")
        local = value.astimezone(write_zone).replace(tzinfo=None)
        return "'" + local.isoformat(sep=" ") + "'"  # no offset: the session zone applies
    if isinstance(value, (dict, list)):
        return "'" + json.dumps(value).replace("'", "''") + "'::jsonb"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no SQL literal for {type(value).__name__}")


def insert_rows(
    db: Database,
    rows: t.Sequence[dict[str, t.Any]],
    *,
    write_timezone: str = "Asia/Kolkata",
    schema: str = SCHEMA,
    table: str = TABLE,
) -> None:
    """INSERT rows (dicts of column -> Python value) in one transaction, in a non-UTC session."""
    zone = ZoneInfo(write_timezone)
    statements = [f"BEGIN;\nSET LOCAL TIME ZONE '{write_timezone}';"]
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)}")
        names = ", ".join(f'"{c}"' for c in row)
        values = ", ".join(sql_literal(v, zone) for v in row.values())
        statements.append(f"INSERT INTO {schema}.{table} ({names}) VALUES ({values});")
    statements.append("COMMIT;")
    db.execute("\n".join(statements))


def update_rows(
    db: Database,
    row_id: str,
    changes: dict[str, t.Any],
    *,
    write_timezone: str = "Asia/Kolkata",
    schema: str = SCHEMA,
    table: str = TABLE,
) -> int:
    """UPDATE every row with this `id` (a correction in the warehouse); returns rows changed.

    `uuid_ts` is set to the database's now() unless `changes` sets it, as a reload would: the
    tap bookmarks on `uuid_ts`, so the next incremental `meltano run` reads the changed row.
    """
    zone = ZoneInfo(write_timezone)
    unknown = set(changes) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}")
    sets = [f'"{c}" = {sql_literal(v, zone)}' for c, v in changes.items()]
    if "uuid_ts" not in changes:
        sets.append('"uuid_ts" = clock_timestamp()')
    return int(
        db.scalar(
            f"WITH u AS (UPDATE {schema}.{table} SET {', '.join(sets)} "
            f"WHERE id = {sql_literal(row_id, zone)} RETURNING 1) SELECT count(*) FROM u;"
        )
    )


def delete_rows(db: Database, row_id: str, *, schema: str = SCHEMA, table: str = TABLE) -> None:
    """DELETE every row with this `id` (a hard delete: an incremental tap never sees it)."""
    db.execute(f"DELETE FROM {schema}.{table} WHERE id = {sql_literal(row_id, ZoneInfo('UTC'))};")


# ---------------------------------------------------------------------------- the nasty rows


@dataclass(frozen=True)
class Row:
    """One warehouse row and what must become of it."""

    name: str  # what is nasty about it (also in the test ids)
    columns: dict[str, t.Any]
    # "event": must land in Orb as `event` (live or through a backfill, by its age);
    # "collapsed": an equal duplicate of an earlier row, lands once with it;
    # "dead_letter": never reaches Orb; dead-lettered with `reason` (a substring).
    outcome: t.Literal["event", "collapsed", "dead_letter"]
    event: dict[str, t.Any] | None = None  # the Orb event, timestamp as an aware datetime
    reason: str | None = None
    reason_if_late_rejected: str | None = None  # under `reject` a late row dies as `late` first

    @property
    def id(self) -> str:
        return t.cast(str, self.columns["id"])

    @property
    def timestamp(self) -> dt.datetime:
        return t.cast(dt.datetime, self.columns["timestamp"])


@dataclass
class Scenario:
    now: dt.datetime  # when the rows were made (UTC)
    month_start: dt.datetime  # a UTC month start between 39 and 2 days ago
    rows: list[Row] = field(default_factory=list)
    preexisting: list[dict[str, t.Any]] = field(default_factory=list)  # Orb events, ts aware

    def row(self, name: str) -> Row:
        (found,) = [r for r in self.rows if r.name == name]
        return found


def _ms(when: dt.datetime) -> dt.datetime:
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def latest_month_start(
    now: dt.datetime, *, after: dt.timedelta, before: dt.timedelta
) -> dt.datetime:
    """The latest first-of-month 00:00 UTC in (now - after, now - before)."""
    cursor = (now - before).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    assert cursor > now - after, "no month start in the interval (it spans > 31 days)"
    return cursor


def segment_row(
    row_id: str,
    when: dt.datetime,
    *,
    user_id: str | None,
    event: str,
    event_text: str | None,
    loaded: dt.datetime,
    **props: t.Any,
) -> dict[str, t.Any]:
    """A row with Segment's system columns filled the way Segment fills them."""
    return {
        "id": row_id,
        "anonymous_id": "anon-" + row_id[-8:],
        "user_id": user_id,
        "event": event,
        "event_text": event_text,
        "timestamp": when,
        "original_timestamp": when - dt.timedelta(milliseconds=250),  # device clock skew
        "sent_at": when + dt.timedelta(seconds=2),
        "received_at": when + dt.timedelta(seconds=2, milliseconds=120),
        "uuid_ts": loaded,
        "context_library_name": "analytics-node-next",
        "context_library_version": "1.53.0",
        "context_ip": "203.0.113.7",
        "context_page_path": None,
        **props,
    }


def nasty_scenario(now: dt.datetime | None = None) -> Scenario:
    """History from ~40 days ago across two backfill windows, fresh rows, and nasty ones.

    `uuid_ts` (Segment's load time, the tap's replication key) rises one second per row in
    table order and ends a little before `now`; event times are what the names say.
    """
    now = _ms(now or dt.datetime.now(dt.timezone.utc))
    month_start = latest_month_start(now, after=dt.timedelta(days=39), before=dt.timedelta(days=2))
    sc = Scenario(now=now, month_start=month_start)
    day = dt.timedelta(days=1)
    load = iter(now - dt.timedelta(seconds=120 - i) for i in range(120))

    def ev(row_id: str, name: str, customer: str, when: dt.datetime, **props: t.Any) -> dict:
        return {
            "idempotency_key": row_id,
            "event_name": name,
            "external_customer_id": customer,
            "timestamp": when,
            "properties": props,
        }

    def add(
        name: str,
        row_id: str,
        when: dt.datetime,
        *,
        outcome: t.Literal["event", "collapsed", "dead_letter"] = "event",
        user_id: str | None = "acct_alpha",
        event: str = "api_request",
        event_text: str | None = "API Request",
        expect: dict[str, t.Any] | None = None,
        reason: str | None = None,
        reason_if_late_rejected: str | None = "older than the 12 h grace period",
        **props: t.Any,
    ) -> None:
        columns = segment_row(
            row_id,
            when,
            user_id=user_id,
            event=event,
            event_text=event_text,
            loaded=next(load),
            **props,
        )
        sc.rows.append(Row(name, columns, outcome, expect, reason, reason_if_late_rejected))

    # -- history (older than the 12 h grace period) -----------------------------------------
    t40 = _ms(now - 40 * day)
    add(
        "40 days old, already in Orb (same body)",
        "wh-api-40d",
        t40,
        tokens=1200,
        region="us-east-1",
        expect=ev("wh-api-40d", "API Request", "acct_alpha", t40, tokens=1200, region="us-east-1"),
    )
    t38 = _ms(now - 38 * day + dt.timedelta(hours=3))
    add(
        "numeric(38,10) amount, 38 days old",
        "wh-order-38d",
        t38,
        event="order_completed",
        event_text="Order Completed",
        user_id="acct_beta",
        amount=decimal.Decimal("19.9900000000"),
        currency="USD",
        expect=ev(
            "wh-order-38d",
            "Order Completed",
            "acct_beta",
            t38,
            amount=decimal.Decimal("19.99"),
            currency="USD",
        ),
    )
    before = month_start - dt.timedelta(minutes=10)
    add(
        "10 min before a UTC month start (local date is already the next day)",
        "wh-month-end",
        before,
        tokens=31,
        region="ap-south-1",
        expect=ev(
            "wh-month-end", "API Request", "acct_alpha", before, tokens=31, region="ap-south-1"
        ),
    )
    after = month_start + dt.timedelta(minutes=10)
    add(
        "10 min after a UTC month start",
        "wh-month-start",
        after,
        tokens=32,
        region="ap-south-1",
        expect=ev(
            "wh-month-start", "API Request", "acct_alpha", after, tokens=32, region="ap-south-1"
        ),
    )
    t20 = _ms(now - 20 * day)
    add(
        "duplicate id, same body (first copy)",
        "wh-dup-same",
        t20,
        tokens=7,
        user_id="acct_beta",
        expect=ev("wh-dup-same", "API Request", "acct_beta", t20, tokens=7),
    )
    dup = segment_row(
        "wh-dup-same",
        t20,
        user_id="acct_beta",
        event="api_request",
        event_text="API Request",
        loaded=next(load),
        tokens=7,
    )
    dup["received_at"] += dt.timedelta(minutes=3)  # a re-delivered copy: system columns differ
    dup["context_ip"] = "198.51.100.23"
    sc.rows.append(
        Row(
            "duplicate id, same body (second copy)",
            dup,
            "collapsed",
            reason_if_late_rejected="older than the 12 h grace period",
        )
    )
    t15 = _ms(now - 15 * day)
    add(
        "duplicate id, different body (first copy)",
        "wh-dup-diff",
        t15,
        tokens=5,
        expect=ev("wh-dup-diff", "API Request", "acct_alpha", t15, tokens=5),
    )
    add(
        "duplicate id, different body (second copy)",
        "wh-dup-diff",
        t15,
        tokens=9,
        outcome="dead_letter",
        reason="already used in this request by a different event",
    )
    add(
        "null user_id (anonymous)",
        "wh-anon",
        _ms(now - 10 * day),
        user_id=None,
        tokens=3,
        outcome="dead_letter",
        reason="no customer id at `user_id`",
        reason_if_late_rejected="no customer id at `user_id`",
    )
    t5 = _ms(now - 5 * day)
    add(
        "null property column and null JSONB values",
        "wh-nulls",
        t5,
        tokens=None,
        region="eu-west-1",
        properties={"plan": None, "seats": 3},
        expect=ev("wh-nulls", "API Request", "acct_alpha", t5, region="eu-west-1", seats=3),
    )
    add(
        "numeric(38,10) amount beyond int64",
        "wh-huge-amount",
        _ms(now - 3 * day),
        event="order_completed",
        event_text="Order Completed",
        amount=decimal.Decimal("100000000000000000000.0000000000"),
        currency="USD",
        outcome="dead_letter",
        reason="is outside the int64 range",
    )
    t2 = _ms(now - 2 * day)
    add(
        "nested JSONB properties",
        "wh-nested",
        t2,
        tokens=40,
        properties={"request": {"method": "POST", "path": "/v1/search"}, "tags": ["a", "b"]},
        expect=ev(
            "wh-nested",
            "API Request",
            "acct_alpha",
            t2,
            tokens=40,
            request_method="POST",
            request_path="/v1/search",
            tags='["a","b"]',
        ),
    )
    add(
        "property column and JSONB key collide",
        "wh-collision",
        _ms(now - 36 * dt.timedelta(hours=1)),
        region="eu-west-1",
        properties={"region": "us-east-1"},
        outcome="dead_letter",
        reason="both become Orb property `region`",
    )

    # -- fresh (inside the grace period) -----------------------------------------------------
    f5 = _ms(now - dt.timedelta(minutes=5))
    add(
        "fresh, already in Orb (same body)",
        "wh-api-5m",
        f5,
        tokens=77,
        region="us-east-1",
        reason_if_late_rejected=None,
        expect=ev("wh-api-5m", "API Request", "acct_alpha", f5, tokens=77, region="us-east-1"),
    )
    f2h = _ms(now - dt.timedelta(hours=2))
    add(
        "fresh, null event_text falls back to event",
        "wh-order-2h",
        f2h,
        event="order_completed",
        event_text=None,
        user_id="acct_beta",
        amount=decimal.Decimal("0.1000000000"),
        currency="EUR",
        reason_if_late_rejected=None,
        expect=ev(
            "wh-order-2h",
            "order_completed",
            "acct_beta",
            f2h,
            amount=decimal.Decimal("0.1"),
            currency="EUR",
        ),
    )
    f1h = _ms(now - dt.timedelta(hours=1))
    add(
        "fresh, numeric(38,10) with 17 significant digits",
        "wh-precise-1h",
        f1h,
        event="order_completed",
        event_text="Order Completed",
        user_id="acct_beta",
        amount=decimal.Decimal("1234567.1234567891"),
        currency="USD",
        reason_if_late_rejected=None,
        expect=ev(
            "wh-precise-1h",
            "Order Completed",
            "acct_beta",
            f1h,
            amount=decimal.Decimal("1234567.1234567891"),
            currency="USD",
        ),
    )
    f3h = _ms(now - dt.timedelta(hours=3))
    add(
        "fresh, duplicate id, same body (first copy)",
        "wh-fresh-dup",
        f3h,
        tokens=12,
        reason_if_late_rejected=None,
        expect=ev("wh-fresh-dup", "API Request", "acct_alpha", f3h, tokens=12),
    )
    fdup = segment_row(
        "wh-fresh-dup",
        f3h,
        user_id="acct_alpha",
        event="api_request",
        event_text="API Request",
        loaded=next(load),
        tokens=12,
    )
    sc.rows.append(Row("fresh, duplicate id, same body (second copy)", fdup, "collapsed"))

    # -- already in Orb before the first run -------------------------------------------------
    sc.preexisting = [
        sc.row("40 days old, already in Orb (same body)").event,  # type: ignore[list-item]
        sc.row("fresh, already in Orb (same body)").event,  # type: ignore[list-item]
        ev("legacy-import-0001", "API Request", "acct_gamma", _ms(now - 35 * day), tokens=999),
        ev(
            "other-source-0001",
            "Seat Added",
            "acct_gamma",
            _ms(now - dt.timedelta(minutes=30)),
            seats=2,
        ),
    ]
    return sc


# ---------------------------------------------------------------------------- stand-in helpers


def orb_format(event: dict[str, t.Any]) -> dict[str, t.Any]:
    """An expected event as the stand-in stores it (UTC, 6 fraction digits, JSON numbers)."""
    out = dict(event)
    out["timestamp"] = (
        event["timestamp"].astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    )
    out["properties"] = {
        k: float(v) if isinstance(v, decimal.Decimal) else v for k, v in event["properties"].items()
    }
    return out


def comparable(event: dict[str, t.Any]) -> dict[str, t.Any]:
    """A landed event with its timestamp normalised to 6 fraction digits."""
    out = dict(event)
    ts = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    out["timestamp"] = ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return out


def seed_orb(orb: t.Any, events: t.Iterable[dict[str, t.Any]]) -> None:
    """Ingest events live into a stand-in, each at a stand-in time 1 min after its timestamp.

    So old events are in Orb as if they had been sent on time (not through a backfill).
    """
    import requests

    for event in events:
        orb.set_now(event["timestamp"] + dt.timedelta(minutes=1))
        try:
            res = requests.post(
                f"{orb.url}/ingest",
                json={"events": [orb_format(event)]},
                headers={"Authorization": f"Bearer {orb.api_key}"},
                timeout=10,
            )
        finally:
            orb.set_now(None)
        assert res.status_code == 200, res.text
        assert not res.json().get("validation_failed"), res.text


def target_metrics(stderr: str) -> dict[str, t.Any]:
    """The `target-orb metrics: {...}` JSON that target-orb logs at the end of a run."""
    marker = "target-orb metrics: "
    lines = [ln for ln in stderr.splitlines() if marker in ln]
    assert len(lines) == 1, f"expected one `{marker}` line, got {len(lines)}"
    text = lines[0].split(marker, 1)[1]
    return json.JSONDecoder().raw_decode(text)[0]
