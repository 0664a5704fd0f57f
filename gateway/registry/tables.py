"""The registry's tables and their versioned migrations (table ``schema_version``).

Times are Unix milliseconds (BIGINT) so SQLite and PostgreSQL agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

__all__ = [
    "SCHEMA_VERSION",
    "agents",
    "devices",
    "enterprises",
    "metadata",
    "migrate",
    "provisioning_keys",
    "ratio_snapshots",
    "schema_version",
]

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_ms", sa.BigInteger, nullable=False),
)

enterprises = sa.Table(
    "enterprises",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("region", sa.String(6), nullable=False),
    sa.Column("industry", sa.String(8), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

agents = sa.Table(
    "agents",
    metadata,
    # The agent id is its MQTT username, so it is unique across enterprises.
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("enterprise", sa.String(64), sa.ForeignKey("enterprises.id"), nullable=False),
    sa.Column("password_hash", sa.String(300), nullable=True),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("last_birth_ms", sa.BigInteger, nullable=True),
    sa.Column("bdseq", sa.BigInteger, nullable=True),
    sa.Column("online", sa.Boolean, nullable=False, default=False),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("enterprise", sa.String(64), sa.ForeignKey("enterprises.id"), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("agent", sa.String(64), nullable=True),
    sa.Column("name", sa.String(200), nullable=False, default=""),
    sa.Column("region", sa.String(6), nullable=False),
    sa.Column("industry", sa.String(8), nullable=False),
    sa.Column("family", sa.String(32), nullable=False),
    sa.Column("category", sa.String(32), nullable=False),
    sa.Column("profile", sa.String(64), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("source", sa.String(8), nullable=False),
    sa.Column("not_in_ledger", sa.Boolean, nullable=False, default=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("first_seen_ms", sa.BigInteger, nullable=True),
    sa.Column("last_seen_ms", sa.BigInteger, nullable=True),
    sa.Column("last_good_ms", sa.BigInteger, nullable=True),
    sa.Column("online", sa.Boolean, nullable=False, default=False),
    sa.Column("offline_since_ms", sa.BigInteger, nullable=True),
    sa.Column("reason", sa.String(200), nullable=False, default=""),
)

ratio_snapshots = sa.Table(
    "ratio_snapshots",
    metadata,
    sa.Column("ts_ms", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("group_by", sa.String(16), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("window_s", sa.Integer, nullable=False),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("connected", sa.Integer, nullable=False),
    sa.Column("online", sa.Integer, nullable=False),
)

provisioning_keys = sa.Table(
    "provisioning_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("enterprise", sa.String(64), sa.ForeignKey("enterprises.id"), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=True),
    sa.Column("max_uses", sa.Integer, nullable=True),
    sa.Column("uses", sa.Integer, nullable=False, default=0),
)

sa.Index("ix_devices_agent", devices.c.agent)
sa.Index("ix_snapshots_group_ts", ratio_snapshots.c.group_by, ratio_snapshots.c.ts_ms)


def _v1(conn: sa.Connection) -> None:
    for table in (enterprises, agents, devices, ratio_snapshots, provisioning_keys):
        table.create(conn, checkfirst=True)


def _v2(conn: sa.Connection) -> None:
    from gateway.control.tables import CONTROL_TABLES

    for table in CONTROL_TABLES:
        table.create(conn, checkfirst=True)


# Append new steps here; never edit a released one.
_MIGRATIONS: list[Callable[[sa.Connection], None]] = [_v1, _v2]
SCHEMA_VERSION = len(_MIGRATIONS)


def migrate(engine: sa.Engine, now_ms: int) -> int:
    """Bring the schema up to date; returns the version before migrating."""
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
        for number, step in enumerate(_MIGRATIONS, start=1):
            if number > current:
                step(conn)
                conn.execute(schema_version.insert().values(version=number, applied_ms=now_ms))
    return int(current)
