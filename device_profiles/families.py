"""Equipment families as data: ``families.yaml`` beside the profiles, plus integrators' own.

A family has a key (what profiles and the registry use), Chinese and English names, and
the policy category its equipment counts in when a ledger row does not say (none for
``other``). An integrator's profile folder may hold a ``families.yaml`` of the same form
to add families; redefining a shipped key is an error naming both files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_profiles.schema import IDENTIFIER_PATTERN, Category
from iiot_common.yamlfile import YamlFileError, read_yaml

__all__ = [
    "FAMILIES_FILE",
    "FamilyInfo",
    "builtin_families",
    "family_files",
    "load_families",
]

FAMILIES_FILE = "families.yaml"
_BUILTIN = Path(__file__).resolve().parent / FAMILIES_FILE


class FamilyInfo(BaseModel):
    """One equipment family."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(pattern=IDENTIFIER_PATTERN)
    name_zh: str = Field(min_length=1)
    name: str = Field(min_length=1)
    category: Category | None = Field(
        default=None, description="Policy category; none: a ledger row must give one."
    )

    @property
    def label(self) -> str:
        """Bilingual label, e.g. '工业窑炉 Industrial kiln'."""
        return f"{self.name_zh} {self.name}"


class _FamiliesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    families: list[FamilyInfo] = Field(min_length=1)


def family_files(root: Path) -> list[Path]:
    """The families files of a profile folder (any depth), in a stable order."""
    if root.is_file():
        return []
    return sorted(p for p in root.rglob(FAMILIES_FILE) if "golden" not in p.parts)


def _read(path: Path) -> list[FamilyInfo]:
    try:
        data = read_yaml(path)
        return _FamiliesFile.model_validate(data).families
    except YamlFileError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{path}: {loc}: {msg}")
        raise ValueError("\n".join(problems)) from exc


def load_families(
    files: Iterable[Path], base: Mapping[str, FamilyInfo] | None = None
) -> tuple[dict[str, FamilyInfo], list[str]]:
    """``base`` plus the families of ``files``; returns them and every problem found."""
    families = dict(builtin_families() if base is None else base)
    where: dict[str, str] = {k: str(_BUILTIN) for k in families}
    problems: list[str] = []
    for path in files:
        if path.resolve() == _BUILTIN:
            continue
        try:
            found = _read(path)
        except ValueError as exc:
            problems.extend(str(exc).splitlines())
            continue
        for fam in found:
            if fam.key in families and families[fam.key] != fam:
                problems.append(
                    f"{path}: family '{fam.key}' is already defined in {where[fam.key]}"
                )
                continue
            families[fam.key] = fam
            where.setdefault(fam.key, str(path))
    return families, problems


@cache
def builtin_families() -> dict[str, FamilyInfo]:
    """The shipped families, by key (read once)."""
    return {f.key: f for f in _read(_BUILTIN)}
