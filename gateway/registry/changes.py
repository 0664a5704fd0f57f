"""What a refresh pass reads: the rows other gateway instances changed since the last.

On PostgreSQL a write stamps each device row with its transaction's id (``updated_xid``,
and ``state_xid`` unless it moved only sample times). Before it reads, a pass takes a
``Mark`` of the database's snapshot: the first transaction id not yet assigned and the
ids still in progress. Every change the next pass has not seen was made by one of those
in-progress transactions or by a later one, so the next pass reads exactly the rows
stamped by them: each committed change once, however late its transaction commits and
whatever the write rate, in index scans. Sample times come as narrow rows
(``TIME_ROW``); whole rows only where something else changed.

SQLite has no transaction ids; there a pass reads the whole rows whose ``updated_ms``
(the database's clock at the write) is newer than the clock when the previous pass read,
less an overlap for transactions that commit late. So are enterprises and agents read
everywhere: few rows change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from gateway.registry import rows as _rows
from gateway.registry import tables as t

__all__ = ["TIME_ROW", "Mark", "device_rows_since", "device_rows_stamped", "take_mark"]

# The columns of a narrow row: key, then the sample times.
TIME_ROW = ("enterprise", "id", "first_seen_ms", "last_good_ms", "last_seen_ms")

_MARK_SQL = (
    "SELECT CAST(CAST(pg_snapshot_xmax(s) AS TEXT) AS BIGINT), "
    "ARRAY(SELECT CAST(CAST(x AS TEXT) AS BIGINT) FROM pg_snapshot_xip(s) AS x) "
    "FROM pg_current_snapshot() AS s"
)


@dataclass(frozen=True, slots=True)
class Mark:
    """Transactions whose rows a pass had not seen: ids from ``xmax`` on, and ``xip``."""

    xmax: int
    xip: tuple[int, ...]


def take_mark(conn: sa.Connection) -> Mark | None:
    """The database's snapshot now (None where rows carry no transaction ids)."""
    if conn.dialect.name != "postgresql":
        return None
    xmax, xip = conn.exec_driver_sql(_MARK_SQL).one()
    return Mark(int(xmax), tuple(int(x) for x in xip))


def device_rows_stamped(
    conn: sa.Connection, mark: Mark
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(narrow rows of every device changed since ``mark``, whole rows in ``LOAD_COLUMNS``
    order of those changed beyond their sample times), on PostgreSQL."""
    # Straight through the driver: SQLAlchemy's rows cost more than the read itself
    # at tens of thousands of rows a pass.
    cur: Any = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        params = (mark.xmax, list(mark.xip))
        cur.execute(
            f"SELECT {', '.join(TIME_ROW)} FROM devices "
            "WHERE updated_xid >= %s OR updated_xid = ANY(CAST(%s AS BIGINT[]))",
            params,
        )
        times: list[tuple[Any, ...]] = cur.fetchall()
        cur.execute(
            f"SELECT {', '.join(_rows.LOAD_COLUMNS)} FROM devices "
            "WHERE state_xid >= %s OR state_xid = ANY(CAST(%s AS BIGINT[]))",
            params,
        )
        whole: list[tuple[Any, ...]] = cur.fetchall()
    finally:
        cur.close()
    return times, whole


def device_rows_since(conn: sa.Connection, since_ms: int) -> list[tuple[Any, ...]]:
    """Whole rows (``LOAD_COLUMNS`` order, then ``updated_ms``) stamped after ``since_ms``."""
    cols = [t.devices.c[name] for name in _rows.LOAD_COLUMNS] + [t.devices.c.updated_ms]
    stmt = sa.select(*cols).where(t.devices.c.updated_ms > since_ms)
    return [tuple(r) for r in conn.execute(stmt).all()]
