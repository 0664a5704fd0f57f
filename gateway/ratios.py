"""Connection ratios (联网设备总量 / 企业设备总量, 联网产品总量 / 生产产品总量), enterprises on
the cloud (上云企业数) against their targets, and the ratios' scheduled snapshots.

Definitions (the API states the same), over the devices of one kind — an enterprise's
production equipment (the default) or the products it made, counted in the maker's
region wherever they are installed:

- total: devices in the scope that are not decommissioned (ledger devices that never
  reported count);
- connected: devices in the scope whose last good sample is newer than
  ``as_of - window``;
- online: devices online at ``as_of``: agent alive, device state online, last sample
  no older than three poll intervals;
- ratio = connected / total, online_ratio = online / total (0 when total is 0);
- an enterprise is on the cloud when at least ``min_devices`` of its equipment is
  connected; progress = enterprises on the cloud / the region's target.

A grouping is a few vectorised operations over the registry's in-memory index.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal, get_args

import numpy as np

from gateway.influx import escape_key
from gateway.registry.codes import (
    category_label,
    family_label,
    industry_division,
    industry_label,
    region_label,
    region_prefix_range,
)
from gateway.registry.index import GROUPINGS, NEVER, DeviceIndex, Grouping, IndexView

__all__ = [
    "DEFINITIONS",
    "GROUPINGS",
    "KINDS",
    "ON_CLOUD_GROUPINGS",
    "FixedGate",
    "Grouping",
    "HistoryGrouping",
    "Kind",
    "OnCloudGrouping",
    "Snapshotter",
    "code_mask",
    "compute_on_cloud",
    "compute_ratios",
    "enterprise_category_table",
    "filter_mask",
    "history_series",
    "line_protocol",
    "on_cloud_definition",
    "online_mask",
    "parse_as_of",
    "parse_window",
    "quality_mask",
    "ratio",
    "report_year",
    "snapshot_rows",
    "target_region",
]

log = logging.getLogger("iiot.gateway.ratios")

HistoryGrouping = Literal["overall", Grouping]
Kind = Literal["equipment", "product"]
KINDS: tuple[Kind, ...] = get_args(Kind)
OnCloudGrouping = Literal["province", "city", "county", "industry"]
ON_CLOUD_GROUPINGS: tuple[OnCloudGrouping, ...] = get_args(OnCloudGrouping)
# Report years follow China Standard Time (UTC+8): a year starts at 1 January 00:00 there.
_CST = timezone(timedelta(hours=8))
Mask = np.ndarray[Any, Any]
# What the counting functions read: the registry's live index (under its lock) or a view.
Counted = DeviceIndex | IndexView
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
    "**kind**: the numbers are over one kind of device at a time — `equipment`, an "
    "enterprise's production equipment (联网设备总量 / 企业设备总量; the default), or "
    "`product`, the products it made (联网产品总量 / 生产产品总量), which count in the "
    "maker's region and industry wherever they are installed (`site_region`). "
    "Regions roll up by GB/T 2260 code prefix: province = first 2 digits + 0000, city = "
    "first 4 + 00, county = all 6. `as_of` (Unix ms or ISO 8601; default now) fixes the "
    "reference time so the same data and `as_of` always give the same numbers; the "
    "population is the registry's current content."
)


def on_cloud_definition(min_devices: int | None = None) -> str:
    """The definition of an enterprise on the cloud, with the gateway's threshold if known."""
    if min_devices is None:
        devices = "N devices (the response's `min_connected_devices`; default 1)"
    else:
        devices = "one device" if min_devices == 1 else f"{min_devices} devices"
    return (
        f"**on_cloud** (上云企业) = enterprises with at least {devices} of production "
        "equipment connected in the window (connected as above: a good sample newer than "
        "`as_of - window`, not decommissioned; products do not count; the threshold is the "
        "gateway config's `on_cloud.min_connected_devices`). **registered** = enterprises "
        "in the registry in the scope, by the enterprise's own region and industry. "
        "**ratio** = on_cloud / registered. **target**: the region's target of enterprises "
        "on the cloud for the year of `as_of` (China Standard Time; a target without a "
        "year applies to every year), set by the targets file or `PUT /api/v1/targets`; "
        "**progress** = on_cloud / target. Both are null where no target is set."
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


def online_mask(idx: Counted, as_of_ms: int, freshness_ms: int) -> Mask:
    """Devices online at ``as_of_ms``: agent alive, state online, sample fresh."""
    n = idx.n
    # NEVER (-1) is below any threshold >= -1: a device that never sent is not fresh.
    fresh = idx.last_ts[:n] >= max(as_of_ms - freshness_ms, NEVER + 1)
    mask: Mask = idx.agent_alive[:n] & idx.dev_online[:n] & fresh
    return mask


def code_mask(idx: Counted, group: str, value: str) -> Mask:
    """Devices whose ``group`` column is ``value`` (none if the value never occurs)."""
    col, enc = idx.column(group)
    code = enc.codes.get(value)
    if code is None:
        return np.zeros(idx.n, np.bool_)
    mask: Mask = col == code
    return mask


def filter_mask(
    idx: Counted,
    *,
    enterprise: str | None = None,
    region: str | None = None,
    industry: str | None = None,
    category: str | None = None,
    kind: str | None = None,
) -> Mask:
    """Scope filters as a boolean mask (of a view, or under ``reading``); ValueError if
    malformed.

    ``kind``: 'equipment' or 'product'; None keeps both.
    """
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
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
        product = idx.product[:n]
        mask &= product if kind == "product" else ~product
    return mask


def _group(
    key: str, label: str, total: int, connected: int, online: int, quality: int = 0
) -> dict[str, Any]:
    return {
        "key": key,
        "label": label,
        "total": total,
        "connected": connected,
        "quality_connected": quality,
        "online": online,
        "ratio": ratio(connected, total),
        "quality_ratio": ratio(quality, total),
        "online_ratio": ratio(online, total),
    }


def quality_mask(registry: Any, idx: Counted, as_of_ms: int, window_ms: int) -> Mask:
    """Devices passing the data-quality gate (see ``gateway.quality``); none without one."""
    window = getattr(registry, "quality", None)
    if window is None:
        return np.zeros(idx.n, np.bool_)
    mask: Mask = window.mask(idx.keys, idx.n, as_of_ms, window_ms)
    return mask


class _Verdicts:
    """The data-quality gate's verdicts taken once, answering as ``QualityWindow.mask``."""

    def __init__(self, passes: Mask) -> None:
        self._passes = passes

    def mask(self, _positions: Any, n: int, _as_of_ms: int, _window_ms: int) -> Mask:
        out = np.zeros(n, np.bool_)
        k = min(n, len(self._passes))
        out[:k] = self._passes[:k]
        return out


class FixedGate:
    """What the counting functions read of a registry besides the view, with the quality
    gate's verdicts fixed (``passes`` by view position; None: no gate): every grouping of
    a snapshot, its evidence and a recount of that evidence see the same verdicts."""

    def __init__(self, names: dict[str, str], freshness_ms: int, passes: Mask | None) -> None:
        self._names = names
        self.freshness_ms = freshness_ms
        self.quality = None if passes is None else _Verdicts(passes)

    def enterprise_names(self) -> dict[str, str]:
        return self._names


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
    kind: str = "equipment",
    view: IndexView | None = None,
) -> dict[str, Any]:
    """The ratios response: window_s, as_of, kind, group_by, groups (sorted by key), overall.

    ``registry`` is a ``gateway.registry.Registry``; counts over ``view`` (default: one
    taken now); ValueError on a malformed filter.
    """
    if group_by is not None and group_by not in GROUPINGS:
        raise ValueError(f"group_by {group_by!r} must be one of {', '.join(GROUPINGS)}")
    as_of = int(time.time() * 1000) if as_of_ms is None else as_of_ms
    window_ms = window_s * 1000
    filters = {"enterprise": enterprise, "region": region, "industry": industry}
    filters["category"] = category
    idx = registry.view() if view is None else view
    n = idx.n
    scope = filter_mask(idx, **filters, kind=kind) & idx.active[:n]
    # NEVER (-1) is below any threshold >= -1, so "never reported" needs no extra test.
    connected = idx.last_good[:n] > max(as_of - window_ms, NEVER)
    online = online_mask(idx, as_of, registry.freshness_ms)
    quality = connected & quality_mask(registry, idx, as_of, window_ms)
    groups: list[dict[str, Any]] = []
    if group_by is None:
        overall = _group(
            "all",
            "全部 All",
            int(np.count_nonzero(scope)),
            int(np.count_nonzero(scope & connected)),
            int(np.count_nonzero(scope & online)),
            int(np.count_nonzero(scope & quality)),
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
        qua = np.bincount(col[scope & quality], minlength=k)
        overall = _group(
            "all", "全部 All", int(tot.sum()), int(con.sum()), int(onl.sum()), int(qua.sum())
        )
        values = list(enc.values)
        names = registry.enterprise_names() if group_by == "enterprise" else {}
        for code in np.flatnonzero(tot):
            key = values[int(code)]
            groups.append(
                _group(
                    key,
                    _label(group_by, key, names),
                    int(tot[code]),
                    int(con[code]),
                    int(onl[code]),
                    int(qua[code]),
                )
            )
    groups.sort(key=lambda g: g["key"])
    return {
        "window_s": window_s,
        "as_of": as_of,
        "kind": kind,
        "group_by": group_by,
        "groups": groups,
        "overall": overall,
    }


def history_series(
    rows: Sequence[Any],
    *,
    step_s: int | None = None,
    key: str | None = None,
    kind: str = "equipment",
) -> list[dict[str, Any]]:
    """Stored snapshot rows as series by key; with ``step_s``, the last point per step."""
    series: dict[str, dict[str, Any]] = {}
    for r in rows:
        if key is not None and r.key != key:
            continue
        if kind == "product":
            total, connected, online = r.products_total, r.products_connected, r.products_online
            other = r.total
        else:
            total, connected, online, other = r.total, r.connected, r.online, r.products_total
        if total == 0 and other > 0:
            continue  # the group is in this snapshot for the other kind only
        s = series.setdefault(r.key, {"key": r.key, "label": r.label, "points": {}})
        bucket = r.ts_ms if step_s is None else r.ts_ms // (step_s * 1000)
        # Null in snapshots stored before the quality count was: not recorded, not 0.
        quality = r.products_quality_connected if kind == "product" else r.quality_connected
        s["points"][bucket] = {
            "ts": r.ts_ms,
            "total": total,
            "connected": connected,
            "quality_connected": quality,
            "online": online,
            "ratio": ratio(connected, total),
            "quality_ratio": None if quality is None else ratio(quality, total),
            "online_ratio": ratio(online, total),
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
    """Per enterprise and category: total and connected equipment, and the same over the
    enterprise's products (the programmes' form: 联网设备总量 / 企业设备总量 and
    联网产品总量 / 生产产品总量)."""
    as_of = int(time.time() * 1000) if as_of_ms is None else as_of_ms
    idx = registry.view()
    n = idx.n
    active = idx.active[:n]
    product = idx.product[:n]
    last_good = idx.last_good[:n]
    connected = active & (last_good > max(as_of - window_s * 1000, NEVER))
    ncat = max(1, len(idx.enc["category"]))
    combined = idx.ent[:n].astype(np.int64) * ncat + idx.category[:n]
    size = max(1, len(idx.enc["enterprise"]) * ncat)
    tot = np.bincount(combined[active & ~product], minlength=size)
    con = np.bincount(combined[connected & ~product], minlength=size)
    ptot = np.bincount(combined[active & product], minlength=size)
    pcon = np.bincount(combined[connected & product], minlength=size)
    ents = idx.enc["enterprise"].values
    cats = idx.enc["category"].values
    by_id = {e.id: e for e in registry.list_enterprises()}
    rows = []
    for code in np.flatnonzero(tot + ptot):
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
                "products_connected": int(pcon[code]),
                "products_total": int(ptot[code]),
            }
        )
    rows.sort(key=lambda r: (r["enterprise"], r["category"]))
    return rows


