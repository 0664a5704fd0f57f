"""The registry's tables and their versioned migrations (table ``schema_version``).

Times are Unix milliseconds (BIGINT) so SQLite and PostgreSQL agree exactly.
``updated_ms`` on enterprises, agents and devices is the database's clock at the row's
last write: gateway instances sharing the database poll it for rows changed since their
last look (``RegistryStore.refresh``). On PostgreSQL a device row also carries the id of
the transaction that last wrote it (``updated_xid``) and of the last that changed more
than its sample times (``state_xid``), which the refresh reads by instead (see
``gateway.registry.changes``); on SQLite both stay 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

__all__ = [
    "DB_NOW_MS_SQLITE",
    "SCHEMA_VERSION",
    "agent_rotations",
    "agents",
    "db_now_ms",
    "db_xid",
    "device_moves",
    "devices",
    "enterprises",
    "metadata",
    "migrate",
    "provisioning_keys",
    "quality_buckets",
    "quality_span",
    "ratio_snapshots",
    "schema_version",
    "targets",
]

metadata = sa.MetaData()


class db_now_ms(sa.sql.expression.FunctionElement[int]):
    """The database server's clock in Unix milliseconds (one clock for every instance)."""

    type = sa.BigInteger()
    inherit_cache = True


DB_NOW_MS_SQLITE = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"


@compiles(db_now_ms)
def _db_now_ms_default(_element: db_now_ms, _compiler: Any, **_kw: Any) -> str:
    return DB_NOW_MS_SQLITE


@compiles(db_now_ms, "postgresql")
def _db_now_ms_pg(_element: db_now_ms, _compiler: Any, **_kw: Any) -> str:
    # clock_timestamp(), not now(): a long transaction must not stamp rows in the past.
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"


class db_xid(sa.sql.expression.FunctionElement[int]):
    """The writing transaction's id on PostgreSQL (64-bit, never wraps); 0 elsewhere."""

    type = sa.BigInteger()
    inherit_cache = True


@compiles(db_xid)
def _db_xid_default(_element: db_xid, _compiler: Any, **_kw: Any) -> str:
    return "0"


@compiles(db_xid, "postgresql")
def _db_xid_pg(_element: db_xid, _compiler: Any, **_kw: Any) -> str:
    return "CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT)"


def _xid_column(name: str) -> sa.Column[int]:
    return sa.Column(
        name, sa.BigInteger, nullable=False, default=db_xid(), onupdate=db_xid(), server_default="0"
    )


def _updated_ms() -> sa.Column[int]:
    return sa.Column(
        "updated_ms",
        sa.BigInteger,
        nullable=False,
        default=db_now_ms(),
        onupdate=db_now_ms(),
        server_default="0",
    )


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
    _updated_ms(),
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
    _updated_ms(),
    # The wire format of its last birth: 'json' (iiot/v1) or 'sparkplug' (spBv1.0), which
    # decides how a write reaches it.
    sa.Column("codec", sa.String(16), nullable=False, server_default="json"),
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
    # 'equipment' (production equipment) or 'product' (made by the enterprise, installed
    # anywhere; ``region`` is the maker's, ``site_region`` where it is installed).
    sa.Column("kind", sa.String(16), nullable=False, server_default="equipment"),
    sa.Column("site_region", sa.String(6), nullable=True),
    # The device's own last reported state; ``online`` is it and its agent's being alive.
    sa.Column("reported_online", sa.Boolean, nullable=False, server_default=sa.false()),
    _updated_ms(),
    # Every write stamps updated_xid; every write but one of sample times only (which
    # keeps it: see rows.update_devices) stamps state_xid.
    _xid_column("updated_xid"),
    _xid_column("state_xid"),
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
    # The same three numbers over the enterprises' products (the columns above: equipment).
    sa.Column("products_total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("products_connected", sa.Integer, nullable=False, server_default="0"),
    sa.Column("products_online", sa.Integer, nullable=False, server_default="0"),
    # Connected and passing the data-quality gate, equipment and products; null in a
    # snapshot stored before they were (not recorded, which is not 0).
    sa.Column("quality_connected", sa.Integer, nullable=True),
    sa.Column("products_quality_connected", sa.Integer, nullable=True),
)

