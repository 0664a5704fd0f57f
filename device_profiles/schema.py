"""The device-profile schema: one YAML file describes one device model.

A profile names the model, its equipment family and policy category, its protocol,
and its points. A point says what the value means (name, unit, type, scale) and where
it lives (a Modbus table and address, or an OPC UA NodeId / browse path).

Validation is strict (``extra="forbid"``) and every error names the point it concerns;
the loader adds the file name.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from iiot_common.identifier import IDENTIFIER_PATTERN, Identifier, is_identifier

__all__ = [
    "IDENTIFIER_PATTERN",
    "ByteOrder",
    "Category",
    "Family",
    "Identifier",
    "ModbusAddress",
    "ModbusSettings",
    "ModbusTable",
    "OpcUaAddress",
    "OpcUaSettings",
    "Point",
    "Profile",
    "ValueType",
    "is_identifier",
    "register_count",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Family(StrEnum):
    """Equipment families; the registry groups by these."""

    KILN = "kiln"
    BOILER = "boiler"
    AIR_COMPRESSOR = "air_compressor"
    MOTOR = "motor"
    DIESEL_GENSET = "diesel_genset"
    WIND_TURBINE = "wind_turbine"
    PV_INVERTER = "pv_inverter"
    CNC_MACHINE = "cnc_machine"
    PETROCHEMICAL = "petrochemical"
    CONSTRUCTION_MACHINERY = "construction_machinery"
    MEDICAL = "medical"
    OTHER = "other"


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


class ModbusTable(StrEnum):
    COIL = "coil"  # 0x, read/write bits
    DISCRETE = "discrete"  # 1x, read-only bits
    INPUT = "input"  # 3x, read-only registers
    HOLDING = "holding"  # 4x, read/write registers

    @property
    def is_bit_table(self) -> bool:
        return self in (ModbusTable.COIL, ModbusTable.DISCRETE)

    @property
    def writable(self) -> bool:
        return self in (ModbusTable.COIL, ModbusTable.HOLDING)


class ByteOrder(StrEnum):
    BIG = "big"
    LITTLE = "little"


_REGISTERS_PER_TYPE: dict[ValueType, int] = {
    ValueType.BOOL: 1,
    ValueType.INT16: 1,
    ValueType.UINT16: 1,
    ValueType.INT32: 2,
    ValueType.UINT32: 2,
    ValueType.INT64: 4,
    ValueType.FLOAT32: 2,
    ValueType.FLOAT64: 4,
}

MODBUS_ADDRESS_SPACE = 65536


def register_count(value_type: ValueType, length: int | None = None) -> int:
    """How many 16-bit registers a value of this type occupies (strings: ``length``)."""
    if value_type is ValueType.STRING:
        return length or 0
    return _REGISTERS_PER_TYPE[value_type]


class ModbusAddress(_Strict):
    """Where a point lives on a Modbus device (zero-based protocol address)."""

    table: ModbusTable
    address: int = Field(ge=0, description="Zero-based protocol address (40001 → holding 0).")
    bit: int | None = Field(
        default=None,
        ge=0,
        le=15,
        description="For a bool packed in a register: the bit number (0 = least significant).",
    )
    length: int | None = Field(
        default=None, ge=1, le=125, description="For strings: the number of 16-bit registers."
    )
    byte_order: ByteOrder | None = Field(
        default=None, description="Byte order within a register; default from the profile."
    )
    word_order: ByteOrder | None = Field(
        default=None,
        description="Order of registers in a multi-register value; default from the profile.",
    )


class OpcUaAddress(_Strict):
    """Where a point lives on an OPC UA server: a NodeId or a browse path, not both."""

    node_id: str | None = Field(
        default=None,
        description="NodeId string, e.g. 'ns=2;s=Boiler.SteamPressure'. 'ns=2' is the "
        "profile's namespace_uri on the simulator; drivers resolve the URI at connect time.",
    )
    browse_path: str | None = Field(
        default=None,
        description="Slash-separated browse path from the Objects folder, each element "
        "'nsidx:Name', e.g. '2:Machine/2:Monitoring/2:Spindle/2:Speed'.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("give exactly one of node_id or browse_path")
        return self


class Point(_Strict):
    """One value a device offers."""

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
    modbus: ModbusAddress | None = None
    opcua: OpcUaAddress | None = None

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

    @property
    def register_count(self) -> int:
        """Registers (or bits, for the bit tables) this point occupies on Modbus."""
        if self.modbus is None:
            return 0
        if self.modbus.table.is_bit_table:
            return 1
        return register_count(self.type, self.modbus.length)


class ModbusSettings(_Strict):
    """Profile-wide Modbus defaults."""

    byte_order: ByteOrder = ByteOrder.BIG
    word_order: ByteOrder = ByteOrder.BIG
    max_registers_per_read: int = Field(default=125, ge=1, le=125)
    max_bits_per_read: int = Field(default=2000, ge=1, le=2000)
    default_unit: int = Field(default=1, ge=0, le=247)


class OpcUaSettings(_Strict):
    """Profile-wide OPC UA settings."""

    namespace_uri: str = Field(description="URI of the namespace the profile's NodeIds live in.")
    root_name: str | None = Field(
        default=None, description="Name of the device's root object under Objects."
    )


class Profile(_Strict):
    """A device model: what it is, which category it counts in, and its points."""

    id: Identifier
    name: str = Field(min_length=1)
    name_zh: str = Field(min_length=1)
    family: Family
    category: Category
    protocol: Literal["modbus", "opcua"]
    manufacturer: str = ""
    description: str = ""
    standard: str = Field(default="", description="Register map standard followed, if any.")
    modbus: ModbusSettings | None = None
    opcua: OpcUaSettings | None = None
    points: list[Point] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("protocol") == "modbus" and "modbus" not in data:
            data = {**data, "modbus": {}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[str] = []
        seen: set[str] = set()
        for p in self.points:
            if p.name in seen:
                errors.append(f"point '{p.name}': duplicate point name")
            seen.add(p.name)
        if self.protocol == "modbus":
            errors.extend(self._check_modbus())
        else:
            errors.extend(self._check_opcua())
        names = {p.name: p for p in self.points}
        for p in self.points:
            if p.scale_factor_point is not None:
                sf = names.get(p.scale_factor_point)
                if sf is None:
                    errors.append(
                        f"point '{p.name}': scale_factor_point '{p.scale_factor_point}' "
                        "is not a point of this profile"
                    )
                elif sf.type not in (ValueType.INT16, ValueType.UINT16):
                    errors.append(f"point '{p.name}': scale factor point '{sf.name}' must be int16")
            if p.enum is not None and p.type in (ValueType.FLOAT32, ValueType.FLOAT64):
                errors.append(f"point '{p.name}': enum labels need an integer type")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def _check_modbus(self) -> list[str]:
        errors: list[str] = []
        assert self.modbus is not None
        # (table, register) -> (point name, bit or None)
        used: dict[tuple[ModbusTable, int], list[tuple[str, int | None]]] = {}
        for p in self.points:
            where = f"point '{p.name}'"
            if p.opcua is not None:
                errors.append(f"{where}: has an opcua address in a modbus profile")
            a = p.modbus
            if a is None:
                errors.append(f"{where}: missing its modbus address")
                continue
            if a.table.is_bit_table:
                if p.type is not ValueType.BOOL:
                    errors.append(
                        f"{where}: a {a.table.value} holds single bits, so its type must be bool, "
                        f"not {p.type.value}"
                    )
                if a.bit is not None:
                    errors.append(f"{where}: 'bit' applies to register tables only")
            else:
                if p.type is ValueType.BOOL and a.bit is None:
                    errors.append(f"{where}: a bool in a {a.table.value} register needs 'bit'")
                if p.type is not ValueType.BOOL and a.bit is not None:
                    errors.append(f"{where}: 'bit' is only for bool points")
            if p.type is ValueType.STRING and a.length is None:
                errors.append(f"{where}: a string needs 'length' (registers)")
            if p.type is not ValueType.STRING and a.length is not None:
                errors.append(f"{where}: 'length' is only for strings")
            if p.access == "rw" and not a.table.writable:
                errors.append(
                    f"{where}: access rw but the {a.table.value} table is read-only "
                    "(use holding or coil)"
                )
            count = p.register_count
            if a.address + count > MODBUS_ADDRESS_SPACE:
                errors.append(
                    f"{where}: registers {a.address}..{a.address + count - 1} run past 65535"
                )
                continue
            limit = (
                self.modbus.max_bits_per_read
                if a.table.is_bit_table
                else self.modbus.max_registers_per_read
            )
            if count > limit:
                errors.append(f"{where}: {count} registers cannot be read in one request")
            for reg in range(a.address, a.address + count):
                for other, other_bit in used.get((a.table, reg), []):
                    same_bit_ok = a.bit is not None and other_bit is not None and a.bit != other_bit
                    if not same_bit_ok:
                        errors.append(
                            f"{where}: {a.table.value} register {reg} overlaps point '{other}'"
                        )
                        break
                used.setdefault((a.table, reg), []).append((p.name, a.bit))
        return errors

    def _check_opcua(self) -> list[str]:
        errors: list[str] = []
        if self.opcua is None:
            errors.append("an opcua profile needs 'opcua: {namespace_uri: ...}'")
        seen: dict[str, str] = {}
        for p in self.points:
            where = f"point '{p.name}'"
            if p.modbus is not None:
                errors.append(f"{where}: has a modbus address in an opcua profile")
            if p.opcua is None:
                errors.append(f"{where}: missing its opcua address")
                continue
            key = p.opcua.node_id or p.opcua.browse_path or ""
            if key in seen:
                errors.append(f"{where}: same OPC UA address as point '{seen[key]}'")
            seen[key] = p.name
        return errors

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)
