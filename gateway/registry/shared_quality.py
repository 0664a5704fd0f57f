"""The data-quality gate's buckets, shared through PostgreSQL by the gateway instances.

Each instance counts the samples it receives in its window's buckets (gateway.quality).
Every ``quality_share_interval`` its flush thread adds the samples counted since its
last write to the table ``quality_buckets`` (one row a device and bucket; batched
upserts in key order, a transaction a chunk), which also notes whether values differed
in the bucket; each refresh pass reads the rows written since its last (by transaction
id, as device rows: ``gateway.registry.changes``) and folds them into the window, so
every instance judges every instance's samples. A window starts with the table's
buckets, so a restarted instance judges what the others kept counting.

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
from gateway.registry.changes import Mark
from gateway.registry.store import RegistryStore

__all__ = ["SharedQualityPart"]

log = logging.getLogger("iiot.gateway.registry")

# Rows an upsert statement (and its transaction) writes: short enough that instances
# adding to the same rows wait little on each other.
_CHUNK = 20_000
# Rows read at a time when a window starts with the shared buckets.
_LOAD_CHUNK = 100_000
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


def _read(conn: sa.Connection, where: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    cur = _cursor(conn)
    try:
        cur.execute(f"SELECT {_COLUMNS} FROM quality_buckets WHERE {where}", params)
        rows: list[tuple[Any, ...]] = cur.fetchall()
    finally:
        cur.close()
    return rows


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
    _quality_loaded: threading.Event

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
        rows = 0
        try:
            with self._engine.connect() as conn:
                span = _span_row(conn)
                # A server-side cursor read in chunks: a day of buckets at province scale
                # is tens of millions of rows, never all in memory at once.
                dbapi = conn.connection.dbapi_connection
                cur = dbapi.cursor(name="quality_load")  # type: ignore[union-attr]
                try:
                    query = f"SELECT {_COLUMNS} FROM quality_buckets WHERE start_ms > %s"
                    cur.execute(query, (low,))
                    while chunk := cur.fetchmany(_LOAD_CHUNK):
                        # Folded a slice at a time: ingest records under the same lock.
                        for lo in range(0, len(chunk), _FOLD_SLICE):
                            window.fold(chunk[lo : lo + _FOLD_SLICE])
                        rows += len(chunk)
                finally:
                    cur.close()
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
        while not self._stop.wait(self.quality_share_interval):
            try:
                self.share_quality()
            except Exception:  # counted and logged in share_quality; never ends the loop
                log.exception("writing the quality buckets failed; will retry")

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

    def _read_shared(self, conn: sa.Connection, mark: Mark | None) -> Any:
        if mark is None or self._quality is None or not self.quality_shared:
            return None
        where = "updated_xid >= %s OR updated_xid = ANY(CAST(%s AS BIGINT[]))"
        return _read(conn, where, (mark.xmax, list(mark.xip))), _span_row(conn)

    def _apply_shared(self, read: Any) -> None:
        if read is None or self._quality is None:
            return
        rows, span = read
        self.counters["quality_rows_folded"] += self._quality.fold(rows)
        if (
            self._quality_span_ok
            and span is not None
            and span[1] >= self._now_ms() - self._break_ms()
        ):
            self._quality.adopt_since(span[0])