# Targets of enterprises on the cloud (上云企业数) per region; year 0 = every year.
targets = sa.Table(
    "targets",
    metadata,
    sa.Column("region", sa.String(6), primary_key=True),
    sa.Column("year", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("target", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
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
    # A key that may give an existing agent a new password (locking out the old one).
    sa.Column("allow_rotation", sa.Boolean, nullable=False, server_default=sa.text("false")),
)

# Every time an existing agent got a new password: who asked, when, how.
agent_rotations = sa.Table(
    "agent_rotations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("enterprise", sa.String(64), nullable=False),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("by", sa.String(80), nullable=False),
    sa.Column("via", sa.String(16), nullable=False),
)

# Every explicit change of the agent a device belongs to: admin move, remote
# configuration, ledger, decommissioning (a first claim by a birth is not one).
device_moves = sa.Table(
    "device_moves",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("enterprise", sa.String(64), nullable=False),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("from_agent", sa.String(64), nullable=True),
    sa.Column("to_agent", sa.String(64), nullable=True),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("by", sa.String(80), nullable=False),
    sa.Column("via", sa.String(16), nullable=False),
)

# The data-quality gate's sample counts a device and time bucket, added to by every
# gateway instance sharing the database (see gateway.quality): the samples, the
# fingerprint of the first values written, whether values differed within the bucket.
# Used on PostgreSQL only; buckets older than the gate's horizon are deleted.
quality_buckets = sa.Table(
    "quality_buckets",
    metadata,
    sa.Column("enterprise", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("start_ms", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("samples", sa.BigInteger, nullable=False),
    sa.Column("fp", sa.BigInteger, nullable=False),
    sa.Column("varied", sa.Boolean, nullable=False),
    _xid_column("updated_xid"),
)

# One row (id 1): since when the instances sharing the database have counted samples
# without a break, and when one last said it was counting.
quality_span = sa.Table(
    "quality_span",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("since_ms", sa.BigInteger, nullable=False),
    sa.Column("seen_ms", sa.BigInteger, nullable=False),
)

sa.Index("ix_devices_agent", devices.c.agent)
sa.Index("ix_device_moves_device", device_moves.c.enterprise, device_moves.c.device)
sa.Index("ix_snapshots_group_ts", ratio_snapshots.c.group_by, ratio_snapshots.c.ts_ms)
sa.Index("ix_devices_updated", devices.c.updated_ms)
sa.Index("ix_agents_updated", agents.c.updated_ms)
sa.Index("ix_enterprises_updated", enterprises.c.updated_ms)
sa.Index("ix_devices_updated_xid", devices.c.updated_xid)
sa.Index("ix_devices_state_xid", devices.c.state_xid)
sa.Index("ix_quality_buckets_xid", quality_buckets.c.updated_xid)
sa.Index("ix_quality_buckets_start", quality_buckets.c.start_ms)


def _v1(conn: sa.Connection) -> None:
    for table in (enterprises, agents, devices, ratio_snapshots, provisioning_keys):
        table.create(conn, checkfirst=True)


def _v2(conn: sa.Connection) -> None:
    from gateway.control.tables import CONTROL_TABLES

    for table in CONTROL_TABLES:
        table.create(conn, checkfirst=True)


def _add_missing_columns(conn: sa.Connection, table: sa.Table, names: tuple[str, ...]) -> None:
    """ALTER TABLE ADD COLUMN for those of ``names`` the table lacks.

    A database created by this version's ``_v1`` has them already (``create`` uses the
    current table definitions); one created by an older release does not.
    """
    have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    preparer = conn.dialect.identifier_preparer
    for name in names:
        if name in have:
            continue
        col = table.c[name]
        ddl = f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN {preparer.quote(name)} "
        ddl += col.type.compile(dialect=conn.dialect)
        if col.server_default is not None:
            default = col.server_default.arg  # type: ignore[attr-defined]
            quoted = isinstance(col.type, sa.String)
            ddl += f" DEFAULT '{default}'" if quoted else f" DEFAULT {default}"
        if not col.nullable:
            ddl += " NOT NULL"
        conn.exec_driver_sql(ddl)


def _v3(conn: sa.Connection) -> None:
    """Device kinds (equipment/product), products in snapshots, on-the-cloud targets."""
    _add_missing_columns(conn, devices, ("kind", "site_region"))
    _add_missing_columns(
        conn, ratio_snapshots, ("products_total", "products_connected", "products_online")
    )
    targets.create(conn, checkfirst=True)


def _v4(conn: sa.Connection) -> None:
    """Ledger serial numbers and the snapshots' audit records."""
    from gateway.registry.provincial import PROVINCIAL_TABLES

    for table in PROVINCIAL_TABLES:
        table.create(conn, checkfirst=True)


def _v5(conn: sa.Connection) -> None:
    """Keys that may rotate an existing agent's password, and the rotations' audit."""
    _add_missing_columns(conn, provisioning_keys, ("allow_rotation",))
    agent_rotations.create(conn, checkfirst=True)


def _v6(conn: sa.Connection) -> None:
    """Change stamps for instances sharing the database; the device's own reported state."""
    for table in (enterprises, agents, devices):
        _add_missing_columns(conn, table, ("updated_ms",))
    _add_missing_columns(conn, devices, ("reported_online",))
    conn.execute(devices.update().where(devices.c.online).values(reported_online=True))
    for table in (enterprises, agents, devices):
        for index in table.indexes:
            if index.name not in _V9_INDEXES:  # their columns come later
                index.create(conn, checkfirst=True)


def _v7(conn: sa.Connection) -> None:
    """Each agent's wire format, from its births."""
    _add_missing_columns(conn, agents, ("codec",))


def _v8(conn: sa.Connection) -> None:
    """When a scan's final report arrived, so that later ones are refused."""
    from gateway.control.tables import scans

    _add_missing_columns(conn, scans, ("finished_ms",))


_V9_INDEXES = ("ix_devices_updated_xid", "ix_devices_state_xid")


def _v9(conn: sa.Connection) -> None:
    """Transaction stamps on devices, for the refresh on PostgreSQL."""
    _add_missing_columns(conn, devices, ("updated_xid", "state_xid"))
    for index in devices.indexes:
        if index.name in _V9_INDEXES:
            index.create(conn, checkfirst=True)


def _v10(conn: sa.Connection) -> None:
    """The snapshots' evidence, and when it was pruned."""
    from gateway.registry.provincial import snapshot_audit, snapshot_evidence

    _add_missing_columns(conn, snapshot_audit, ("evidence_pruned_ms",))
    snapshot_evidence.create(conn, checkfirst=True)


def _v11(conn: sa.Connection) -> None:
    """The audit of devices moved from one agent to another."""
    device_moves.create(conn, checkfirst=True)


def _v12(conn: sa.Connection) -> None:
    """The data-quality gate's sample counts, shared by the instances."""
    for table in (quality_buckets, quality_span):
        table.create(conn, checkfirst=True)


def _v13(conn: sa.Connection) -> None:
    """The quality gate's counts in the ratio snapshots (null in older ones)."""
    _add_missing_columns(conn, ratio_snapshots, ("quality_connected", "products_quality_connected"))


# Append new steps here; never edit a released one.
_MIGRATIONS: list[Callable[[sa.Connection], None]] = [
    _v1,
    _v2,
    _v3,
    _v4,
    _v5,
    _v6,
    _v7,
    _v8,
    _v9,
    _v10,
    _v11,
    _v12,
    _v13,
]
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
