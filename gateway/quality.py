"""The data-quality gate and each device's recent telemetry, from a bounded in-memory window.

``connected`` asks only for one good sample in the window; a device that is up but
sends almost nothing, or the same values over and over, would count. The gate is
stricter (the API and the dashboard state the same):

- **quality_connected** = connected devices that, in the watched part of the window
  (at most the last 24 h), sent at least ``min_share`` of their expected samples
  (watched span / poll interval) and whose values changed at least once (not
  *frozen*: identical values for the whole window).

Samples are counted in time buckets (at most ``_BUCKETS`` a device) and the latest
values of each message are kept for ``points`` messages a device (fewer when more
devices report than ``_POINTS_BUDGET / points``); both are bounded.

Gateway instances sharing a PostgreSQL database share the buckets: each adds the counts
it took since its last write to the database's (``take_pending``), and folds in what
the database holds (``fold``), so every instance judges every instance's samples. The
watched span then starts when the instances sharing the database last began counting
without a break (``adopt_since``), not when this one started. Alone, or on SQLite, the
buckets and the messages start empty when the gateway starts.
"""

from __future__ import annotations

import marshal
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gateway.sink import SampleSummary

__all__ = ["QUALITY_DEFINITION", "PendingCounts", "PointValue", "QualityWindow"]

PointValue = bool | int | float | str | None
_BUCKETS = 48
_MAX_DEVICES = 2_000_000
# Messages kept for telemetry charts across all devices: the per-device number shrinks
# as more devices report, so the memory stays bounded at province scale.
_POINTS_BUDGET = 2_000_000
_STATES = 50
_LIVE_S = 15.0

QUALITY_DEFINITION = (
    "**quality_connected** (数据质量达标) = connected devices that, over the watched part "
    "of the window (at most the last 24 h), sent at least `min_share` of the samples their "
    "poll interval implies (watched span / `default_poll_interval`) and whose values "
    "changed at least once (a device sending the same values for the whole window is "
    "*frozen* and does not count). **quality_ratio** = quality_connected / total. The "
    "samples counted are those every gateway instance sharing the PostgreSQL database "
    "received; the watched span starts when those instances last began counting without "
    "a break (a break: none of them writing its counts for 3 × "
    "`registry.quality_share_interval` + 30 s), so an instance that restarts judges what "
    "the others kept counting. With one instance on SQLite it "
    "starts when that instance started. For a query at the current time the gate's "
    "verdicts may be up to 15 s old, and other instances' samples arrive within "
    "`registry.quality_share_interval` + `registry.refresh_interval`."
)


class _Track:
    """One device's bucket rows (in ``_Buckets``, oldest first), messages and state
    changes: plain lists (a deque costs some 600 bytes even empty, and a province has
    10⁶ devices), trimmed as they grow."""

    __slots__ = ("points", "rows", "slot", "states")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.rows: list[int] = []
        self.points: list[tuple[int, dict[str, PointValue]]] = []
        self.states: list[tuple[int, bool, str]] = []


