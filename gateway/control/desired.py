"""Checking a desired agent configuration the way the agent will, before it is stored.

Devices are validated with the agent's own ``DeviceConfig`` model; every problem is
collected and names the device (``device 'boiler-3': profile 'x' not found``). Profiles
come from the shipped ``device_profiles`` package, from the request, or from earlier
uploads; those that are not shipped travel with the configuration, and so do the
families (``families.yaml`` entries) they name that no shipped family file has.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from device_profiles.families import FamilyInfo, builtin_families
from device_profiles.loader import ProfileError, ProfileSet, load_profiles, parse_profile
from device_profiles.schema import Profile
from edge_agent.config import DeviceConfig

__all__ = ["CheckedConfig", "DesiredConfigError", "builtin_profiles", "check_config"]


class DesiredConfigError(ValueError):
    """A desired configuration that cannot be used; ``problems`` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, slots=True)
class CheckedConfig:
    devices: list[dict[str, Any]]
    profiles: dict[str, Profile]  # every profile a device uses, by id
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)  # new uploads, by id
    ship: list[dict[str, Any]] = field(default_factory=list)  # non-shipped profiles used
    families: list[dict[str, Any]] = field(default_factory=list)  # non-shipped ones they name


@functools.cache
def builtin_profiles() -> ProfileSet:
    """The profiles shipped in the device_profiles package (every agent has them)."""
    return load_profiles()


def _pydantic_problems(where: str, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function"))
        msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"])
        msg = msg.removeprefix("Value error, ")
        out.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    return out


def _check_families(
    raw_families: list[Any], problems: list[str]
) -> tuple[dict[str, FamilyInfo], dict[str, dict[str, Any]]]:
    """The shipped families plus the request's; a shipped key redefined is refused."""
    families = dict(builtin_families())
    docs: dict[str, dict[str, Any]] = {}
    for i, raw in enumerate(raw_families):
        key = raw.get("key") if isinstance(raw, dict) else None
        where = f"family '{key}'" if isinstance(key, str) else f"families[{i}]"
        try:
            fam = FamilyInfo.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(where, exc))
            continue
        if fam.key in families and families[fam.key] != fam:
            shipped = fam.key in builtin_families()
            problems.append(f"{where}: " + ("a shipped family" if shipped else "given twice"))
            continue
        families[fam.key] = fam
        if fam.key not in builtin_families():
            docs[fam.key] = fam.model_dump(mode="json", exclude_none=True)
    return families, docs


def _check_uploads(
    raw_profiles: list[Any], families: dict[str, FamilyInfo], problems: list[str]
) -> tuple[dict[str, Profile], dict[str, dict[str, Any]]]:
    parsed: dict[str, Profile] = {}
    docs: dict[str, dict[str, Any]] = {}
    builtin = builtin_profiles()
    for i, raw in enumerate(raw_profiles):
        name = raw.get("id") if isinstance(raw, dict) else None
        where = f"profile '{name}'" if isinstance(name, str) else f"profiles[{i}]"
        try:
            prof = parse_profile(raw, where, families=families)
        except ProfileError as exc:
            problems.extend(f"{where}: {p}" for p in exc.problems)
            continue
        if prof.id in builtin:
            problems.append(f"{where}: a shipped profile has this id; upload it under another id")
        elif prof.id in parsed:
            problems.append(f"{where}: uploaded twice")
        else:
            parsed[prof.id] = prof
            docs[prof.id] = raw
    return parsed, docs


def _check_device(
    dev: DeviceConfig, profiles: dict[str, Profile], lookup: dict[str, Profile]
) -> list[str]:
    where = f"device '{dev.id}'"
    prof = lookup.get(dev.profile)
    if prof is None:
        return [f"{where}: profile '{dev.profile}' not found (neither shipped nor uploaded)"]
    if prof.protocol != dev.protocol:
        return [
            f"{where}: profile '{prof.id}' speaks {prof.protocol} but the device "
            f"has a '{dev.protocol}' connection"
        ]
    if dev.points is not None:
        known = {p.name for p in prof.points}
        bad = [f"{where}: point '{n}' is not in profile '{prof.id}'" for n in dev.points]
        bad = [b for b, n in zip(bad, dev.points, strict=True) if n not in known]
        if not dev.points:
            bad.append(f"{where}: 'points' is empty")
        if bad:
            return bad
    profiles[prof.id] = prof
    return []


def check_config(
    raw_devices: list[Any],
    raw_profiles: list[Any],
    stored_profiles: dict[str, dict[str, Any]],
    raw_families: list[Any] | None = None,
) -> CheckedConfig:
    """Validate devices, uploaded profiles and the families they add; raises
    ``DesiredConfigError`` listing every problem."""
    problems: list[str] = []
    families, family_docs = _check_families(raw_families or [], problems)
    uploads, upload_docs = _check_uploads(raw_profiles, families, problems)
    lookup: dict[str, Profile] = {p.id: p for p in builtin_profiles()}
    stored_docs: dict[str, dict[str, Any]] = {}
    for pid, doc in stored_profiles.items():
        if pid not in uploads and pid not in lookup:
            try:
                lookup[pid] = parse_profile(doc, f"stored profile '{pid}'", families=families)
                stored_docs[pid] = doc
            except ProfileError:
                continue  # a stored profile the schema no longer accepts is not offered
    lookup.update(uploads)
    used: dict[str, Profile] = {}
    seen: set[str] = set()
    devices: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_devices):
        name = raw.get("id") if isinstance(raw, dict) else None
        where = f"device '{name}'" if isinstance(name, str) else f"devices[{i}]"
        try:
            dev = DeviceConfig.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(where, exc))
            continue
        if dev.id in seen:
            problems.append(f"{where}: duplicate device id")
            continue
        seen.add(dev.id)
        problems.extend(_check_device(dev, used, lookup))
        devices.append(raw)
    if problems:
        raise DesiredConfigError(problems)
    docs = {**stored_docs, **upload_docs}
    ship = [docs[pid] for pid in sorted(used) if pid in docs]
    named = sorted({used[pid].family for pid in used if pid in docs})
    return CheckedConfig(
        devices, used, upload_docs, ship, [family_docs[k] for k in named if k in family_docs]
    )
