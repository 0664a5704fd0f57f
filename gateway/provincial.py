"""The provincial platform's checks: ledger reconciliation, graded evaluation against a
rubric, and the versions that make a stored report verifiable.

- **Reconciliation** (台账核对) lists, at ``as_of``: devices that report but are not in
  the ledger; ledger devices never seen; devices seen before but not within the window;
  serial numbers (the ledger's optional ``serial``) claimed by more than one enterprise.
- **Grades** (分级分类评价): each enterprise's production equipment measured against
  the rubric's levels (``gateway/rubrics/default.yaml``), with the evidence.
- **Verification**: a stored snapshot keeps its evidence (``gateway.evidence``: each
  device it counted, with its ledger fields, last good sample, online state and whether
  it counted as quality_connected) and
  records ``registry_version``, the hash of that evidence, and ``DEFINITIONS_VERSION``,
  the hash of the definitions. ``verify_report`` checks the evidence against the hash,
  counts it again through the same arithmetic as the live ratios
  (``gateway.ratios.snapshot_rows``) and compares every stored row; separately it says
  how the registry, read now for the same ``as_of``, differs from the evidence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.control import tables as ct
from gateway.evidence import (
    DICT_COLUMNS,
    ENCODINGS,
    Evidence,
    EvidenceError,
    compress,
    decode,
    decompress,
    digest,
    encode,
    from_columns,
)
from gateway.quality import QUALITY_DEFINITION
from gateway.ratios import (
    DEFINITIONS,
    GROUPINGS,
    FixedGate,
    online_mask,
    quality_mask,
    ratio,
    snapshot_rows,
)
from gateway.registry.codes import region_label, region_prefix_range
from gateway.registry.index import NEVER, DeviceIndex, IndexView
from iiot_common.yamlfile import YamlFileError, read_yaml

__all__ = [
    "DEFINITIONS_VERSION",
    "EVIDENCE_HEADER",
    "Rubric",
    "RubricError",
    "RubricLevel",
    "default_rubric",
    "evidence_rows",
    "evidence_states",
    "grade_enterprises",
    "load_evidence",
    "load_rubric",
    "reconcile",
    "recount",
    "registry_changes",
    "snapshot_evidence",
    "verify_report",
]

DEFINITIONS_VERSION = hashlib.sha256(
    (DEFINITIONS + "\n" + QUALITY_DEFINITION).encode("utf-8")
).hexdigest()[:16]


class RubricError(ValueError):
    """A rubric file that cannot be used; the message names the file and the entry."""


class RubricLevel(BaseModel):
    """One level and the criteria an enterprise must meet for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: str = Field(min_length=1, max_length=16)
    label: str = Field(default="", max_length=200)
    min_connected: int | None = Field(default=None, ge=0)
    min_ratio: float | None = Field(default=None, ge=0, le=1)
    all_categories: bool = False
    min_quality_ratio: float | None = Field(default=None, ge=0, le=1)
    control_in_use: bool = False


class Rubric(BaseModel):
    """A province's rubric: levels from the lowest to the highest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="", max_length=200)
    levels: list[RubricLevel] = Field(min_length=1, max_length=20)


def load_rubric(path: Path | str) -> Rubric:
    """Read a rubric YAML file; RubricError naming the file and the entry."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except YamlFileError as exc:
        raise RubricError(f"{path}: {exc}") from exc
    try:
        rubric = Rubric.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise RubricError(f"{path}: {where}: {msg}") from None
    names = [lv.level for lv in rubric.levels]
    if len(set(names)) != len(names):
        raise RubricError(f"{path}: levels: a level is named twice")
    return rubric


def default_rubric() -> Rubric:
    """The rubric shipped with the gateway (``gateway/rubrics/default.yaml``)."""
    with resources.as_file(resources.files("gateway") / "rubrics" / "default.yaml") as p:
        return load_rubric(p)


def _device_item(registry: Any, idx: Any, i: int, names: dict[str, str]) -> dict[str, Any]:
    m = idx.meta[i]
    last = int(idx.last_ts[i])
    return {
        "enterprise": m.enterprise,
        "enterprise_name": names.get(m.enterprise, m.enterprise),
        "device_id": m.id,
        "name": m.name,
        "region": m.region,
        "region_label": region_label(m.region),
        "kind": m.kind,
        "agent": m.agent,
        "last_seen_ms": None if last == NEVER else last,
    }