class _Buckets:
    """Every tracked device's sample-count buckets as flat columns (a row a bucket), so
    that judging 10⁶ devices is a few numpy passes rather than a Python loop.

    Per row: the device's slot, the bucket's start, its sample count, the fingerprint of
    its first message's values, and whether a later one differed; of the count, the
    samples not yet added to the shared database's (``pending``), and whether the row
    changed since it was last written there (``dirty``). Rows a track no longer lists
    are garbage; ``compact`` drops them once they outnumber the rest.
    """

    _COLUMNS = ("slot", "start", "count", "fp", "varied", "pending", "dirty")

    def __init__(self, capacity: int = 1024) -> None:
        self.used = 0
        self.live = 0
        self.slot = np.zeros(capacity, np.int64)
        self.start = np.zeros(capacity, np.int64)
        self.count = np.zeros(capacity, np.int64)
        self.fp = np.zeros(capacity, np.int64)
        self.varied = np.zeros(capacity, np.bool_)
        self.pending = np.zeros(capacity, np.int64)
        self.dirty = np.zeros(capacity, np.bool_)

    def append(self, slot: int, start: int, count: int, fp: int) -> int:
        """A new row; returns its number. The caller compacts first when ``full``."""
        j = self.used
        if j == len(self.start):
            self._resize(2 * j)
        self.slot[j], self.start[j], self.count[j], self.fp[j] = slot, start, count, fp
        self.varied[j] = self.dirty[j] = False
        self.pending[j] = 0
        self.used = j + 1
        self.live += 1
        return j

    @property
    def full(self) -> bool:
        return self.used == len(self.start)

    def _resize(self, capacity: int) -> None:
        for name in self._COLUMNS:
            old = getattr(self, name)
            new = np.zeros(capacity, old.dtype)
            new[: self.used] = old[: self.used]
            setattr(self, name, new)

    def compact(self, tracks: list[_Track]) -> None:
        """Keep only the rows the tracks list, renumbering them (call under the lock).

        New arrays, not rewritten ones: a judgement under way keeps reading the old.
        """
        keep = [j for track in tracks for j in track.rows]
        order = np.array(keep, np.int64)
        for name in self._COLUMNS:
            column = getattr(self, name)
            new = np.zeros(max(1024, 2 * len(keep)), column.dtype)
            new[: len(keep)] = column[order]
            setattr(self, name, new)
        k = 0
        for track in tracks:
            m = len(track.rows)
            track.rows = list(range(k, k + m))
            k += m
        self.used = self.live = len(keep)


_I64_MIN = np.iinfo(np.int64).min


def _trim(items: list[Any], keep: int) -> None:
    # Trimming only at twice the bound keeps appends amortised O(1).
    if len(items) > 2 * keep:
        del items[:-keep]


def _fingerprint(values: dict[str, PointValue]) -> int:
    # The same in every process (instances compare each other's): Python's hash of a
    # string or None is not. marshal's version 2 writes no back-references, so equal
    # values give equal bytes; an agent sends a device's points in one order.
    return zlib.crc32(marshal.dumps(tuple(values.items()), 2))


class PendingCounts:
    """Bucket rows taken for writing to the shared database, as columns in key order."""

    __slots__ = ("count", "device", "enterprise", "fp", "start", "varied")

    def __init__(
        self,
        keys: list[tuple[str, str]],
        start: list[int],
        count: list[int],
        fp: list[int],
        varied: list[bool],
    ) -> None:
        self.enterprise = [k[0] for k in keys]
        self.device = [k[1] for k in keys]
        self.start, self.count, self.fp, self.varied = start, count, fp, varied

    def __len__(self) -> int:
        return len(self.start)

    def rows(self) -> list[tuple[str, str, int, int, int, bool]]:
        """(enterprise, device, start, count, fp, varied) a row."""
        cols = (self.enterprise, self.device, self.start, self.count, self.fp, self.varied)
        return list(zip(*cols, strict=True))


