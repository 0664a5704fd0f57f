"""Store-and-forward spool: every sample is written here before it is published.

SQLite in WAL mode with ``synchronous=NORMAL``. A sample counts as spooled once the
transaction holding it has committed: from then on it survives the agent process being
killed (kill -9) — the WAL is in the operating system's page cache once the commit
returns. What NORMAL gives up is the last few transactions on a power loss or kernel
crash; set ``durable=True`` (``synchronous=FULL``, an fsync per commit) where that
matters more than throughput.

Group commit: ``append`` commits at once; ``stage`` and ``ack_later`` queue a sample or
a deletion, and ``commit`` writes everything queued in one transaction. With
``start_group_commit`` the spool commits by itself within a short window after the first
queued change and then tells the caller which devices have new committed samples, so
many devices polled in the same few milliseconds share one commit. A staged sample is
not published before that commit; killing the agent loses at most the samples of the
open window, which were never reported as spooled.

Rows are deleted only when the broker has acknowledged the message that carried them.
The per-device sequence numbers and the agent's birth sequence (bdseq) live in the same
file, so both survive a restart and a replay keeps each sample's original ``seq``.

Size cap: when ``max_samples`` or ``max_bytes`` is exceeded, the oldest rows (of any
device) are dropped first and counted in ``dropped``; newest data is always kept.

The spool is used from one thread (the agent's event loop).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Spool", "SpoolRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    ts     INTEGER NOT NULL,
    body   TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_device ON samples (device, id);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_log = logging.getLogger("iiot.agent.spool")

# Per-row bookkeeping SQLite spends beyond the body (rowid, index entry, ints).
_ROW_OVERHEAD = 48


@dataclass(frozen=True, slots=True)
class SpoolRow:
    id: int
    device: str
    seq: int
    ts: int
    body: str


class Spool:
    """Durable FIFO of samples per device, with seq and bdseq counters."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_samples: int | None = None,
        max_bytes: int | None = None,
        durable: bool = False,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.dropped = 0  # rows dropped by the cap since this process started
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._ckpt: sqlite3.Connection | None = None
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM samples"
        ).fetchone()
        self._count = int(row[0])
        self._bytes = int(row[1]) + self._count * _ROW_OVERHEAD
        self._seq: dict[str, int] = {
            str(k)[4:]: int(v)
            for k, v in self._db.execute("SELECT key, value FROM meta WHERE key LIKE 'seq:%'")
        }
        self._staged: list[tuple[str, int, int, str]] = []  # (device, seq, ts, body)
        self._acks: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._window = 0.0
        self._on_commit: Callable[[list[str], int], None] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self.commits = 0  # group commits done
        self.commit_errors = 0  # group commits that failed (retried in the next window)

    # -- counters -------------------------------------------------------------------------

    def next_bdseq(self) -> int:
        """Increment and return the birth sequence (one per MQTT connection session)."""
        with self._tx():
            cur = self._meta("bdseq")
            nxt = 0 if cur is None else cur + 1
            self._set_meta("bdseq", nxt)
        return nxt

    def last_seq(self, device: str) -> int | None:
        return self._seq.get(device)

    # -- samples --------------------------------------------------------------------------

    def append(self, device: str, ts: int, body: str) -> int:
        """Store one sample (its JSON body without seq) now; returns the seq it was given."""
        if self._staged:
            self.flush()  # staged samples have lower seqs: they go first
        seq = self._seq.get(device, 0) + 1
        with self._tx():
            self._db.execute(
                "INSERT INTO samples (device, seq, ts, body) VALUES (?, ?, ?, ?)",
                (device, seq, ts, body),
            )
            self._set_meta(f"seq:{device}", seq)
        self._seq[device] = seq
        self._count += 1
        self._bytes += len(body) + _ROW_OVERHEAD
        self._enforce_cap()
        return seq

    def stage(self, device: str, ts: int, body: str) -> int:
        """Queue one sample for the next group commit; returns the seq it was given.

        The sample is spooled (and reported through ``on_commit``) only once that commit
        is done; without ``start_group_commit`` the caller must call ``commit()``.
        """
        seq = self._seq.get(device, 0) + 1
        self._seq[device] = seq
        self._staged.append((device, seq, ts, body))
        self._schedule()
        return seq

    def ack_later(self, ids: list[int]) -> None:
        """Delete acknowledged rows in the next group commit (at once without one)."""
        if self._loop is None:
            self.ack(ids)
            return
        self._acks.extend(ids)
        self._schedule()

    @property
    def staged(self) -> int:
        """Samples queued for the next commit, not yet spooled."""
        return len(self._staged)

    def start_group_commit(
        self,
        loop: asyncio.AbstractEventLoop,
        window: float,
        on_commit: Callable[[list[str], int], None],
    ) -> None:
        """Commit queued changes ``window`` seconds after the first, on ``loop``.

        After each commit ``on_commit`` receives the devices that have new committed
        samples and how many samples were committed.
        """
        self._loop, self._window, self._on_commit = loop, window, on_commit

    def stop_group_commit(self) -> None:
        """Commit what is queued now and go back to committing on request."""
        self.flush()
        self._loop = None
        self._on_commit = None

    def flush(self) -> None:
        """Commit what is queued now and report it (no-op when nothing is queued)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._staged and not self._acks:
            return
        samples = len(self._staged)
        try:
            devices = self.commit()
        except sqlite3.Error as exc:
            # Keep the queue: the next window tries again; a sample counts as spooled
            # only once it is committed, so nothing is reported twice or out of order.
            self.commit_errors += 1
            _log.warning(
                "spool commit failed, retrying",
                extra={"staged": len(self._staged), "error": str(exc)},
            )
            self._schedule()
            return
        if self._on_commit is not None:
            self._on_commit(devices, samples)

    def commit(self) -> list[str]:
        """Write every staged sample and queued deletion in one transaction.

        Returns the devices with new committed samples, in first-staged order.
        """
        staged, acks = self._staged, self._acks
        if not staged and not acks:
            return []
        last: dict[str, int] = {}
        for device, seq, _ts, _body in staged:
            last[device] = seq
        with self._tx():
            if staged:
                self._db.executemany(
                    "INSERT INTO samples (device, seq, ts, body) VALUES (?, ?, ?, ?)", staged
                )
                self._db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [(f"seq:{d}", q) for d, q in last.items()],
                )
            removed, sizes = self._delete(acks) if acks else (0, 0)
        self._staged, self._acks = [], []
        self.commits += 1
        self._count += len(staged) - removed
        self._bytes += sum(len(r[3]) + _ROW_OVERHEAD for r in staged)
        self._bytes -= sizes + removed * _ROW_OVERHEAD
        if staged:
            self._enforce_cap()
        return list(last)

    def _schedule(self) -> None:
        if self._loop is not None and self._flush_handle is None:
            self._flush_handle = self._loop.call_later(self._window, self.flush)

    def batch(
        self, device: str, *, after_id: int = 0, max_samples: int = 500, max_bytes: int = 262144
    ) -> list[SpoolRow]:
        """The oldest rows of ``device`` after ``after_id``, with contiguous seqs, within limits.

        At least one row is returned when any is pending, however large.
        """
        rows = self._db.execute(
            "SELECT id, seq, ts, body FROM samples WHERE device = ? AND id > ? ORDER BY id LIMIT ?",
            (device, after_id, max_samples),
        ).fetchall()
        out: list[SpoolRow] = []
        size = 0
        for rid, seq, ts, body in rows:
            if out and (seq != out[-1].seq + 1 or size + len(body) > max_bytes):
                break  # a message carries consecutive seqs only (a cap drop leaves a gap)
            out.append(SpoolRow(int(rid), device, int(seq), int(ts), str(body)))
            size += len(body) + 1
        return out

    def devices(self) -> list[str]:
        """Devices with rows waiting."""
        return [
            str(r[0]) for r in self._db.execute("SELECT DISTINCT device FROM samples ORDER BY 1")
        ]

    def ack(self, ids: list[int]) -> int:
        """Delete acknowledged rows; returns how many were still there."""
        if not ids:
            return 0
        with self._tx():
            removed, sizes = self._delete(ids)
        self._count -= removed
        self._bytes -= sizes + removed * _ROW_OVERHEAD
        return removed

    def _delete(self, ids: list[int]) -> tuple[int, int]:
        """Delete rows by id inside the caller's transaction; (rows, body bytes) removed."""
        removed = 0
        sizes = 0
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            got = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM samples "
                f"WHERE id IN ({marks})",
                chunk,
            ).fetchone()
            self._db.execute(f"DELETE FROM samples WHERE id IN ({marks})", chunk)
            removed += int(got[0])
            sizes += int(got[1])
        return removed, sizes

    @property
    def depth(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        """Approximate bytes held (bodies plus a fixed per-row overhead)."""
        return self._bytes

    def take_over_checkpoints(self) -> None:
        """Stop SQLite checkpointing inside appends; the caller runs ``checkpoint()`` instead.

        An automatic checkpoint runs inside whichever commit crosses the threshold and
        syncs the database file, which stalls the event loop for tens of milliseconds.
        """
        self._db.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self) -> int:
        """Copy the WAL into the database without blocking writers (PASSIVE).

        Safe to run in a worker thread: it uses a connection of its own. Returns the
        number of WAL frames checkpointed.
        """
        if self._ckpt is None:
            self._ckpt = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        row = self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[2]) if row is not None else 0

    def close(self) -> None:
        """Commit what is queued, then close."""
        self.flush()
        self._loop = None
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None
        self._db.close()

    # -- internals ------------------------------------------------------------------------

    def _enforce_cap(self) -> None:
        over_n = self._count - self.max_samples if self.max_samples is not None else 0
        while over_n > 0 or (self.max_bytes is not None and self._bytes > self.max_bytes):
            # Drop in chunks so a tiny cap costs one statement per append, not per row.
            n = max(over_n, 1 if self.max_bytes is None else max(1, self._count // 100))
            with self._tx():
                rows = self._db.execute(
                    "SELECT id, LENGTH(body) FROM samples ORDER BY id LIMIT ?", (n,)
                ).fetchall()
                if not rows:
                    return
                if self.max_bytes is not None and over_n <= 0:
                    # Byte cap: drop just enough of the oldest rows.
                    keep: list[tuple[int, int]] = []
                    excess = self._bytes - self.max_bytes
                    for rid, ln in rows:
                        if excess <= 0:
                            break
                        keep.append((rid, ln))
                        excess -= ln + _ROW_OVERHEAD
                    rows = keep
                last = rows[-1][0]
                self._db.execute("DELETE FROM samples WHERE id <= ?", (last,))
            self._count -= len(rows)
            self._bytes -= sum(int(ln) + _ROW_OVERHEAD for _, ln in rows)
            self.dropped += len(rows)
            over_n = self._count - self.max_samples if self.max_samples is not None else 0

    def _meta(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _tx(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