def line_protocol(group_by: str, group: dict[str, Any], ts_ms: int, kind: str = "equipment") -> str:
    """One ``connection_ratio`` point (``product_connection_ratio`` for products; ms)."""
    measurement = "product_connection_ratio" if kind == "product" else "connection_ratio"
    return (
        f"{measurement},group_by={escape_key(group_by)},key={escape_key(str(group['key']))}"
        f" total={group['total']}i,connected={group['connected']}i,online={group['online']}i,"
        f"ratio={float(group['ratio'])!r},online_ratio={float(group['online_ratio'])!r}"
        f" {ts_ms}"
    )


def report_year(as_of_ms: int) -> int:
    """The calendar year of ``as_of_ms`` in China Standard Time (targets are per year)."""
    try:
        return datetime.fromtimestamp(as_of_ms / 1000, _CST).year
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"as_of {as_of_ms} is out of range") from None


def target_region(region: str) -> str:
    """A region filter ('13', '1301', '130102') as the six-digit code its target is under."""
    return f"{region_prefix_range(region)[0]:06d}"


def _target_of(targets: Mapping[tuple[str, int], int], region: str, year: int) -> int | None:
    """The target of a region for a year; one set without a year (0) applies to any."""
    found = targets.get((region, year))
    return targets.get((region, 0)) if found is None else found


