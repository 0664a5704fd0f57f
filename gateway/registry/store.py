"""The registry's shared state: the database engine, the in-memory index, the flush thread.

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

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self

import numpy as np
import sqlalchemy as sa

from gateway.registry import rows as _rows
from gateway.registry import tables as t
from gateway.registry.index import NEVER, DeviceIndex, DeviceMeta
from gateway.registry.model import Agent, Enterprise

__all__ = ["PointValue", "RegistryStore"]

log = logging.getLogger("iiot.gateway.registry")

PointValue = bool | int | float | str | None


class RegistryStore:
    """The registry's shared state, lifecycle and flush thread; the concerns build on it."""

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
        self._engine = _rows.make_engine(url)
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

    def start(self) -> Self:
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

    def __enter__(self) -> Self:
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
            cols = [t.devices.c[name] for name in _rows.LOAD_COLUMNS]
            devs = [tuple(r) for r in conn.execute(sa.select(*cols)).all()]
        index = DeviceIndex(capacity=max(1024, len(devs) + len(devs) // 4))
        with self._lock:
            self._enterprises = {r.id: _rows.enterprise_of(r) for r in ents}
            self._agents = {r.id: _rows.agent_of(r) for r in agts}
            metas = [DeviceMeta(*r[:17]) for r in devs]
            start = index.add_many(metas)
            sl = slice(start, start + len(devs))
            index.last_good[sl] = [NEVER if r[17] is None else r[17] for r in devs]
            index.last_ts[sl] = [NEVER if r[18] is None else r[18] for r in devs]
            index.offline_since[sl] = [NEVER if r[19] is None else r[19] for r in devs]
            index.saved_good[sl] = index.last_good[sl]
            index.saved_ts[sl] = index.last_ts[sl]
            index.dev_online[sl] = [bool(r[20]) for r in devs]
            alive = {a.id for a in self._agents.values() if a.online}
            index.agent_alive[sl] = [r[8] in alive for r in devs]
            for m in metas:
                m.not_in_ledger = bool(m.not_in_ledger)
            self._index = index
        _rows.freeze_long_lived()
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
            "last_seen_ms": _rows.opt(idx.last_ts[i]),
            "last_good_ms": _rows.opt(idx.last_good[i]),
            "online": bool(idx.dev_online[i] and idx.agent_alive[i]),
            "offline_since_ms": _rows.opt(idx.offline_since[i]),
            "reason": m.reason[:200],
            "kind": m.kind,
            "site_region": m.site_region,
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
                    "v_codec": a.codec,
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
                _rows.insert_many(conn, t.devices, inserts)
                _rows.update_devices(conn, updates)
                if agent_rows:
                    conn.execute(
                        t.agents.update()
                        .where(t.agents.c.id == sa.bindparam("b_id"))
                        .values(
                            last_birth_ms=sa.bindparam("v_last_birth_ms"),
                            bdseq=sa.bindparam("v_bdseq"),
                            online=sa.bindparam("v_online"),
                            codec=sa.bindparam("v_codec"),
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

    # ------------------------------------------------------------------ reads

    @contextmanager
    def reading(self) -> Iterator[DeviceIndex]:
        """The index, held under the registry lock for the duration of a computation."""
        with self._lock:
            yield self._index

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
