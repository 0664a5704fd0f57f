"""Ratio snapshots stored in the registry's database, with their audit records and
evidence (``gateway.registry.provincial``) in the same transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from gateway.registry import rows as _rows
from gateway.registry import tables as t
from gateway.registry.provincial import snapshot_audit, snapshot_evidence
from gateway.registry.store import RegistryStore

__all__ = ["SnapshotsPart"]


def _count_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


class SnapshotsPart(RegistryStore):
    """Stored ratio snapshots."""

    def save_snapshot(
        self,
        ts_ms: int,
        window_s: int,
        rows: Sequence[dict[str, Any]],
        *,
        audit: dict[str, Any] | None = None,
        evidence: dict[str, Any] | None = None,
    ) -> None:
        """Store one ratio snapshot: rows of group_by, key, label, total, connected, online,
        quality_connected (equipment) and products_total, products_connected,
        products_online, products_quality_connected (a quality count a row lacks is
        stored as not recorded); with its audit record and evidence (rows of
        ``snapshot_audit``, ``snapshot_evidence`` without ``ts_ms``), all or nothing."""
        data = [
            {
                "ts_ms": ts_ms,
                "window_s": window_s,
                "group_by": r["group_by"],
                "key": str(r["key"])[:64],
                "label": str(r["label"])[:200],
                "total": int(r["total"]),
                "connected": int(r["connected"]),
                "online": int(r["online"]),
                "products_total": int(r.get("products_total", 0)),
                "products_connected": int(r.get("products_connected", 0)),
                "products_online": int(r.get("products_online", 0)),
                "quality_connected": _count_or_none(r.get("quality_connected")),
                "products_quality_connected": _count_or_none(r.get("products_quality_connected")),
            }
            for r in rows
        ]
        with self._db_lock, self._engine.begin() as conn:
            for table in (t.ratio_snapshots, snapshot_audit, snapshot_evidence):
                conn.execute(table.delete().where(table.c.ts_ms == ts_ms))
            for chunk in _rows.chunks(data, _rows.FLUSH_BATCH):
                conn.execute(t.ratio_snapshots.insert(), chunk)
            if audit is not None:
                conn.execute(snapshot_audit.insert(), [{**audit, "ts_ms": ts_ms}])
            if evidence is not None:
                conn.execute(snapshot_evidence.insert(), [{**evidence, "ts_ms": ts_ms}])

    def prune_snapshots(self, before_ms: int) -> int:
        """Delete snapshots older than ``before_ms``, their audit records and evidence;
        returns the snapshot rows deleted."""
        with self._db_lock, self._engine.begin() as conn:
            done = conn.execute(
                t.ratio_snapshots.delete().where(t.ratio_snapshots.c.ts_ms < before_ms)
            )
            for table in (snapshot_audit, snapshot_evidence):
                conn.execute(table.delete().where(table.c.ts_ms < before_ms))
        return int(done.rowcount or 0)

    def snapshot_rows(
        self,
        group_by: str,
        from_ms: int,
        to_ms: int,
        *,
        limit: int = 100_000,
        key: str | None = None,
    ) -> list[sa.Row[Any]]:
        """Stored snapshots of one grouping (one group's, with ``key``) in [from, to]."""
        c = t.ratio_snapshots.c
        where = [c.group_by == group_by, c.ts_ms >= from_ms, c.ts_ms <= to_ms]
        if key is not None:
            where.append(c.key == key)
        stmt = sa.select(t.ratio_snapshots).where(*where).order_by(c.ts_ms, c.key).limit(limit)
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).all())