def _on_cloud_key(group_by: str, region: str, industry: str) -> str:
    if group_by == "province":
        return region[:2] + "0000"
    if group_by == "city":
        return region[:4] + "00"
    if group_by == "county":
        return region
    return industry_division(industry)


def _region_level(code: str) -> str:
    return "province" if code.endswith("0000") else "city" if code.endswith("00") else "county"


def _on_cloud_group(
    key: str, label: str, registered: int, on_cloud: int, target: int | None
) -> dict[str, Any]:
    return {
        "key": key,
        "label": label,
        "registered": registered,
        "on_cloud": on_cloud,
        "ratio": ratio(on_cloud, registered),
        "target": target,
        "progress": None if not target else ratio(on_cloud, target),
    }


def _connected_equipment(registry: Any, as_of: int, window_s: int) -> dict[str, int]:
    """Enterprise id → its equipment connected in the window (not decommissioned)."""
    idx = registry.view()
    n = idx.n
    equipment = idx.active[:n] & ~idx.product[:n]
    connected = equipment & (idx.last_good[:n] > max(as_of - window_s * 1000, NEVER))
    enc = idx.enc["enterprise"]
    counts = np.bincount(idx.ent[:n][connected], minlength=max(1, len(enc)))
    return {value: int(counts[code]) for code, value in enumerate(enc.values)}