def reconcile(registry: Any, *, as_of_ms: int, window_s: int, limit: int = 1000) -> dict[str, Any]:
    """The four lists of the ledger reconciliation at ``as_of_ms`` (see the module doc);
    each list keeps its first ``limit`` entries, ``counts`` counts them all."""
    names = {e.id: e.name for e in registry.list_enterprises()}
    since = as_of_ms - window_s * 1000
    not_in_ledger: list[dict[str, Any]] = []
    never_seen: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    with registry.reading() as idx:
        for i in range(idx.n):
            if not idx.active[i]:
                continue
            m = idx.meta[i]
            last = int(idx.last_ts[i])
            if m.not_in_ledger:
                not_in_ledger.append(_device_item(registry, idx, i, names))
            elif last == NEVER:
                never_seen.append(_device_item(registry, idx, i, names))
            if last != NEVER and last <= since:
                stale.append(_device_item(registry, idx, i, names))
    claims: dict[str, list[dict[str, str]]] = {}
    for (ent, dev), serial in sorted(registry.serials().items()):
        claims.setdefault(serial, []).append(
            {"enterprise": ent, "enterprise_name": names.get(ent, ent), "device_id": dev}
        )
    duplicates = [
        {"serial": serial, "claims": found}
        for serial, found in sorted(claims.items())
        if len({c["enterprise"] for c in found}) > 1
    ]
    return {
        "as_of": as_of_ms,
        "window_s": window_s,
        "limit": limit,
        "not_in_ledger": not_in_ledger[:limit],
        "never_seen": never_seen[:limit],
        "not_seen_in_window": stale[:limit],
        "duplicate_serials": duplicates[:limit],
        "counts": {
            "not_in_ledger": len(not_in_ledger),
            "never_seen": len(never_seen),
            "not_seen_in_window": len(stale),
            "duplicate_serials": len(duplicates),
        },
    }


def _control_in_use(registry: Any, as_of_ms: int) -> dict[str, dict[str, int]]:
    """Enterprise → applied remote configurations and successful writes up to ``as_of``."""
    out: dict[str, dict[str, int]] = {}
    cr, wa = ct.config_reports.c, ct.write_audit.c
    with registry.engine.connect() as conn:
        configs = conn.execute(
            sa.select(cr.enterprise, sa.func.count())
            .where(cr.applied.is_(True), cr.received_ms <= as_of_ms)
            .group_by(cr.enterprise)
        ).all()
        writes = conn.execute(
            sa.select(wa.enterprise, sa.func.count())
            .where(wa.status == "ok", wa.finished_ms <= as_of_ms)
            .group_by(wa.enterprise)
        ).all()
    for ent, count in configs:
        out.setdefault(ent, {"configs_applied": 0, "writes_ok": 0})["configs_applied"] = count
    for ent, count in writes:
        out.setdefault(ent, {"configs_applied": 0, "writes_ok": 0})["writes_ok"] = count
    return out


def _enterprise_numbers(registry: Any, as_of_ms: int, window_s: int) -> dict[str, dict[str, Any]]:
    """Per enterprise: its production equipment's totals and categories."""
    window_ms = window_s * 1000
    with registry.reading() as idx:
        n = idx.n
        scope = idx.active[:n] & ~idx.product[:n]
        connected = scope & (idx.last_good[:n] > max(as_of_ms - window_ms, NEVER))
        quality = connected & quality_mask(registry, idx, as_of_ms, window_ms)
        ents = list(idx.enc["enterprise"].values)
        cats = list(idx.enc["category"].values)
        ent_col, cat_col = idx.ent[:n], idx.category[:n]
        out: dict[str, dict[str, Any]] = {
            e: {"total": 0, "connected": 0, "quality_connected": 0, "owned": {}, "covered": set()}
            for e in ents
        }
        for i in np.flatnonzero(scope):
            row = out[ents[int(ent_col[i])]]
            cat = cats[int(cat_col[i])]
            row["total"] += 1
            row["owned"][cat] = row["owned"].get(cat, 0) + 1
            if connected[i]:
                row["connected"] += 1
                row["covered"].add(cat)
            if quality[i]:
                row["quality_connected"] += 1
    return out


