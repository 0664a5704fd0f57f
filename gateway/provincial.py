"""The provincial platform's checks: ledger reconciliation, graded evaluation against a
rubric, and the versions that make a stored report verifiable.

- **Reconciliation** (台账核对) lists, at ``as_of``: devices that report but are not in
  the ledger; ledger devices never seen; devices seen before but not within the window;
  serial numbers (the ledger's optional ``serial``) claimed by more than one enterprise.
- **Grades** (分级分类评价): each enterprise's production equipment measured against
  the rubric's levels (``gateway/rubrics/default.yaml``), with the evidence.
- **Versions**: ``registry_version`` hashes the devices a report counted (ledger fields
  and whether each was connected at ``as_of``); ``DEFINITIONS_VERSION`` hashes the
  definitions. A stored snapshot records both, and ``verify`` recomputes it.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.control import tables as ct
from gateway.quality import QUALITY_DEFINITION
from gateway.ratios import DEFINITIONS, GROUPINGS, compute_ratios, quality_mask, ratio
from gateway.registry.codes import region_label
from gateway.registry.index import NEVER
from iiot_common.yamlfile import YamlFileError, read_yaml

__all__ = [
    "DEFINITIONS_VERSION",
    "Rubric",
    "RubricError",
    "RubricLevel",
    "default_rubric",
    "grade_enterprises",
    "load_rubric",
    "reconcile",
    "registry_version",
    "snapshot_audit_record",
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
    from gateway.registry.codes import region_prefix_range

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


def registry_version(registry: Any, *, as_of_ms: int, window_s: int) -> tuple[str, int]:
    """A hash of the devices a report at ``as_of`` counts, and how many there are.

    Each device contributes its ledger fields (enterprise, id, region, industry,
    category, kind, decommissioned or not) and whether it was connected at ``as_of``.
    """
    h = hashlib.sha256()
    with registry.reading() as idx:
        n = idx.n
        connected = idx.last_good[:n] > max(as_of_ms - window_s * 1000, NEVER)
        order = sorted(range(n), key=lambda i: (idx.meta[i].enterprise, idx.meta[i].id))
        for i in order:
            m = idx.meta[i]
            fields = (
                m.enterprise,
                m.id,
                m.region,
                m.industry,
                m.category,
                m.kind,
                m.status == "decommissioned",
                bool(connected[i]),
            )
            h.update(repr(fields).encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()[:32], n


def snapshot_audit_record(registry: Any, *, ts_ms: int, window_s: int) -> dict[str, Any]:
    """The audit record a snapshot at ``ts_ms`` stores beside its rows."""
    version, devices = registry_version(registry, as_of_ms=ts_ms, window_s=window_s)
    return {
        "ts_ms": ts_ms,
        "window_s": window_s,
        "registry_version": version,
        "definitions_version": DEFINITIONS_VERSION,
        "devices": devices,
    }


def verify_report(registry: Any, as_of_ms: int) -> dict[str, Any] | None:
    """Recompute the stored snapshot at or before ``as_of`` and compare (None: none stored).

    ``total`` and ``connected`` (equipment and products) are compared per group;
    ``online`` is the state at the moment of the snapshot and is not recomputable.
    """
    audit = registry.snapshot_audit_at(as_of_ms)
    if audit is None:
        return None
    ts, window_s = int(audit["ts_ms"]), int(audit["window_s"])
    now_version, _ = registry_version(registry, as_of_ms=ts, window_s=window_s)
    differences: list[dict[str, Any]] = []
    for group_by in ("overall", *GROUPINGS):
        stored = {r.key: r for r in registry.snapshot_rows(group_by, ts, ts)}
        now: dict[str, dict[str, int]] = {}
        for kind, prefix in (("equipment", ""), ("product", "products_")):
            result = compute_ratios(
                registry,
                None if group_by == "overall" else group_by,
                window_s=window_s,
                as_of_ms=ts,
                kind=kind,
            )
            groups = [result["overall"]] if group_by == "overall" else result["groups"]
            for g in groups:
                row = now.setdefault(str(g["key"]), {})
                row[prefix + "total"] = g["total"]
                row[prefix + "connected"] = g["connected"]
        for key in sorted(set(stored) | set(now)):
            for field in ("total", "connected", "products_total", "products_connected"):
                was = int(getattr(stored[key], field)) if key in stored else 0
                is_ = now.get(key, {}).get(field, 0)
                if was != is_:
                    differences.append(
                        {
                            "group_by": group_by,
                            "key": key,
                            "field": field,
                            "stored": was,
                            "recomputed": is_,
                        }
                    )
    same_defs = audit["definitions_version"] == DEFINITIONS_VERSION
    return {
        "as_of": as_of_ms,
        "snapshot_ts": ts,
        "window_s": window_s,
        "registry_version": audit["registry_version"],
        "registry_version_now": now_version,
        "definitions_version": audit["definitions_version"],
        "definitions_version_now": DEFINITIONS_VERSION,
        "registry_unchanged": audit["registry_version"] == now_version,
        "definitions_unchanged": same_defs,
        "reproducible": not differences and same_defs,
        "differences": differences[:1000],
    }