def compute_on_cloud(
    registry: Any,
    group_by: str | None,
    *,
    targets: Mapping[tuple[str, int], int],
    window_s: int = 86400,
    as_of_ms: int | None = None,
    region: str | None = None,
    industry: str | None = None,
    min_devices: int = 1,
) -> dict[str, Any]:
    """Enterprises on the cloud overall and per group, with targets and progress.

    ``targets`` maps (six-digit region, year or 0 for every year) to a count. A region
    grouping also lists the regions in scope that have a target but no enterprise yet.
    ValueError on a malformed filter.
    """
    if group_by is not None and group_by not in ON_CLOUD_GROUPINGS:
        raise ValueError(f"group_by {group_by!r} must be one of {', '.join(ON_CLOUD_GROUPINGS)}")
    as_of = int(time.time() * 1000) if as_of_ms is None else as_of_ms
    year = report_year(as_of)
    lo, hi = region_prefix_range(region) if region is not None else (0, 10**6)
    prefix = industry.strip().upper() if industry is not None else ""
    connected = _connected_equipment(registry, as_of, window_s)
    counts: dict[str, list[int]] = {}
    registered = on_cloud = 0
    for ent in registry.list_enterprises():
        if not lo <= int(ent.region) < hi or not ent.industry.upper().startswith(prefix):
            continue
        up = connected.get(ent.id, 0) >= min_devices
        registered += 1
        on_cloud += up
        if group_by is not None:
            acc = counts.setdefault(_on_cloud_key(group_by, ent.region, ent.industry), [0, 0])
            acc[0] += 1
            acc[1] += up
    if group_by in ("province", "city", "county"):
        for code, y in targets:
            if y in (0, year) and _region_level(code) == group_by and lo <= int(code) < hi:
                counts.setdefault(code, [0, 0])
    groups = [
        _on_cloud_group(
            key,
            _label(str(group_by), key, {}),
            acc[0],
            acc[1],
            _target_of(targets, key, year) if group_by != "industry" else None,
        )
        for key, acc in sorted(counts.items())
    ]
    overall_target = _target_of(targets, target_region(region), year) if region else None
    return {
        "window_s": window_s,
        "as_of": as_of,
        "year": year,
        "min_connected_devices": min_devices,
        "group_by": group_by,
        "groups": groups,
        "overall": _on_cloud_group("all", "全部 All", registered, on_cloud, overall_target),
    }


