"""Durable outbox of line protocol between MQTT ingest and the InfluxDB writer (SQLite WAL).

Ingest appends one chunk (many lines) per transaction and acknowledges the MQTT messages
only after the commit; the writer reads the oldest chunks, writes them, and deletes them
only after InfluxDB accepted them. With no InfluxDB configured the outbox is the
embedded store.

Retention cap: at most ``max_lines`` lines and nothing older than ``max_age`` seconds
are kept; what the cap removes before it was written is counted
(``iiot_gateway_outbox_dropped_lines_total``). The cap holds with or without InfluxDB,
so a long database outage cannot fill the disk.

Duplicate rule: a sample is identified by ``(enterprise/agent/device, seq, ts)``. The
same transaction that appends its lines records that key; a sample whose key is
already recorded is a replay and is not written again. A restarted agent continues its
seq, and a reset agent restarting at seq 0 carries newer timestamps, so neither
collides with what was recorded. The record keeps the ``dedup_window`` most recent keys
(all devices together); a replay arriving after that many newer samples is written
again, which InfluxDB stores as an overwrite of the same point.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.metrics import DataPathMetrics

__all__ = ["Outbox", "OutboxBatch", "OutboxError", "OutboxTransaction"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    n INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    id INTEGER PRIMARY KEY,
    dev TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS seen_key ON seen (dev, seq, ts);
CREATE TABLE IF NOT EXISTS sparkplug_births (
    node TEXT NOT NULL,
    device TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (node, device)
);
"""

# Checking retention on every append would cost a query per batch; age is coarse anyway.
_AGE_CHECK_INTERVAL = 10.0


class OutboxError(RuntimeError):
    """The outbox database cannot be opened or written; the message names the file."""


@dataclass(frozen=True, slots=True)
class OutboxBatch:
    """Oldest pending chunks: delete through ``last_id`` once written."""

    last_id: int
    lines: int
    body: str


