"""The device-profile schema: one YAML file describes one device model.

A profile names the model, its equipment family and policy category, its protocol,
and its points. A point says what the value means (name, unit, type, scale) and where
it lives: under a key named after the protocol (``modbus:``, ``opcua:``), whose model
the protocol's folder owns (``protocols.registry``). A profile may also carry
protocol-wide settings under the same key.

Families are data (``families.yaml`` beside the profiles, plus an integrator's own);
validate with ``context={"families": ...}`` to check against other than the shipped ones.

Validation is strict (``extra="forbid"``) and every error names the point it concerns;
the loader adds the file name.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic import ModelWrapValidatorHandler as _Handler
from pydantic import model_validator as _model_validator

from iiot_common.identifier import IDENTIFIER_PATTERN, Identifier, is_identifier
from protocols.parts import ProtocolParts, validate_parts

__all__ = [
    "CATEGORY_LABELS_ZH",
    "IDENTIFIER_PATTERN",
    "INT_BOUNDS",
    "Category",
    "Identifier",
    "Point",
    "Profile",
    "ValueType",
    "is_identifier",
    "profile_json_schema",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Category(StrEnum):
    """The four policy categories of equipment (see domain notes)."""

    HIGH_ENERGY_PROCESS = "high_energy_process"  # 高耗能流程行业设备
    GENERAL_POWER = "general_power"  # 通用动力设备
    NEW_ENERGY = "new_energy"  # 新能源设备
    INTELLIGENT = "intelligent"  # 智能化设备和产品


CATEGORY_LABELS_ZH: dict[Category, str] = {
    Category.HIGH_ENERGY_PROCESS: "高耗能流程行业设备",
    Category.GENERAL_POWER: "通用动力设备",
    Category.NEW_ENERGY: "新能源设备",
    Category.INTELLIGENT: "智能化设备和产品",
}


class ValueType(StrEnum):
    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"


# The integer range of each integer type, for checks of values and ranges.
INT_BOUNDS: dict[ValueType, tuple[int, int]] = {
    ValueType.INT16: (-(2**15), 2**15 - 1),
    ValueType.UINT16: (0, 2**16 - 1),
    ValueType.INT32: (-(2**31), 2**31 - 1),
    ValueType.UINT32: (0, 2**32 - 1),
    ValueType.INT64: (-(2**63), 2**63 - 1),
}


class _WithParts(ProtocolParts):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Point(_WithParts):
    """One value a device offers; its address lives under its protocol's key."""

    name: Identifier
    description: str = ""
    unit: str = Field(default="", description="Engineering unit after scaling, e.g. 'degC', 'kW'.")
    type: ValueType
    access: Literal["r", "rw"] = "r"
    scale: float = Field(
        default=1.0, allow_inf_nan=False, description="value = raw * scale + offset"
    )
    offset: float = Field(default=0.0, allow_inf_nan=False)
    scale_factor_point: str | None = Field(
        default=None,
        description="SunSpec-style scale factor: value = raw * 10**(that point's raw value).",
    )
    deadband: float | None = Field(
        default=None, ge=0, description="Report only when the value moves by more than this."
    )
    range: tuple[float, float] | None = Field(
        default=None, description="Plausible engineering range [min, max] after scaling."
    )
    enum: dict[int, str] | None = Field(
        default=None, description="Labels of a state code; unknown codes are reported as-is."
    )
    bits: dict[int, str] | None = Field(
        default=None, description="Labels of the bits of a status or alarm word."
    )

    @_model_validator(mode="wrap")
    @classmethod
    def _addresses(cls, data: Any, handler: _Handler[Point]) -> Point:
        point: Point = validate_parts(cls, data, handler, "address")
        return point

    @field_validator("scale")
    @classmethod
    def _scale_not_zero(cls, v: float) -> float:
        if v == 0:
            raise ValueError("scale must not be zero (writes divide by it)")
        return v

    @field_validator("range")
    @classmethod
    def _range_ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("range bounds must be finite numbers")
        if v is not None and v[0] > v[1]:
            raise ValueError(f"range minimum {v[0]} is above its maximum {v[1]}")
        return v

    def address(self, protocol: str) -> BaseModel | None:
        """Where the point lives for ``protocol`` (its ``<protocol>:`` mapping), if given."""
        return self.part(protocol)


