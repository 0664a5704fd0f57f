"""The registry's shared state: the database engine, the in-memory index, the flush thread.

The database (SQLAlchemy 2; SQLite by default, PostgreSQL by URL) is the source of
truth. The hot state lives in memory (``DeviceIndex``) so the MQTT thread only takes a
lock and sets a few array cells; a background thread writes the changed rows in
batches (``flush``). Sample timestamps are written when they have moved by
``persist_granularity`` (default 60 s) or the status changes, so the database copy of
``last_seen``/``last_good`` may lag by that much while running; ``close()`` writes them
exactly. Writes that come through the API go to the database at once, after pending
ingest changes, so the two never overtake each other.

Several gateway instances may share one database. Each stamps the rows it writes with
the database's clock (``updated_ms``), and with ``refresh_interval`` set a thread reads
the rows changed since its last look (``refresh``) into this instance's index, so every
instance's ratios follow every instance's ingest: at most ``persist_granularity +
flush_interval + refresh_interval`` behind. A pass reads registry rows only: the quality
gate's shared counts are read and folded on a thread of their own (shared_quality.py),
so however many there are, they do not delay it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self

import numpy as np
import sqlalchemy as sa

from gateway.registry import changes as _changes
from gateway.registry import rows as _rows
from gateway.registry import tables as t
from gateway.registry.history import StateHistory
from gateway.registry.index import NEVER, DeviceIndex, DeviceMeta, IndexView
from gateway.registry.model import Agent, Enterprise
from gateway.registry.views import AnswerCache, ViewBoard

__all__ = ["PointValue", "RegistryStore"]

log = logging.getLogger("iiot.gateway.registry")

PointValue = bool | int | float | str | None
# Devices newly reporting between two freezes of the GC's long-lived objects.
_FREEZE_EVERY = 2_000


class RegistryStore:
    """The registry's shared state, lifecycle and flush thread; the concerns build on it."""

    def __init__(
        self,
        url: str,
        *,
        default_poll_interval: float = 10.0,
        flush_interval: float = 1.0,
        persist_granularity: float = 60.0,
        refresh_interval: float | None = None,
        view_max_age: float = 2.0,
        quality_share_interval: float = 60.0,
        share_quality: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.refresh_interval = refresh_interval
        # Rows stamped by the clock (see changes.py) are read from this far before the
        # previous pass read: a transaction may commit after a pass that its stamps
        # precede. A flush that takes longer is counted (``slow_flushes``): others may
        # miss its rows.
        self.refresh_overlap_ms = 5000
        self._slow = False
        self._watermark = 0  # the database's clock when the last pass read
        # On PostgreSQL: the transactions whose device rows the next refresh reads.
        self._mark: _changes.Mark | None = None
        self._refresh_lock = threading.Lock()
        # Local changes are numbered (``_seq``); a flush notes up to which number every
        # change is in the database once it commits (``_committed_seq``). A refresh
        # applies a row's state only where this instance's last change of it is no newer
        # than that number was before the read. API writes are counted apart.
        self._seq = 0
        self._committed_seq = 0
        self._api_writes = 0
        self._agent_seq: dict[str, int] = {}
        self.persist_granularity_ms = int(persist_granularity * 1000)
        self.default_poll_interval = default_poll_interval
        self.flush_interval = flush_interval
        # Seconds between writes of the quality gate's counts for other instances.
        self.quality_share_interval = quality_share_interval
        # Off where every instance receives every message (no shared subscription): each
        # would add the same samples again.
        self.share_quality_counts = share_quality
        self._clock = clock
        self._engine = _rows.make_engine(url)
        self._lock = threading.RLock()  # in-memory state
        self._db_lock = threading.Lock()  # database writes, in order
        self._index = DeviceIndex()
        self._enterprises: dict[str, Enterprise] = {}
        self._agents: dict[str, Agent] = {}
        self._latest: dict[tuple[str, str], tuple[int, dict[str, PointValue]]] = {}
        self._history = StateHistory()  # online/offline changes, for the device page
        # Sequence gaps per device since this process started: (gaps, missed, last gap ts).
        self._gaps: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._frozen_at = 0  # len(_latest) when last frozen (see _freeze_grown)
        self._pending_inserts: set[int] = set()
        self._dirty: set[int] = set()
        # What changed, by the columns it writes (see rows.META_COLUMNS): ``_dirty`` the
        # metadata, ``_dirty_report`` the device's reported state, ``_dirty_times`` only
        # the sample timestamps.
        self._dirty_report: set[int] = set()
        self._dirty_times: set[int] = set()
        self._dirty_agents: set[str] = set()
        # Publishers not found in the database either: (enterprise, agent) -> when looked up.
        self._misses: dict[tuple[str, str], float] = {}
        # Seconds a publisher found in neither memory nor database is refused without
        # asking the database again (another instance may add it meanwhile).
        self.publisher_miss_ttl = 10.0
        self.counters: Counter[str] = Counter()
        # A query at the current time may count over a view this old (seconds): ingest
        # shows that much later in live ratios; API writes and refresh passes at once.
        self._views = ViewBoard(view_max_age, self.counters)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresher: threading.Thread | None = None
        self._publisher: threading.Thread | None = None
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
        if self.refresh_interval is not None:
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="registry-refresh", daemon=True
            )
            self._refresher.start()
        self._publisher = threading.Thread(
            target=self._publish_loop, name="registry-views", daemon=True
        )
        self._publisher.start()
        self._on_start()
        self._started = True
        return self

    def close(self) -> None:
        """Flush what is pending and stop the flush thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for thread in (self._thread, self._refresher, self._publisher):
            if thread is not None:
                thread.join(timeout=10)
        self._thread = self._refresher = self._publisher = None
        with self._lock:
            idx = self._index
            n = idx.n
            lagging = np.flatnonzero(
                (idx.last_ts[:n] != idx.saved_ts[:n]) | (idx.last_good[:n] != idx.saved_good[:n])
            )
            self._dirty_times.update(int(i) for i in lagging)
        self.flush()
        try:
            self._after_flush(final=True)
        except Exception:
            log.exception("the last write after the flush failed")
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
                self._after_flush(final=False)
            except Exception:
                self.counters["flush_errors"] += 1
                log.exception("registry flush failed; will retry")
            self._freeze_grown()

    def _freeze_grown(self) -> None:
        """Freeze the per-device state that reporting devices added since the last time.

        Each reporting device adds a few long-lived objects (its latest values, its
        quality track); unfrozen, every full collection of the cyclic GC walks them all,
        a stop of every thread that grew past a second at 10⁵ devices. Frozen every
        ``_FREEZE_EVERY`` devices, a collection walks at most that many devices' worth.
        """
        grown = len(self._latest)
        if grown - self._frozen_at >= _FREEZE_EVERY:
            self._frozen_at = grown
            _rows.freeze_long_lived()
            self.counters["gc_freezes"] += 1

    def _refresh_loop(self) -> None:
        # Bounded by the stop event; each pass has the database timeout of the engine.
        assert self.refresh_interval is not None
        failing = False
        while not self._stop.wait(self.refresh_interval):
            try:
                self.refresh()
            except Exception:
                self.counters["refresh_errors"] += 1
                if not failing:  # once per change, not every few seconds
                    log.exception("registry refresh failed; will retry")
                failing = True
            else:
                if failing:
                    log.info("registry refresh works again")
                failing = False

    def _publish_loop(self) -> None:
        # Bounded by the stop event; a pass copies the index and answers a bounded
        # number of queries ahead (views.py). Idle while nobody asks live queries.
        interval = self._views.max_age / 2
        failing = False
        while not self._stop.wait(interval):
            age = self._views.age()
            if not self._views.asked() or (age is not None and age < interval):
                continue  # nobody asking, or a refresh pass has just published
            try:
                self._publish()
            except Exception:
                self.counters["view_errors"] += 1
                if not failing:  # once per change
                    log.exception("publishing an index view failed; will retry")
                failing = True
            else:
                failing = False

    def _load(self) -> None:
        with self._engine.connect() as conn:
            # Read before the rows: a change made while they are read is read again.
            self._watermark = _db_now(conn)
            self._mark = _changes.take_mark(conn)
            ents = conn.execute(sa.select(t.enterprises)).all()
            agts = conn.execute(sa.select(t.agents)).all()
            # Plain tuples in DeviceMeta's field order, then the runtime columns.
            cols = [t.devices.c[name] for name in _rows.LOAD_COLUMNS]
            devs = [tuple(r) for r in conn.execute(sa.select(*cols)).all()]
        index = DeviceIndex(capacity=max(1024, len(devs) + len(devs) // 4))
        with self._lock:
            self._enterprises = {r.id: _rows.enterprise_of(r) for r in ents}
            self._agents = {r.id: _rows.agent_of(r) for r in agts}
            self._add_loaded(index, devs)
            self._index = index
        _rows.freeze_long_lived()
        log.info(
            "registry loaded",
            extra={"enterprises": len(ents), "agents": len(agts), "devices": len(devs)},
        )

    def _add_loaded(self, index: DeviceIndex, devs: list[tuple[Any, ...]]) -> None:
        """Append rows read in ``LOAD_COLUMNS`` order to ``index`` (under the lock)."""
        metas = [DeviceMeta(*r[:17]) for r in devs]
        for m in metas:
            m.not_in_ledger = bool(m.not_in_ledger)
        start = index.add_many(metas)
        sl = slice(start, start + len(devs))
        index.last_good[sl] = [NEVER if r[17] is None else r[17] for r in devs]
        index.last_ts[sl] = [NEVER if r[18] is None else r[18] for r in devs]
        index.offline_since[sl] = [NEVER if r[19] is None else r[19] for r in devs]
        index.saved_good[sl] = index.last_good[sl]
        index.saved_ts[sl] = index.last_ts[sl]
        index.dev_online[sl] = [bool(r[21]) for r in devs]
        alive = {a.id for a in self._agents.values() if a.online}
        index.agent_alive[sl] = [r[8] in alive for r in devs]

    # ------------------------------------------------------------------ refreshing

    def refresh(self) -> int:
        """Read the rows changed since the last refresh (by any instance) into memory.

        Returns the rows read. A device whose state this instance changed after the
        last flush that committed before the read keeps its state; its sample times
        take the later of the two. Queries count either all of a pass or none of it.
        """
        with self._refresh_lock:
            with self._lock:
                committed, api_writes = self._committed_seq, self._api_writes
            since = self._watermark - self.refresh_overlap_ms
            with self._engine.connect() as conn:
                # Both before reading: see changes.py.
                read_at, mark = _db_now(conn), _changes.take_mark(conn)
                ents = conn.execute(
                    sa.select(t.enterprises).where(t.enterprises.c.updated_ms > since)
                ).all()
                agts = conn.execute(sa.select(t.agents).where(t.agents.c.updated_ms > since)).all()
                if self._mark is not None:
                    times, devs = _changes.device_rows_stamped(conn, self._mark)
                else:
                    devs = _changes.device_rows_since(conn, since)
                    times = [(r[0], r[1], r[13], r[17], r[18]) for r in devs]
            prep = self._prepare_devices(devs, times)
            with self._lock:
                # An API write made meanwhile may be newer than what was read, or older:
                # take only new devices and sample times, and read the rest again.
                settled = self._api_writes == api_writes and api_writes % 2 == 0
                if settled:
                    for r in ents:
                        self._enterprises[r.id] = _rows.enterprise_of(r)
                    self._refresh_agents(agts, committed)
                self._apply_devices(prep, committed if settled else -1)
                if settled:
                    self._watermark, self._mark = read_at, mark
                read = len(ents) + len(agts) + len(devs) + len(times)
                # Taken with the pass applied, under the same hold of the lock: a query
                # counts either all of this pass or none of it.
                view = self._views.take(self._index) if read else None
                writes = self._api_writes
            if view is not None:
                self._views.warm(view)
                self._views.publish(view, writes)
        self.counters["refresh_runs"] += 1
        self.counters["refresh_rows"] += read
        return read

    def _refresh_agents(self, rows: Sequence[Any], committed: int) -> None:
        idx = self._index
        for r in rows:
            if self._agent_seq.get(r.id, 0) > committed:
                continue  # this instance's change is newer than what was read
            a = self._agents.get(r.id)
            online = bool(r.online)
            if a is None:
                self._agents[r.id] = _rows.agent_of(r)
                self._misses.clear()
            else:
                a.password_hash, a.bdseq = r.password_hash, r.bdseq
                a.last_birth_ms = r.last_birth_ms
                if a.online == online:
                    continue
                a.online = online
            for i in idx.by_agent.get(r.id, ()):
                idx.agent_alive[i] = online

    def _prepare_devices(
        self, rows: list[tuple[Any, ...]], times: list[tuple[Any, ...]]
    ) -> _DeviceRows:
        """Sort rows read into new devices, state changes and sample times (``TIME_ROW``).

        Runs without the memory lock, so queries are not held up by the bulk of the work;
        ``_apply_devices`` checks again under the lock what may have moved meanwhile.
        """
        idx = self._index
        keys = idx.keys
        prep = _DeviceRows()
        for r in rows:
            i = keys.get((r[0], r[1]))
            if i is None:
                prep.new.append(r)
            elif not _same_state(idx, i, r):  # most rows only carry newer sample times
                prep.changed.append((i, r))
        known = [(keys.get((r[0], r[1]), -1), r) for r in times]
        known = [(i, r) for i, r in known if i >= 0]
        prep.pos = np.fromiter((i for i, _r in known), np.int64, len(known))
        prep.good = np.fromiter(
            (NEVER if r[3] is None else r[3] for _i, r in known), np.int64, len(known)
        )
        prep.ts = np.fromiter(
            (NEVER if r[4] is None else r[4] for _i, r in known), np.int64, len(known)
        )
        meta = idx.meta
        prep.first_seen = [
            (i, r[2])
            for i, r in known
            if r[2] is not None and (meta[i].first_seen_ms is None or r[2] < meta[i].first_seen_ms)
        ]
        return prep

    def _apply_devices(self, prep: _DeviceRows, committed: int) -> None:
        """Apply prepared rows to the index (under the lock): state only where this
        instance's last change of it is numbered ``committed`` or lower."""
        idx = self._index
        new = [r for r in prep.new if (r[0], r[1]) not in idx.keys]
        # Added meanwhile by this instance's ingest: apply like any known device.
        raced = [(idx.keys[(r[0], r[1])], r) for r in prep.new if (r[0], r[1]) in idx.keys]
        if new:
            self._add_loaded(idx, new)
        for col, saved, db in (
            ("last_good", "saved_good", prep.good),
            ("last_ts", "saved_ts", prep.ts),
        ):
            mem, was = getattr(idx, col), getattr(idx, saved)
            mem[prep.pos] = np.maximum(mem[prep.pos], db)
            was[prep.pos] = np.maximum(was[prep.pos], db)
        for i, first in prep.first_seen:
            m = idx.meta[i]
            if m.first_seen_ms is None or first < m.first_seen_ms:
                m.first_seen_ms = first
        for i, r in prep.changed + raced:
            if idx.state_seq[i] > committed:
                continue  # this instance's change is newer than what was read
            self._apply_device_row(i, r)

    def _apply_device_row(self, i: int, r: tuple[Any, ...]) -> None:
        idx = self._index
        meta, fresh = idx.meta[i], DeviceMeta(*r[:17])
        first = meta.first_seen_ms
        for name in _REFRESHED_META:
            setattr(meta, name, getattr(fresh, name))
        meta.not_in_ledger = bool(fresh.not_in_ledger)
        if first is not None and (meta.first_seen_ms is None or first < meta.first_seen_ms):
            meta.first_seen_ms = first
        idx.set_static(i, meta)
        agent = self._agents.get(r[8]) if r[8] else None
        idx.set_agent(i, r[8], agent is not None and agent.online)
        idx.agent_alive[i] = agent is not None and agent.online
        for col, k in (("last_good", 17), ("last_ts", 18)):
            if r[k] is not None and r[k] > getattr(idx, col)[i]:
                getattr(idx, col)[i] = r[k]
        idx.offline_since[i] = NEVER if r[19] is None else r[19]
        idx.dev_online[i] = bool(r[21])

    # ------------------------------------------------------------------ hooks

    def _on_start(self) -> None:
        """Called by ``start`` before it returns (a part's own start)."""

    def _after_flush(self, final: bool) -> None:
        """Called after each flush of the flush thread, and by ``close`` (``final``)."""

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
            **_rows.meta_row(m),
            "last_seen_ms": _rows.opt(idx.last_ts[i]),
            "last_good_ms": _rows.opt(idx.last_good[i]),
            "online": bool(idx.dev_online[i] and idx.agent_alive[i]),
            "reported_online": bool(idx.dev_online[i]),
            "offline_since_ms": _rows.opt(idx.offline_since[i]),
            "reason": m.reason[:200],
        }

    def _time_values(
        self, positions: list[int]
    ) -> tuple[list[tuple[str, str, int | None]], list[int], list[int]]:
        """Keys and first-seen, last good and last sample times of ``positions``, noted as
        written (under the lock)."""
        idx = self._index
        pos = np.array(positions, np.int64)
        good, seen = idx.last_good[pos], idx.last_ts[pos]
        idx.saved_good[pos], idx.saved_ts[pos] = good, seen
        meta = idx.meta
        keys = [(m.enterprise, m.id, m.first_seen_ms) for m in (meta[i] for i in positions)]
        return keys, good.tolist(), seen.tolist()

    def _flush_locked(self) -> int:
        with self._lock:
            seq = self._seq
            pending, meta, report, dirty_times, dirty_agents = (
                self._pending_inserts,
                self._dirty,
                self._dirty_report,
                self._dirty_times,
                self._dirty_agents,
            )
            self._pending_inserts, self._dirty, self._dirty_agents = set(), set(), set()
            self._dirty_report, self._dirty_times = set(), set()
            row = self._device_row
            inserts = [row(i) for i in sorted(pending)]
            both = (meta & report) - pending
            groups = [
                (_rows.STATE_COLUMNS, [row(i) for i in sorted(both)]),
                (_rows.META_COLUMNS, [row(i) for i in sorted(meta - both - pending)]),
                (_rows.REPORT_COLUMNS, [row(i) for i in sorted(report - both - pending)]),
            ]
            # Most rows move only sample times: taken as plain values here, made rows
            # outside the lock, which ingest and views wait for.
            times = self._time_values(sorted(dirty_times - meta - report - pending))
            agent_rows = [
                {
                    "b_id": a.id,
                    "v_last_birth_ms": a.last_birth_ms,
                    "v_bdseq": a.bdseq,
                    "v_online": a.online,
                    "v_codec": a.codec,
                }
                for a in (self._agents.get(x) for x in dirty_agents)
                if a is not None
            ]
        groups.append((_rows.TIME_COLUMNS, _time_rows(*times)))
        updates = sum(len(rows) for _cols, rows in groups)
        if not (inserts or updates or agent_rows):
            # Every change up to seq was in an earlier flush, committed (flushes run
            # one at a time); API writes commit before they change memory.
            self._committed_seq = seq
            return 0
        began = time.monotonic()
        try:
            with self._engine.begin() as conn:
                _rows.insert_many(conn, t.devices, inserts)
                for columns, rows in groups:
                    _rows.update_devices(conn, rows, columns)
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
                self._dirty |= meta
                self._dirty_report |= report
                self._dirty_times |= dirty_times
                self._dirty_agents |= dirty_agents
            self.counters["flush_errors"] += 1
            log.exception("registry flush failed", extra={"rows": len(inserts) + updates})
            return 0
        self._committed_seq = seq
        written = len(inserts) + updates + len(agent_rows)
        self.counters["flushed_rows"] += written
        slow = (time.monotonic() - began) * 1000 > self.refresh_overlap_ms
        if slow:
            self.counters["slow_flushes"] += 1
        if slow and not self._slow:  # once per change, not every second
            log.warning(
                "registry flush took longer than the refresh overlap",
                extra={"rows": written, "seconds": round(time.monotonic() - began, 1)},
            )
        self._slow = slow
        return written

    # ------------------------------------------------------------------ reads

    @contextmanager
    def reading(self) -> Iterator[DeviceIndex]:
        """The index, held under the registry lock for the duration of a computation."""
        with self._lock:
            yield self._index

    @property
    def answers(self) -> AnswerCache:
        """Answers to live queries by view generation (see ``views.py``)."""
        return self._views.answers

    def view(self, *, live: bool = False) -> IndexView:
        """The counting columns as a read-only view, to count over without the lock.

        ``live`` (a query at the current time): the latest published view if it is
        younger than ``view_max_age`` and no API write came since; else one taken now.
        """
        if live:
            found = self._views.live(self._api_writes)
            if found is not None:
                return found
            self.counters["views_taken_by_queries"] += 1
        with self._lock:
            view, writes = self._views.take(self._index), self._api_writes
        self._views.publish(view, writes)
        return view

    def published_view(self) -> IndexView | None:
        """The latest view if a live query may count over it (see ``view``), without
        waiting for anything; None if a new one must be taken."""
        return self._views.live(self._api_writes)

    def _publish(self) -> None:
        """Take a view, answer the live queries asked lately over it, then publish it."""
        with self._lock:
            view, writes = self._views.take(self._index), self._api_writes
        self._views.warm(view)
        self._views.publish(view, writes)
        self.counters["views_published"] += 1

    @contextmanager
    def _api_write(self) -> Iterator[None]:
        """An API write: to the database, then to memory; after pending ingest changes.

        A refresh pass that overlaps it applies no state it read (it reads it again next
        time, when it cannot be older), and live queries count a new view after it.
        """
        with self._db_lock:
            self._flush_locked()
            with self._lock:
                self._api_writes += 1
            try:
                yield
            finally:
                with self._lock:
                    self._api_writes += 1

    def _touch_locked(self, i: int) -> None:
        """Position ``i``'s state changed here (ingest), to be written by a flush."""
        self._seq += 1
        self._index.state_seq[i] = self._seq

    def _touch_agent_locked(self, agent: str) -> None:
        self._seq += 1
        self._agent_seq[agent] = self._seq

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
                "pending_rows": len(self._dirty | self._dirty_report | self._dirty_times)
                + len(self._pending_inserts),
            }


