"""The device registry: enterprises, agents, devices, provisioning keys, ratio snapshots.

The database (SQLAlchemy 2; SQLite by default, PostgreSQL by URL) is the source of
truth. The hot state lives in memory (``DeviceIndex``) so the MQTT thread only takes a
lock and sets a few array cells; a background thread writes the changed rows in
batches (``flush``). Sample timestamps are written when they have moved by
``persist_granularity`` (default 60 s) or the status changes, so the database copy of
``last_seen``/``last_good`` may lag by that much while running; ``close()`` writes them
exactly. Writes that come through the API go to the database at once, after pending
ingest changes, so the two never overtake each other.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import operator
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from gateway.registry import tables as t
from gateway.registry.codes import (
    CATEGORY_LABELS,
    FAMILY_CATEGORY,
    FAMILY_LABELS,
    UNKNOWN,
    check_ident,
    check_industry,
    check_region,
    check_text,
    region_label,
    region_prefix_range,
)
from gateway.registry.index import NEVER, DeviceIndex, DeviceMeta
from gateway.registry.ledger import DeviceInput, RowError
from gateway.sink import SampleSummary
from protocols.mqtt.contract import Birth, DeviceState, Will

__all__ = [
    "STATUSES",
    "Agent",
    "Conflict",
    "Enterprise",
    "ImportResult",
    "NotFound",
    "Registry",
    "RegistryError",
]

log = logging.getLogger("iiot.gateway.registry")

STATUSES = ("registered", "provisioned", "connected", "decommissioned")
PointValue = bool | int | float | str | None
_FLUSH_BATCH = 5000
_MISS_CACHE_SIZE = 65536


class RegistryError(ValueError):
    """A request the registry refuses; the message names the enterprise/device/agent."""


class NotFound(RegistryError):
    pass


class Conflict(RegistryError):
    pass


@dataclass(slots=True)
class Enterprise:
    id: str
    name: str
    region: str
    industry: str
    created_ms: int

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "region": self.region,
            "region_label": region_label(self.region),
            "industry": self.industry,
            "created_ms": self.created_ms,
        }


@dataclass(slots=True)
class Agent:
    id: str
    enterprise: str
    password_hash: str | None
    created_ms: int
    last_birth_ms: int | None = None
    bdseq: int | None = None
    online: bool = False

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "enterprise": self.enterprise,
            "created_ms": self.created_ms,
            "last_birth_ms": self.last_birth_ms,
            "bdseq": self.bdseq,
            "online": self.online,
        }


@dataclass(frozen=True, slots=True)
class ImportResult:
    accepted: int
    created: int
    updated: int
    errors: list[RowError]


def _make_engine(url: str) -> sa.Engine:
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


def _hash_key(key: str) -> str:
    """Provisioning keys are 192-bit random tokens, so one SHA-256 is enough to store them."""
    return hashlib.sha256(key.encode()).hexdigest()


class Registry:
    """The registry; also the gateway's ``IngestSink``."""

    def __init__(
        self,
        url: str,
        *,
        default_poll_interval: float = 10.0,
        flush_interval: float = 1.0,
        persist_granularity: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.persist_granularity_ms = int(persist_granularity * 1000)
        self.default_poll_interval = default_poll_interval
        self.flush_interval = flush_interval
        self._clock = clock
        self._engine = _make_engine(url)
        self._lock = threading.RLock()  # in-memory state
        self._db_lock = threading.Lock()  # database writes, in order
        self._index = DeviceIndex()
        self._enterprises: dict[str, Enterprise] = {}
        self._agents: dict[str, Agent] = {}
        self._latest: dict[tuple[str, str], tuple[int, dict[str, PointValue]]] = {}
        self._pending_inserts: set[int] = set()
        self._dirty: set[int] = set()
        self._dirty_agents: set[str] = set()
        # Publishers not found in the database either: (enterprise, agent) -> when looked up.
        self._misses: dict[tuple[str, str], float] = {}
        # Seconds a publisher found in neither memory nor database is refused without
        # asking the database again (another instance may add it meanwhile).
        self.publisher_miss_ttl = 10.0
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False
        # Schema and index are ready as soon as the object exists, so a caller that
        # forgets start() still gets a working sink; start() adds the flush thread.
        before = t.migrate(self._engine, self._now_ms())
        if before < t.SCHEMA_VERSION:
            log.info("registry schema migrated", extra={"from": before, "to": t.SCHEMA_VERSION})
        self._load()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Registry:
        """Start the background flush thread (idempotent)."""
        if self._started:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._flush_loop, name="registry-flush", daemon=True)
        self._thread.start()
        self._started = True
        return self

    def close(self) -> None:
        """Flush what is pending and stop the flush thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            idx = self._index
            n = idx.n
            lagging = np.flatnonzero(
                (idx.last_ts[:n] != idx.saved_ts[:n]) | (idx.last_good[:n] != idx.saved_good[:n])
            )
            self._dirty.update(int(i) for i in lagging)
        self.flush()
        self._started = False
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @property
    def engine(self) -> sa.Engine:
        """The database engine, for the modules that keep their own tables beside these."""
        return self._engine

    @property
    def freshness_ms(self) -> int:
        """How recent the last sample must be for 'online': three poll intervals."""
        return int(3 * self.default_poll_interval * 1000)

    def _flush_loop(self) -> None:
        # Bounded by the stop event; each pass has the database timeout of the engine.
        while not self._stop.wait(self.flush_interval):
            self.counters["flush_runs"] += 1
            try:
                self.flush()
            except Exception:
                self.counters["flush_errors"] += 1
                log.exception("registry flush failed; will retry")

    def _load(self) -> None:
        with self._engine.connect() as conn:
            ents = conn.execute(sa.select(t.enterprises)).all()
            agts = conn.execute(sa.select(t.agents)).all()
            # Plain tuples in DeviceMeta's field order, then the runtime columns.
            cols = [t.devices.c[name] for name in _LOAD_COLUMNS]
            devs = [tuple(r) for r in conn.execute(sa.select(*cols)).all()]
        index = DeviceIndex(capacity=max(1024, len(devs) + len(devs) // 4))
        with self._lock:
            self._enterprises = {r.id: _enterprise_of(r) for r in ents}
            self._agents = {r.id: _agent_of(r) for r in agts}
            metas = [DeviceMeta(*r[:15]) for r in devs]
            start = index.add_many(metas)
            sl = slice(start, start + len(devs))
            index.last_good[sl] = [NEVER if r[15] is None else r[15] for r in devs]
            index.last_ts[sl] = [NEVER if r[16] is None else r[16] for r in devs]
            index.offline_since[sl] = [NEVER if r[17] is None else r[17] for r in devs]
            index.saved_good[sl] = index.last_good[sl]
            index.saved_ts[sl] = index.last_ts[sl]
            index.dev_online[sl] = [bool(r[18]) for r in devs]
            alive = {a.id for a in self._agents.values() if a.online}
            index.agent_alive[sl] = [r[8] in alive for r in devs]
            for m in metas:
                m.not_in_ledger = bool(m.not_in_ledger)
            self._index = index
        _freeze_long_lived()
        log.info(
            "registry loaded",
            extra={"enterprises": len(ents), "agents": len(agts), "devices": len(devs)},
        )

    # ------------------------------------------------------------------ flushing

    def flush(self) -> int:
        """Write pending ingest changes to the database; returns the rows written."""
        with self._db_lock:
            return self._flush_locked()

    def _device_row(self, i: int) -> dict[str, Any]:
        """The row to write for position ``i`` (call under the lock, when writing it)."""
        idx = self._index
        m = idx.meta[i]
        idx.saved_good[i] = idx.last_good[i]
        idx.saved_ts[i] = idx.last_ts[i]
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
            "last_seen_ms": _opt(idx.last_ts[i]),
            "last_good_ms": _opt(idx.last_good[i]),
            "online": bool(idx.dev_online[i] and idx.agent_alive[i]),
            "offline_since_ms": _opt(idx.offline_since[i]),
            "reason": m.reason[:200],
        }

    def _flush_locked(self) -> int:
        with self._lock:
            inserts = [self._device_row(i) for i in sorted(self._pending_inserts)]
            updates = [self._device_row(i) for i in sorted(self._dirty - self._pending_inserts)]
            agent_rows = [
                {
                    "b_id": a.id,
                    "v_last_birth_ms": a.last_birth_ms,
                    "v_bdseq": a.bdseq,
                    "v_online": a.online,
                }
                for a in (self._agents.get(x) for x in self._dirty_agents)
                if a is not None
            ]
            pending, dirty, dirty_agents = (
                self._pending_inserts,
                self._dirty,
                self._dirty_agents,
            )
            self._pending_inserts, self._dirty, self._dirty_agents = set(), set(), set()
        if not (inserts or updates or agent_rows):
            return 0
        try:
            with self._engine.begin() as conn:
                _insert_many(conn, t.devices, inserts)
                _update_devices(conn, updates)
                if agent_rows:
                    conn.execute(
                        t.agents.update()
                        .where(t.agents.c.id == sa.bindparam("b_id"))
                        .values(
                            last_birth_ms=sa.bindparam("v_last_birth_ms"),
                            bdseq=sa.bindparam("v_bdseq"),
                            online=sa.bindparam("v_online"),
                        ),
                        agent_rows,
                    )
        except sa.exc.SQLAlchemyError:
            # Keep the changes in memory and try again on the next pass: nothing is lost.
            with self._lock:
                self._pending_inserts |= pending
                self._dirty |= dirty
                self._dirty_agents |= dirty_agents
            self.counters["flush_errors"] += 1
            log.exception("registry flush failed", extra={"rows": len(inserts) + len(updates)})
            return 0
        self.counters["flushed_rows"] += len(inserts) + len(updates) + len(agent_rows)
        return len(inserts) + len(updates) + len(agent_rows)

    # ------------------------------------------------------------------ ingest sink

    def check_publisher(self, enterprise: str, agent: str) -> str | None:
        reject = self._publisher_reject(enterprise, agent)
        if reject in ("unknown_enterprise", "unknown_agent") and self._load_publisher(
            enterprise, agent
        ):
            reject = self._publisher_reject(enterprise, agent)
        return reject

    def _publisher_reject(self, enterprise: str, agent: str) -> str | None:
        with self._lock:
            if enterprise not in self._enterprises:
                return "unknown_enterprise"
            a = self._agents.get(agent)
            if a is None:
                return "unknown_agent"
            if a.enterprise != enterprise:
                return "agent_enterprise_mismatch"
            return None

    def _load_publisher(self, enterprise: str, agent: str) -> bool:
        """Load an enterprise and agent that another gateway instance sharing the database
        added; False when they are not there (remembered for ``publisher_miss_ttl``)."""
        key = (enterprise, agent)
        now = time.monotonic()
        with self._lock:
            seen = self._misses.get(key)
            if seen is not None and now - seen < self.publisher_miss_ttl:
                self.counters["publisher_misses_cached"] += 1
                return False
        self.counters["publisher_lookups"] += 1
        try:
            with self._engine.connect() as conn:
                ent = conn.execute(
                    sa.select(t.enterprises).where(t.enterprises.c.id == enterprise)
                ).first()
                agt = conn.execute(sa.select(t.agents).where(t.agents.c.id == agent)).first()
        except sa.exc.SQLAlchemyError:
            self.counters["publisher_lookup_errors"] += 1
            log.exception("publisher lookup failed", extra={"enterprise": enterprise})
            ent = agt = None
        with self._lock:
            if ent is not None and ent.id not in self._enterprises:
                self._enterprises[ent.id] = _enterprise_of(ent)
            if agt is not None and agt.id not in self._agents:
                self._agents[agt.id] = _agent_of(agt)
            if ent is not None and agt is not None:
                self._misses.pop(key, None)
                return True
            if len(self._misses) >= _MISS_CACHE_SIZE:
                self._misses = {
                    k: v for k, v in self._misses.items() if now - v < self.publisher_miss_ttl
                }
                if len(self._misses) >= _MISS_CACHE_SIZE:
                    self._misses.clear()
            self._misses[key] = now
        return False

    def device_tags(self, enterprise: str, device: str) -> tuple[str, str] | None:
        with self._lock:
            i = self._index.keys.get((enterprise, device))
            if i is None:
                return None
            m = self._index.meta[i]
            return m.family, m.profile or UNKNOWN

    def on_birth(self, enterprise: str, agent: str, birth: Birth) -> None:
        self.counters["births"] += 1
        reject = self.check_publisher(enterprise, agent)
        if reject is not None:
            self.counters[f"rejected_{reject}"] += 1
            return
        now = self._now_ms()
        with self._lock:
            a = self._agents[agent]
            a.online = True
            a.bdseq = birth.bdseq
            a.last_birth_ms = birth.ts or now
            self._dirty_agents.add(agent)
            ent = self._enterprises[enterprise]
            idx = self._index
            for dev in birth.devices:
                i = idx.keys.get((enterprise, dev.id))
                if i is None:
                    family = dev.family if dev.family in FAMILY_LABELS else "other"
                    category = (
                        dev.category
                        if dev.category in CATEGORY_LABELS
                        else FAMILY_CATEGORY.get(family, UNKNOWN)
                    )
                    meta = DeviceMeta(
                        enterprise,
                        dev.id,
                        "",
                        ent.region,
                        ent.industry,
                        family,
                        category,
                        dev.profile,
                        agent,
                        "provisioned",
                        "agent",
                        True,
                        now,
                    )
                    i = idx.add(meta)
                    self._pending_inserts.add(i)
                    self.counters["devices_not_in_ledger"] += 1
                else:
                    meta = idx.meta[i]
                    meta.profile = dev.profile
                    if meta.family == "other" and dev.family in FAMILY_LABELS:
                        meta.family = dev.family
                        if meta.category == UNKNOWN:
                            meta.category = FAMILY_CATEGORY.get(dev.family, UNKNOWN)
                        idx.set_static(i, meta)
                    if meta.status == "registered":
                        meta.status = "provisioned"
                    idx.set_agent(i, agent, True)
                self._dirty.add(i)
            for i in idx.by_agent.get(agent, ()):
                idx.agent_alive[i] = True
                self._dirty.add(i)

    def on_will(self, enterprise: str, agent: str, will: Will) -> None:
        self.counters["wills"] += 1
        now = self._now_ms()
        with self._lock:
            a = self._agents.get(agent)
            if a is None or a.enterprise != enterprise:
                self.counters["rejected_will"] += 1
                return
            if a.bdseq is not None and will.bdseq != a.bdseq:
                # The will of an older session arriving after the agent's new birth.
                self.counters["stale_wills"] += 1
                return
            a.online = False
            self._dirty_agents.add(agent)
            idx = self._index
            for i in idx.by_agent.get(agent, ()):
                if idx.dev_online[i] and idx.agent_alive[i]:
                    idx.offline_since[i] = now
                    idx.meta[i].reason = "agent offline"
                idx.agent_alive[i] = False
                idx.dev_online[i] = False
                self._dirty.add(i)

    def on_device_state(self, enterprise: str, agent: str, device: str, state: DeviceState) -> None:
        self.counters["device_states"] += 1
        with self._lock:
            idx = self._index
            i = idx.keys.get((enterprise, device))
            if i is None:
                self.counters["unknown_device"] += 1
                return
            a = self._agents.get(agent)
            idx.set_agent(i, agent, a is not None and a.online)
            was = bool(idx.dev_online[i])
            if was and not state.online:
                idx.offline_since[i] = state.ts or self._now_ms()
            idx.dev_online[i] = state.online
            idx.meta[i].reason = state.reason[:200]
            self._dirty.add(i)

    def on_samples(self, summary: SampleSummary) -> None:
        self.counters["sample_messages"] += 1
        key = (summary.enterprise, summary.device)
        with self._lock:
            idx = self._index
            i = idx.keys.get(key)
            if i is None:
                self.counters["unknown_device"] += 1
                return
            self.counters["samples"] += summary.count
            # Timestamps move with every poll; writing each one would be 10⁵ UPDATEs a
            # second at province scale. The database copy may lag by the granularity;
            # status changes and the first sample are written at once, close() writes all.
            changed = False
            if summary.last_ts > idx.last_ts[i]:
                idx.last_ts[i] = summary.last_ts
                changed = summary.last_ts - idx.saved_ts[i] >= self.persist_granularity_ms
            meta = idx.meta[i]
            if summary.last_good_ts is not None and summary.last_good_ts > idx.last_good[i]:
                idx.last_good[i] = summary.last_good_ts
                if meta.status in ("registered", "provisioned"):
                    meta.status = "connected"
                    changed = True
                elif summary.last_good_ts - idx.saved_good[i] >= self.persist_granularity_ms:
                    changed = True
            if meta.first_seen_ms is None or summary.first_ts < meta.first_seen_ms:
                meta.first_seen_ms = summary.first_ts
                changed = True
            if summary.latest:
                old = self._latest.get(key)
                if old is None or summary.last_ts >= old[0]:
                    values = dict(old[1]) if old else {}
                    values.update(summary.latest)
                    self._latest[key] = (summary.last_ts, values)
            if changed:
                self._dirty.add(i)

    # ------------------------------------------------------------------ enterprises, agents

    def add_enterprise(
        self, enterprise_id: str, name: str, region: str, industry: str
    ) -> tuple[Enterprise, bool]:
        """Create or update an enterprise; returns it and whether it was created."""
        check_ident(enterprise_id, "enterprise")
        region = check_region(region)
        industry = check_industry(industry)
        name = check_text(name.strip(), "name")[:200] or enterprise_id
        with self._db_lock:
            self._flush_locked()
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
        with self._db_lock:
            self._flush_locked()
            with self._lock:
                taken = [e.id for e in ents if e.id in self._enterprises]
            if taken:
                raise Conflict(f"enterprise {taken[0]!r} is already registered")
            with self._engine.begin() as conn:
                for chunk in _chunks([_ent_row(e) for e in ents], 20_000):
                    conn.execute(t.enterprises.insert(), chunk)
                for chunk in _chunks([_agent_row(a) for a in agents], 20_000):
                    conn.execute(t.agents.insert(), chunk)
            with self._lock:
                self._enterprises.update((e.id, e) for e in ents)
                self._agents.update((a.id, a) for a in agents)
                self._misses.clear()
        return len(ents)

    def get_enterprise(self, enterprise_id: str) -> Enterprise | None:
        with self._lock:
            return self._enterprises.get(enterprise_id)

    def list_enterprises(self) -> list[Enterprise]:
        with self._lock:
            return sorted(self._enterprises.values(), key=lambda e: e.id)

    def list_agents(self, enterprise: str | None = None) -> list[Agent]:
        with self._lock:
            return sorted(
                (a for a in self._agents.values() if enterprise in (None, a.enterprise)),
                key=lambda a: a.id,
            )

    def agent_credentials(self) -> list[tuple[str, str, str]]:
        """(agent id, enterprise, password hash) of every agent that has a password.

        Read from the database, not memory, so that gateway instances sharing it write
        the same broker files and one instance's rewrite keeps the others' agents.
        """
        c = t.agents.c
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(c.id, c.enterprise, c.password_hash)
                .where(c.password_hash.is_not(None), c.password_hash != "")
                .order_by(c.id)
            ).all()
        return [(r.id, r.enterprise, r.password_hash) for r in rows]

    def add_agent(self, enterprise: str, agent_id: str, password_hash: str | None) -> Agent:
        """Register an agent (or rotate its password); the id is unique across enterprises."""
        check_ident(agent_id, "agent")
        with self._db_lock:
            self._flush_locked()
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
            ent = _enterprise_of(row)
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
                agent = self._agents.get(agent_id) or _agent_of(found)
            agent.password_hash = password_hash
        with self._lock:
            self._enterprises.setdefault(enterprise, ent)
            self._agents[agent_id] = agent
            self._misses.clear()
        return agent, found is not None

    def create_provisioning_key(
        self, enterprise: str, *, expires_ms: int | None = None, max_uses: int | None = None
    ) -> tuple[str, str]:
        """A new key for an enterprise: returns (key id, key). Only the hash is stored."""
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
                )
            )
        return key_id, key

    def redeem_provisioning_key(self, key: str, agent_id: str, password_hash: str) -> Agent:
        """Check a key and register the agent under its enterprise, atomically."""
        check_ident(agent_id, "agent_id")
        now = self._now_ms()
        with self._db_lock:
            self._flush_locked()
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
                agent, existed = self._put_agent(conn, row.enterprise, agent_id, password_hash)
        self.counters["agents_provisioned"] += 1
        if existed:
            self.counters["agents_reprovisioned"] += 1
            log.warning(
                "agent re-provisioned: its previous password no longer works",
                extra={"agent": agent.id, "enterprise": agent.enterprise},
            )
        return agent

    # ------------------------------------------------------------------ devices

    def import_devices(
        self, rows: Sequence[tuple[int, DeviceInput]], *, source: str = "ledger"
    ) -> ImportResult:
        """Idempotent upsert of validated rows; rows naming unknown enterprises are errors."""
        errors: list[RowError] = []
        good: dict[tuple[str, str], tuple[int, DeviceInput]] = {}
        with self._lock:
            for line, row in rows:
                if row.enterprise not in self._enterprises:
                    errors.append(
                        RowError(line, row.device_id, f"unknown enterprise {row.enterprise!r}")
                    )
                    continue
                # A repeated device in one import: the last row wins.
                good[(row.enterprise, row.device_id)] = (line, row)
        created = updated = 0
        now = self._now_ms()
        with self._db_lock:
            self._flush_locked()
            new_metas: list[DeviceMeta] = []
            changed: list[tuple[int, DeviceMeta]] = []
            with self._lock:
                idx = self._index
                for (ent_id, dev_id), (_line, row) in good.items():
                    ent = self._enterprises[ent_id]
                    i = idx.keys.get((ent_id, dev_id))
                    meta = DeviceMeta(
                        ent_id,
                        dev_id,
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
                    )
                    if i is None:
                        new_metas.append(meta)
                    else:
                        changed.append((i, _ledger_update(idx.meta[i], meta)))
                insert_rows = [_meta_row(m) for m in new_metas]
                update_rows = [_meta_row(m) for _i, m in changed]
            with self._engine.begin() as conn:
                _insert_many(conn, t.devices, insert_rows)
                for chunk in _chunks(update_rows, _FLUSH_BATCH):
                    conn.execute(
                        t.devices.update()
                        .where(
                            t.devices.c.enterprise == sa.bindparam("b_enterprise"),
                            t.devices.c.id == sa.bindparam("b_id"),
                        )
                        .values({k: sa.bindparam("v_" + k) for k in _META_UPDATE}),
                        [
                            {
                                "b_enterprise": r["enterprise"],
                                "b_id": r["id"],
                                **{"v_" + k: r[k] for k in _META_UPDATE},
                            }
                            for r in chunk
                        ],
                    )
            with self._lock:
                raced = self._add_inserted_locked(new_metas)
                for i, meta in changed:
                    self._set_meta_locked(i, meta)
            created, updated = len(new_metas) - raced, len(changed) + raced
        self.counters["ledger_rows_accepted"] += created + updated
        self.counters["ledger_rows_rejected"] += len(errors)
        return ImportResult(created + updated, created, updated, errors)

    def register_device(self, row: DeviceInput) -> tuple[dict[str, Any], bool]:
        result = self.import_devices([(1, row)], source="manual")
        if result.errors:
            raise NotFound(result.errors[0].reason)
        view = self.get_device(row.enterprise, row.device_id)
        assert view is not None
        return view, result.created == 1

    def decommission(self, enterprise: str, device: str) -> dict[str, Any]:
        with self._db_lock:
            self._flush_locked()
            with self._lock:
                i = self._index.keys.get((enterprise, device))
                if i is None:
                    raise NotFound(f"device {enterprise}/{device} is not registered")
            with self._engine.begin() as conn:
                conn.execute(
                    t.devices.update()
                    .where(t.devices.c.enterprise == enterprise, t.devices.c.id == device)
                    .values(status="decommissioned")
                )
            with self._lock:
                self._index.meta[i].status = "decommissioned"
                self._index.active[i] = False
        self.counters["devices_decommissioned"] += 1
        view = self.get_device(enterprise, device)
        assert view is not None
        return view

    def bulk_load(self, rows: Sequence[DeviceInput], *, source: str = "ledger") -> int:
        """Insert many new devices fast (bulk import, benchmarks); existing ids are errors."""
        now = self._now_ms()
        with self._lock:
            metas = []
            for r in rows:
                ent = self._enterprises.get(r.enterprise)
                if ent is None:
                    raise NotFound(f"enterprise {r.enterprise!r} is not registered")
                if (r.enterprise, r.device_id) in self._index.keys:
                    raise Conflict(f"device {r.enterprise}/{r.device_id} is already registered")
                metas.append(
                    DeviceMeta(
                        r.enterprise,
                        r.device_id,
                        r.name,
                        r.region or ent.region,
                        r.industry or ent.industry,
                        r.family,
                        r.category,
                        r.profile,
                        r.agent,
                        "registered",
                        source,
                        False,
                        now,
                    )
                )
        with self._db_lock:
            self._flush_locked()
            with self._engine.begin() as conn:
                _insert_many(conn, t.devices, [_meta_row(m) for m in metas])
            with self._lock:
                self._add_inserted_locked(metas)
        _freeze_long_lived()
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

    @contextmanager
    def reading(self) -> Iterator[DeviceIndex]:
        """The index, held under the registry lock for the duration of a computation."""
        with self._lock:
            yield self._index

    def _online_mask(self, idx: DeviceIndex, as_of_ms: int) -> np.ndarray[Any, Any]:
        n = idx.n
        # NEVER (-1) is below any threshold >= -1: a device that never sent is not fresh.
        fresh = idx.last_ts[:n] >= max(as_of_ms - self.freshness_ms, NEVER + 1)
        mask: np.ndarray[Any, Any] = idx.agent_alive[:n] & idx.dev_online[:n] & fresh
        return mask

    def online_mask(self, idx: DeviceIndex, as_of_ms: int) -> np.ndarray[Any, Any]:
        """Devices online at ``as_of_ms``: agent alive, state online, sample fresh."""
        return self._online_mask(idx, as_of_ms)

    def _view(self, i: int, now_ms: int) -> dict[str, Any]:
        idx = self._index
        m = idx.meta[i]
        last_ts = _opt(idx.last_ts[i])
        online = bool(
            idx.agent_alive[i]
            and idx.dev_online[i]
            and last_ts is not None
            and last_ts >= now_ms - self.freshness_ms
        )
        ent = self._enterprises.get(m.enterprise)
        return {
            "enterprise": m.enterprise,
            "enterprise_name": ent.name if ent else m.enterprise,
            "id": m.id,
            "name": m.name,
            "region": m.region,
            "region_label": region_label(m.region),
            "industry": m.industry,
            "family": m.family,
            "category": m.category,
            "profile": m.profile,
            "agent": m.agent,
            "status": m.status,
            "source": m.source,
            "not_in_ledger": m.not_in_ledger,
            "created_ms": m.created_ms,
            "first_seen_ms": m.first_seen_ms,
            "last_seen_ms": last_ts,
            "last_good_ms": _opt(idx.last_good[i]),
            "online": online,
            "offline_since_ms": _opt(idx.offline_since[i]),
            "state_reason": m.reason,
        }

    def get_device(self, enterprise: str, device: str) -> dict[str, Any] | None:
        now = self._now_ms()
        with self._lock:
            i = self._index.keys.get((enterprise, device))
            if i is None:
                return None
            view = self._view(i, now)
            latest = self._latest.get((enterprise, device))
        view["latest_ts"] = latest[0] if latest else None
        view["latest"] = dict(latest[1]) if latest else {}
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
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        """Devices matching every given filter, in registration order, one page."""
        now = self._now_ms()
        with self._lock:
            idx = self._index
            mask = self.filter_mask(
                idx, enterprise=enterprise, region=region, industry=industry, category=category
            )
            if family is not None:
                mask &= _code_mask(idx, "family", family)
            n = idx.n
            if status is not None:
                wanted = status
                mask &= np.fromiter((m.status == wanted for m in idx.meta), np.bool_, n)
            if not_in_ledger is not None:
                flag = not_in_ledger
                mask &= np.fromiter((m.not_in_ledger == flag for m in idx.meta), np.bool_, n)
            if online is not None:
                on = self._online_mask(idx, now)
                mask &= on if online else ~on
            hits = np.flatnonzero(mask)
            page = hits[offset : offset + limit]
            return int(hits.size), [self._view(int(i), now) for i in page]

    def filter_mask(
        self,
        idx: DeviceIndex,
        *,
        enterprise: str | None = None,
        region: str | None = None,
        industry: str | None = None,
        category: str | None = None,
    ) -> np.ndarray[Any, Any]:
        """Scope filters as a boolean mask (call under ``reading``); ValueError if malformed."""
        n = idx.n
        mask = np.ones(n, np.bool_)
        if enterprise is not None:
            mask &= _code_mask(idx, "enterprise", enterprise)
        if region is not None:
            lo, hi = region_prefix_range(region)
            col = idx.region_num[:n]
            mask &= (col >= lo) & (col < hi)
        if industry is not None:
            prefix = industry.strip().upper()
            codes = [c for v, c in idx.enc["industry"].codes.items() if v.startswith(prefix)]
            mask &= np.isin(idx.industry[:n], np.array(codes, np.int32))
        if category is not None:
            mask &= _code_mask(idx, "category", category)
        return mask

    def recent_offline(
        self, *, limit: int = 20, enterprise: str | None = None
    ) -> list[dict[str, Any]]:
        """Devices offline now that were online before, most recent drop first."""
        now = self._now_ms()
        with self._lock:
            idx = self._index
            n = idx.n
            mask = (idx.offline_since[:n] != NEVER) & ~self._online_mask(idx, now) & idx.active[:n]
            if enterprise is not None:
                mask &= _code_mask(idx, "enterprise", enterprise)
            hits = np.flatnonzero(mask)
            order = hits[np.argsort(-idx.offline_since[hits], kind="stable")][:limit]
            return [self._view(int(i), now) for i in order]

    # ------------------------------------------------------------------ snapshots

    def save_snapshot(self, ts_ms: int, window_s: int, rows: Sequence[dict[str, Any]]) -> None:
        """Store one ratio snapshot: rows of group_by, key, label, total, connected, online."""
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
            }
            for r in rows
        ]
        with self._db_lock, self._engine.begin() as conn:
            conn.execute(t.ratio_snapshots.delete().where(t.ratio_snapshots.c.ts_ms == ts_ms))
            for chunk in _chunks(data, _FLUSH_BATCH):
                conn.execute(t.ratio_snapshots.insert(), chunk)

    def prune_snapshots(self, before_ms: int) -> int:
        """Delete snapshots older than ``before_ms``; returns the rows deleted."""
        with self._db_lock, self._engine.begin() as conn:
            done = conn.execute(
                t.ratio_snapshots.delete().where(t.ratio_snapshots.c.ts_ms < before_ms)
            )
        return int(done.rowcount or 0)

    def snapshot_rows(
        self, group_by: str, from_ms: int, to_ms: int, *, limit: int = 100_000
    ) -> list[sa.Row[Any]]:
        """Stored snapshots of one grouping in [from, to], oldest first."""
        c = t.ratio_snapshots.c
        stmt = (
            sa.select(t.ratio_snapshots)
            .where(c.group_by == group_by, c.ts_ms >= from_ms, c.ts_ms <= to_ms)
            .order_by(c.ts_ms, c.key)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).all())

    def stats(self) -> dict[str, int]:
        """Gauges for /metrics."""
        with self._lock:
            n = self._index.n
            return {
                "devices": n,
                "devices_active": int(self._index.active[:n].sum()),
                "enterprises": len(self._enterprises),
                "agents": len(self._agents),
                "agents_online": sum(1 for a in self._agents.values() if a.online),
                "pending_rows": len(self._dirty) + len(self._pending_inserts),
            }


_LOAD_COLUMNS = (
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
    "last_good_ms",
    "last_seen_ms",
    "offline_since_ms",
    "online",
)

_META_UPDATE = (
    "name",
    "region",
    "industry",
    "family",
    "category",
    "profile",
    "agent",
    "source",
    "not_in_ledger",
)


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
    )


def _enterprise_of(r: Any) -> Enterprise:
    return Enterprise(r.id, r.name, r.region, r.industry, r.created_ms)


def _agent_of(r: Any) -> Agent:
    return Agent(
        r.id,
        r.enterprise,
        r.password_hash,
        r.created_ms,
        r.last_birth_ms,
        r.bdseq,
        bool(r.online),
    )


def _ent_row(e: Enterprise) -> dict[str, Any]:
    return {
        "id": e.id,
        "name": e.name,
        "region": e.region,
        "industry": e.industry,
        "created_ms": e.created_ms,
    }


def _agent_row(a: Agent) -> dict[str, Any]:
    return {
        "id": a.id,
        "enterprise": a.enterprise,
        "password_hash": a.password_hash,
        "created_ms": a.created_ms,
        "online": a.online,
    }


def _meta_row(m: DeviceMeta) -> dict[str, Any]:
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
        "reason": m.reason,
    }


_STATE_COLUMNS = (
    "agent",
    "profile",
    "status",
    "family",
    "category",
    "first_seen_ms",
    "last_seen_ms",
    "last_good_ms",
    "online",
    "offline_since_ms",
    "reason",
)


def _insert_many(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """executemany INSERT; on SQLite straight through the driver (SQLAlchemy's per-row
    parameter processing costs more than the insert itself at 10⁶ rows)."""
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        for chunk in _chunks(rows, _FLUSH_BATCH):
            conn.execute(table.insert(), chunk)
        return
    cols = list(rows[0])
    sql = f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    get = operator.itemgetter(*cols)
    conn.exec_driver_sql(sql, [get(r) for r in rows])


def _update_devices(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        sets = ", ".join(f"{k} = ?" for k in _STATE_COLUMNS)
        conn.exec_driver_sql(
            f"UPDATE devices SET {sets} WHERE enterprise = ? AND id = ?",
            list(map(operator.itemgetter(*_STATE_COLUMNS, "enterprise", "id"), rows)),
        )
        return
    stmt = (
        t.devices.update()
        .where(
            t.devices.c.enterprise == sa.bindparam("b_enterprise"),
            t.devices.c.id == sa.bindparam("b_id"),
        )
        .values({k: sa.bindparam("v_" + k) for k in _STATE_COLUMNS})
    )
    data = [
        {
            "b_enterprise": r["enterprise"],
            "b_id": r["id"],
            **{"v_" + k: r[k] for k in _STATE_COLUMNS},
        }
        for r in rows
    ]
    for chunk in _chunks(data, _FLUSH_BATCH):
        conn.execute(stmt, chunk)


def _code_mask(idx: DeviceIndex, group: str, value: str) -> np.ndarray[Any, Any]:
    col, enc = idx.column(group)
    code = enc.codes.get(value)
    if code is None:
        return np.zeros(idx.n, np.bool_)
    mask: np.ndarray[Any, Any] = col == code
    return mask


def _freeze_long_lived() -> None:
    """Move the (possibly millions of) device objects out of the cyclic GC's sight.

    Otherwise every full collection rescans them all, which shows as 100+ ms pauses in
    API latency at 10⁶ devices.
    """
    gc.collect()
    gc.freeze()


def _opt(value: Any) -> int | None:
    v = int(value)
    return None if v == NEVER else v


def _chunks(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for k in range(0, len(rows), size):
        yield rows[k : k + size]
