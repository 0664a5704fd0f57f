"""What a device profile says about Modbus: point addresses, profile-wide defaults, checks.

A point's ``modbus:`` mapping is a :class:`ModbusAddress`; a profile's ``modbus:``
mapping is :class:`ModbusSettings`. :func:`check_profile` finds what no single point
shows: overlapping registers, a request larger than the device allows.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from device_profiles.schema import Point, Profile, ValueType

__all__ = [
    "MODBUS_ADDRESS_SPACE",
    "ByteOrder",
    "ModbusAddress",
    "ModbusSettings",
    "ModbusTable",
    "check_profile",
    "modbus_address",
    "modbus_settings",
    "point_registers",
    "register_count",
]

MODBUS_ADDRESS_SPACE = 65536


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class ModbusSettings(_Strict):
    """Profile-wide Modbus defaults."""

    byte_order: ByteOrder = ByteOrder.BIG
    word_order: ByteOrder = ByteOrder.BIG
    max_registers_per_read: int = Field(default=125, ge=1, le=125)
    max_bits_per_read: int = Field(default=2000, ge=1, le=2000)
    default_unit: int = Field(default=1, ge=0, le=247)


def modbus_address(point: Point) -> ModbusAddress | None:
    """The point's ``modbus:`` address, if it has one."""
    a = point.address("modbus")
    return a if isinstance(a, ModbusAddress) else None


def modbus_settings(profile: Profile) -> ModbusSettings:
    """The profile's ``modbus:`` settings (defaults when it gives none)."""
    s = profile.settings("modbus")
    return s if isinstance(s, ModbusSettings) else ModbusSettings()


def point_registers(point: Point) -> int:
    """Registers (or bits, for the bit tables) this point occupies; 0 without an address."""
    a = modbus_address(point)
    if a is None:
        return 0
    if a.table.is_bit_table:
        return 1
    return register_count(point.type, a.length)


def _check_point(p: Point, a: ModbusAddress) -> list[str]:
    errors: list[str] = []
    where = f"point '{p.name}'"
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
            f"{where}: access rw but the {a.table.value} table is read-only (use holding or coil)"
        )
    return errors


def check_profile(profile: Profile) -> list[str]:
    """Every problem of a Modbus profile's addresses, each naming its point."""
    errors: list[str] = []
    settings = modbus_settings(profile)
    # (table, register) -> (point name, bit or None)
    used: dict[tuple[ModbusTable, int], list[tuple[str, int | None]]] = {}
    for p in profile.points:
        a = modbus_address(p)
        if a is None:
            continue
        where = f"point '{p.name}'"
        errors.extend(_check_point(p, a))
        count = point_registers(p)
        if a.address + count > MODBUS_ADDRESS_SPACE:
            errors.append(f"{where}: registers {a.address}..{a.address + count - 1} run past 65535")
            continue
        limit = (
            settings.max_bits_per_read if a.table.is_bit_table else settings.max_registers_per_read
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