class _DeviceRows:
    """Device rows a refresh read, sorted for applying (see ``_prepare_devices``)."""

    def __init__(self) -> None:
        self.new: list[tuple[Any, ...]] = []
        self.changed: list[tuple[int, tuple[Any, ...]]] = []
        # Sample times by position, and first-seen times earlier than memory's.
        self.pos = np.zeros(0, np.int64)
        self.good = np.zeros(0, np.int64)
        self.ts = np.zeros(0, np.int64)
        self.first_seen: list[tuple[int, int]] = []


# The metadata a refresh takes from the database (first_seen_ms: the earlier of the two).
_REFRESHED_META = (
    "name",
    "region",
    "industry",
    "family",
    "category",
    "profile",
    "status",
    "source",
    "first_seen_ms",
    "reason",
    "kind",
    "site_region",
)


def _same_state(idx: DeviceIndex, i: int, r: tuple[Any, ...]) -> bool:
    """Whether row ``r`` (``LOAD_COLUMNS`` order) holds what position ``i`` has already."""
    m = idx.meta[i]
    return bool(
        m.status == r[9]
        and m.agent == r[8]
        and m.reason == r[14]
        and m.profile == r[7]
        and m.family == r[5]
        and m.category == r[6]
        and m.name == r[2]
        and m.region == r[3]
        and m.industry == r[4]
        and m.source == r[10]
        and m.kind == r[15]
        and m.site_region == r[16]
        and m.not_in_ledger == bool(r[11])
        and m.first_seen_ms == r[13]
        and bool(idx.dev_online[i]) == bool(r[21])
        and int(idx.offline_since[i]) == (NEVER if r[19] is None else r[19])
    )


def _time_rows(
    keys: list[tuple[str, str, int | None]], good: list[int], seen: list[int]
) -> list[dict[str, Any]]:
    """Rows of ``TIME_COLUMNS`` from ``RegistryStore._time_values``."""
    return [
        {
            "enterprise": ent,
            "id": dev,
            "first_seen_ms": first,
            "last_good_ms": None if g == NEVER else g,
            "last_seen_ms": None if s == NEVER else s,
        }
        for (ent, dev, first), g, s in zip(keys, good, seen, strict=True)
    ]


def _db_now(conn: sa.Connection) -> int:
    """The database's clock, which stamps the rows, in Unix milliseconds."""
    return int(conn.execute(sa.select(t.db_now_ms())).scalar_one())