class OutboxTransaction:
    """One ingest transaction: dedup checks and appended lines commit together."""

    def __init__(self, cur: sqlite3.Cursor, high_water: dict[str, int]) -> None:
        self._cur = cur
        self._lines: list[str] = []
        self._hw = high_water
        self._hw_new: dict[str, int] = {}
        self._pending: list[tuple[str, int, int]] = []
        self.new_keys = 0

    def first_time(self, dev: str, seq: int, ts: int) -> bool:
        """Record a sample key; False if it was already recorded (a replay)."""
        hw = self._hw_new.get(dev)
        if hw is None:
            hw = self._hw.get(dev)
            if hw is None:
                self._flush_keys()
                row = self._cur.execute(
                    "SELECT MAX(seq) FROM seen WHERE dev = ?", (dev,)
                ).fetchone()
                # A value read inside a transaction that later rolls back can only be
                # too high, which sends more samples to the exact check below: safe.
                hw = -1 if row[0] is None else int(row[0])
                self._hw[dev] = hw
        if seq > hw:
            # Above every seq recorded for this device: new without a lookup.
            self._pending.append((dev, seq, ts))
            self._hw_new[dev] = seq
            self.new_keys += 1
            return True
        self._flush_keys()
        self._cur.execute(
            "INSERT OR IGNORE INTO seen (dev, seq, ts) VALUES (?, ?, ?)", (dev, seq, ts)
        )
        if self._cur.rowcount == 1:
            self.new_keys += 1
            return True
        return False

    def last_seen(self, dev: str) -> tuple[int, int] | None:
        """(seq, ts) of the sample of ``dev`` recorded last, or None."""
        self._flush_keys()
        row = self._cur.execute(
            "SELECT seq, ts FROM seen WHERE dev = ? ORDER BY id DESC LIMIT 1", (dev,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def add(self, lines: Sequence[str]) -> None:
        self._lines.extend(lines)

    def save_birth(self, node: str, device: str, body: bytes) -> None:
        """Keep a Sparkplug birth (device '' for NBIRTH, which forgets the node's DBIRTHs).

        DDATA queued for the gateway while it was down names metrics by alias only; the
        births committed with the data before them let a restarted gateway read it.
        """
        if not device:
            self._cur.execute("DELETE FROM sparkplug_births WHERE node = ?", (node,))
        self._cur.execute(
            "INSERT OR REPLACE INTO sparkplug_births (node, device, body) VALUES (?, ?, ?)",
            (node, device, body),
        )

    def _flush_keys(self) -> None:
        if self._pending:
            self._cur.executemany(
                "INSERT OR IGNORE INTO seen (dev, seq, ts) VALUES (?, ?, ?)", self._pending
            )
            self._pending.clear()


class Outbox:
    """SQLite outbox shared by the ingest, snapshot and writer threads."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_lines: int = 10_000_000,
        max_age: float = 7 * 86400.0,
        dedup_window: int = 1_000_000,
        synchronous: str = "full",
        chunk_lines: int = 5000,
        metrics: DataPathMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_lines = max_lines
        self.max_age = max_age
        self.dedup_window = dedup_window
        self.chunk_lines = max(1, chunk_lines)
        self.metrics = metrics or DataPathMetrics()
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss, which is what acknowledging promises;
            # NORMAL (WAL) survives a process crash but not an operating-system one.
            if synchronous not in ("full", "normal"):
                raise OutboxError(f"outbox {self.path}: synchronous must be full or normal")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute(
                "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(size), 0) FROM chunks"
            ).fetchone()
            self._lines, self._bytes = int(row[0]), int(row[1])
            seen_max = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM seen").fetchone()[0]
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path}: {exc}") from exc
        self._seen_since_prune = int(seen_max)
        # Per device, the highest seq recorded: samples above it skip the exact lookup.
        self._high_water: dict[str, int] = {}
        self._last_age_check = 0.0
        self._update_gauges()

    # -- ingest side -------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[OutboxTransaction]:
        """Dedup checks and lines in one durable commit; rolled back on any exception."""
        with self._lock:
            self._check_open()
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            tx = OutboxTransaction(cur, self._high_water)
            try:
                yield tx
                tx._flush_keys()
                if tx._lines:
                    self._insert_chunk(cur, tx._lines)
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute("ROLLBACK")
                if tx._lines:
                    # Undo the in-memory depth for the chunk that never committed.
                    self._reread_depth()
                raise
            self._seen_since_prune += tx.new_keys
            if len(self._high_water) > 1_000_000:
                self._high_water.clear()  # reloaded per device on demand
            self._high_water.update(tx._hw_new)
            self._after_commit()

    def sparkplug_births(self) -> list[tuple[str, str, bytes]]:
        """Every kept Sparkplug birth: (node, device, payload), NBIRTHs first."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT node, device, body FROM sparkplug_births ORDER BY node, device"
            ).fetchall()
        return [(str(n), str(d), bytes(b)) for n, d, b in rows]

    def append(self, lines: Sequence[str]) -> None:
        """Append lines in their own transaction (ratio snapshots and the like)."""
        if not lines:
            return
        with self.transaction() as tx:
            tx.add(lines)

    def _insert_chunk(self, cur: sqlite3.Cursor, lines: list[str]) -> None:
        # Chunks no bigger than a write batch, so a replayed backlog is not one huge request.
        at = self._clock()
        step = self.chunk_lines
        for i in range(0, len(lines), step):
            part = lines[i : i + step]
            body = "\n".join(part)
            size = len(body.encode())
            cur.execute(
                "INSERT INTO chunks (at, n, size, body) VALUES (?, ?, ?, ?)",
                (at, len(part), size, body),
            )
            self._lines += len(part)
            self._bytes += size

    def _after_commit(self) -> None:
        self._enforce_retention_locked()
        if self._seen_since_prune > self.dedup_window + max(1000, self.dedup_window // 10):
            self._db.execute(
                "DELETE FROM seen WHERE id <= (SELECT MAX(id) FROM seen) - ?",
                (self.dedup_window,),
            )
            self._seen_since_prune = self.dedup_window
        self._update_gauges()
        self._cond.notify_all()

    # -- writer side -------------------------------------------------------------------

    def read(self, max_lines: int) -> OutboxBatch | None:
        """The oldest pending chunks, about ``max_lines`` lines (at least one chunk)."""
        with self._lock:
            self._check_open()
            cur = self._db.execute("SELECT id, n, body FROM chunks ORDER BY id LIMIT 10000")
            bodies: list[str] = []
            total = 0
            last_id = 0
            for cid, n, body in cur:
                if bodies and total + n > max_lines:
                    break
                bodies.append(body)
                total += int(n)
                last_id = int(cid)
                if total >= max_lines:
                    break
            cur.close()
        if not bodies:
            return None
        return OutboxBatch(last_id, total, "\n".join(bodies))

    def delete(self, batch: OutboxBatch) -> None:
        """Remove a written batch (and anything older, already gone to retention)."""
        with self._lock:
            self._check_open()
            self._delete_through(batch.last_id)
            self._update_gauges()

    def wait(self, min_lines: int, timeout: float) -> int:
        """Block until at least ``min_lines`` are pending or ``timeout``; the depth."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._lines < min_lines and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._lines

    def wake(self) -> None:
        """Release every ``wait`` now (used at shutdown)."""
        with self._cond:
            self._cond.notify_all()

    # -- retention and bookkeeping ------------------------------------------------------

    @property
    def pending_lines(self) -> int:
        return self._lines

    def oldest_age(self) -> float | None:
        """Seconds the oldest pending line has waited; None when nothing is pending."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT at FROM chunks ORDER BY id LIMIT 1").fetchone()
        return None if row is None else max(0.0, self._clock() - float(row[0]))

    def enforce_retention(self) -> int:
        """Apply the cap now; the number of lines dropped."""
        with self._lock:
            self._check_open()
            self._last_age_check = 0.0
            dropped = self._enforce_retention_locked()
            self._update_gauges()
            return dropped

    def _enforce_retention_locked(self) -> int:
        dropped = 0
        if self._lines > self.max_lines:
            # Drop whole oldest chunks until under the cap.
            excess = self._lines - self.max_lines
            rows = self._db.execute("SELECT id, n FROM chunks ORDER BY id LIMIT 100000")
            upto = None
            acc = 0
            for cid, n in rows:
                acc += int(n)
                upto = int(cid)
                if acc >= excess:
                    break
            rows.close()
            if upto is not None:
                dropped += self._delete_through(upto)
        now = time.monotonic()
        if now - self._last_age_check >= _AGE_CHECK_INTERVAL:
            self._last_age_check = now
            row = self._db.execute(
                "SELECT MAX(id) FROM chunks WHERE at < ?", (self._clock() - self.max_age,)
            ).fetchone()
            if row[0] is not None:
                dropped += self._delete_through(int(row[0]))
        if dropped:
            self.metrics.outbox_dropped.inc(dropped)
        return dropped

    def _delete_through(self, last_id: int) -> int:
        row = self._db.execute(
            "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(size), 0) FROM chunks WHERE id <= ?",
            (last_id,),
        ).fetchone()
        self._db.execute("DELETE FROM chunks WHERE id <= ?", (last_id,))
        self._lines -= int(row[0])
        self._bytes -= int(row[1])
        return int(row[0])

    def _reread_depth(self) -> None:
        row = self._db.execute(
            "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(size), 0) FROM chunks"
        ).fetchone()
        self._lines, self._bytes = int(row[0]), int(row[1])

    def _update_gauges(self) -> None:
        self.metrics.outbox_lines.set(self._lines)
        self.metrics.outbox_bytes.set(self._bytes)

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