class Profile(_WithParts):
    """A device model: what it is, which category it counts in, and its points."""

    id: Identifier
    name: str = Field(min_length=1)
    name_zh: str = Field(min_length=1)
    family: Identifier = Field(description="A family key of families.yaml.")
    category: Category
    protocol: Identifier = Field(description="A registered protocol: modbus, opcua, ...")
    manufacturer: str = ""
    description: str = ""
    standard: str = Field(default="", description="Register map standard followed, if any.")
    points: list[Point] = Field(min_length=1)

    @_model_validator(mode="wrap")
    @classmethod
    def _settings(cls, data: Any, handler: _Handler[Profile]) -> Profile:
        from protocols import registry

        if isinstance(data, dict) and isinstance(data.get("protocol"), str):
            name = data["protocol"]
            if name in registry.names():
                spec = registry.get(name)
                if spec.settings_default and name not in data:
                    data = {**data, name: {}}
        profile: Profile = validate_parts(cls, data, handler, "settings", _check_profile)
        return profile

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str, info: ValidationInfo) -> str:
        families: Any = (info.context or {}).get("families")
        if families is None:
            from device_profiles.families import builtin_families

            families = builtin_families()
        if v not in families:
            raise ValueError(
                f"Input should be a family of families.yaml ({', '.join(families)}), "
                f"not '{v}'; an integrator adds one in a families.yaml beside the profiles"
            )
        return v

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        from protocols import registry

        if v not in registry.names():
            raise ValueError(
                f"Input should be a registered protocol ({', '.join(registry.names())}), not '{v}'"
            )
        return v

    def settings(self, protocol: str) -> BaseModel | None:
        """The profile-wide ``<protocol>:`` settings, if given."""
        return self.part(protocol)

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)


def _check_profile(profile: Profile) -> list[str]:
    """Checks across points: names, scale factors, and the protocol's own checks."""
    from protocols import registry

    errors: list[str] = []
    seen: set[str] = set()
    names = {p.name: p for p in profile.points}
    for p in profile.points:
        where = f"point '{p.name}'"
        if p.name in seen:
            errors.append(f"{where}: duplicate point name")
        seen.add(p.name)
        for other in p.parts:
            if other != profile.protocol:
                errors.append(f"{where}: has an {other} address in a {profile.protocol} profile")
        if p.address(profile.protocol) is None:
            errors.append(f"{where}: missing its {profile.protocol} address")
        if p.scale_factor_point is not None:
            sf = names.get(p.scale_factor_point)
            if sf is None:
                errors.append(
                    f"{where}: scale_factor_point '{p.scale_factor_point}' "
                    "is not a point of this profile"
                )
            elif sf.type not in (ValueType.INT16, ValueType.UINT16):
                errors.append(f"{where}: scale factor point '{sf.name}' must be int16")
        if p.enum is not None and p.type in (ValueType.FLOAT32, ValueType.FLOAT64):
            errors.append(f"{where}: enum labels need an integer type")
    check = registry.get(profile.protocol).check_profile
    if check is not None:
        errors.extend(check(profile))
    return errors


def profile_json_schema() -> dict[str, Any]:
    """The JSON Schema of a profile, with every registered protocol's keys."""
    from protocols import registry

    doc = Profile.model_json_schema()
    defs: dict[str, Any] = doc.setdefault("$defs", {})
    for name in registry.names():
        spec = registry.get(name)
        for owner, model in (("Point", spec.address), ("Profile", spec.settings)):
            if model is None:
                continue
            sub = model.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(sub.pop("$defs", {}))
            defs[model.__name__] = sub
            target = doc if owner == "Profile" else defs["Point"]
            target["properties"][name] = {
                "anyOf": [{"$ref": f"#/$defs/{model.__name__}"}, {"type": "null"}],
                "default": None,
            }
    return doc
