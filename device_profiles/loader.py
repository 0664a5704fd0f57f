"""Load profiles from YAML files and folders, with errors that name the file and point."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from device_profiles.families import (
    FAMILIES_FILE,
    FamilyInfo,
    builtin_families,
    family_files,
    load_families,
)
from device_profiles.schema import Profile
from iiot_common.yamlfile import YamlFileError, read_yaml

__all__ = [
    "BUILTIN_DIR",
    "ProfileError",
    "ProfileSet",
    "ProfileSetError",
    "load_profile",
    "load_profiles",
    "parse_profile",
]

BUILTIN_DIR = Path(__file__).resolve().parent


class ProfileError(ValueError):
    """A profile file that cannot be used; ``problems`` lists each finding."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


def _loc(data: Any, loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into 'point 'name': field' where possible."""
    parts: list[str] = []
    node: Any = data
    i = 0
    while i < len(loc):
        key = loc[i]
        if key == "points" and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            idx = int(loc[i + 1])
            name = None
            if isinstance(node, dict):
                pts = node.get("points")
                if isinstance(pts, list) and idx < len(pts) and isinstance(pts[idx], dict):
                    name = pts[idx].get("name")
                    node = pts[idx]
            parts.append(f"point '{name}'" if name else f"point #{idx + 1}")
            i += 2
            continue
        if isinstance(node, dict):
            node = node.get(key) if isinstance(key, str) else None
        parts.append(str(key))
        i += 1
    if not parts:
        return "profile"
    head, rest = parts[0], parts[1:]
    return head + (": " + ".".join(rest) if rest else "")


def _format(exc: ValidationError, data: Any) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        where = _loc(data, loc)
        if where == "profile" and "; " in msg:
            problems.extend(msg.split("; "))
        else:
            problems.append(f"{where}: {msg}" if where != "profile" else msg)
    return problems


def parse_profile(
    data: Any,
    source: Path | str = "<profile>",
    *,
    families: Mapping[str, FamilyInfo] | None = None,
) -> Profile:
    """Validate already-parsed YAML/JSON data as a profile (``families``: default shipped)."""
    if not isinstance(data, dict):
        raise ProfileError(source, ["a profile must be a mapping at the top level"])
    try:
        return Profile.model_validate(data, context={"families": families})
    except ValidationError as exc:
        raise ProfileError(source, _format(exc, data)) from exc


def load_profile(path: Path | str, *, families: Mapping[str, FamilyInfo] | None = None) -> Profile:
    """Read and validate one profile file."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except YamlFileError as exc:
        raise ProfileError(path, [str(exc)]) from exc
    return parse_profile(data, path, families=families)


def _profile_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(
        p for p in root.rglob("*.yaml") if "golden" not in p.parts and p.name != FAMILIES_FILE
    )


class ProfileSet:
    """Profiles by id, from the shipped folder and any extra folders."""

    def __init__(
        self,
        profiles: dict[str, Profile],
        sources: dict[str, Path],
        families: Mapping[str, FamilyInfo] | None = None,
    ) -> None:
        self._profiles = profiles
        self.sources = sources
        self.families: Mapping[str, FamilyInfo] = (
            builtin_families() if families is None else families
        )

    def __getitem__(self, profile_id: str) -> Profile:
        try:
            return self._profiles[profile_id]
        except KeyError:
            known = ", ".join(sorted(self._profiles)) or "none"
            raise KeyError(f"unknown profile '{profile_id}' (known: {known})") from None

    def __contains__(self, profile_id: object) -> bool:
        return profile_id in self._profiles

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._profiles.values(), key=lambda p: (p.family, p.id)))

    def __len__(self) -> int:
        return len(self._profiles)


def load_profiles(extra_dirs: Iterable[Path | str] = (), *, builtin: bool = True) -> ProfileSet:
    """Load every profile; later folders may not redefine an id. Raises listing every bad file."""
    roots = ([BUILTIN_DIR] if builtin else []) + [Path(d) for d in extra_dirs]
    profiles: dict[str, Profile] = {}
    sources: dict[str, Path] = {}
    problems: list[ProfileError] = []
    missing = [r for r in roots if not r.exists()]
    problems.extend(ProfileError(r, ["no such file or folder"]) for r in missing)
    roots = [r for r in roots if r.exists()]
    families, found = load_families(f for r in roots for f in family_files(r))
    problems.extend(ProfileError(p.partition(": ")[0], [p.partition(": ")[2]]) for p in found)
    for root in roots:
        for f in _profile_files(root):
            try:
                prof = load_profile(f, families=families)
            except ProfileError as exc:
                problems.append(exc)
                continue
            if prof.id in profiles and sources[prof.id] != f:
                problems.append(
                    ProfileError(
                        f, [f"profile id '{prof.id}' is already defined in {sources[prof.id]}"]
                    )
                )
                continue
            profiles[prof.id] = prof
            sources[prof.id] = f
    if problems:
        raise ProfileSetError(problems)
    return ProfileSet(profiles, sources, families)


class ProfileSetError(ValueError):
    """Several profile files failed; each entry is a ProfileError."""

    def __init__(self, errors: list[ProfileError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))