class QualityWindow:
    """Per device: sample counts in time buckets and the latest values of recent messages.

    ``horizon_s`` is the longest window the gate can judge; ``points`` the messages kept
    a device for its telemetry chart.
    """

    def __init__(
        self,
        *,
        horizon_s: int = 86400,
        points: int = 360,
        min_share: float = 0.8,
        poll_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < min_share <= 1:
            raise ValueError("quality min_share must be more than 0 and at most 1")
        self.horizon_ms = horizon_s * 1000
        self.bucket_ms = max(10_000, self.horizon_ms // _BUCKETS)
        self.points = points
        self.min_share = min_share
        self.poll_ms = int(poll_interval_s * 1000)
        self.started_ms = int(clock() * 1000)
        # Where the watched span starts: this instance's start, or earlier when instances
        # sharing the database have been counting since (``adopt_since``).
        self.watched_ms = self.started_ms
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._keys: list[tuple[str, str]] = []  # by slot
        self._buckets = _Buckets()
        self._lock = threading.Lock()
        self._clock = clock
        self._mask_cache: tuple[tuple[int, int, int], int, float, bool, Any] | None = None
        # Slot → index position, for the positions mapping of id ``_pos_of``.
        self._pos_of = 0
        self._slot_pos = np.zeros(0, np.int64)
        self.dropped = 0

    def configure(self, *, min_share: float, points: int) -> None:
        """Change the gate's share and the messages kept (for devices tracked from now)."""
        if not 0 < min_share <= 1:
            raise ValueError("quality min_share must be more than 0 and at most 1")
        self.min_share = min_share
        self.points = points

    def _points_kept(self) -> int:
        """Messages kept a device: ``points``, less when many devices share the budget."""
        return max(2, min(self.points, _POINTS_BUDGET // max(1, len(self._tracks))))

    def _track(self, key: tuple[str, str]) -> _Track | None:
        track = self._tracks.get(key)
        if track is None:
            if len(self._tracks) >= _MAX_DEVICES:
                self.dropped += 1
                return None
            track = self._tracks[key] = _Track(len(self._keys))
            self._keys.append(key)
        return track

    def record_state(self, key: tuple[str, str], ts_ms: int, online: bool, reason: str) -> None:
        """Keep a change of the device's online state (the last ``_STATES`` a device)."""
        with self._lock:
            track = self._track(key)
            if track is None:
                return
            if track.states and track.states[-1][1:] == (online, reason):
                return  # a repeated state is not a change
            track.states.append((ts_ms, online, reason))
            _trim(track.states, _STATES)

    def states(self, key: tuple[str, str]) -> list[dict[str, Any]]:
        """The device's kept state changes, newest first."""
        with self._lock:
            track = self._tracks.get(key)
            kept = track.states[-_STATES:] if track else []
        return [{"ts": ts, "online": on, "reason": why} for ts, on, why in reversed(kept)]

    def record(self, summary: SampleSummary) -> None:
        """Count one data message of a known device."""
        key = (summary.enterprise, summary.device)
        fp = _fingerprint(summary.latest) if summary.latest else 0
        start = summary.last_ts // self.bucket_ms * self.bucket_ms
        with self._lock:
            track = self._track(key)
            if track is None:
                return
            self._count(track, start, summary.count, fp)
            if summary.latest:
                track.points.append((summary.last_ts, dict(summary.latest)))
                _trim(track.points, self._points_kept())

    def _count(self, track: _Track, start: int, count: int, fp: int) -> None:
        """Add ``count`` samples to the track's bucket at ``start`` (under the lock)."""
        b = self._buckets
        j = self._row(track, start, fp)
        if b.start[j] == _I64_MIN:
            return  # older than every bucket kept
        b.count[j] += count
        b.pending[j] += count
        b.dirty[j] = True
        if fp != b.fp[j]:
            b.varied[j] = True

    def _row(self, track: _Track, start: int, fp: int) -> int:
        """The track's row of the bucket at ``start``, made (empty, first values ``fp``)
        where there is none; the list stays oldest first (under the lock)."""
        b = self._buckets
        rows = track.rows
        k = len(rows)
        # Nearly always the newest bucket; a late message or another instance's row
        # may be for an older one.
        while k and b.start[rows[k - 1]] > start:
            k -= 1
        if k and b.start[rows[k - 1]] == start:
            return rows[k - 1]
        if b.full and b.live <= b.used // 2:
            b.compact(list(self._tracks.values()))
            rows = track.rows
        j = b.append(track.slot, start, 0, fp)
        rows.insert(k, j)
        if len(rows) > 2 * _BUCKETS:  # trimming at twice the bound: O(1) amortised
            b.live -= len(rows) - _BUCKETS
            old = rows[:-_BUCKETS]
            b.start[old] = _I64_MIN  # in no window any more
            b.dirty[old] = False
            del rows[:-_BUCKETS]
        return j

    def take_pending(self) -> PendingCounts:
        """The rows changed since last taken, with the samples not yet written (their
        ``count``), now noted as written; ``restore`` them if the write fails."""
        b = self._buckets
        with self._lock:
            used = b.used
            rows = np.flatnonzero(b.dirty[:used])
            slots, start = b.slot[rows], b.start[rows]
            count, fp, varied = b.pending[rows], b.fp[rows], b.varied[rows]
            b.pending[rows] = 0
            b.dirty[rows] = False
            keys = self._keys
            taken = [keys[s] for s in slots.tolist()]
        # Every instance writes in one order (by key), so two writes never wait on
        # each other's rows in opposite orders.
        starts = start.tolist()
        order = sorted(range(len(taken)), key=lambda k: (taken[k], starts[k]))
        pick = np.array(order, np.int64)
        return PendingCounts(
            [taken[k] for k in order],
            [starts[k] for k in order],
            count[pick].tolist(),
            fp[pick].tolist(),
            varied[pick].tolist(),
        )

    def restore(self, rows: list[tuple[str, str, int, int, int, bool]]) -> None:
        """Put back as not written rows of ``take_pending`` whose write failed."""
        b = self._buckets
        with self._lock:
            for ent, dev, start, count, fp, _varied in rows:
                track = self._tracks.get((ent, dev))
                if track is None:
                    continue
                j = self._row(track, start, fp)
                if b.start[j] != _I64_MIN:
                    b.pending[j] += count
                    b.dirty[j] = True

    def fold(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Take the shared database's bucket rows (enterprise, device, start, count, fp,
        varied): counts that include what other instances added; returns the rows taken.

        The database's count of a bucket includes every sample this instance wrote to it,
        and never goes back: the bucket counts the larger of it and what this instance
        knew, plus what it has not written yet. A row read before a write of this
        instance committed is read again after it (by transaction id), so counts that
        lag catch up with the next read.
        """
        b = self._buckets
        low = int(self._clock() * 1000) - self.horizon_ms - self.bucket_ms
        taken = 0
        with self._lock:
            for ent, dev, start, count, fp, varied in rows:
                if start <= low:
                    continue
                track = self._track((ent, dev))
                if track is None:
                    continue
                j = self._row(track, start, fp)
                if b.start[j] == _I64_MIN:
                    continue
                pending = int(b.pending[j])
                if count > b.count[j] - pending:
                    b.count[j] = count + pending
                if varied or fp != b.fp[j]:
                    b.varied[j] = True
                taken += 1
        return taken

    def adopt_since(self, since_ms: int) -> None:
        """Instances sharing the database have counted without a break since ``since_ms``."""
        self.watched_ms = min(self.started_ms, since_ms)

    def _span(self, as_of_ms: int, window_ms: int) -> tuple[int, int]:
        """(lowest bucket start counted, expected samples) of a window."""
        # Only what the buckets still hold can be judged: at most the last horizon.
        lo = max(as_of_ms - window_ms, self.watched_ms, as_of_ms - self.horizon_ms)
        expected = max(1, (as_of_ms - lo) // self.poll_ms) if as_of_ms > lo else 1
        return lo - self.bucket_ms, int(expected)

    def judge(self, key: tuple[str, str], as_of_ms: int, window_ms: int) -> dict[str, Any]:
        """The gate's evidence for one device: samples, expected, frozen, passes."""
        low, expected = self._span(as_of_ms, window_ms)
        b = self._buckets
        with self._lock:
            track = self._tracks.get(key)
            kept = track.rows[-_BUCKETS:] if track else []
            rows = [j for j in kept if low < b.start[j] <= as_of_ms]
            samples = sum(int(b.count[j]) for j in rows)
            varied = any(b.varied[j] for j in rows) or len({int(b.fp[j]) for j in rows}) > 1
        complete = samples >= self.min_share * expected
        frozen = samples > 1 and not varied
        return {
            "samples": samples,
            "expected": expected,
            "complete": complete,
            "frozen": frozen,
            "passes": complete and not frozen and samples > 0,
        }

    def mask(
        self, positions: dict[tuple[str, str], int], n: int, as_of_ms: int, window_ms: int
    ) -> Any:
        """Devices that pass the gate, as a mask by index position (``positions``: key → i)."""
        # For the same as_of (a snapshot asks once per grouping and kind), and for
        # queries at "now" (as_of within _LIVE_S of the clock) for _LIVE_S, a mask is
        # reused: the verdicts change slowly, and a million devices take a while.
        now = time.monotonic()
        live = abs(as_of_ms - self._clock() * 1000) <= _LIVE_S * 1000
        cached = self._mask_cache
        if cached is not None and cached[0] == (window_ms, n, id(positions)):
            age = now - cached[2]
            if (cached[1] == as_of_ms and age < _LIVE_S) or (live and cached[3] and age < _LIVE_S):
                return cached[4]
        low, expected = self._span(as_of_ms, window_ms)
        need = max(self.min_share * expected, 1)
        passes = self._judge_all(low, as_of_ms, need)
        pos = self._positions(positions, len(passes))
        hit = pos[passes]
        out = np.zeros(n, np.bool_)
        out[hit[(hit >= 0) & (hit < n)]] = True
        self._mask_cache = ((window_ms, n, id(positions)), as_of_ms, now, live, out)
        return out

    def _judge_all(self, low: int, as_of_ms: int, need: float) -> Any:
        """Whether each slot's device passes over the buckets in (low, as_of]."""
        b = self._buckets
        with self._lock:
            # Views of the current arrays: rows appended meanwhile are not counted, a
            # count moving meanwhile is read before or after; either is settled next time.
            used, slots = b.used, len(self._keys)
            slot, start, count = b.slot[:used], b.start[:used], b.count[:used]
            fp, varied = b.fp[:used], b.varied[:used]
        valid = (start > low) & (start <= as_of_ms)
        s = slot[valid]
        samples = np.bincount(s, weights=count[valid], minlength=slots)
        # Values changed in the window if a bucket saw two, or two buckets' first values
        # differ: compare each with one of its device's (whichever a repeated index
        # assignment leaves; any will do).
        firsts = fp[valid]
        ref = np.zeros(slots, np.int64)
        ref[s] = firsts
        differs = s[(firsts != ref[s]) | varied[valid]]
        changed = np.bincount(differs, minlength=slots) > 0
        frozen = (samples > 1) & ~changed
        passes: Any = (samples >= need) & ~frozen
        return passes

    def _positions(self, positions: dict[tuple[str, str], int], slots: int) -> Any:
        """Index position of each slot's device (-1: not in ``positions``)."""
        with self._lock:
            keys = self._keys[:slots]
        if self._pos_of != id(positions):
            self._pos_of, self._slot_pos = id(positions), np.zeros(0, np.int64)
        old = self._slot_pos[:slots]
        # Only slots new since the last time, or whose device was not indexed then.
        new = np.fromiter((positions.get(k, -1) for k in keys[len(old) :]), np.int64)
        pos = np.concatenate([old, new])
        for k in np.flatnonzero(old == -1):
            pos[k] = positions.get(keys[k], -1)
        self._slot_pos = pos
        return pos

    def telemetry(self, key: tuple[str, str], from_ms: int) -> list[dict[str, Any]]:
        """The device's kept messages since ``from_ms``: ts and values, oldest first."""
        with self._lock:
            track = self._tracks.get(key)
            points = track.points[-self._points_kept() :] if track else []
        return [{"ts": ts, "values": v} for ts, v in points if ts >= from_ms]
