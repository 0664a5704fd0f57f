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
queued sample (a deletion waits up to ``_ACK_WINDOW`` for one) and then tells the caller
which devices have new committed samples, so many devices polled in the same few
milliseconds share one commit. A staged sample is
not published before that commit; killing the agent loses at most the samples of the
open window, which were never reported as spooled.

Rows are deleted only when the broker has acknowledged the message that carried them.
The per-device sequence numbers and the agent's birth sequence (bdseq) live in the same
file, so both survive a restart and a replay keeps each sample's original ``seq``.

Size cap: when ``max_samples`` or ``max_bytes`` is exceeded, the oldest rows (of any
device) are dropped first and counted in ``dropped``; newest data is always kept.
``max_bytes`` bounds the files on disk, write-ahead log included: the rows' pages may use
what the WAL's share (``wal_budget``) leaves, the WAL is truncated to that share after a
checkpoint (``journal_size_limit``), and pages freed by acknowledgements are given back
to the file system a little at a time (``auto_vacuum=INCREMENTAL``). ``size_bytes`` is
the logical size (bodies plus a per-row overhead); ``disk_bytes`` is what the files take.

The spool is used from one thread (the agent's event loop).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protocols.mqtt.codec import payload_bytes

__all__ = ["Spool", "SpoolRow", "wal_budget"]

# '{"seq":<seq>,"samples":[' and ']}' around a data message's samples, for any seq.
_DATA_WRAPPER_BYTES = len('{"seq":,"samples":[]}') + 20

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
# The WAL's share of max_bytes: a tenth, within these bounds.
_WAL_MIN, _WAL_MAX = 1024 * 1024, 64 * 1024 * 1024
# Below this the schema alone fills the budget; a smaller max_bytes bounds rows only.
_MIN_DATA = 64 * 1024
# Free pages given back per commit (bounded, so a drain never stalls the event loop).
_VACUUM_PAGES = 64
_ACKS_PER_COMMIT = 256
_ACK_WINDOW = 0.2  # seconds a deletion waits for a commit of samples to ride with
_VACUUM_MIN = 256 * 1024  # free space below this stays in the file for the next rows
# A file this small (or an empty spool) is rewritten at open to enable incremental vacuum.
_CONVERT_MAX = 16 * 1024 * 1024


def wal_budget(max_bytes: int) -> int:
    """How much of ``max_bytes`` the write-ahead log may take."""
    return max(_WAL_MIN, min(_WAL_MAX, max_bytes // 10))


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
        self._wal_path = Path(f"{self.path}-wal")
        self.wal_budget = wal_budget(max_bytes) if max_bytes is not None else _WAL_MAX
        # Takes effect only on a new file (or after VACUUM): set before the schema.
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        # After a checkpoint the WAL file is cut back to a quarter of its share.
        self._db.execute(f"PRAGMA journal_size_limit={self.wal_budget // 4}")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        self._convert_to_incremental_vacuum()
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
        self.inline_checkpoints = 0  # WAL cut back inside a commit (the worker fell behind)
        self._manual_checkpoints = False

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
        # Deletions are in no hurry: they ride with the next commit of samples rather than
        # wake the process for a commit of their own.
        self._schedule(max(self._window, _ACK_WINDOW))

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

    def flush(self, *, bounded: bool = False) -> None:
        """Commit what is queued now and report it (no-op when nothing is queued).

        ``bounded`` (the group-commit timer) deletes at most ``_ACKS_PER_COMMIT`` rows
        and leaves the rest to the next window.
        """
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._staged and not self._acks:
            return
        samples = len(self._staged)
        try:
            devices = self.commit(bounded=bounded)
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

    def commit(self, *, bounded: bool = False) -> list[str]:
        """Write every staged sample and queued deletion in one transaction.

        Returns the devices with new committed samples, in first-staged order. With
        ``bounded``, deletions beyond the first ``_ACKS_PER_COMMIT`` stay queued.
        """
        n_acks = _ACKS_PER_COMMIT if bounded else len(self._acks)
        staged, acks = self._staged, self._acks[:n_acks]
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
        # Deletions beyond the first _ACKS_PER_COMMIT wait for the next window: a device's
        # rows are spread over the whole file, so one commit deleting a large backlog
        # would rewrite most of it into the WAL at once.
        self._staged, self._acks = [], self._acks[n_acks:]
        if self._acks:
            self._schedule()
        self.commits += 1
        if self._manual_checkpoints and self.wal_bytes > self.wal_budget:
            self._checkpoint_inline()
        self._count += len(staged) - removed
        self._bytes += sum(len(r[3]) + _ROW_OVERHEAD for r in staged)
        self._bytes -= sizes + removed * _ROW_OVERHEAD
        if staged:
            self._enforce_cap()
        if removed:
            self._give_back()
        return list(last)

    def _schedule(self, window: float | None = None) -> None:
        """Commit within ``window`` seconds (default: the group-commit window)."""
        loop = self._loop
        if loop is None:
            return
        if window is None:
            window = self._window
        handle = self._flush_handle
        if handle is not None:
            if handle.when() <= loop.time() + window:
                return  # a commit comes soon enough
            handle.cancel()
        self._flush_handle = loop.call_later(window, self._flush_window)

    def _flush_window(self) -> None:
        self._flush_handle = None
        self.flush(bounded=True)

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
        size = _DATA_WRAPPER_BYTES
        for rid, seq, ts, body in rows:
            add = payload_bytes(body) + (1 if out else 0)  # UTF-8, and the comma before it
            if out and (seq != out[-1].seq + 1 or size + add > max_bytes):
                break  # a message carries consecutive seqs only (a cap drop leaves a gap)
            out.append(SpoolRow(int(rid), device, int(seq), int(ts), str(body)))
            size += add
        return out

    def rows_after(self, after_id: int, *, max_samples: int = 500) -> list[SpoolRow]:
        """The oldest rows of every device after ``after_id``, in spool (id) order."""
        return [
            SpoolRow(int(rid), str(dev), int(seq), int(ts), str(body))
            for rid, dev, seq, ts, body in self._db.execute(
                "SELECT id, device, seq, ts, body FROM samples WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, max_samples),
            )
        ]

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
        if removed:
            self._give_back()
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

    @property
    def disk_bytes(self) -> int:
        """Bytes the spool's files take on disk: database, WAL and shared-memory index."""
        total = 0
        for p in (self.path, self._wal_path, Path(f"{self.path}-shm")):
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    @property
    def wal_bytes(self) -> int:
        """Size of the write-ahead log file (0 when there is none)."""
        try:
            return self._wal_path.stat().st_size
        except OSError:
            return 0

    @property
    def wal_over_budget(self) -> bool:
        """The WAL has grown past a quarter of its share: time for a checkpoint."""
        return self.wal_bytes > self.wal_budget // 4

    def take_over_checkpoints(self) -> None:
        """Stop SQLite checkpointing inside appends; the caller runs ``checkpoint()`` instead.

        An automatic checkpoint runs inside whichever commit crosses the threshold and
        syncs the database file, which stalls the event loop for tens of milliseconds.
        """
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._manual_checkpoints = True

    def _checkpoint_inline(self) -> None:
        """Cut the WAL back now, on this connection: the worker's checkpoints fell behind.

        The worker thread is handed a checkpoint once the WAL passes a quarter of its
        share; on a starved CPU the log can grow by megabytes before that thread runs, and
        the disk bound would not hold. A commit that finds the WAL past its whole share
        pays for the copy itself.
        """
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.inline_checkpoints += 1
        except sqlite3.Error:  # busy with the worker's own checkpoint: it is cutting it
            pass

    def checkpoint(self) -> int:
        """Copy the WAL into the database; returns the number of WAL frames checkpointed.

        PASSIVE (never blocks writers) while the WAL is within its share. Under a steady
        stream of commits a passive checkpoint never catches up, so the WAL is never
        rewound and keeps growing; past its share the checkpoint is TRUNCATE, which holds
        writers off for the copy (a commit on the event loop waits that long) and cuts
        the file back. Safe to run in a worker thread: it uses a connection of its own.
        """
        if self._ckpt is None:
            self._ckpt = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0.2
            )
        mode = "TRUNCATE" if self.wal_bytes > self.wal_budget else "PASSIVE"
        row = self._ckpt.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(row[2]) if row is not None else 0

    def close(self) -> None:
        """Commit what is queued, give free pages back, truncate the WAL, then close."""
        self.flush()
        self._loop = None
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None
        try:
            self._vacuum(self._file_pages()[1])
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # the data is committed; only the file stays larger
            _log.warning("spool not compacted at close", extra={"error": str(exc)})
        self._db.close()

    # -- internals ------------------------------------------------------------------------

    def _convert_to_incremental_vacuum(self) -> None:
        """Rewrite a spool made without incremental vacuum, when that is cheap."""
        if int(self._db.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:
            return
        if self._file_pages()[0] * self._page_size > _CONVERT_MAX and self._has_rows():
            _log.warning(
                "spool file cannot give space back until it is empty once",
                extra={"path": str(self.path)},
            )
            return
        self._db.execute("VACUUM")  # applies auto_vacuum=INCREMENTAL to the file

    def _has_rows(self) -> bool:
        return self._db.execute("SELECT 1 FROM samples LIMIT 1").fetchone() is not None

    def _file_pages(self) -> tuple[int, int]:
        """(pages in the database, free pages among them), as of the last commit."""
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        return pages, free

    def _disk_excess(self, wal: int) -> int:
        """Bytes of row pages above what ``max_bytes`` leaves beside a WAL of ``wal`` bytes.

        Checkpoints keep the WAL to its share, but under a steady stream of commits it can
        run longer for a while; the rows then make room for it.
        """
        if self.max_bytes is None:
            return 0
        pages, free = self._file_pages()
        used = (pages - free) * self._page_size
        return used - max(self.max_bytes - max(self.wal_budget, wal), _MIN_DATA)

    def _give_back(self) -> None:
        """Return free pages to the file system, a bounded number per commit."""
        pages, free = self._file_pages()
        # Only once at least half the file is free (a drain done, or nearly): before that,
        # vacuuming moves live pages from the end of the file, costing WAL and time.
        if free and (
            (free * 2 >= pages and free * self._page_size >= _VACUUM_MIN) or self._count == 0
        ):
            try:
                self._vacuum(min(free, _VACUUM_PAGES))
            except sqlite3.Error as exc:  # the file stays larger; nothing is lost
                _log.warning("spool vacuum failed", extra={"error": str(exc)})

    def _vacuum(self, pages: int) -> None:
        """Give ``pages`` free pages back, in one transaction.

        Python's sqlite3 steps a statement without result columns only once, and
        ``incremental_vacuum(N)`` frees one page per step: hence one page per statement.
        """
        with self._tx():
            for _ in range(pages):
                self._db.execute("PRAGMA incremental_vacuum(1)")

    def _drop_for_disk(self) -> None:
        """Drop the oldest rows while their pages take more than the disk budget allows."""
        # The WAL as it is now: the deletions below lengthen it, and chasing that would
        # drop far more than needed.
        wal = self.wal_bytes
        excess = self._disk_excess(wal)
        rounds = 0
        while excess > 0 and self._count > 1 and rounds < 4:
            rounds += 1
            pages, free = self._file_pages()
            per_row = max(1, (pages - free) * self._page_size // max(self._count, 1))
            # Whole pages free up only when all their rows are gone: drop a little more.
            n = min(self._count - 1, excess // per_row + max(1, self._count // 100))
            with self._tx():
                got = self._db.execute(
                    "SELECT MAX(id), COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM "
                    "(SELECT id, body FROM samples ORDER BY id LIMIT ?)",
                    (n,),
                ).fetchone()
                if got is None or got[0] is None:
                    return
                self._db.execute("DELETE FROM samples WHERE id <= ?", (int(got[0]),))
            self._count -= int(got[1])
            self._bytes -= int(got[2]) + int(got[1]) * _ROW_OVERHEAD
            self.dropped += int(got[1])
            excess = self._disk_excess(wal)

    def _enforce_cap(self) -> None:
        self._drop_for_disk()
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