def _empty_row(group_by: str, group: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"group_by": group_by, "key": group["key"], "label": group["label"]}
    for field in _SNAPSHOT_FIELDS:
        row[field] = row["products_" + field] = 0
    return row


# What a snapshot row stores of each kind (products' with the prefix ``products_``).
_SNAPSHOT_FIELDS = ("total", "connected", "online", "quality_connected")


def snapshot_rows(
    registry: Any,
    view: IndexView,
    *,
    ts_ms: int,
    window_s: int,
    groupings: Sequence[str] = GROUPINGS,
) -> tuple[list[dict[str, Any]], list[str]]:
    """What a snapshot at ``ts_ms`` stores, counted over ``view``: one row per group
    (overall, then each grouping; equipment and products side by side) and its points
    in line protocol. A stored report is verified by calling this again over its
    evidence."""
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for group_by in (None, *groupings):
        by_key: dict[str, dict[str, Any]] = {}
        name = "overall" if group_by is None else group_by
        for kind in KINDS:
            result = compute_ratios(
                registry, group_by, window_s=window_s, as_of_ms=ts_ms, kind=kind, view=view
            )
            groups = [result["overall"]] if group_by is None else result["groups"]
            for g in groups:
                row = by_key.setdefault(g["key"], _empty_row(name, g))
                prefix = "products_" if kind == "product" else ""
                for field in _SNAPSHOT_FIELDS:
                    row[prefix + field] = g[field]
                if group_by is None and kind == "product" and g["total"] == 0:
                    continue  # no products anywhere: no product series either
                lines.append(line_protocol(name, g, ts_ms, kind))
        rows.extend(by_key[k] for k in sorted(by_key))
    return rows, lines


class Snapshotter:
    """Every ``interval`` seconds, stores the ratios (overall and per grouping).

    The registry keeps ``retention_days`` of snapshots; InfluxDB keeps its own. Each
    snapshot's evidence (the devices it counted) is kept ``evidence_days``, and the
    first snapshot's of each day (China Standard Time) ``evidence_daily_days``.

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
        evidence_days: float = 7.0,
        evidence_daily_days: float = 400.0,
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
        # Evidence is 4-13 bytes a device a snapshot: hourly at 10⁶ devices, up to 300 MB a
        # day, hence a short retention of all and a long one of one a day.
        self.evidence_ms = int(evidence_days * 86400_000)
        self.evidence_daily_ms = int(evidence_daily_days * 86400_000)
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.errors = 0
        self.last_ts_ms: int | None = None

    def snapshot_once(self, ts_ms: int | None = None) -> int:
        """Take one snapshot now (or at ``ts_ms``); returns the number of groups stored."""
        from gateway.provincial import snapshot_evidence

        if ts_ms is None:
            step = int(self.interval * 1000)
            ts_ms = int(self._clock() * 1000) // step * step
        view = self.registry.view()  # every grouping, and the evidence, count the same devices
        # ... with the same quality verdicts, though the gate's may change while counting.
        gate = quality_mask(self.registry, view, ts_ms, self.window_s * 1000)
        source = FixedGate(self.registry.enterprise_names(), self.registry.freshness_ms, gate)
        rows, lines = snapshot_rows(
            source, view, ts_ms=ts_ms, window_s=self.window_s, groupings=self.groupings
        )
        # What this snapshot counted, so GET /api/v1/reports/verify can count it again.
        audit, evidence = snapshot_evidence(
            source, view, ts_ms=ts_ms, window_s=self.window_s, groupings=self.groupings
        )
        self.registry.save_snapshot(ts_ms, self.window_s, rows, audit=audit, evidence=evidence)
        self.registry.prune_snapshots(ts_ms - self.retention_ms)
        self.registry.prune_snapshot_evidence(
            ts_ms - self.evidence_ms, ts_ms - self.evidence_daily_ms
        )
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
