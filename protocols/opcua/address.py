"""Profile addresses and values on the OPC UA wire, shared by the simulator and the driver.

A profile writes ``ns=2`` (in NodeIds and in browse-path elements) for its own
``namespace_uri``; a server may hold that namespace at another index, so both sides
resolve addresses against the index the namespace really has. Values on the wire are
raw (before the profile's scale/offset) and carry the variant type of the point's type.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from asyncua import ua

from device_profiles.schema import INT_BOUNDS, Point, ValueType
from protocols.modbus.codec import Value, from_raw, to_raw

__all__ = [
    "PROFILE_NS_INDEX",
    "VARIANT_TYPES",
    "browse_path",
    "decode_value",
    "encode_value",
    "node_id",
]

PROFILE_NS_INDEX = 2

VARIANT_TYPES: dict[ValueType, ua.VariantType] = {
    ValueType.BOOL: ua.VariantType.Boolean,
    ValueType.INT16: ua.VariantType.Int16,
    ValueType.UINT16: ua.VariantType.UInt16,
    ValueType.INT32: ua.VariantType.Int32,
    ValueType.UINT32: ua.VariantType.UInt32,
    ValueType.INT64: ua.VariantType.Int64,
    ValueType.FLOAT32: ua.VariantType.Float,
    ValueType.FLOAT64: ua.VariantType.Double,
    ValueType.STRING: ua.VariantType.String,
}

_FLOAT32_MAX = 3.4028234663852886e38


def _ns(index: int, profile_ns: int) -> int:
    return profile_ns if index == PROFILE_NS_INDEX else index


def node_id(text: str, profile_ns: int, namespace_uri: str = "") -> ua.NodeId:
    """A profile's NodeId string on a server where the profile namespace has ``profile_ns``.

    ``nsu=<namespace_uri>;...`` is accepted for the profile's own namespace.
    """
    try:
        parsed = ua.NodeId.from_string(text)
    except (ua.UaError, ValueError) as exc:
        raise ValueError(f"'{text}' is not a NodeId (e.g. 'ns=2;s=Boiler.Pressure')") from exc
    ident_type = parsed.NodeIdType
    if ident_type in (ua.NodeIdType.TwoByte, ua.NodeIdType.FourByte):
        ident_type = ua.NodeIdType.Numeric
    uri = getattr(parsed, "NamespaceUri", None)
    if uri:
        if uri != namespace_uri:
            raise ValueError(f"'{text}': namespace '{uri}' is not the profile's namespace_uri")
        index = profile_ns
    else:
        index = _ns(parsed.NamespaceIndex, profile_ns)
    return ua.NodeId(parsed.Identifier, index, ident_type)


def browse_path(text: str, profile_ns: int) -> list[ua.QualifiedName]:
    """Browse names of a slash-separated path of ``nsidx:Name`` elements (no prefix: ns 0)."""
    names: list[ua.QualifiedName] = []
    for part in text.strip("/").split("/"):
        if not part:
            raise ValueError(f"browse path '{text}' has an empty element")
        prefix, sep, name = part.partition(":")
        if sep and prefix.isdigit():
            if not name:
                raise ValueError(f"browse path '{text}': element '{part}' has no name")
            names.append(ua.QualifiedName(name, _ns(int(prefix), profile_ns)))
        else:
            names.append(ua.QualifiedName(part, 0))
    return names


def encode_value(point: Point, value: Value, *, saturate: bool = False) -> ua.Variant:
    """Engineering value → the raw value in the point's variant type.

    ``saturate`` clamps integers to the type's limits as a device's converter does; without
    it an out-of-limits value raises ValueError naming the point.
    """
    vtype = VARIANT_TYPES[point.type]
    if point.type is ValueType.BOOL:
        if not isinstance(value, bool | int) or (isinstance(value, int) and value not in (0, 1)):
            raise ValueError(f"point '{point.name}': expected a bool, got {value!r}")
        return ua.Variant(bool(value), vtype)
    if point.type is ValueType.STRING:
        if not isinstance(value, str):
            raise ValueError(f"point '{point.name}': expected a string, got {value!r}")
        return ua.Variant(value, vtype)
    raw = to_raw(point, value)
    if isinstance(raw, bool | str):
        raise ValueError(f"point '{point.name}': expected a number, got {value!r}")
    bounds = INT_BOUNDS.get(point.type)
    if bounds is not None:
        lo, hi = bounds
        raw_int = int(raw)
        if not lo <= raw_int <= hi:
            if not saturate:
                raise ValueError(
                    f"point '{point.name}': {value!r} does not fit a {point.type.value} "
                    f"(raw {raw_int}, limits {lo}..{hi})"
                )
            raw_int = min(hi, max(lo, raw_int))
        return ua.Variant(raw_int, vtype)
    raw_f = float(raw)
    if point.type is ValueType.FLOAT32 and math.isfinite(raw_f) and abs(raw_f) > _FLOAT32_MAX:
        if not saturate:
            raise ValueError(f"point '{point.name}': {value!r} does not fit a float32")
        raw_f = math.copysign(_FLOAT32_MAX, raw_f)
    return ua.Variant(raw_f, vtype)


def _shortest_float32(v: float) -> float:
    """The shortest decimal that reads back as the same float32 (101.3, not 101.30000305)."""
    if not math.isfinite(v):
        return v
    target = struct.pack("<f", v)
    for digits in range(6, 10):
        candidate = float(f"{v:.{digits}g}")
        if struct.pack("<f", candidate) == target:
            return candidate
    return v


def decode_value(point: Point, raw: Any) -> Value:
    """A raw value read from a server → engineering value; ValueError if the type is wrong."""
    t = point.type
    if t is ValueType.BOOL:
        if not isinstance(raw, bool):
            raise ValueError(f"point '{point.name}': expected Boolean, got {raw!r}")
        return raw
    if t is ValueType.STRING:
        if not isinstance(raw, str):
            raise ValueError(f"point '{point.name}': expected String, got {raw!r}")
        # Servers send legacy encodings (GBK on much Chinese equipment); what is not
        # UTF-8 arrives as surrogate escapes, which no JSON encoder accepts.
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"point '{point.name}': expected a number, got {raw!r}")
    if t in INT_BOUNDS and not isinstance(raw, int):
        raise ValueError(f"point '{point.name}': expected an integer {t.value}, got {raw!r}")
    if isinstance(raw, float) and not math.isfinite(raw):
        # As on Modbus: NaN and infinities are a sensor fault, not a reading.
        raise ValueError(f"point '{point.name}': not a finite number ({raw!r})")
    if t is ValueType.FLOAT32:
        raw = _shortest_float32(float(raw))
    return from_raw(point, raw)
