"""Values to and from Modbus registers, exactly as a profile declares them.

The simulators encode with these functions and the agent decodes with them, so a
profile and its simulator can never disagree about a register's meaning.
"""

from __future__ import annotations

import math
import struct

from device_profiles.schema import Point, ValueType
from protocols.modbus.profile import ByteOrder, ModbusSettings, modbus_address

__all__ = ["STRUCT_CODES", "Value", "decode", "encode", "from_raw", "to_raw"]

Value = bool | int | float | str

# struct codes of the numeric types (big-endian, one value each).
STRUCT_CODES: dict[ValueType, str] = {
    ValueType.INT16: "h",
    ValueType.UINT16: "H",
    ValueType.INT32: "i",
    ValueType.UINT32: "I",
    ValueType.INT64: "q",
    ValueType.FLOAT32: "f",
    ValueType.FLOAT64: "d",
}
_INT_TYPES = {ValueType.INT16, ValueType.UINT16, ValueType.INT32, ValueType.UINT32, ValueType.INT64}


def _orders(point: Point, settings: ModbusSettings | None) -> tuple[ByteOrder, ByteOrder]:
    s = settings or ModbusSettings()
    a = modbus_address(point)
    byte_order = (a.byte_order if a and a.byte_order else None) or s.byte_order
    word_order = (a.word_order if a and a.word_order else None) or s.word_order
    return byte_order, word_order


def _words_to_registers(data: bytes, byte_order: ByteOrder, word_order: ByteOrder) -> list[int]:
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if word_order is ByteOrder.LITTLE:
        words.reverse()
    if byte_order is ByteOrder.LITTLE:
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def _registers_to_bytes(regs: list[int], byte_order: ByteOrder, word_order: ByteOrder) -> bytes:
    words = [(r & 0xFFFF).to_bytes(2, "big") for r in regs]
    if byte_order is ByteOrder.LITTLE:
        words = [w[::-1] for w in words]
    if word_order is ByteOrder.LITTLE:
        words.reverse()
    return b"".join(words)


def to_raw(point: Point, value: Value, sf_exponent: int | None = None) -> Value:
    """Engineering value → raw value as stored on the device (reverse scale/offset)."""
    if point.type in (ValueType.BOOL, ValueType.STRING):
        return value
    if isinstance(value, bool | str):
        raise ValueError(f"point '{point.name}': expected a number, got {value!r}")
    if (
        isinstance(value, int)
        and point.type in _INT_TYPES
        and point.scale == 1.0
        and point.offset == 0.0
        and not sf_exponent
    ):
        return value  # exact: a float would round int64 values beyond 2**53
    raw = (float(value) - point.offset) / point.scale
    if sf_exponent is not None:
        raw /= 10.0**sf_exponent
    if point.type in _INT_TYPES:
        return round(raw)
    return raw


def from_raw(point: Point, raw: Value, sf_exponent: int | None = None) -> Value:
    """Raw device value → engineering value (scale, offset, scale-factor exponent)."""
    if point.type in (ValueType.BOOL, ValueType.STRING) or isinstance(raw, bool | str):
        return raw
    plain = point.scale == 1.0 and point.offset == 0.0 and not sf_exponent
    if plain:
        return raw
    value = raw * point.scale
    if sf_exponent:
        value *= 10.0**sf_exponent
    value += point.offset
    # Keep decimal figures honest: 2301 * 0.1 is 230.1, not 230.10000000000002.
    return round(value, 10) if math.isfinite(value) else value


def encode(
    point: Point,
    value: Value,
    settings: ModbusSettings | None = None,
    *,
    sf_exponent: int | None = None,
) -> list[int]:
    """Engineering value → the registers (or single bit, as [0|1]) the device holds."""
    if point.type is ValueType.BOOL:
        return [1 if value else 0]
    byte_order, word_order = _orders(point, settings)
    if point.type is ValueType.STRING:
        a = modbus_address(point)
        assert a is not None and a.length is not None
        data = str(value).encode("utf-8")[: a.length * 2]
        data = data.ljust(a.length * 2, b"\x00")
        words = [data[i : i + 2] for i in range(0, len(data), 2)]
        if byte_order is ByteOrder.LITTLE:
            words = [w[::-1] for w in words]
        return [int.from_bytes(w, "big") for w in words]
    raw = to_raw(point, value, sf_exponent)
    try:
        data = struct.pack(">" + STRUCT_CODES[point.type], raw)
    except struct.error as exc:
        raise ValueError(
            f"point '{point.name}': {value!r} does not fit a {point.type.value}"
        ) from exc
    return _words_to_registers(data, byte_order, word_order)


def decode(
    point: Point,
    registers: list[int],
    settings: ModbusSettings | None = None,
    *,
    sf_exponent: int | None = None,
) -> Value:
    """The registers (or [bit]) read from the device → engineering value."""
    if point.type is ValueType.BOOL:
        a = modbus_address(point)
        bit = a.bit if a is not None else None
        if bit is not None:
            return bool((registers[0] >> bit) & 1)
        return bool(registers[0])
    byte_order, word_order = _orders(point, settings)
    if point.type is ValueType.STRING:
        words = [(r & 0xFFFF).to_bytes(2, "big") for r in registers]
        if byte_order is ByteOrder.LITTLE:
            words = [w[::-1] for w in words]
        return b"".join(words).rstrip(b"\x00 ").decode("utf-8", errors="replace")
    data = _registers_to_bytes(registers, byte_order, word_order)
    (raw,) = struct.unpack(">" + STRUCT_CODES[point.type], data)
    return from_raw(point, raw, sf_exponent)
