"""Devices in the registry: ledger import, manual registration, decommissioning, views.

A device belongs to one agent of its enterprise (``devices.agent``): the one the ledger
or a remote configuration assigns, else the first whose birth names it. Ingest refuses
another agent's data, birth or state for it (``device_owner``). Only an explicit move
changes it, each one audited in ``device_moves``: ``move_device`` (the admin API), the
owning agent's remote configuration dropping it (``config_owners``), a ledger row naming
another agent, and decommissioning (which frees it for the next agent that reports it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any, get_type_hints

import numpy as np
import sqlalchemy as sa

from gateway import ratios as _ratios
from gateway.registry import rows as _rows
from gateway.registry import tables as t
from gateway.registry.codes import region_label
from gateway.registry.index import NEVER, DeviceMeta
from gateway.registry.ledger import DeviceInput, RowError
from gateway.registry.model import (
    STATUSES,
    Conflict,
    Enterprise,
    ImportResult,
    NotFound,
    RegistryError,
)
from gateway.registry.store import RegistryStore

__all__ = ["STATUSES", "DevicesPart", "device_view_fields"]

log = logging.getLogger("iiot.gateway.registry")

# A change of agent: the device's position, enterprise and id, from agent, to agent.
# Audited with how it came: "api", "config", "ledger" or "decommission".
_Move = tuple[int, str, str, str | None, str | None]

# A device as the API shows it, in this order: DeviceMeta's fields (``reason`` as
# ``state_reason``) and those computed from the index and the enterprise (_COMPUTED).
_VIEW_ORDER = (
    "enterprise",
    "enterprise_name",
    "id",
    "name",
    "region",
    "region_label",
    "industry",
    "family",
    "category",
    "kind",
    "site_region",
    "profile",
    "agent",
    "status",
    "source",
    "not_in_ledger",
    "created_ms",
    "first_seen_ms",
    "last_seen_ms",
    "last_good_ms",
    "online",
    "offline_since_ms",
    "state_reason",
)
_COMPUTED: dict[str, Any] = {
    "enterprise_name": str,
    "region_label": str,
    "last_seen_ms": int | None,
    "last_good_ms": int | None,
    "online": bool,
    "offline_since_ms": int | None,
    "state_reason": str,
}
_META_FIELDS = get_type_hints(DeviceMeta)
_META_IN_VIEW = tuple(name for name in _VIEW_ORDER if name in _META_FIELDS)


def device_view_fields() -> dict[str, Any]:
    """Name → type of each field of a device view, in order (the API's ``DeviceOut``)."""
    return {name: _META_FIELDS.get(name) or _COMPUTED[name] for name in _VIEW_ORDER}


def _ledger_update(old: DeviceMeta, new: DeviceMeta) -> DeviceMeta:
    """A known device's metadata after a ledger row ``new``; its runtime state stays."""
    return DeviceMeta(
        new.enterprise,
        new.id,
        new.name or old.name,
        new.region,
        new.industry,
        new.family,
        new.category,
        new.profile or old.profile,
        new.agent or old.agent,
        old.status,
        new.source if old.not_in_ledger else old.source,
        False,
        old.created_ms,
        old.first_seen_ms,
        old.reason,
        new.kind,
        new.site_region,
    )


def _new_meta(ent: Enterprise, row: DeviceInput, source: str, now: int) -> DeviceMeta:
    """A new device's metadata; region and industry default to the enterprise's."""
    return DeviceMeta(
        ent.id,
        row.device_id,
        row.name,
        row.region or ent.region,
        row.industry or ent.industry,
        row.family,
        row.category,
        row.profile,
        row.agent,
        "registered",
        source,
        False,
        now,
        kind=row.kind,
        site_region=row.site_region,
    )


class DevicesPart(RegistryStore):
    """Devices: the ledger import, manual registration, decommissioning and views."""

    def import_devices(
        self, rows: Sequence[tuple[int, DeviceInput]], *, source: str = "ledger"
    ) -> ImportResult:
        """Idempotent upsert of validated rows; rows naming unknown enterprises are errors."""
        errors: list[RowError] = []
        good: dict[tuple[str, str], tuple[int, DeviceInput]] = {}
        with self._lock:
            for line, row in rows:
                reason = self._row_refusal(row)
                if reason is not None:
                    errors.append(RowError(line, row.device_id, reason))
                    continue
                # A repeated device in one import: the last row wins.
                good[(row.enterprise, row.device_id)] = (line, row)
        created = updated = 0
        now = self._now_ms()
        with self._api_write():
            new_metas: list[DeviceMeta] = []
            changed: list[tuple[int, DeviceMeta]] = []
            with self._lock:
                idx = self._index
                for (ent_id, dev_id), (_line, row) in good.items():
                    i = idx.keys.get((ent_id, dev_id))
                    meta = _new_meta(self._enterprises[ent_id], row, source, now)
                    if i is None:
                        new_metas.append(meta)
                    else:
                        changed.append((i, _ledger_update(idx.meta[i], meta)))
                insert_rows = [_rows.meta_row(m) for m in new_metas]
                update_rows = [_rows.meta_row(m) for _i, m in changed]
                moves: list[_Move] = [
                    (i, m.enterprise, m.id, idx.meta[i].agent, m.agent)
                    for i, m in changed
                    if idx.meta[i].agent and m.agent != idx.meta[i].agent
                ]
            with self._engine.begin() as conn:
                _rows.insert_many(conn, t.devices, insert_rows)
                self._audit_moves(conn, moves, now, by=source, via="ledger")
                for chunk in _rows.chunks(update_rows, _rows.FLUSH_BATCH):
                    conn.execute(
                        t.devices.update()
                        .where(
                            t.devices.c.enterprise == sa.bindparam("b_enterprise"),
                            t.devices.c.id == sa.bindparam("b_id"),
                        )
                        .values({k: sa.bindparam("v_" + k) for k in _rows.META_UPDATE}),
                        [
                            {
                                "b_enterprise": r["enterprise"],
                                "b_id": r["id"],
                                **{"v_" + k: r[k] for k in _rows.META_UPDATE},
                            }
                            for r in chunk
                        ],
                    )
            with self._lock:
                raced = self._add_inserted_locked(new_metas)
                for i, meta in changed:
                    self._set_meta_locked(i, meta)
            created, updated = len(new_metas) - raced, len(changed) + raced
        self._log_moves(moves, by=source, via="ledger")
        save_serials = getattr(self, "save_serials", None)
        if callable(save_serials) and good:
            save_serials([row for _line, row in good.values()])
        self.counters["ledger_rows_accepted"] += created + updated
        self.counters["ledger_rows_rejected"] += len(errors)
        return ImportResult(created + updated, created, updated, errors)

    def _row_refusal(self, row: DeviceInput) -> str | None:
        """Why a valid row cannot be imported for its enterprise (None: it can)."""
        ent = self._enterprises.get(row.enterprise)
        if ent is None:
            return f"unknown enterprise {row.enterprise!r}"
        if row.agent is not None:
            # A device given to an agent that is not this enterprise's would have its
            # data refused from every agent that really reads it.
            owner = self._agents.get(row.agent)
            if owner is None or owner.enterprise != row.enterprise:
                return f"agent {row.agent!r} is not registered for enterprise {row.enterprise!r}"
        if row.kind == "product" and row.region is not None and row.region != ent.region:
            return (
                f"region {row.region!r}: a product is counted in its maker's region "
                f"({ent.region}); put where it is installed in site_region"
            )
        return None

    def register_device(self, row: DeviceInput) -> tuple[dict[str, Any], bool]:
        result = self.import_devices([(1, row)], source="manual")
        if result.errors:
            reason = result.errors[0].reason
            raise (NotFound if reason.startswith("unknown enterprise") else RegistryError)(reason)
        view = self.get_device(row.enterprise, row.device_id)
        assert view is not None
        return view, result.created == 1

    def decommission(self, enterprise: str, device: str, *, by: str = "api") -> dict[str, Any]:
        """Take a device out of the totals; it no longer belongs to any agent (audited)."""
        now = self._now_ms()
        with self._api_write():
            with self._lock:
                i = self._index.keys.get((enterprise, device))
                if i is None:
                    raise NotFound(f"device {enterprise}/{device} is not registered")
                owner = self._index.meta[i].agent
            moves: list[_Move] = [(i, enterprise, device, owner, None)] if owner else []
            with self._engine.begin() as conn:
                conn.execute(
                    t.devices.update()
                    .where(t.devices.c.enterprise == enterprise, t.devices.c.id == device)
                    .values(status="decommissioned", agent=None)
                )
                self._audit_moves(conn, moves, now, by=by, via="decommission")
            with self._lock:
                self._index.meta[i].status = "decommissioned"
                self._index.active[i] = False
                self._index.set_agent(i, None, False)
        self._log_moves(moves, by=by, via="decommission")
        self.counters["devices_decommissioned"] += 1
        view = self.get_device(enterprise, device)
        assert view is not None
        return view

    # ------------------------------------------------------------------ ownership

    def device_owner(self, enterprise: str, device: str) -> str | None:
        """The agent a device belongs to; None when unknown or no agent has it yet."""
        with self._lock:
            i = self._index.keys.get((enterprise, device))
            return None if i is None else self._index.meta[i].agent

    def move_device(
        self, enterprise: str, device: str, agent: str | None, *, by: str
    ) -> dict[str, Any]:
        """Give a device to another agent of its enterprise, or (None) to the next agent
        whose birth names it; audited. NotFound for an unknown device or agent."""
        if agent is not None:
            with self._lock:
                a = self._agents.get(agent)
            if a is None or a.enterprise != enterprise:
                raise NotFound(f"agent {agent!r} of enterprise {enterprise!r} is not registered")
        with self._lock:
            i = self._index.keys.get((enterprise, device))
            if i is None:
                raise NotFound(f"device {enterprise}/{device} is not registered")
        self._move(enterprise, lambda _dev, _owner: agent, [device], by=by, via="api")
        view = self.get_device(enterprise, device)
        assert view is not None
        return view

    def config_owners(
        self,
        enterprise: str,
        agent: str,
        devices: Collection[str],
        removed: Collection[str],
        *,
        by: str,
    ) -> int:
        """An agent's remote configuration changed: its ``devices`` no agent has yet become
        its own, the ``removed`` ones it has become free (audited); returns the moves."""
        listed = set(devices)

        def owner(dev: str, current: str | None) -> str | None:
            if dev in listed:
                return agent if current is None else current
            return None if current == agent else current

        return self._move(enterprise, owner, [*listed, *removed], by=by, via="config")

    def _move(
        self,
        enterprise: str,
        owner: Callable[[str, str | None], str | None],
        devices: Collection[str],
        *,
        by: str,
        via: str,
    ) -> int:
        """Set the agent of each of ``devices`` to ``owner(device, current agent)``."""
        now = self._now_ms()
        with self._api_write():
            with self._lock:
                idx = self._index
                moves: list[_Move] = []
                for dev in devices:
                    i = idx.keys.get((enterprise, dev))
                    if i is None:
                        continue
                    old = idx.meta[i].agent
                    new = owner(dev, old)
                    if new != old:
                        moves.append((i, enterprise, dev, old, new))
            if not moves:
                return 0
            with self._engine.begin() as conn:
                for _i, _e, dev, _old, new in moves:
                    conn.execute(
                        t.devices.update()
                        .where(t.devices.c.enterprise == enterprise, t.devices.c.id == dev)
                        .values(agent=new)
                    )
                self._audit_moves(conn, moves, now, by=by, via=via)
            with self._lock:
                for i, _e, _dev, _old, new in moves:
                    a = self._agents.get(new) if new else None
                    self._index.set_agent(i, new, a is not None and a.online)
                    self._touch_locked(i)
        self._log_moves(moves, by=by, via=via)
        self.counters["devices_moved"] += len(moves)
        return len(moves)

    @staticmethod
    def _audit_moves(
        conn: sa.Connection, moves: Sequence[_Move], now: int, *, by: str, via: str
    ) -> None:
        if moves:
            conn.execute(
                t.device_moves.insert(),
                [
                    {
                        "enterprise": ent,
                        "device": dev,
                        "from_agent": old,
                        "to_agent": new,
                        "at_ms": now,
                        "by": by[:80],
                        "via": via,
                    }
                    for _i, ent, dev, old, new in moves
                ],
            )

    @staticmethod
    def _log_moves(moves: Sequence[_Move], *, by: str, via: str) -> None:
        for _i, ent, dev, old, new in moves[:20]:  # a big ledger import is summed up below
            log.warning(
                "device moved to another agent",
                extra={
                    "enterprise": ent,
                    "device": dev,
                    "from_agent": old,
                    "to_agent": new,
                    "by": by,
                    "via": via,
                },
            )
        if len(moves) > 20:
            log.warning(
                "devices moved to other agents",
                extra={"count": len(moves), "logged": 20, "by": by, "via": via},
            )

    def list_moves(
        self, enterprise: str, device: str | None = None, *, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Changes of the agent an enterprise's devices belong to, newest first."""
        m = t.device_moves.c
        q = sa.select(m.enterprise, m.device, m.from_agent, m.to_agent, m.at_ms, m.by, m.via)
        q = q.where(m.enterprise == enterprise)
        if device is not None:
            q = q.where(m.device == device)
        with self._engine.connect() as conn:
            rows = conn.execute(q.order_by(m.id.desc()).limit(limit)).all()
        return [dict(row._mapping) for row in rows]

    def bulk_load(self, rows: Sequence[DeviceInput], *, source: str = "ledger") -> int:
        """Insert many new devices fast (bulk import, benchmarks); existing ids are errors."""
        now = self._now_ms()
        with self._lock:
            metas = []
            for r in rows:
                ent = self._enterprises.get(r.enterprise)
                if ent is None:
                    raise NotFound(f"enterprise {r.enterprise!r} is not registered")
                reason = self._row_refusal(r)
                if reason is not None:
                    raise RegistryError(f"device {r.enterprise}/{r.device_id}: {reason}")
                if (r.enterprise, r.device_id) in self._index.keys:
                    raise Conflict(f"device {r.enterprise}/{r.device_id} is already registered")
                metas.append(_new_meta(ent, r, source, now))
        with self._api_write():
            with self._engine.begin() as conn:
                _rows.insert_many(conn, t.devices, [_rows.meta_row(m) for m in metas])
            with self._lock:
                self._add_inserted_locked(metas)
        _rows.freeze_long_lived()
        return len(metas)

    def _add_inserted_locked(self, metas: list[DeviceMeta]) -> int:
        """Index devices whose rows were just inserted; returns how many were there already.

        The memory lock is released while the rows are written, so a birth may have added
        some of them meanwhile. Such a position is updated instead of added twice, and its
        own pending insert is dropped: the database row exists now.
        """
        idx = self._index
        keys = idx.keys
        raced = [(keys[(m.enterprise, m.id)], m) for m in metas if (m.enterprise, m.id) in keys]
        if not raced:
            if metas:
                idx.add_many(metas)
            return 0
        taken = {i for i, _m in raced}
        idx.add_many([m for m in metas if keys.get((m.enterprise, m.id)) not in taken])
        for i, m in raced:
            self._set_meta_locked(i, _ledger_update(idx.meta[i], m))
            self._pending_inserts.discard(i)
            self._dirty.add(i)
            self._dirty_report.add(i)
            self._touch_locked(i)
        self.counters["ledger_birth_races"] += len(raced)
        return len(raced)

    def _set_meta_locked(self, i: int, meta: DeviceMeta) -> None:
        idx = self._index
        agent = meta.agent
        meta.agent = idx.meta[i].agent
        idx.meta[i] = meta
        idx.set_static(i, meta)
        a = self._agents.get(agent) if agent else None
        idx.set_agent(i, agent, a is not None and a.online)

    # ------------------------------------------------------------------ reads

    def _view(self, i: int, now_ms: int) -> dict[str, Any]:
        idx = self._index
        m = idx.meta[i]
        last_ts = _rows.opt(idx.last_ts[i])
        online = bool(
            idx.agent_alive[i]
            and idx.dev_online[i]
            and last_ts is not None
            and last_ts >= now_ms - self.freshness_ms
        )
        ent = self._enterprises.get(m.enterprise)
        view = {name: getattr(m, name) for name in _META_IN_VIEW}
        view["enterprise_name"] = ent.name if ent else m.enterprise
        view["region_label"] = region_label(m.region)
        view["last_seen_ms"] = last_ts
        view["last_good_ms"] = _rows.opt(idx.last_good[i])
        view["online"] = online
        view["offline_since_ms"] = _rows.opt(idx.offline_since[i])
        view["state_reason"] = m.reason
        return view

    def get_device(self, enterprise: str, device: str) -> dict[str, Any] | None:
        now = self._now_ms()
        with self._lock:
            i = self._index.keys.get((enterprise, device))
            if i is None:
                return None
            view = self._view(i, now)
            latest = self._latest.get((enterprise, device))
            gaps, missed, last_gap = self._gaps.get((enterprise, device), (0, 0, 0))
        view["latest_ts"] = latest[0] if latest else None
        view["latest"] = dict(latest[1]) if latest else {}
        view["sequence_gaps"] = gaps
        view["missed_samples"] = missed
        view["last_gap_ms"] = last_gap or None
        return view

    def list_devices(
        self,
        *,
        enterprise: str | None = None,
        region: str | None = None,
        industry: str | None = None,
        category: str | None = None,
        family: str | None = None,
        status: str | None = None,
        online: bool | None = None,
        not_in_ledger: bool | None = None,
        kind: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        """Devices matching every given filter, in registration order, one page."""
        now = self._now_ms()
        with self._lock:
            idx = self._index
            mask = _ratios.filter_mask(
                idx,
                enterprise=enterprise,
                region=region,
                industry=industry,
                category=category,
                kind=kind,
            )
            if family is not None:
                mask &= _ratios.code_mask(idx, "family", family)
            n = idx.n
            if status is not None:
                wanted = status
                mask &= np.fromiter((m.status == wanted for m in idx.meta), np.bool_, n)
            if not_in_ledger is not None:
                flag = not_in_ledger
                mask &= np.fromiter((m.not_in_ledger == flag for m in idx.meta), np.bool_, n)
            if online is not None:
                on = _ratios.online_mask(idx, now, self.freshness_ms)
                mask &= on if online else ~on
            hits = np.flatnonzero(mask)
            page = hits[offset : offset + limit]
            return int(hits.size), [self._view(int(i), now) for i in page]

    def recent_offline(
        self, *, limit: int = 20, enterprise: str | None = None
    ) -> list[dict[str, Any]]:
        """Devices offline now that were online before, most recent drop first."""
        now = self._now_ms()
        with self._lock:
            idx = self._index
            n = idx.n
            mask = (
                (idx.offline_since[:n] != NEVER)
                & ~_ratios.online_mask(idx, now, self.freshness_ms)
                & idx.active[:n]
            )
            if enterprise is not None:
                mask &= _ratios.code_mask(idx, "enterprise", enterprise)
            hits = np.flatnonzero(mask)
            order = hits[np.argsort(-idx.offline_since[hits], kind="stable")][:limit]
            return [self._view(int(i), now) for i in order]
