"""The registry's database side: the engine, row conversions and batched writes."""

from __future__ import annotations

import gc
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from gateway.registry import tables as t
from gateway.registry.index import NEVER, DeviceMeta
from gateway.registry.model import Agent, Enterprise

__all__ = [
    "FLUSH_BATCH",
    "LOAD_COLUMNS",
    "META_COLUMNS",
    "META_UPDATE",
    "REPORT_COLUMNS",
    "STATE_COLUMNS",
    "TIME_COLUMNS",
    "agent_of",
    "agent_row",
    "chunks",
    "enterprise_of",
    "enterprise_row",
    "freeze_long_lived",
    "insert_many",
    "make_engine",
    "meta_row",
    "opt",
    "update_devices",
]

FLUSH_BATCH = 5000


def make_engine(url: str) -> sa.Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    parsed = sa.make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    else:
        engine = sa.create_engine(
            "sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool
        )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


LOAD_COLUMNS = (
    "enterprise",
    "id",
    "name",
    "region",
    "industry",
    "family",
    "category",
    "profile",
    "agent",
    "status",
    "source",
    "not_in_ledger",
    "created_ms",
    "first_seen_ms",
    "reason",
    "kind",
    "site_region",
    "last_good_ms",
    "last_seen_ms",
    "offline_since_ms",
    "online",
    "reported_online",
)

META_UPDATE = (
    "name",
    "region",
    "industry",
    "family",
    "category",
    "profile",
    "agent",
    "source",
    "not_in_ledger",
    "kind",
    "site_region",
)


def enterprise_of(r: Any) -> Enterprise:
    return Enterprise(r.id, r.name, r.region, r.industry, r.created_ms)


def agent_of(r: Any) -> Agent:
    return Agent(
        r.id,
        r.enterprise,
        r.password_hash,
        r.created_ms,
        r.last_birth_ms,
        r.bdseq,
        bool(r.online),
        str(r.codec or "json"),
    )


def enterprise_row(e: Enterprise) -> dict[str, Any]:
    return {
        "id": e.id,
        "name": e.name,
        "region": e.region,
        "industry": e.industry,
        "created_ms": e.created_ms,
    }


def agent_row(a: Agent) -> dict[str, Any]:
    return {
        "id": a.id,
        "enterprise": a.enterprise,
        "password_hash": a.password_hash,
        "created_ms": a.created_ms,
        "online": a.online,
    }


def meta_row(m: DeviceMeta) -> dict[str, Any]:
    return {
        "enterprise": m.enterprise,
        "id": m.id,
        "agent": m.agent,
        "name": m.name,
        "region": m.region,
        "industry": m.industry,
        "family": m.family,
        "category": m.category,
        "profile": m.profile,
        "status": m.status,
        "source": m.source,
        "not_in_ledger": m.not_in_ledger,
        "created_ms": m.created_ms,
        "first_seen_ms": m.first_seen_ms,
        "online": False,
        "reported_online": False,
        "reason": m.reason,
        "kind": m.kind,
        "site_region": m.site_region,
    }


STATE_COLUMNS = (
    "agent",
    "profile",
    "status",
    "family",
    "category",
    "first_seen_ms",
    "last_seen_ms",
    "last_good_ms",
    "online",
    "reported_online",
    "offline_since_ms",
    "reason",
)
# Each kind of change writes its own columns, so an instance never writes back a column
# it did not change over what another instance has just written there.
# What a sample moves:
TIME_COLUMNS = ("first_seen_ms", "last_seen_ms", "last_good_ms")
# What a birth, a ledger change or a first good sample changes (``online`` is derived):
META_COLUMNS = ("agent", "profile", "status", "family", "category", "online", *TIME_COLUMNS)
# What a device's state report or its agent's will changes:
REPORT_COLUMNS = ("online", "reported_online", "offline_since_ms", "reason", *TIME_COLUMNS)


def insert_many(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """executemany INSERT; on SQLite straight through the driver (SQLAlchemy's per-row
    parameter processing costs more than the insert itself at 10⁶ rows)."""
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        for chunk in chunks(rows, FLUSH_BATCH):
            conn.execute(table.insert(), chunk)
        return
    cols = list(rows[0])
    values = ", ".join("?" * len(cols))
    if "updated_ms" in table.c:
        sql = f"INSERT INTO {table.name} ({', '.join(cols)}, updated_ms) VALUES ({values}, "
        sql += f"{t.DB_NOW_MS_SQLITE})"
    else:
        sql = f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({values})"
    get = operator.itemgetter(*cols)
    conn.exec_driver_sql(sql, [get(r) for r in rows])


def update_devices(
    conn: sa.Connection, rows: list[dict[str, Any]], columns: tuple[str, ...] = STATE_COLUMNS
) -> None:
    """Write ``columns`` of ``rows`` (timestamps never move back on PostgreSQL)."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        sets = ", ".join(f"{k} = ?" for k in columns)
        conn.exec_driver_sql(
            f"UPDATE devices SET {sets}, updated_ms = {t.DB_NOW_MS_SQLITE} "
            "WHERE enterprise = ? AND id = ?",
            list(map(operator.itemgetter(*columns, "enterprise", "id"), rows)),
        )
        return
    c = t.devices.c
    values: dict[str, Any] = {k: sa.bindparam("v_" + k) for k in columns}
    # Several instances write the same row: a timestamp only ever moves forward, so a
    # late write from an instance that saw older samples cannot take it back.
    for name in ("last_seen_ms", "last_good_ms"):
        if name in values:
            values[name] = sa.func.greatest(c[name], values[name])
    if "first_seen_ms" in values:
        values["first_seen_ms"] = sa.func.least(c.first_seen_ms, values["first_seen_ms"])
    if "agent" in values:
        # Ingest only ever gives a device no agent has to the first that reports it;
        # moves are written by the API in their own transaction. So a flush claims, and
        # never takes back a move another instance made that this one has not yet read.
        values["agent"] = sa.case(
            (sa.or_(c.agent.is_(None), c.agent == values["agent"]), values["agent"]),
            else_=c.agent,
        )
    if columns == TIME_COLUMNS:
        # Only sample times: other instances read such a row narrow (changes.py).
        values["state_xid"] = c.state_xid
    if "status" in values:
        # Nor does a device go back from 'connected' to before its first good sample.
        values["status"] = sa.case(
            (
                sa.and_(
                    c.status == "connected",
                    sa.or_(values["status"] == "registered", values["status"] == "provisioned"),
                ),
                c.status,
            ),
            else_=values["status"],
        )
    stmt = (
        t.devices.update()
        .where(c.enterprise == sa.bindparam("b_enterprise"), c.id == sa.bindparam("b_id"))
        .values(values)
    )
    data = [
        {"b_enterprise": r["enterprise"], "b_id": r["id"], **{"v_" + k: r[k] for k in columns}}
        for r in rows
    ]
    for chunk in chunks(data, FLUSH_BATCH):
        conn.execute(stmt, chunk)


def freeze_long_lived() -> None:
    """Move the (possibly millions of) device objects out of the cyclic GC's sight.

    Otherwise every full collection rescans them all, which shows as 100+ ms pauses in
    API latency at 10⁶ devices.
    """
    gc.collect()
    gc.freeze()


def opt(value: Any) -> int | None:
    v = int(value)
    return None if v == NEVER else v


def chunks(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for k in range(0, len(rows), size):
        yield rows[k : k + size]
