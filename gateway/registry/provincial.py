"""What the provincial platform's checks keep in the registry's database: ledger serial
numbers (for reconciliation) and each ratio snapshot's audit record (registry and
definitions versions, for verifying a stored report)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from gateway.registry import rows as _rows
from gateway.registry.ledger import DeviceInput
from gateway.registry.store import RegistryStore
from gateway.registry.tables import metadata

__all__ = ["PROVINCIAL_TABLES", "ProvincialPart", "device_serials", "snapshot_audit"]

# The optional ledger column ``serial``: one row per device that has one.
device_serials = sa.Table(
    "device_serials",
    metadata,
    sa.Column("enterprise", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("serial", sa.String(64), nullable=False),
)
sa.Index("ix_device_serials_serial", device_serials.c.serial)

# One row per stored snapshot: what it counted, so a report can be verified later.
snapshot_audit = sa.Table(
    "snapshot_audit",
    metadata,
    sa.Column("ts_ms", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("window_s", sa.Integer, nullable=False),
    sa.Column("registry_version", sa.String(64), nullable=False),
    sa.Column("definitions_version", sa.String(64), nullable=False),
    sa.Column("devices", sa.Integer, nullable=False),
)

PROVINCIAL_TABLES = (device_serials, snapshot_audit)


class ProvincialPart(RegistryStore):
    """Serial numbers from the ledger and the snapshots' audit records."""

    def save_serials(self, rows: Sequence[DeviceInput]) -> None:
        """Record the ``serial`` of imported rows; a row without one clears the old one."""
        keep = [
            {"enterprise": r.enterprise, "device": r.device_id, "serial": r.serial}
            for r in rows
            if r.serial
        ]
        keys = [{"e": r.enterprise, "d": r.device_id} for r in rows]
        c = device_serials.c
        delete = device_serials.delete().where(
            c.enterprise == sa.bindparam("e"), c.device == sa.bindparam("d")
        )
        with self._db_lock, self._engine.begin() as conn:
            for chunk in _rows.chunks(keys, _rows.FLUSH_BATCH):
                conn.execute(delete, chunk)
            for part in _rows.chunks(keep, _rows.FLUSH_BATCH):
                conn.execute(device_serials.insert(), part)

    def serials(self) -> dict[tuple[str, str], str]:
        """(enterprise, device) → serial, for the devices whose ledger row gives one."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(device_serials)).all()
        return {(r.enterprise, r.device): r.serial for r in rows}

    def save_snapshot_audit(self, record: dict[str, Any]) -> None:
        """Store (replace) the audit record of the snapshot at ``record['ts_ms']``."""
        with self._db_lock, self._engine.begin() as conn:
            conn.execute(snapshot_audit.delete().where(snapshot_audit.c.ts_ms == record["ts_ms"]))
            conn.execute(snapshot_audit.insert(), [record])

    def snapshot_audit_at(self, ts_ms: int) -> dict[str, Any] | None:
        """The audit record of the latest snapshot at or before ``ts_ms``."""
        c = snapshot_audit.c
        stmt = sa.select(snapshot_audit).where(c.ts_ms <= ts_ms).order_by(c.ts_ms.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else dict(row._mapping)

    def prune_snapshot_audit(self, before_ms: int) -> None:
        with self._db_lock, self._engine.begin() as conn:
            conn.execute(snapshot_audit.delete().where(snapshot_audit.c.ts_ms < before_ms))
