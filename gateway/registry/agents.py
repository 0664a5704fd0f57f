"""Enterprises, agents and provisioning keys of the registry."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from gateway.registry import rows as _rows
from gateway.registry import tables as t
from gateway.registry.codes import check_ident, check_industry, check_region, check_text
from gateway.registry.model import Agent, Conflict, Enterprise, NotFound
from gateway.registry.store import RegistryStore

__all__ = ["AgentsPart", "Credentials", "Publish"]

# (agent id, enterprise, password hash) of every agent that has a password.
Credentials = list[tuple[str, str, str]]
# Called inside a credentials change's transaction with the credentials as they will be
# once it commits; if it raises, nothing is committed.
Publish = Callable[[Credentials], None]

log = logging.getLogger("iiot.gateway.registry")


def _hash_key(key: str) -> str:
    """Provisioning keys are 192-bit random tokens, so one SHA-256 is enough to store them."""
    return hashlib.sha256(key.encode()).hexdigest()


class AgentsPart(RegistryStore):
    """Enterprises, agents and provisioning keys."""

    def add_enterprise(
        self, enterprise_id: str, name: str, region: str, industry: str
    ) -> tuple[Enterprise, bool]:
        """Create or update an enterprise; returns it and whether it was created."""
        check_ident(enterprise_id, "enterprise")
        region = check_region(region)
        industry = check_industry(industry)
        name = check_text(name.strip(), "name")[:200] or enterprise_id
        with self._api_write():
            with self._lock:
                existing = self._enterprises.get(enterprise_id)
            now = self._now_ms()
            with self._engine.begin() as conn:
                if existing is None:
                    conn.execute(
                        t.enterprises.insert().values(
                            id=enterprise_id,
                            name=name,
                            region=region,
                            industry=industry,
                            created_ms=now,
                        )
                    )
                else:
                    conn.execute(
                        t.enterprises.update()
                        .where(t.enterprises.c.id == enterprise_id)
                        .values(name=name, region=region, industry=industry)
                    )
            with self._lock:
                ent = Enterprise(
                    enterprise_id,
                    name,
                    region,
                    industry,
                    existing.created_ms if existing else now,
                )
                self._enterprises[enterprise_id] = ent
        return ent, existing is None

    def bulk_add_enterprises(
        self, rows: Sequence[tuple[str, str, str, str]], *, with_agents: bool = False
    ) -> int:
        """Insert many new enterprises (id, name, region, industry) in one transaction.

        With ``with_agents`` each also gets an agent ``<id>-agent`` (no password).
        """
        now = self._now_ms()
        ents = []
        for ent_id, name, region, industry in rows:
            check_ident(ent_id, "enterprise")
            check_text(name, "name")
            ents.append(
                Enterprise(ent_id, name, check_region(region), check_industry(industry), now)
            )
        agents = [Agent(f"{e.id}-agent", e.id, None, now) for e in ents] if with_agents else []
        with self._api_write():
            with self._lock:
                taken = [e.id for e in ents if e.id in self._enterprises]
            if taken:
                raise Conflict(f"enterprise {taken[0]!r} is already registered")
            with self._engine.begin() as conn:
                for chunk in _rows.chunks([_rows.enterprise_row(e) for e in ents], 20_000):
                    conn.execute(t.enterprises.insert(), chunk)
                for chunk in _rows.chunks([_rows.agent_row(a) for a in agents], 20_000):
                    conn.execute(t.agents.insert(), chunk)
            with self._lock:
                self._enterprises.update((e.id, e) for e in ents)
                self._agents.update((a.id, a) for a in agents)
                self._misses.clear()
        return len(ents)

    def get_enterprise(self, enterprise_id: str) -> Enterprise | None:
        with self._lock:
            return self._enterprises.get(enterprise_id)

    def enterprise_names(self) -> dict[str, str]:
        """Enterprise id → name, without waiting for the registry's lock (queries count
        over a view and must not wait for a refresh pass or a flush)."""
        # dict.copy() runs in C under the GIL: it sees the dict between two changes.
        return {e.id: e.name for e in self._enterprises.copy().values()}

    def list_enterprises(self) -> list[Enterprise]:
        with self._lock:
            return sorted(self._enterprises.values(), key=lambda e: e.id)

    def list_agents(self, enterprise: str | None = None) -> list[Agent]:
        with self._lock:
            return sorted(
                (a for a in self._agents.values() if enterprise in (None, a.enterprise)),
                key=lambda a: a.id,
            )

    def agent_credentials(self) -> Credentials:
        """(agent id, enterprise, password hash) of every agent that has a password.

        Read from the database, not memory, so that gateway instances sharing it write
        the same broker files and one instance's rewrite keeps the others' agents.
        """
        with self._engine.connect() as conn:
            return self._credentials_in(conn)

    @staticmethod
    def _credentials_in(conn: sa.Connection) -> Credentials:
        c = t.agents.c
        rows = conn.execute(
            sa.select(c.id, c.enterprise, c.password_hash)
            .where(c.password_hash.is_not(None), c.password_hash != "")
            .order_by(c.id)
        ).all()
        return [(r.id, r.enterprise, r.password_hash) for r in rows]

    def _publish_in(
        self,
        conn: sa.Connection,
        publish: Publish | None,
        agent_id: str,
        cached: tuple[Agent | None, str | None],
    ) -> None:
        """Hand the uncommitted credentials to ``publish``; if it fails, undo the cache too.

        ``cached`` is the agent memory held before this change and its password hash
        (``_put_agent`` changes the cached agent in place).
        """
        if publish is None:
            return
        try:
            publish(self._credentials_in(conn))
        except BaseException:
            agent, password_hash = cached
            with self._lock:
                if agent is None:
                    self._agents.pop(agent_id, None)
                else:
                    agent.password_hash = password_hash
                    self._agents[agent_id] = agent
            raise

    def _cached(self, agent_id: str) -> tuple[Agent | None, str | None]:
        with self._lock:
            agent = self._agents.get(agent_id)
            return agent, agent.password_hash if agent is not None else None

    def add_agent(self, enterprise: str, agent_id: str, password_hash: str | None) -> Agent:
        """Register an agent (or rotate its password); the id is unique across enterprises."""
        check_ident(agent_id, "agent")
        with self._api_write():
            with self._engine.begin() as conn:
                return self._put_agent(conn, enterprise, agent_id, password_hash)[0]

    def _put_agent(
        self, conn: sa.Connection, enterprise: str, agent_id: str, password_hash: str | None
    ) -> tuple[Agent, bool]:
        """Insert or update an agent; returns it and whether it existed already.

        The enterprise and agent are looked up in the database, where another gateway
        instance may have added them.
        """
        with self._lock:
            ent = self._enterprises.get(enterprise)
        if ent is None:
            row = conn.execute(
                sa.select(t.enterprises).where(t.enterprises.c.id == enterprise)
            ).first()
            if row is None:
                raise NotFound(f"enterprise {enterprise!r} is not registered")
            ent = _rows.enterprise_of(row)
        found = conn.execute(sa.select(t.agents).where(t.agents.c.id == agent_id)).first()
        if found is not None and found.enterprise != enterprise:
            raise Conflict(
                f"agent id {agent_id!r} already belongs to another enterprise; choose another id"
            )
        now = self._now_ms()
        if found is None:
            conn.execute(
                t.agents.insert().values(
                    id=agent_id,
                    enterprise=enterprise,
                    password_hash=password_hash,
                    created_ms=now,
                    online=False,
                )
            )
            agent = Agent(agent_id, enterprise, password_hash, now)
        else:
            conn.execute(
                t.agents.update()
                .where(t.agents.c.id == agent_id)
                .values(password_hash=password_hash)
            )
            with self._lock:
                agent = self._agents.get(agent_id) or _rows.agent_of(found)
            agent.password_hash = password_hash
        with self._lock:
            self._enterprises.setdefault(enterprise, ent)
            self._agents[agent_id] = agent
            self._misses.clear()
        return agent, found is not None

    def create_provisioning_key(
        self,
        enterprise: str,
        *,
        expires_ms: int | None = None,
        max_uses: int | None = None,
        allow_rotation: bool = False,
    ) -> tuple[str, str]:
        """A new key for an enterprise: returns (key id, key). Only the hash is stored.

        Only a key with ``allow_rotation`` gives an agent id that exists already a new
        password (which locks out whatever runs with the old one).
        """
        with self._lock:
            if enterprise not in self._enterprises:
                raise NotFound(f"enterprise {enterprise!r} is not registered")
        key = "pk_" + secrets.token_urlsafe(24)
        key_id = secrets.token_hex(8)
        with self._db_lock, self._engine.begin() as conn:
            conn.execute(
                t.provisioning_keys.insert().values(
                    id=key_id,
                    enterprise=enterprise,
                    key_hash=_hash_key(key),
                    created_ms=self._now_ms(),
                    expires_ms=expires_ms,
                    max_uses=max_uses,
                    uses=0,
                    allow_rotation=allow_rotation,
                )
            )
        return key_id, key

    def redeem_provisioning_key(
        self, key: str, agent_id: str, password_hash: str, *, publish: Publish | None = None
    ) -> tuple[Agent, bool]:
        """Check a key and register the agent under its enterprise, atomically.

        Returns the agent and whether it existed (its password rotated, which only a key
        with ``allow_rotation`` may do; otherwise ``Conflict``). When ``publish`` raises,
        the key's use is not spent and the agent is neither added nor changed.
        """
        check_ident(agent_id, "agent_id")
        now = self._now_ms()
        with self._api_write():
            cached = self._cached(agent_id)
            with self._engine.begin() as conn:
                row = conn.execute(
                    sa.select(t.provisioning_keys).where(
                        t.provisioning_keys.c.key_hash == _hash_key(key)
                    )
                ).first()
                if row is None:
                    raise NotFound("provisioning key is not valid")
                if row.expires_ms is not None and now >= row.expires_ms:
                    raise NotFound("provisioning key has expired")
                if row.max_uses is not None and row.uses >= row.max_uses:
                    raise NotFound("provisioning key has been used up")
                # Counted in one conditional UPDATE: another gateway instance sharing the
                # database may redeem the same key between the read above and this write.
                k = t.provisioning_keys.c
                counted = conn.execute(
                    t.provisioning_keys.update()
                    .where(
                        k.id == row.id,
                        sa.or_(k.max_uses.is_(None), k.uses < k.max_uses),
                        sa.or_(k.expires_ms.is_(None), k.expires_ms > now),
                    )
                    .values(uses=k.uses + 1)
                )
                if counted.rowcount != 1:
                    raise NotFound("provisioning key has been used up")
                existing = conn.execute(
                    sa.select(t.agents.c.enterprise).where(t.agents.c.id == agent_id)
                ).first()
                if existing is not None and existing.enterprise == row.enterprise:
                    if not row.allow_rotation:
                        # Raised inside the transaction: the key's use is not spent.
                        self.counters["reprovision_refused"] += 1
                        raise Conflict(
                            f"agent {agent_id!r} of enterprise {row.enterprise!r} is already "
                            "provisioned; a new password would lock out the running agent. "
                            "An admin can rotate its credentials (POST /api/v1/agents/"
                            f"{row.enterprise}/{agent_id}/rotate) or create a key with "
                            "allow_rotation"
                        )
                agent, existed = self._put_agent(conn, row.enterprise, agent_id, password_hash)
                if existed:
                    self._audit_rotation(conn, agent, now, by=f"key:{row.id}", via="key")
                self._publish_in(conn, publish, agent_id, cached)
        self.counters["agents_provisioned"] += 1
        if existed:
            self.counters["agents_reprovisioned"] += 1
            log.warning(
                "agent credentials rotated with a provisioning key: its previous password "
                "no longer works",
                extra={"agent": agent.id, "enterprise": agent.enterprise, "key_id": row.id},
            )
        return agent, existed

    def rotate_agent(
        self,
        enterprise: str,
        agent_id: str,
        password_hash: str,
        *,
        by: str,
        publish: Publish | None = None,
    ) -> Agent:
        """Give an existing agent a new password; audited. NotFound if it does not exist.

        When ``publish`` raises, neither the password nor the audit changes.
        """
        now = self._now_ms()
        with self._api_write():
            cached = self._cached(agent_id)
            with self._engine.begin() as conn:
                found = conn.execute(
                    sa.select(t.agents.c.enterprise).where(t.agents.c.id == agent_id)
                ).first()
                if found is None or found.enterprise != enterprise:
                    raise NotFound(
                        f"agent {agent_id!r} of enterprise {enterprise!r} is not registered"
                    )
                agent, _ = self._put_agent(conn, enterprise, agent_id, password_hash)
                self._audit_rotation(conn, agent, now, by=by, via="api")
                self._publish_in(conn, publish, agent_id, cached)
        self.counters["agents_rotated"] += 1
        log.warning(
            "agent credentials rotated: its previous password no longer works",
            extra={"agent": agent_id, "enterprise": enterprise, "by": by},
        )
        return agent

    @staticmethod
    def _audit_rotation(conn: sa.Connection, agent: Agent, now: int, *, by: str, via: str) -> None:
        conn.execute(
            t.agent_rotations.insert().values(
                enterprise=agent.enterprise, agent=agent.id, at_ms=now, by=by[:80], via=via
            )
        )

    def list_rotations(
        self, enterprise: str, agent: str | None = None, *, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Credential rotations of an enterprise's agents, newest first."""
        r = t.agent_rotations.c
        q = sa.select(r.agent, r.enterprise, r.at_ms, r.by, r.via).where(r.enterprise == enterprise)
        if agent is not None:
            q = q.where(r.agent == agent)
        with self._engine.connect() as conn:
            rows = conn.execute(q.order_by(r.id.desc()).limit(limit)).all()
        return [dict(row._mapping) for row in rows]
