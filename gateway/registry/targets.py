"""Targets of enterprises on the cloud (上云企业数) per region and year, and their file.

A target file is YAML (a list of mappings, or a mapping with a ``targets`` list) or CSV
with the header ``region,year,target``; ``year`` may be left out (every year).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gateway.registry import tables as t
from gateway.registry.codes import check_region, region_label
from gateway.registry.store import RegistryStore
from iiot_common.yamlfile import YamlFileError, read_yaml

__all__ = [
    "Target",
    "TargetsError",
    "TargetsPart",
    "check_target",
    "check_targets",
    "read_targets_file",
]

_MAX_TARGETS = 100_000
_MAX_YEAR = 2200


class TargetsError(ValueError):
    """A target file or entry that cannot be used; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Target:
    """A region's target of enterprises on the cloud; ``year`` None = every year."""

    region: str
    year: int | None
    target: int

    def view(self, updated_ms: int | None = None) -> dict[str, Any]:
        return {
            "region": self.region,
            "region_label": region_label(self.region),
            "year": self.year,
            "target": self.target,
            "updated_ms": updated_ms,
        }


def check_target(raw: object) -> Target:
    """One target entry (mapping of region, year?, target); ValueError naming the field."""
    if not isinstance(raw, dict):
        raise ValueError("a target must be a mapping of region, year and target")
    unknown = sorted(set(raw) - {"region", "year", "target"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    region = check_region(raw.get("region"))
    year = _integer(raw.get("year"), "year", blank_ok=True)
    if year is not None and not 2000 <= year <= _MAX_YEAR:
        raise ValueError(f"year {year} must be between 2000 and {_MAX_YEAR}")
    target = _integer(raw.get("target"), "target", blank_ok=False)
    if target is None or not 1 <= target <= 10**9:
        raise ValueError(f"target {raw.get('target')!r} must be a whole number from 1")
    return Target(region, year, target)


def _integer(value: object, name: str, *, blank_ok: bool) -> int | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if blank_ok:
            return None
        raise ValueError(f"{name} is required")
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} must be a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    raise ValueError(f"{name} {value!r} must be a whole number")


def check_targets(entries: Sequence[object], where: str) -> list[Target]:
    """Entries checked in order; TargetsError naming ``where`` and the entry number."""
    if len(entries) > _MAX_TARGETS:
        raise TargetsError(f"{where}: more than {_MAX_TARGETS} targets")
    out: list[Target] = []
    seen: dict[tuple[str, int | None], int] = {}
    for number, raw in enumerate(entries, start=1):
        try:
            target = check_target(raw)
        except ValueError as exc:
            raise TargetsError(f"{where}: target {number}: {exc}") from None
        key = (target.region, target.year)
        if key in seen:
            raise TargetsError(
                f"{where}: target {number}: region {target.region} year "
                f"{target.year or 'any'} repeats target {seen[key]}"
            )
        seen[key] = number
        out.append(target)
    return out


def read_targets_file(path: Path) -> list[Target]:
    """The targets of a YAML or CSV file (by its suffix); TargetsError naming the file."""
    if path.suffix.lower() == ".csv":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise TargetsError(f"{path}: {exc}") from exc
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if "region" not in fields or "target" not in fields:
            raise TargetsError(f"{path}: the header must name region, target (and year)")
        reader.fieldnames = fields
        try:
            entries: list[object] = [
                {k: v for k, v in row.items() if k is not None} for row in reader
            ]
        except csv.Error as exc:
            raise TargetsError(f"{path}: not valid CSV: {exc}") from exc
        return check_targets(entries, str(path))
    try:
        data = read_yaml(path)
    except YamlFileError as exc:
        raise TargetsError(f"{path}: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"targets"}:
        data = data["targets"]
    if not isinstance(data, list):
        raise TargetsError(f"{path}: expected a list of targets (region, year, target)")
    return check_targets(data, str(path))


class TargetsPart(RegistryStore):
    """Stored targets of enterprises on the cloud."""

    def replace_targets(self, targets: Sequence[Target]) -> None:
        """Make ``targets`` the whole set of stored targets."""
        now = self._now_ms()
        rows = [
            {"region": x.region, "year": x.year or 0, "target": x.target, "updated_ms": now}
            for x in targets
        ]
        with self._db_lock, self._engine.begin() as conn:
            conn.execute(t.targets.delete())
            if rows:
                conn.execute(t.targets.insert(), rows)
        self.counters["targets_replaced"] += 1

    def list_targets(self) -> list[dict[str, Any]]:
        """The stored targets by region and year (views with labels)."""
        c = t.targets.c
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(t.targets).order_by(c.region, c.year)).all()
        return [Target(r.region, r.year or None, r.target).view(r.updated_ms) for r in rows]

    def target_map(self) -> dict[tuple[str, int], int]:
        """(region, year or 0 for every year) → target, for ``compute_on_cloud``."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(t.targets)).all()
        return {(r.region, int(r.year)): int(r.target) for r in rows}
