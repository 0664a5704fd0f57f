"""Database access for the control plane; every method is one short transaction."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from gateway.control import tables as ct
from gateway.registry import tables as rt

__all__ = ["ControlStore", "StaleVersion"]

_PENDING = "pending"


class StaleVersion(RuntimeError):
    """The desired configuration changed meanwhile (another request or instance)."""


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ControlStore:
    """Desired/reported configurations, the write audit and discovery, in the registry DB."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # -- desired and reported configuration ------------------------------------------------

    def desired(self, agent: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(ct.agent_configs).where(ct.agent_configs.c.agent == agent)
            ).first()
        if row is None:
            return None
        out = dict(row._mapping)
        out["document"] = json.loads(out["document"])
        return out

    def save_desired(
        self,
        enterprise: str,
        agent: str,
        document: dict[str, Any],
        *,
        previous: int | None,
        by: str,
        now_ms: int,
    ) -> None:
        """Store version ``document['version']`` if the stored one is still ``previous``."""
        values = {
            "enterprise": enterprise,
            "version": document["version"],
            "document": _dumps(document),
            "updated_ms": now_ms,
            "updated_by": by,
            "published": False,
        }
        table = ct.agent_configs
        try:
            with self.engine.begin() as conn:
                if previous is None:
                    conn.execute(table.insert().values(agent=agent, **values))
                    return
                done = conn.execute(
                    table.update()
                    .where(table.c.agent == agent, table.c.version == previous)
                    .values(**values)
                )
                if done.rowcount != 1:
                    raise StaleVersion(agent)
        except sa.exc.IntegrityError as exc:
            raise StaleVersion(agent) from exc

    def mark_published(self, agent: str, version: int) -> None:
        table = ct.agent_configs
        with self.engine.begin() as conn:
            conn.execute(
                table.update()
                .where(table.c.agent == agent, table.c.version == version)
                .values(published=True)
            )

    def unpublished(self, *, everything: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
        """(enterprise, agent, document) of each configuration not yet on the broker (or all)."""
        table = ct.agent_configs
        q = sa.select(table.c.enterprise, table.c.agent, table.c.document)
        if not everything:
            q = q.where(table.c.published.is_(False))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [(r.enterprise, r.agent, json.loads(r.document)) for r in rows]

    def stored_profiles(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ct.uploaded_profiles)).all()
        return {r.id: json.loads(r.document) for r in rows}

    def save_profiles(self, docs: dict[str, dict[str, Any]], now_ms: int) -> None:
        if not docs:
            return
        table = ct.uploaded_profiles
        with self.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.id.in_(list(docs))))
            conn.execute(
                table.insert(),
                [{"id": k, "document": _dumps(v), "uploaded_ms": now_ms} for k, v in docs.items()],
            )

    def save_report(self, enterprise: str, agent: str, report: Any, now_ms: int) -> None:
        values = {
            "enterprise": enterprise,
            "version": report.version,
            "applied": report.applied,
            "running_version": report.running_version,
            "ts_ms": report.ts,
            "errors": _dumps(report.errors),
            "received_ms": now_ms,
        }
        table = ct.config_reports
        with self.engine.begin() as conn:
            done = conn.execute(table.update().where(table.c.agent == agent).values(**values))
            if done.rowcount == 0:
                conn.execute(table.insert().values(agent=agent, **values))

    def reported(self, agent: str) -> dict[str, Any] | None:
        table = ct.config_reports
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.agent == agent)).first()
        if row is None:
            return None
        out = dict(row._mapping)
        out["errors"] = json.loads(out["errors"])
        return out

    # -- registry facts, read from the database so every instance agrees ----------------

    def agent_of(self, enterprise: str, device: str) -> str | None:
        d = rt.devices
        with self.engine.connect() as conn:
            agent = conn.execute(
                sa.select(d.c.agent).where(d.c.enterprise == enterprise, d.c.id == device)
            ).scalar()
        return None if agent is None else str(agent)

    def agent_state(self, agent: str) -> tuple[str, bool] | None:
        """(enterprise, online) of an agent, or None when it is unknown."""
        a = rt.agents
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(a.c.enterprise, a.c.online).where(a.c.id == agent)).first()
        return None if row is None else (str(row.enterprise), bool(row.online))

    def agent_codec(self, agent: str) -> str:
        """The wire format of the agent's last birth: 'json' or 'sparkplug'."""
        a = rt.agents
        with self.engine.connect() as conn:
            codec = conn.execute(sa.select(a.c.codec).where(a.c.id == agent)).scalar()
        return str(codec or "json")

    # -- writes -------------------------------------------------------------------------

    def insert_write(self, row: dict[str, Any], *, once: bool = False) -> bool:
        """Add a write's record; with ``once``, False when its id is recorded already."""
        row = {**row, "value": _dumps(row["value"])}
        for key in ("previous", "read_back"):
            if row.get(key) is not None:
                row[key] = _dumps(row[key])
        try:
            with self.engine.begin() as conn:
                conn.execute(ct.write_audit.insert().values(**row))
        except sa.exc.IntegrityError:
            if not once:
                raise
            return False
        return True

    def finish_write(
        self,
        request_id: str,
        status: str,
        *,
        reason: str = "",
        previous: Any = None,
        value: Any = None,
        now_ms: int,
        only_pending: bool = True,
    ) -> bool:
        """Record a write's outcome; False when it had one already (and ``only_pending``)."""
        table = ct.write_audit
        cond = [table.c.id == request_id]
        if only_pending:
            cond.append(table.c.status == _PENDING)
        with self.engine.begin() as conn:
            done = conn.execute(
                table.update()
                .where(*cond)
                .values(
                    status=status,
                    reason=reason[:500],
                    previous=None if previous is None else _dumps(previous),
                    read_back=None if value is None else _dumps(value),
                    finished_ms=now_ms,
                )
            )
        return bool(done.rowcount)

    def get_write(self, request_id: str) -> dict[str, Any] | None:
        table = ct.write_audit
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.id == request_id)).first()
        return None if row is None else _write_view(row)

    def list_writes(
        self, enterprise: str | None, device: str | None, limit: int
    ) -> list[dict[str, Any]]:
        table = ct.write_audit
        q = sa.select(table).order_by(table.c.requested_ms.desc(), table.c.id).limit(limit)
        if enterprise is not None:
            q = q.where(table.c.enterprise == enterprise)
        if device is not None:
            q = q.where(table.c.device == device)
        with self.engine.connect() as conn:
            return [_write_view(r) for r in conn.execute(q).all()]

    # -- discovery ------------------------------------------------------------------------

    def insert_scan(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(ct.scans.insert().values(reports=0, errors="[]", **row))

    def get_scan(self, scan: str) -> dict[str, Any] | None:
        """The scan's enterprise, agent, expires_ms and finished_ms; None if never asked for."""
        table = ct.scans
        q = sa.select(table.c.enterprise, table.c.agent, table.c.expires_ms, table.c.finished_ms)
        with self.engine.connect() as conn:
            row = conn.execute(q.where(table.c.id == scan)).first()
        return None if row is None else dict(row._mapping)

    def scan_reported(
        self,
        scan: str,
        errors: list[str],
        *,
        done: bool,
        now_ms: int,
        refusal: Callable[[dict[str, Any] | None], str | None],
    ) -> str | None:
        """Count a report for ``scan`` unless ``refusal`` of its row names a reason; returns it.

        The check and the count are one transaction, and a scan another report has just
        finished (a concurrent instance, a repeated delivery) is refused as finished.
        """
        table = ct.scans
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(
                    table.c.enterprise,
                    table.c.agent,
                    table.c.expires_ms,
                    table.c.finished_ms,
                    table.c.errors,
                ).where(table.c.id == scan)
            ).first()
            reason = refusal(None if row is None else dict(row._mapping))
            if reason is not None or row is None:
                return reason or "scan_unknown"
            merged = (json.loads(row.errors) + errors)[-100:]
            counted = conn.execute(
                table.update()
                .where(table.c.id == scan, table.c.finished_ms.is_(None))
                .values(
                    reports=table.c.reports + 1,
                    errors=_dumps(merged),
                    finished_ms=now_ms if done else None,
                )
            )
            if counted.rowcount != 1:
                return "scan_finished"
        return None

    def upsert_proposal(self, row: dict[str, Any]) -> None:
        """Add a proposal, or refresh a new one seen again; approved/rejected ones stay so."""
        table = ct.discovered
        values = {
            "address": _dumps(row["address"]),
            "answered": _dumps(row["answered"]),
            "candidates": _dumps(row["candidates"]),
            "scan": row["scan"],
            "last_seen_ms": row["now_ms"],
        }
        where = (table.c.agent == row["agent"], table.c.address_key == row["address_key"])
        for _ in range(2):  # a concurrent insert of the same key: update it instead
            try:
                with self.engine.begin() as conn:
                    found = conn.execute(sa.select(table.c.status).where(*where)).first()
                    if found is None:
                        conn.execute(
                            table.insert().values(
                                enterprise=row["enterprise"],
                                agent=row["agent"],
                                address_key=row["address_key"],
                                protocol=row["protocol"],
                                status="new",
                                first_seen_ms=row["now_ms"],
                                **values,
                            )
                        )
                    elif found.status == "new":
                        conn.execute(table.update().where(*where).values(**values))
                    else:
                        conn.execute(
                            table.update().where(*where).values(last_seen_ms=row["now_ms"])
                        )
                return
            except sa.exc.IntegrityError:
                continue

    def list_discovered(
        self, enterprise: str | None, agent: str | None, status: str | None
    ) -> list[dict[str, Any]]:
        table = ct.discovered
        q = sa.select(table).order_by(table.c.id)
        if enterprise is not None:
            q = q.where(table.c.enterprise == enterprise)
        if agent is not None:
            q = q.where(table.c.agent == agent)
        if status is not None:
            q = q.where(table.c.status == status)
        with self.engine.connect() as conn:
            return [_proposal_view(r) for r in conn.execute(q).all()]

    def get_discovered(self, proposal_id: int) -> dict[str, Any] | None:
        table = ct.discovered
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.id == proposal_id)).first()
        return None if row is None else _proposal_view(row)

    def set_discovered(self, proposal_id: int, status: str, device_id: str | None) -> None:
        table = ct.discovered
        with self.engine.begin() as conn:
            conn.execute(
                table.update()
                .where(table.c.id == proposal_id)
                .values(status=status, device_id=device_id)
            )


def _write_view(row: Any) -> dict[str, Any]:
    m = dict(row._mapping)
    for key in ("value", "previous", "read_back"):
        if m[key] is not None:
            m[key] = json.loads(m[key])
    return m


def _proposal_view(row: Any) -> dict[str, Any]:
    m = dict(row._mapping)
    for key in ("address", "answered", "candidates"):
        m[key] = json.loads(m[key])
    del m["address_key"]
    return m
