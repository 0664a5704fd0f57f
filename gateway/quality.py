"""The data-quality gate and each device's recent telemetry, from a bounded in-memory window.

``connected`` asks only for one good sample in the window; a device that is up but
sends almost nothing, or the same values over and over, would count. The gate is
stricter (the API and the dashboard state the same):

- **quality_connected** = connected devices that, in the part of the window this
  gateway has watched (at most the last 24 h), sent at least ``min_share`` of their expected samples
  (watched span / poll interval) and whose values changed at least once (not
  *frozen*: identical values for the whole window).

Samples are counted in time buckets (at most ``_BUCKETS`` a device) and the latest
values of each message are kept for ``points`` messages a device (fewer when more
devices report than ``_POINTS_BUDGET / points``); both are bounded, and both start
empty when the gateway starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.sink import SampleSummary

__all__ = ["QUALITY_DEFINITION", "PointValue", "QualityWindow"]

PointValue = bool | int | float | str | None
_BUCKETS = 48
_MAX_DEVICES = 2_000_000
# Messages kept for telemetry charts across all devices: the per-device number shrinks
# as more devices report, so the memory stays bounded at province scale.
_POINTS_BUDGET = 2_000_000
_STATES = 50
_LIVE_S = 15.0

QUALITY_DEFINITION = (
    "**quality_connected** (数据质量达标) = connected devices that, over the part of the "
    "window this gateway has watched since it started, sent at least `min_share` of the "
    "samples their poll interval implies (watched span / `default_poll_interval`) and "
    "whose values changed at least once (a device sending the same values for the whole "
    "window is *frozen* and does not count). **quality_ratio** = quality_connected / total. "
    "For a query at the current time the gate's verdicts may be up to 15 s old."
)


@dataclass(slots=True)
class _Bucket:
    start_ms: int
    count: int
    first_fp: int
    varied: bool


class _Track:
    """One device's buckets, messages and state changes: plain lists (a deque costs
    some 600 bytes even empty, and a province has 10⁶ devices), trimmed as they grow."""

    __slots__ = ("buckets", "points", "states")

    def __init__(self) -> None:
        self.buckets: list[_Bucket] = []
        self.points: list[tuple[int, dict[str, PointValue]]] = []
        self.states: list[tuple[int, bool, str]] = []


def _trim(items: list[Any], keep: int) -> None:
    # Trimming only at twice the bound keeps appends amortised O(1).
    if len(items) > 2 * keep:
        del items[:-keep]


def _fingerprint(values: dict[str, PointValue]) -> int:
    # Point values are all hashable; an agent sends a device's points in one order.
    return hash(tuple(values.items()))


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
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._mask_cache: tuple[tuple[int, int, int], int, float, bool, Any] | None = None
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
            track = self._tracks[key] = _Track()
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
            last = track.buckets[-1] if track.buckets else None
            if last is not None and last.start_ms == start:
                last.count += summary.count
                last.varied = last.varied or fp != last.first_fp
            elif last is None or start > last.start_ms:
                track.buckets.append(_Bucket(start, summary.count, fp, False))
                _trim(track.buckets, _BUCKETS)
            else:
                # A late message for an older bucket: counted, never reordering the list.
                for b in track.buckets:
                    if b.start_ms == start:
                        b.count += summary.count
                        b.varied = b.varied or fp != b.first_fp
                        break
            if summary.latest:
                track.points.append((summary.last_ts, dict(summary.latest)))
                _trim(track.points, self._points_kept())

    def _span(self, as_of_ms: int, window_ms: int) -> tuple[int, int]:
        """(lowest bucket start counted, expected samples) of a window."""
        # Only what the buckets still hold can be judged: at most the last horizon.
        lo = max(as_of_ms - window_ms, self.started_ms, as_of_ms - self.horizon_ms)
        expected = max(1, (as_of_ms - lo) // self.poll_ms) if as_of_ms > lo else 1
        return lo - self.bucket_ms, int(expected)

    @staticmethod
    def _verdict(
        buckets: list[_Bucket], low: int, as_of_ms: int, need: float
    ) -> tuple[int, bool, bool]:
        """(samples, complete, frozen) from a device's buckets in (low, as_of]."""
        samples = 0
        first: int | None = None
        changed = False
        for b in buckets:
            if low < b.start_ms <= as_of_ms:
                samples += b.count
                if first is None:
                    first = b.first_fp
                changed = changed or b.varied or b.first_fp != first
        return samples, samples >= need, samples > 1 and not changed

    def judge(self, key: tuple[str, str], as_of_ms: int, window_ms: int) -> dict[str, Any]:
        """The gate's evidence for one device: samples, expected, frozen, passes."""
        low, expected = self._span(as_of_ms, window_ms)
        with self._lock:
            track = self._tracks.get(key)
            kept = track.buckets[-_BUCKETS:] if track else []
        need = self.min_share * expected
        samples, complete, frozen = self._verdict(kept, low, as_of_ms, need)
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
        # The gate costs a pass over every tracked device (seconds at 10⁶), so a mask
        # is reused: for the same as_of (a snapshot asks once per grouping and kind),
        # and for queries at "now" (as_of within _LIVE_S of the clock) for _LIVE_S.
        now = time.monotonic()
        live = abs(as_of_ms - self._clock() * 1000) <= _LIVE_S * 1000
        cached = self._mask_cache
        if cached is not None and cached[0] == (window_ms, n, id(positions)):
            age = now - cached[2]
            if (cached[1] == as_of_ms and age < _LIVE_S) or (live and cached[3] and age < _LIVE_S):
                return cached[4]
        out = np.zeros(n, np.bool_)
        low, expected = self._span(as_of_ms, window_ms)
        need = max(self.min_share * expected, 1)
        verdict = self._verdict
        with self._lock:
            tracked = list(self._tracks.items())
        # Reads lists the ingest thread appends to: a bucket added meanwhile is either
        # seen or not, which the next computation settles.
        for key, track in tracked:
            i = positions.get(key)
            if i is not None and i < n:
                _samples, complete, frozen = verdict(track.buckets, low, as_of_ms, need)
                out[i] = complete and not frozen
        self._mask_cache = ((window_ms, n, id(positions)), as_of_ms, now, live, out)
        return out

    def telemetry(self, key: tuple[str, str], from_ms: int) -> list[dict[str, Any]]:
        """The device's kept messages since ``from_ms``: ts and values, oldest first."""
        with self._lock:
            track = self._tracks.get(key)
            points = track.points[-self._points_kept() :] if track else []
        return [{"ts": ts, "values": v} for ts, v in points if ts >= from_ms]