def _check_level(
    level: RubricLevel, nums: dict[str, Any], control: dict[str, int]
) -> tuple[bool, list[dict[str, Any]]]:
    """Whether an enterprise meets one level, and each criterion's evidence."""
    total, connected, quality = nums["total"], nums["connected"], nums["quality_connected"]
    evidence: list[dict[str, Any]] = []
    if level.min_connected is not None:
        ok = connected >= level.min_connected and connected > 0
        evidence.append(
            {
                "criterion": "min_connected",
                "required": level.min_connected,
                "actual": connected,
                "met": ok,
            }
        )
    if level.min_ratio is not None:
        actual = ratio(connected, total)
        ok = total > 0 and actual >= level.min_ratio
        evidence.append(
            {"criterion": "min_ratio", "required": level.min_ratio, "actual": actual, "met": ok}
        )
    if level.all_categories:
        missing = sorted(set(nums["owned"]) - nums["covered"])
        ok = bool(nums["owned"]) and not missing
        evidence.append(
            {
                "criterion": "all_categories",
                "required": sorted(nums["owned"]),
                "actual": sorted(nums["covered"]),
                "missing": missing,
                "met": ok,
            }
        )
    if level.min_quality_ratio is not None:
        actual = ratio(quality, total)
        ok = total > 0 and actual >= level.min_quality_ratio
        evidence.append(
            {
                "criterion": "min_quality_ratio",
                "required": level.min_quality_ratio,
                "actual": actual,
                "met": ok,
            }
        )
    if level.control_in_use:
        used = control.get("configs_applied", 0) + control.get("writes_ok", 0)
        evidence.append(
            {
                "criterion": "control_in_use",
                "required": True,
                "actual": dict(control),
                "met": used > 0,
            }
        )
    return all(e["met"] for e in evidence), evidence


def grade_enterprises(
    registry: Any,
    rubric: Rubric,
    *,
    as_of_ms: int,
    window_s: int,
    region: str | None = None,
    industry: str | None = None,
) -> dict[str, Any]:
    """Each enterprise's grade (the highest level met with every level below) and evidence."""
    lo, hi = region_prefix_range(region) if region is not None else (0, 10**6)
    prefix = industry.strip().upper() if industry is not None else ""
    numbers = _enterprise_numbers(registry, as_of_ms, window_s)
    control = _control_in_use(registry, as_of_ms)
    items: list[dict[str, Any]] = []
    for ent in sorted(registry.list_enterprises(), key=lambda e: e.id):
        if not lo <= int(ent.region) < hi or not ent.industry.upper().startswith(prefix):
            continue
        nums = numbers.get(ent.id) or {
            "total": 0,
            "connected": 0,
            "quality_connected": 0,
            "owned": {},
            "covered": set(),
        }
        grade, still = None, True
        levels = []
        for level in rubric.levels:
            met, evidence = _check_level(level, nums, control.get(ent.id, {}))
            still = still and met
            if still:
                grade = level.level
            levels.append(
                {"level": level.level, "label": level.label, "met": met, "evidence": evidence}
            )
        items.append(
            {
                "enterprise": ent.id,
                "name": ent.name,
                "region": ent.region,
                "region_label": region_label(ent.region),
                "industry": ent.industry,
                "grade": grade,
                "total": nums["total"],
                "connected": nums["connected"],
                "quality_connected": nums["quality_connected"],
                "levels": levels,
            }
        )
    counts = {lv.level: 0 for lv in rubric.levels}
    ungraded = 0
    for it in items:
        if it["grade"] is None:
            ungraded += 1
        else:
            counts[it["grade"]] += 1
    return {
        "as_of": as_of_ms,
        "window_s": window_s,
        "rubric": rubric.name,
        "counts": {**counts, "none": ungraded},
        "items": items,
    }


def _evidence_of(
    registry: Any,
    view: IndexView,
    *,
    as_of_ms: int,
    window_s: int,
    groupings: Sequence[str],
    quality: bool = True,
) -> Evidence:
    """The devices ``view`` counts at ``as_of_ms``, as evidence (canonical order); with
    each one's quality verdict unless ``quality`` is false (the gate judges every device,
    and its one kept answer would be spent)."""
    n = view.n
    window_ms = window_s * 1000
    connected = view.last_good[:n] > max(as_of_ms - window_ms, NEVER)
    ids = [""] * n
    for (_ent, dev), i in view.keys.copy().items():  # keys only grows; copy() is atomic
        if i < n:
            ids[i] = dev
    enc = view.enc
    return from_columns(
        as_of_ms=as_of_ms,
        window_s=window_s,
        groupings=groupings,
        devices=ids,
        columns={
            "enterprise": (enc["enterprise"].values, view.ent[:n]),
            "region": (enc["county"].values, view.county[:n]),  # a county is the full code
            "industry": (enc["industry"].values, view.industry[:n]),
            "category": (enc["category"].values, view.category[:n]),
            "family": (enc["family"].values, view.family[:n]),
        },
        product=view.product[:n],
        decommissioned=~view.active[:n],
        online=online_mask(view, as_of_ms, registry.freshness_ms),
        last_good=view.last_good[:n],
        quality=(connected & quality_mask(registry, view, as_of_ms, window_ms))
        if quality
        else None,
    )


