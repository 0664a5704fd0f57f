"""What the provincial platform's checks keep in the registry's database: ledger serial
numbers (for reconciliation), each ratio snapshot's audit record (registry and
definitions versions) and its evidence (the devices it counted, compressed; see
``gateway.evidence``), for verifying a stored report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from gateway.registry import rows as _rows
from gateway.registry.ledger import DeviceInput
from gateway.registry.store import RegistryStore
from gateway.registry.tables import metadata

__all__ = [
    "PROVINCIAL_TABLES",
    "ProvincialPart",
    "device_serials",
    "snapshot_audit",
    "snapshot_evidence",
]

# Report days (of the evidence kept one a day) start at 00:00 China Standard Time.
_CST_OFFSET_MS = 8 * 3600_000
_DAY_MS = 86400_000

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
    # When the snapshot's evidence was deleted (retention); null while kept, or if the
    # snapshot was taken before evidence was kept.
    sa.Column("evidence_pruned_ms", sa.BigInteger, nullable=True),
)

PROVINCIAL_TABLES = (device_serials, snapshot_audit)

# The evidence of a snapshot: its counted devices in ``gateway.evidence``'s encoding,
# compressed (``encoding``); ``raw_bytes`` is the size before compression.
snapshot_evidence = sa.Table(
    "snapshot_evidence",
    metadata,
    sa.Column("ts_ms", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("encoding", sa.String(16), nullable=False),
    sa.Column("devices", sa.Integer, nullable=False),
    sa.Column("raw_bytes", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


class ProvincialPart(RegistryStore):
    """Serial numbers from the ledger; the snapshots' audit records and evidence (written
    with the snapshot, by ``SnapshotsPart.save_snapshot``)."""

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

    def snapshot_audit_at(self, ts_ms: int) -> dict[str, Any] | None:
        """The audit record of the latest snapshot at or before ``ts_ms``."""
        c = snapshot_audit.c
        stmt = sa.select(snapshot_audit).where(c.ts_ms <= ts_ms).order_by(c.ts_ms.desc()).limit(1)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else dict(row._mapping)

    def snapshot_evidence(self, ts_ms: int) -> dict[str, Any] | None:
        """The stored evidence of the snapshot at exactly ``ts_ms`` (None: none kept)."""
        stmt = sa.select(snapshot_evidence).where(snapshot_evidence.c.ts_ms == ts_ms)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else dict(row._mapping)

    def prune_snapshot_evidence(self, before_ms: int, daily_before_ms: int) -> int:
        """Delete the evidence of snapshots older than ``before_ms``, but the first of each
        day (China Standard Time) until ``daily_before_ms``; the audit records say when.
        Returns how many were deleted."""
        e = snapshot_evidence.c
        with self._db_lock, self._engine.begin() as conn:
            stamps = (
                conn.execute(sa.select(e.ts_ms).where(e.ts_ms < before_ms).order_by(e.ts_ms))
                .scalars()
                .all()
            )
            days: set[int] = set()
            gone: list[int] = []
            for ts in stamps:
                day = (ts + _CST_OFFSET_MS) // _DAY_MS
                if day in days or ts < daily_before_ms:
                    gone.append(ts)
                days.add(day)
            a = snapshot_audit.c
            now = self._now_ms()
            for k in range(0, len(gone), 1000):
                chunk = gone[k : k + 1000]
                conn.execute(snapshot_evidence.delete().where(e.ts_ms.in_(chunk)))
                conn.execute(
                    snapshot_audit.update()
                    .where(a.ts_ms.in_(chunk), a.evidence_pruned_ms.is_(None))
                    .values(evidence_pruned_ms=now)
                )
        return len(gone)
