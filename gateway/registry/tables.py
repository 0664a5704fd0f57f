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
    "targets",
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
    """Each agent's wire format, from its births."""
    _add_missing_columns(conn, agents, ("codec",))


# Append new steps here; never edit a released one.
_MIGRATIONS: list[Callable[[sa.Connection], None]] = [_v1, _v2, _v3, _v4]
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