def snapshot_evidence(
    registry: Any,
    view: IndexView,
    *,
    ts_ms: int,
    window_s: int,
    groupings: Sequence[str] = GROUPINGS,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The audit record and the evidence row a snapshot at ``ts_ms`` stores beside its
    rows, from the ``view`` it counted."""
    ev = _evidence_of(registry, view, as_of_ms=ts_ms, window_s=window_s, groupings=groupings)
    payload = encode(ev)
    audit = {
        "window_s": window_s,
        "registry_version": digest(payload),
        "definitions_version": DEFINITIONS_VERSION,
        "devices": ev.n,
    }
    data = compress(payload, ENCODINGS[0])
    row = {"encoding": ENCODINGS[0], "devices": ev.n, "raw_bytes": len(payload), "data": data}
    return audit, row


def _evidence_view(ev: Evidence) -> IndexView:
    """An index holding exactly the evidence's devices, as ``compute_ratios`` counts them.

    Each device's last good sample is the one recorded; its online state is recorded,
    so a device online then is given a sample at ``as_of`` and a live agent. Built from
    the evidence's dictionaries and codes, without a Python object per device.
    """
    index = DeviceIndex(capacity=ev.n)
    index.add_columns(
        {name: (ev.values[name], ev.codes[name]) for name in DICT_COLUMNS},
        product=ev.product,
        active=~ev.decommissioned,
    )
    return evidence_states(index, ev)


def evidence_states(index: DeviceIndex, ev: Evidence) -> IndexView:
    """``index`` (the evidence's devices, in its order) with the states the evidence
    recorded: each device's last good sample, and online ones a sample at ``as_of`` and a
    live agent."""
    n = ev.n
    index.last_good[:n] = ev.last_good
    index.last_ts[:n] = np.where(ev.online, ev.as_of_ms, NEVER)
    index.agent_alive[:n] = ev.online
    index.dev_online[:n] = ev.online
    return IndexView(index, 0, None)


_COMPARED_ALL = (
    "total",
    "connected",
    "online",
    "quality_connected",
    "products_total",
    "products_connected",
    "products_online",
    "products_quality_connected",
)
_QUALITY_FIELDS = ("quality_connected", "products_quality_connected")


def recount(ev: Evidence, names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The rows a snapshot of exactly the evidence's devices stores, counted under the
    current definitions (``names``: enterprise labels); the quality counts are None
    where the evidence did not record them."""
    # Online is recorded per device, so freshness is no longer a question; nor is the
    # gate's verdict, which is recorded too.
    source = FixedGate(names or {}, 0, ev.quality)
    rows, _lines = snapshot_rows(
        source, _evidence_view(ev), ts_ms=ev.as_of_ms, window_s=ev.window_s, groupings=ev.groupings
    )
    if ev.quality is None:
        for row in rows:
            row.update(dict.fromkeys(_QUALITY_FIELDS))
    return rows


def _differences(registry: Any, ev: Evidence, ts: int) -> tuple[list[dict[str, Any]], int]:
    """Each stored number that counting the evidence again does not give, by row; and
    how many stored rows there were."""
    rows = recount(ev, registry.enterprise_names())
    again: dict[tuple[str, str], dict[str, Any]] = {
        (r["group_by"], str(r["key"])[:64]): r for r in rows
    }
    out: list[dict[str, Any]] = []
    compared = 0
    for group_by in ("overall", *ev.groupings):
        stored = {r.key: r for r in registry.snapshot_rows(group_by, ts, ts)}
        compared += len(stored)
        now = {key: r for (g, key), r in again.items() if g == group_by}
        for key in sorted(set(stored) | set(now)):
            for field in _COMPARED_ALL:
                was = _count(getattr(stored[key], field)) if key in stored else None
                is_ = _count(now[key][field]) if key in now else None
                if was != is_:
                    out.append(
                        {
                            "group_by": group_by,
                            "key": key,
                            "field": field,
                            "stored": was,
                            "recomputed": is_,
                        }
                    )
    return out, compared


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _in_code_space(then: Evidence, now: Evidence, name: str) -> npt.NDArray[np.int64]:
    """``then``'s codes of a column as ``now``'s codes (-1: a value ``now`` lacks)."""
    rank = {v: i for i, v in enumerate(now.values[name])}
    table = np.array([rank.get(v, -1) for v in then.values[name]] or [-1], np.int64)
    return table[then.codes[name]]


def registry_changes(then: Evidence, now: Evidence, limit: int = 20) -> dict[str, Any]:
    """How the registry read now for the same ``as_of`` differs from the evidence: devices
    added, removed, regrouped (region, industry, category, family or kind),
    decommissioned or brought back, counted connected differently (other than by
    reporting since), or reporting since;
    counts and the first ``limit`` of each."""
    then_keys = list(zip(then.column("enterprise"), then.devices, strict=True))
    now_keys = list(zip(now.column("enterprise"), now.devices, strict=True))
    position = {key: i for i, key in enumerate(then_keys)}
    at = np.array([position.get(key, -1) for key in now_keys] or [0], np.int64)[: now.n]
    both = at >= 0
    ib = np.flatnonzero(both)  # rows of ``now`` also in ``then`` ...
    ia = at[both]  # ... and where they are in ``then``
    seen = np.zeros(then.n, np.bool_)
    seen[ia] = True
    regrouped = then.product[ia] != now.product[ib]
    for name in DICT_COLUMNS[1:]:  # every column but the enterprise, which is in the key
        regrouped |= _in_code_space(then, now, name)[ia] != now.codes[name][ib]
    found = {
        "added": [now_keys[i] for i in np.flatnonzero(~both).tolist()],
        "removed": [then_keys[i] for i in np.flatnonzero(~seen).tolist()],
    }
    reported = now.last_good[ib] > then.last_good[ia]
    for name, mask in (
        ("regrouped", regrouped),
        ("decommissioned_changed", then.decommissioned[ia] != now.decommissioned[ib]),
        # A device that reported since counts as connected at ``as_of`` when read now;
        # that is "reported_since", not a change of what the report counted.
        ("connection_changed", (then.connected()[ia] != now.connected()[ib]) & ~reported),
        ("reported_since", reported),
    ):
        found[name] = [then_keys[i] for i in ia[mask].tolist()]
    return {
        "counts": {name: len(keys) for name, keys in found.items()},
        "examples": {
            name: [{"enterprise": e, "device_id": d} for e, d in keys[:limit]]
            for name, keys in found.items()
        },
        "examples_limit": limit,
    }


def _unchanged(changes: dict[str, Any]) -> bool:
    """Whether the registry would count the report's devices the same way now; a device
    that merely reported again since does not change that."""
    counts = changes["counts"]
    return not any(v for k, v in counts.items() if k != "reported_since")


def load_evidence(registry: Any, audit: dict[str, Any]) -> tuple[Evidence | None, dict[str, Any]]:
    """A snapshot's evidence and what is known of it: ``status`` kept, pruned,
    not_recorded or unreadable; ``intact`` whether it hashes to the stored version."""
    ts = int(audit["ts_ms"])
    row = registry.snapshot_evidence(ts)
    if row is None:
        pruned = audit.get("evidence_pruned_ms")
        if pruned is not None:
            detail = f"the evidence was deleted at {pruned} (evidence retention)"
            return None, {"status": "pruned", "pruned_ms": int(pruned), "detail": detail}
        detail = "the snapshot was taken before its evidence was kept"
        return None, {"status": "not_recorded", "detail": detail}
    info: dict[str, Any] = {
        "status": "kept",
        "devices": int(row["devices"]),
        "bytes": len(row["data"]),
        "raw_bytes": int(row["raw_bytes"]),
        "encoding": row["encoding"],
    }
    try:
        payload = decompress(bytes(row["data"]), str(row["encoding"]))
        ev = decode(payload)
    except EvidenceError as exc:
        return None, {**info, "status": "unreadable", "intact": False, "detail": str(exc)}
    version = digest(payload)
    info["registry_version_recomputed"] = version
    info["intact"] = version == audit["registry_version"] and ev.as_of_ms == ts
    return ev, info


def _quality_status(ev: Evidence) -> dict[str, str]:
    """Whether the evidence records each device's quality verdict, so that the stored
    quality counts are recounted and compared."""
    if ev.quality is None:
        return {
            "status": "not_recorded",
            "detail": "the snapshot was taken before quality counts were kept: its "
            "quality_connected is not recorded and is not compared",
        }
    return {"status": "recorded", "detail": "quality_connected recounted from the evidence"}


def verify_report(registry: Any, as_of_ms: int) -> dict[str, Any] | None:
    """Count the stored snapshot at or before ``as_of`` again from its evidence and
    compare, and say how the registry has changed since (None: no snapshot stored)."""
    audit = registry.snapshot_audit_at(as_of_ms)
    if audit is None:
        return None
    ts, window_s = int(audit["ts_ms"]), int(audit["window_s"])
    ev, info = load_evidence(registry, audit)
    same_defs = audit["definitions_version"] == DEFINITIONS_VERSION
    result: dict[str, Any] = {
        "as_of": as_of_ms,
        "snapshot_ts": ts,
        "window_s": window_s,
        "registry_version": audit["registry_version"],
        "definitions_version": audit["definitions_version"],
        "definitions_version_now": DEFINITIONS_VERSION,
        "definitions_unchanged": same_defs,
        "evidence": info,
        "reproducible": None,
        "rows_compared": 0,
        "differences": [],
        "registry_unchanged": None,
        "registry_changes": None,
        "quality": None,
    }
    if ev is None:
        return result
    result["quality"] = _quality_status(ev)
    try:
        differences, compared = _differences(registry, ev, ts)
    except (ValueError, KeyError) as exc:
        # Only altered evidence gets here (a region that is not a code, a grouping that
        # does not exist): it cannot be counted, so nothing about it is reproducible.
        info.update(intact=False, detail=f"the evidence cannot be counted: {exc}")
        result["reproducible"] = False
        return result
    # What changed since is compared on ledger and state, not quality: the gate's window
    # is not the registry's.
    now = _evidence_of(
        registry,
        registry.view(),
        as_of_ms=ts,
        window_s=window_s,
        groupings=ev.groupings,
        quality=False,
    )
    changes = registry_changes(ev, now)
    result.update(
        reproducible=bool(info["intact"]) and not differences,
        rows_compared=compared,
        differences=differences[:1000],
        registry_unchanged=_unchanged(changes),
        registry_changes=changes,
    )
    return result


EVIDENCE_HEADER = [
    "企业标识 enterprise_id",
    "企业名称 enterprise_name",
    "设备 device_id",
    "地区 region",
    "地区名称 region_label",
    "行业 industry",
    "类别 category",
    "设备类型 family",
    "种类 kind",
    "已停用 decommissioned",
    "最后有效数据 last_good_ms",
    "联网 connected",
    "在线 online",
    "数据达标 quality_connected",
]


def evidence_rows(
    ev: Evidence,
    names: dict[str, str],
    *,
    enterprise: str | None = None,
    region: str | None = None,
) -> Iterator[list[Any]]:
    """The evidence's devices as table rows (``EVIDENCE_HEADER``), in (enterprise,
    device) order; ``region`` a code prefix as the ratio filters take it."""
    keep = np.ones(ev.n, np.bool_)
    if enterprise is not None:
        ents = ev.values["enterprise"]
        code = ents.index(enterprise) if enterprise in ents else -1
        keep &= ev.codes["enterprise"] == code
    if region is not None:
        lo, hi = region_prefix_range(region)
        nums = np.array([int(v) for v in ev.values["region"]] or [0], np.int64)
        at = nums[ev.codes["region"]]
        keep &= (at >= lo) & (at < hi)
    connected = ev.connected()
    quality = ev.quality
    cols = {name: ev.values[name] for name in DICT_COLUMNS}
    for i in np.flatnonzero(keep).tolist():
        ent = cols["enterprise"][ev.codes["enterprise"][i]]
        reg = cols["region"][ev.codes["region"][i]]
        good = int(ev.last_good[i])
        yield [
            ent,
            names.get(ent, ent),
            ev.devices[i],
            reg,
            region_label(reg),
            cols["industry"][ev.codes["industry"][i]],
            cols["category"][ev.codes["category"][i]],
            cols["family"][ev.codes["family"][i]],
            "product" if ev.product[i] else "equipment",
            int(ev.decommissioned[i]),
            "" if good == NEVER else good,
            int(connected[i]),
            int(ev.online[i]),
            "" if quality is None else int(quality[i]),  # empty: not recorded
        ]
