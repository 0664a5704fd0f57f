"""The data-quality gate's buckets, shared through PostgreSQL by the gateway instances.

Each instance counts the samples it receives in its window's buckets (gateway.quality).
Its sharing thread (``quality-share``) does the rest, apart from the registry's refresh
pass, so that the device states the ratios follow never wait for quality rows:

- every ``quality_share_interval`` it adds the samples counted since its last write to
  the table ``quality_buckets`` (one row a device and bucket; batched upserts in key
  order, a transaction a chunk), which also notes whether values differed in the bucket;
- ``refresh_interval`` after the last fold ended (where shorter; else after each write;
  behind this instance's own write when one is due) it reads the rows
  written since its last read (by transaction id, as device rows:
  ``gateway.registry.changes``) and folds them into the window, ``_FOLD_SLICE`` rows
  under the window's lock at a time, so ingest waits for a slice at most.

So every instance judges every instance's samples, another's within
``quality_share_interval`` + ``refresh_interval`` + the write and the fold. A window
starts with the table's buckets, read in the background in chunks (the read's mark is
where the sharing thread's reads go on from), so a restarted instance judges what the
others kept counting.

``quality_span`` holds since when the instances have counted without a break: each write
also says "counting, since ..."; when none did for ``_break_ms`` the span starts again
(nobody counted meanwhile, so those samples are not expected). Buckets older than the
gate's horizon are deleted every bucket's length.

On SQLite (one instance) nothing is shared: the window is in memory and starts empty,
as it always was.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import sqlalchemy as sa

from gateway.quality import PendingCounts, QualityWindow
from gateway.registry.changes import Mark, take_mark
from gateway.registry.store import RegistryStore

__all__ = ["SharedQualityPart"]

log = logging.getLogger("iiot.gateway.registry")

# Rows an upsert statement (and its transaction) writes: short enough that instances
# adding to the same rows wait little on each other.
_CHUNK = 20_000
# Rows read at a time from the shared buckets (a start's load, a fold of the others').
_LOAD_CHUNK = 100_000
# Rows folded under one hold of the window's lock: ingest records under the same lock,
# and 10,000 rows take some 30-90 ms.
_FOLD_SLICE = 10_000
_COLUMNS = "enterprise, device, start_ms, samples, fp, varied"
_UPSERT = (
    f"INSERT INTO quality_buckets ({_COLUMNS}, updated_xid) "
    "SELECT e, d, s, c, f, v, CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT) "
    "FROM unnest(CAST(%s AS TEXT[]), CAST(%s AS TEXT[]), CAST(%s AS BIGINT[]), "
    "CAST(%s AS BIGINT[]), CAST(%s AS BIGINT[]), CAST(%s AS BOOLEAN[])) AS u(e, d, s, c, f, v) "
    "ON CONFLICT (enterprise, device, start_ms) DO UPDATE SET "
    "samples = quality_buckets.samples + excluded.samples, "
    "varied = quality_buckets.varied OR excluded.varied OR quality_buckets.fp <> excluded.fp, "
    "updated_xid = excluded.updated_xid"
)
_SPAN = (
    "INSERT INTO quality_span (id, since_ms, seen_ms) VALUES (1, %(since)s, %(now)s) "
    "ON CONFLICT (id) DO UPDATE SET since_ms = CASE "
    "WHEN quality_span.seen_ms < %(now)s - %(gap)s THEN excluded.since_ms "
    "ELSE LEAST(quality_span.since_ms, excluded.since_ms) END, "
    "seen_ms = GREATEST(quality_span.seen_ms, excluded.seen_ms) "
    "RETURNING since_ms"
)

_PRUNE = "DELETE FROM quality_buckets WHERE start_ms < %s"


def _cursor(conn: sa.Connection) -> Any:
    # Straight through the driver: SQLAlchemy's rows cost more than the read itself.
    return conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _texts(values: list[str]) -> str:
    """An array literal of ``values``: one parameter the server parses, where the driver
    would adapt each element (twice as long, at 20,000 rows a statement)."""
    return "{" + ",".join(map(_quoted, values)) + "}"


def _numbers(values: list[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _write(conn: sa.Connection, taken: PendingCounts, lo: int, hi: int) -> None:
    cur = _cursor(conn)
    try:
        params = (
            _texts(taken.enterprise[lo:hi]),
            _texts(taken.device[lo:hi]),
            _numbers(taken.start[lo:hi]),
            _numbers(taken.count[lo:hi]),
            _numbers(taken.fp[lo:hi]),
            "{" + ",".join("t" if v else "f" for v in taken.varied[lo:hi]) + "}",
        )
        cur.execute(_UPSERT, params)
    finally:
        cur.close()


def _fold(
    window: QualityWindow,
    conn: sa.Connection,
    where: str,
    params: tuple[Any, ...],
    stop: threading.Event,
) -> int | None:
    """Fold the rows ``where`` holds into ``window`` a slice at a time, read through a
    server-side cursor in chunks (a day of buckets at province scale is tens of millions
    of rows, never all in memory at once); returns the rows folded, None if ``stop`` was
    set before the end."""
    dbapi = conn.connection.dbapi_connection
    cur = dbapi.cursor(name="quality_fold")  # type: ignore[union-attr]
    folded = 0
    try:
        cur.execute(f"SELECT {_COLUMNS} FROM quality_buckets WHERE {where}", params)
        while chunk := cur.fetchmany(_LOAD_CHUNK):
            for lo in range(0, len(chunk), _FOLD_SLICE):
                if stop.is_set():
                    return None
                folded += window.fold(chunk[lo : lo + _FOLD_SLICE])
    finally:
        cur.close()
    return folded


def _span_row(conn: sa.Connection) -> tuple[int, int] | None:
    row = conn.exec_driver_sql("SELECT since_ms, seen_ms FROM quality_span WHERE id = 1").first()
    return None if row is None else (int(row[0]), int(row[1]))


class SharedQualityPart(RegistryStore):
    """The gate's window, and on PostgreSQL its buckets shared with the other instances."""

    _quality: QualityWindow | None = None
    _quality_span_ok = False  # the shared buckets are in the window
    _quality_sharer: threading.Thread | None = None
    _quality_pruned = 0.0  # and of the last deletion of old buckets
    _quality_failing = False
    _quality_fold_failing = False
    _quality_loaded: threading.Event
    # Where the next fold of the others' rows reads from, and for which window.
    _quality_mark: tuple[QualityWindow, Mark] | None = None

    @property
    def quality(self) -> QualityWindow:
        """The data-quality gate's window (created with the registry's defaults if unset)."""
        window = self._quality
        if window is None:
            window = QualityWindow(poll_interval_s=self.default_poll_interval, clock=self._clock)
            self.set_quality(window)
        return window

    def set_quality(self, window: QualityWindow) -> None:
        """Judge by ``window``; on PostgreSQL the shared buckets are read into it in the
        background (``quality_loaded`` waits for that), so a start at province scale does
        not wait for them and nothing counted meanwhile is lost."""
        self._quality = window
        self._quality_span_ok = False
        self._quality_mark = None
        loaded = self._quality_loaded = threading.Event()
        if not self.quality_shared:
            loaded.set()
            return
        threading.Thread(
            target=self._load_quality, args=(window, loaded), name="quality-load", daemon=True
        ).start()

    def quality_loaded(self, timeout: float | None = None) -> bool:
        """Whether the shared buckets are in the window, waiting up to ``timeout`` s."""
        _ = self.quality
        return self._quality_loaded.wait(timeout)

    @property
    def quality_shared(self) -> bool:
        """Whether the gate's buckets are shared through the database: on PostgreSQL,
        where the instances split the messages between them."""
        return self.share_quality_counts and self._engine.dialect.name == "postgresql"

    def _break_ms(self) -> int:
        """How long no instance may write its counts before the watched span restarts."""
        return int((3 * self.quality_share_interval + 30) * 1000)

    def _load_quality(self, window: QualityWindow, loaded: threading.Event) -> None:
        began = time.monotonic()
        now = self._now_ms()
        low = now - window.horizon_ms - window.bucket_ms
        rows: int | None = 0
        try:
            with self._engine.connect() as conn:
                # Before the rows (see changes.py): the sharing thread's folds read from
                # here on, so a row written while these are read is folded later.
                mark = take_mark(conn)
                if mark is not None and self._quality is window:
                    self._quality_mark = (window, mark)
                span = _span_row(conn)
                rows = _fold(window, conn, "start_ms > %s", (low,), self._stop)
            if rows is None:
                return  # closing
            if span is not None and span[1] >= now - self._break_ms():
                window.adopt_since(span[0])
            # Only a window that holds the shared buckets may watch the others' span:
            # before, or after a failed read, it would expect samples it does not hold.
            self._quality_span_ok = True
        except Exception:  # the driver's own errors too: the cursor is the driver's
            self.counters["quality_load_errors"] += 1
            log.exception(
                "reading the shared quality buckets failed; this instance judges by the "
                "samples it counts and the rows the others write from now on"
            )
            return
        finally:
            loaded.set()
        log.info(
            "quality buckets loaded",
            extra={"rows": rows, "seconds": round(time.monotonic() - began, 1)},
        )

    def _on_start(self) -> None:
        _ = self.quality  # its shared buckets start loading before ingest starts
        if self.quality_shared:
            # A thread of its own: a write at province scale takes seconds, which
            # would hold up the flush of device state on the flush thread.
            self._quality_sharer = threading.Thread(
                target=self._share_loop, name="quality-share", daemon=True
            )
            self._quality_sharer.start()

    def _share_loop(self) -> None:
        # Writes every quality_share_interval; reads and folds the instances' rows every
        # refresh_interval where that is shorter, so the others' samples arrive as soon
        # as device rows do, but on this thread, never holding up a refresh pass.
        interval = self.quality_share_interval
        every = min(interval, self.refresh_interval or interval)
        next_write = time.monotonic() + interval
        while not self._stop.wait(every):
            if time.monotonic() >= next_write - every / 10:
                try:
                    self.share_quality()
                except Exception:  # counted and logged in share_quality; never ends the loop
                    log.exception("writing the quality buckets failed; will retry")
                next_write = time.monotonic() + interval
            self._fold_quietly()

    def _fold_quietly(self) -> None:
        """``fold_quality``, its failures counted and logged once per change."""
        try:
            self.fold_quality()
        except Exception:  # the server-side cursor raises the driver's errors
            self.counters["quality_fold_errors"] += 1
            if not self._quality_fold_failing:
                log.exception("reading the others' quality buckets failed; will retry")
            self._quality_fold_failing = True
            return
        if self._quality_fold_failing:
            log.info("reading the others' quality buckets works again")
        self._quality_fold_failing = False

    def fold_quality(self) -> int:
        """Fold into the window the shared bucket rows written since the last fold (by
        any instance: the database's counts include this one's); returns the rows folded.

        0 on SQLite, while the shared buckets are still loading (the load reads them),
        and when the registry is closing. After a load that could not take a mark this
        first takes one: the rows written from then on are folded.
        """
        if not self.quality_shared or not self.quality_loaded(0):
            return 0
        window = self.quality
        held = self._quality_mark
        with self._engine.connect() as conn:
            mark = take_mark(conn)  # before the rows: see changes.py
            folded: int | None = 0
            if held is not None and held[0] is window:
                where = "updated_xid >= %s OR updated_xid = ANY(CAST(%s AS BIGINT[]))"
                params = (held[1].xmax, list(held[1].xip))
                folded = _fold(window, conn, where, params, self._stop)
        if folded is None:
            return 0  # closing: the mark stays, nothing is lost that a next pass needs
        if mark is not None and self._quality is window:
            self._quality_mark = (window, mark)
        self.counters["quality_rows_folded"] += folded
        return folded

    def _after_flush(self, final: bool) -> None:
        if not final or not self.quality_shared or self._quality is None:
            return
        sharer, self._quality_sharer = self._quality_sharer, None
        if sharer is not None:
            sharer.join(timeout=120)  # a write under way ends before the last one
        self.share_quality()

    def share_quality(self) -> int:
        """Add the samples counted since the last call to the shared buckets; returns
        the rows written (what failed is kept and written next time); 0 on SQLite."""
        if not self.quality_shared:
            return 0
        window = self.quality
        taken = window.take_pending()
        now_ms = self._now_ms()
        written = 0
        try:
            for lo in range(0, len(taken), _CHUNK):
                with self._engine.begin() as conn:
                    _write(conn, taken, lo, lo + _CHUNK)
                written = min(len(taken), lo + _CHUNK)
            with self._engine.begin() as conn:
                params = {"since": window.watched_ms, "now": now_ms, "gap": self._break_ms()}
                since = int(conn.exec_driver_sql(_SPAN, params).scalar_one())
                if time.monotonic() - self._quality_pruned > window.bucket_ms / 1000:
                    cutoff = now_ms - window.horizon_ms - window.bucket_ms
                    conn.exec_driver_sql(_PRUNE, (cutoff,))
                    self._quality_pruned = time.monotonic()
        except Exception:  # the raw cursor raises the driver's errors, not SQLAlchemy's
            window.restore(taken.rows()[written:])
            self.counters["quality_share_errors"] += 1
            if not self._quality_failing:  # once per change
                log.exception("writing the quality buckets failed; will retry")
            self._quality_failing = True
            return written
        if self._quality_failing:
            log.info("writing the quality buckets works again")
        self._quality_failing = False
        if self._quality_span_ok:
            window.adopt_since(since)
        self.counters["quality_rows_shared"] += written
        return written
