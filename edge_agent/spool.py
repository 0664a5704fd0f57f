"""Store-and-forward spool: every sample is written here before it is published.

SQLite in WAL mode with ``synchronous=NORMAL``: each append is its own committed
transaction, so a sample the agent has spooled survives the agent process being killed
(kill -9) — the WAL is in the operating system's page cache once the commit returns.
What NORMAL gives up is the last few transactions on a power loss or kernel crash;
set ``durable=True`` (``synchronous=FULL``, an fsync per commit) where that matters more
than throughput.

Rows are deleted only when the broker has acknowledged the message that carried them.
The per-device sequence numbers and the agent's birth sequence (bdseq) live in the same
file, so both survive a restart and a replay keeps each sample's original ``seq``.

Size cap: when ``max_samples`` or ``max_bytes`` is exceeded, the oldest rows (of any
device) are dropped first and counted in ``dropped``; newest data is always kept.

The spool is used from one thread (the agent's event loop).
"""

from __future__ import annotations

import sqlite3
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
        """Store one sample (its JSON body without seq); returns the seq it was given."""
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
        removed = 0
        sizes = 0
        with self._tx():
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
        self._count -= removed
        self._bytes -= sizes + removed * _ROW_OVERHEAD
        return removed

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
