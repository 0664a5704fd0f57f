"""Connection ratios (联网设备总量 / 企业设备总量) and their scheduled snapshots.

Definitions (the API states the same):

- total: devices in the scope that are not decommissioned (ledger devices that never
  reported count);
- connected: devices in the scope whose last good sample is newer than
  ``as_of - window``;
- online: devices online at ``as_of``: agent alive, device state online, last sample
  no older than three poll intervals;
- ratio = connected / total, online_ratio = online / total (0 when total is 0).

A grouping is a few vectorised operations over the registry's in-memory index.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from gateway.influx import escape_key
from gateway.registry.codes import (
    category_label,
    family_label,
    industry_label,
    region_label,
    region_prefix_range,
)
from gateway.registry.index import GROUPINGS, NEVER, DeviceIndex, Grouping

__all__ = [
    "DEFINITIONS",
    "GROUPINGS",
    "Grouping",
    "HistoryGrouping",
    "Snapshotter",
    "code_mask",
    "compute_ratios",
    "enterprise_category_table",
    "filter_mask",
    "history_series",
    "line_protocol",
    "online_mask",
    "parse_as_of",
    "parse_window",
    "ratio",
]

log = logging.getLogger("iiot.gateway.ratios")

HistoryGrouping = Literal["overall", Grouping]
Mask = np.ndarray[Any, Any]
_WINDOW_RE = re.compile(r"^(\d{1,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_WINDOW_S = 366 * 86400

DEFINITIONS = (
    "**total** = devices in the scope that are not decommissioned (ledger devices that "
    "never reported count). **connected** (联网设备) = devices whose last good sample is "
    "newer than `as_of - window` (samples stamped after `as_of` count too, since agent "
    "clocks may run ahead). **online** = devices online at `as_of`: agent alive, device "
    "state online, and last sample no older than three poll intervals. **ratio** = "
    "connected / total; **online_ratio** = online / total; both 0 when total is 0. "
    "Regions roll up by GB/T 2260 code prefix: province = first 2 digits + 0000, city = "
    "first 4 + 00, county = all 6. `as_of` (Unix ms or ISO 8601; default now) fixes the "
    "reference time so the same data and `as_of` always give the same numbers; the "
    "population is the registry's current content."
)


def parse_window(text: str) -> int:
    """'15m', '24h', '7d' → seconds; ValueError naming the parameter."""
    m = _WINDOW_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"window {text!r} must be a number and a unit s/m/h/d, e.g. 24h")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if not 0 < seconds <= _MAX_WINDOW_S:
        raise ValueError(f"window {text!r} must be more than 0 and at most 366d")
    return seconds


def parse_as_of(text: str) -> int:
    """Unix milliseconds or an ISO 8601 time (UTC if no zone) → milliseconds."""
    value = text.strip()
    if value.isascii() and value.isdigit() and len(value) <= 15:
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"time {text!r} must be Unix milliseconds or ISO 8601, e.g. 2025-01-31T08:00:00Z"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        ms = int(dt.timestamp() * 1000)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"time {text!r} is out of range") from None
    if ms < 0:
        raise ValueError(f"time {text!r} is before 1970")
    return ms


def ratio(part: int, total: int, digits: int = 6) -> float:
    """``part / total`` rounded to ``digits`` decimals; 0 when ``total`` is 0."""
    return round(part / total, digits) if total else 0.0


def online_mask(idx: DeviceIndex, as_of_ms: int, freshness_ms: int) -> Mask:
    """Devices online at ``as_of_ms``: agent alive, state online, sample fresh."""
    n = idx.n
    # NEVER (-1) is below any threshold >= -1: a device that never sent is not fresh.
    fresh = idx.last_ts[:n] >= max(as_of_ms - freshness_ms, NEVER + 1)
    mask: Mask = idx.agent_alive[:n] & idx.dev_online[:n] & fresh
    return mask


def code_mask(idx: DeviceIndex, group: str, value: str) -> Mask:
    """Devices whose ``group`` column is ``value`` (none if the value never occurs)."""
    col, enc = idx.column(group)
    code = enc.codes.get(value)
    if code is None:
        return np.zeros(idx.n, np.bool_)
    mask: Mask = col == code
    return mask


def filter_mask(
    idx: DeviceIndex,
    *,
    enterprise: str | None = None,
    region: str | None = None,
    industry: str | None = None,
    category: str | None = None,
) -> Mask:
    """Scope filters as a boolean mask (call under ``reading``); ValueError if malformed."""
    n = idx.n
    mask = np.ones(n, np.bool_)
    if enterprise is not None:
        mask &= code_mask(idx, "enterprise", enterprise)
    if region is not None:
        lo, hi = region_prefix_range(region)
        col = idx.region_num[:n]
        mask &= (col >= lo) & (col < hi)
    if industry is not None:
        prefix = industry.strip().upper()
        codes = [c for v, c in idx.enc["industry"].codes.items() if v.startswith(prefix)]
        mask &= np.isin(idx.industry[:n], np.array(codes, np.int32))
    if category is not None:
        mask &= code_mask(idx, "category", category)
    return mask


def _group(key: str, label: str, total: int, connected: int, online: int) -> dict[str, Any]:
    return {
        "key": key,
        "label": label,
        "total": total,
        "connected": connected,
        "online": online,
        "ratio": ratio(connected, total),
        "online_ratio": ratio(online, total),
    }


def compute_ratios(
    registry: Any,
    group_by: str | None,
    *,
    window_s: int = 86400,
    as_of_ms: int | None = None,
    enterprise: str | None = None,
    region: str | None = None,
    industry: str | None = None,
    category: str | None = None,
) -> dict[str, Any]:
    """The ratios response: window_s, as_of, group_by, groups (sorted by key), overall.

    ``registry`` is a ``gateway.registry.Registry``; ValueError on a malformed filter.
    """
    if group_by is not None and group_by not in GROUPINGS:
        raise ValueError(f"group_by {group_by!r} must be one of {', '.join(GROUPINGS)}")
    as_of = int(time.time() * 1000) if as_of_ms is None else as_of_ms
    window_ms = window_s * 1000
    filters = {"enterprise": enterprise, "region": region, "industry": industry}
    filters["category"] = category
    with registry.reading() as idx:
        n = idx.n
        active = idx.active[:n]
        if any(v is not None for v in filters.values()):
            scope = filter_mask(idx, **filters) & active
        else:
            scope = active  # a view: never modified below
        # NEVER (-1) is below any threshold >= -1, so "never reported" needs no extra test.
        connected = idx.last_good[:n] > max(as_of - window_ms, NEVER)
        online = online_mask(idx, as_of, registry.freshness_ms)
        groups: list[dict[str, Any]] = []
        if group_by is None:
            overall = _group(
                "all",
                "全部 All",
                int(np.count_nonzero(scope)),
                int(np.count_nonzero(scope & connected)),
                int(np.count_nonzero(scope & online)),
            )
        else:
            col, enc = idx.column(group_by)
            k = max(1, len(enc))
            # One pass: each device adds 1 to slot (group, in scope, online, connected).
            slots = (
                (col << 3)
                | (scope.view(np.uint8) << 2)
                | (online.view(np.uint8) << 1)
                | connected.view(np.uint8)
            )
            c = np.bincount(slots, minlength=k * 8).reshape(-1, 8)[:, 4:]
            tot = c.sum(axis=1)
            con = c[:, 1] + c[:, 3]
            onl = c[:, 2] + c[:, 3]
            overall = _group("all", "全部 All", int(tot.sum()), int(con.sum()), int(onl.sum()))
            values = list(enc.values)
            names = (
                {e.id: e.name for e in registry.list_enterprises()}
                if group_by == "enterprise"
                else {}
            )
            for code in np.flatnonzero(tot):
                key = values[int(code)]
                groups.append(
                    _group(
                        key,
                        _label(group_by, key, names),
                        int(tot[code]),
                        int(con[code]),
                        int(onl[code]),
                    )
                )
    groups.sort(key=lambda g: g["key"])
    return {
        "window_s": window_s,
        "as_of": as_of,
        "group_by": group_by,
        "groups": groups,
        "overall": overall,
    }


def history_series(
    rows: Sequence[Any], *, step_s: int | None = None, key: str | None = None
) -> list[dict[str, Any]]:
    """Stored snapshot rows as series by key; with ``step_s``, the last point per step."""
    series: dict[str, dict[str, Any]] = {}
    for r in rows:
        if key is not None and r.key != key:
            continue
        s = series.setdefault(r.key, {"key": r.key, "label": r.label, "points": {}})
        bucket = r.ts_ms if step_s is None else r.ts_ms // (step_s * 1000)
        s["points"][bucket] = {
            "ts": r.ts_ms,
            "total": r.total,
            "connected": r.connected,
            "online": r.online,
            "ratio": ratio(r.connected, r.total),
            "online_ratio": ratio(r.online, r.total),
        }
    return [
        {"key": s["key"], "label": s["label"], "points": list(s["points"].values())}
        for s in sorted(series.values(), key=lambda s: s["key"])
    ]


def _label(group_by: str, key: str, names: dict[str, str]) -> str:
    if group_by == "enterprise":
        return names.get(key, key)
    if group_by in ("province", "city", "county"):
        return region_label(key)
    if group_by == "industry":
        return industry_label(key)
    if group_by == "category":
        return category_label(key)
    return family_label(key)


def enterprise_category_table(
    registry: Any, *, window_s: int = 86400, as_of_ms: int | None = None
) -> list[dict[str, Any]]:
    """Per enterprise and category: total and connected devices (the programmes' form)."""
    as_of = int(time.time() * 1000) if as_of_ms is None else as_of_ms
    with registry.reading() as idx:
        n = idx.n
        active = idx.active[:n]
        last_good = idx.last_good[:n]
        connected = active & (last_good > max(as_of - window_s * 1000, NEVER))
        ncat = max(1, len(idx.enc["category"]))
        combined = idx.ent[:n].astype(np.int64) * ncat + idx.category[:n]
        size = max(1, len(idx.enc["enterprise"]) * ncat)
        tot = np.bincount(combined[active], minlength=size)
        con = np.bincount(combined[connected], minlength=size)
        ents = list(idx.enc["enterprise"].values)
        cats = list(idx.enc["category"].values)
    by_id = {e.id: e for e in registry.list_enterprises()}
    rows = []
    for code in np.flatnonzero(tot):
        ent_id = ents[int(code) // ncat]
        ent = by_id.get(ent_id)
        rows.append(
            {
                "enterprise": ent_id,
                "name": ent.name if ent else ent_id,
                "region": ent.region if ent else "",
                "industry": ent.industry if ent else "",
                "category": cats[int(code) % ncat],
                "connected": int(con[code]),
                "total": int(tot[code]),
            }
        )
    rows.sort(key=lambda r: (r["enterprise"], r["category"]))
    return rows


def line_protocol(group_by: str, group: dict[str, Any], ts_ms: int) -> str:
    """One ``connection_ratio`` point (timestamp in ms)."""
    return (
        f"connection_ratio,group_by={escape_key(group_by)},key={escape_key(str(group['key']))}"
        f" total={group['total']}i,connected={group['connected']}i,online={group['online']}i,"
        f"ratio={float(group['ratio'])!r},online_ratio={float(group['online_ratio'])!r}"
        f" {ts_ms}"
    )


class Snapshotter:
    """Every ``interval`` seconds, stores the ratios (overall and per grouping).

    The registry keeps ``retention_days`` of snapshots; InfluxDB keeps its own.

    Snapshot times are aligned to multiples of the interval, so several gateway
    instances sharing one database write the same rows rather than near-duplicates.
    """

    def __init__(
        self,
        registry: Any,
        interval: float,
        write_lines: Callable[[list[str]], None],
        *,
        window_s: int = 86400,
        groupings: Sequence[str] = GROUPINGS,
        retention_days: float = 400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0:
            raise ValueError("snapshot interval must be more than 0 seconds")
        self.registry = registry
        self.interval = interval
        self.write_lines = write_lines
        self.window_s = window_s
        self.groupings = tuple(groupings)
        # Hourly snapshots of every enterprise add up (10⁴ enterprises: 10⁵ rows a day).
        self.retention_ms = int(retention_days * 86400_000)
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.errors = 0
        self.last_ts_ms: int | None = None

    def snapshot_once(self, ts_ms: int | None = None) -> int:
        """Take one snapshot now (or at ``ts_ms``); returns the number of groups stored."""
        if ts_ms is None:
            step = int(self.interval * 1000)
            ts_ms = int(self._clock() * 1000) // step * step
        rows: list[dict[str, Any]] = []
        lines: list[str] = []
        first = compute_ratios(self.registry, None, window_s=self.window_s, as_of_ms=ts_ms)
        rows.append({"group_by": "overall", **first["overall"]})
        lines.append(line_protocol("overall", first["overall"], ts_ms))
        for group_by in self.groupings:
            result = compute_ratios(self.registry, group_by, window_s=self.window_s, as_of_ms=ts_ms)
            for g in result["groups"]:
                rows.append({"group_by": group_by, **g})
                lines.append(line_protocol(group_by, g, ts_ms))
        self.registry.save_snapshot(ts_ms, self.window_s, rows)
        self.registry.prune_snapshots(ts_ms - self.retention_ms)
        self.write_lines(lines)
        self.runs += 1
        self.last_ts_ms = ts_ms
        counters = getattr(self.registry, "counters", None)
        if counters is not None:
            counters["ratio_snapshots"] += 1
        return len(rows)

    def _run(self) -> None:
        # Bounded by the stop event; a failing pass is counted and retried next time.
        wait = 0.0
        while not self._stop.wait(wait):
            started = time.monotonic()
            try:
                self.snapshot_once()
            except Exception:
                self.errors += 1
                counters = getattr(self.registry, "counters", None)
                if counters is not None:
                    counters["ratio_snapshot_errors"] += 1
                log.exception("ratio snapshot failed")
            wait = max(0.0, self.interval - (time.monotonic() - started))

    def start(self) -> None:
        if self._thread is not None:
            return
        starter = getattr(self.registry, "start", None)
        if callable(starter):
            starter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ratio-snapshots", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
