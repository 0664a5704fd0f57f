"""Sparkplug B topics, datatypes and metric values over the generated protobuf module.

Topics (namespace ``spBv1.0``), with group id = enterprise, edge node id = agent id,
device id = device id::

    spBv1.0/{group}/NBIRTH|NDEATH|NDATA|NCMD/{node}
    spBv1.0/{group}/DBIRTH|DDEATH|DDATA|DCMD/{node}/{device}

A point's datatype comes from its profile type (``datatype_for``); a value that does not
fit it (a scaled integer, a float32 point read as a wider float) travels with the
datatype of its own Python type on that metric, so no value is ever rounded or cut.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from device_profiles.schema import Point, ValueType
from protocols.mqtt.contract import ContractError, PointValue, validate_identifier
from protocols.mqtt.sparkplug import sparkplug_b_pb2 as _pb

__all__ = [
    "NAMESPACE",
    "DataType",
    "MessageType",
    "Payload",
    "SpTopic",
    "datatype_for",
    "fit_datatype",
    "get_properties",
    "get_value",
    "parse_payload",
    "parse_sp_topic",
    "set_property",
    "set_value",
]

NAMESPACE = "spBv1.0"

_generated: Any = _pb  # protoc's module builds its classes at import time
Payload: Any = _generated.Payload


class DataType(IntEnum):
    """Sparkplug B datatypes (the scalar ones this project sends and reads)."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15


class MessageType(StrEnum):
    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    NDATA = "NDATA"
    NCMD = "NCMD"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    DDATA = "DDATA"
    DCMD = "DCMD"


_DEVICE_TYPES = frozenset(
    {MessageType.DBIRTH, MessageType.DDEATH, MessageType.DDATA, MessageType.DCMD}
)


@dataclass(frozen=True, slots=True)
class SpTopic:
    """A validated Sparkplug B topic."""

    group: str
    type: MessageType
    node: str
    device: str | None = None

    def __post_init__(self) -> None:
        validate_identifier(self.group, "group")
        validate_identifier(self.node, "edge node")
        if (self.type in _DEVICE_TYPES) != (self.device is not None):
            raise ContractError("bad_topic", f"{self.type.value} topic: device id misplaced")
        if self.device is not None:
            validate_identifier(self.device, "device")

    def __str__(self) -> str:
        base = f"{NAMESPACE}/{self.group}/{self.type.value}/{self.node}"
        return base if self.device is None else f"{base}/{self.device}"


def parse_sp_topic(topic: str) -> SpTopic:
    """Parse a ``spBv1.0/...`` topic; raises ContractError('bad_topic' / 'bad_identifier')."""
    parts = topic.split("/")
    if parts[0] != NAMESPACE or len(parts) not in (4, 5):
        raise ContractError("bad_topic", f"topic {topic[:120]!r} is not a Sparkplug B topic")
    try:
        kind = MessageType(parts[2])
    except ValueError:
        raise ContractError(
            "bad_topic", f"topic {topic[:120]!r}: unknown message type {parts[2][:20]!r}"
        ) from None
    return SpTopic(parts[1], kind, parts[3], parts[4] if len(parts) == 5 else None)


_TYPE_MAP: dict[ValueType, DataType] = {
    ValueType.BOOL: DataType.BOOLEAN,
    ValueType.INT16: DataType.INT16,
    ValueType.UINT16: DataType.UINT16,
    ValueType.INT32: DataType.INT32,
    ValueType.UINT32: DataType.UINT32,
    ValueType.INT64: DataType.INT64,
    ValueType.FLOAT32: DataType.FLOAT,
    ValueType.FLOAT64: DataType.DOUBLE,
    ValueType.STRING: DataType.STRING,
}

_INT_RANGE: dict[DataType, tuple[int, int]] = {
    DataType.INT8: (-(2**7), 2**7 - 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT8: (0, 2**8 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.UINT64: (0, 2**64 - 1),
    DataType.DATETIME: (0, 2**64 - 1),
}
_SIGNED32 = frozenset({DataType.INT8, DataType.INT16, DataType.INT32})
_UNSIGNED32 = frozenset({DataType.UINT8, DataType.UINT16})
# UInt32 travels in long_value, as Eclipse Tahu's encoders write it; read from either.
_LONG = frozenset({DataType.UINT32, DataType.INT64, DataType.UINT64, DataType.DATETIME})
_STRINGS = frozenset({DataType.STRING, DataType.TEXT, DataType.UUID})
_F32 = struct.Struct("<f")


def datatype_for(point: Point) -> DataType:
    """The datatype a profile point is born with: its type, Double once it is scaled."""
    dt = _TYPE_MAP[point.type]
    scaled = point.scale != 1.0 or point.offset != 0.0 or point.scale_factor_point is not None
    if scaled and dt not in (DataType.BOOLEAN, DataType.STRING):
        return DataType.DOUBLE
    return dt


def _is_float32(v: float) -> bool:
    if not math.isfinite(v):
        return True
    try:
        return float(_F32.unpack(_F32.pack(v))[0]) == v
    except OverflowError:
        return False


def fit_datatype(declared: DataType, value: PointValue) -> DataType:
    """``declared`` when ``value`` fits it exactly, else the datatype of the value itself.

    An integer on a Double point (a scaled value that came out whole) stays an integer:
    the gateway writes it as the JSON contract would, so the series keeps one field type.
    """
    t = type(value)
    if value is None:
        return declared
    if t is bool:
        return DataType.BOOLEAN
    if t is str:
        return declared if declared in _STRINGS else DataType.STRING
    if t is int:
        assert isinstance(value, int)
        bounds = _INT_RANGE.get(declared)
        if bounds is not None and bounds[0] <= value <= bounds[1]:
            return declared
        if -(2**63) <= value < 2**63:
            return DataType.INT64
        if 0 <= value < 2**64:
            return DataType.UINT64
        raise ContractError("bad_value", f"integer {value} does not fit 64 bits")
    if t is float:
        assert isinstance(value, float)
        if declared is DataType.FLOAT and _is_float32(value):
            return declared
        return DataType.DOUBLE
    raise ContractError("bad_value", f"a {t.__name__} is no point value")


def set_value(metric: Any, datatype: DataType, value: PointValue) -> None:
    """Write ``value`` into ``metric``'s value field for ``datatype`` (None: is_null)."""
    if value is None:
        metric.is_null = True
    elif datatype in _SIGNED32:
        metric.int_value = int(value) & 0xFFFFFFFF  # two's complement, as the spec says
    elif datatype in _UNSIGNED32:
        metric.int_value = int(value)
    elif datatype in _LONG:
        metric.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif datatype is DataType.FLOAT:
        metric.float_value = float(value)
    elif datatype is DataType.DOUBLE:
        metric.double_value = float(value)
    elif datatype is DataType.BOOLEAN:
        metric.boolean_value = bool(value)
    elif datatype in _STRINGS:
        metric.string_value = str(value)
    else:
        raise ContractError("unsupported_datatype", f"datatype {int(datatype)} is not sent")


_FIELD_OF: dict[DataType, str] = {
    **dict.fromkeys(_SIGNED32 | _UNSIGNED32, "int_value"),
    **dict.fromkeys(_LONG, "long_value"),
    DataType.FLOAT: "float_value",
    DataType.DOUBLE: "double_value",
    DataType.BOOLEAN: "boolean_value",
    **dict.fromkeys(_STRINGS, "string_value"),
}
_BITS = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}


def get_value(metric: Any, datatype: int) -> PointValue:
    """The value of ``metric`` read as ``datatype``; ContractError when they disagree."""
    if metric.is_null:
        return None
    try:
        dt = DataType(datatype)
    except ValueError:
        raise ContractError(
            "unsupported_datatype", f"metric {metric.name!r}: datatype {datatype} is not read"
        ) from None
    field = _FIELD_OF.get(dt)
    if field is None:
        raise ContractError(
            "unsupported_datatype", f"metric {metric.name!r}: datatype {datatype} is not read"
        )
    which = metric.WhichOneof("value")
    if which == "int_value" and dt is DataType.UINT32:
        field = which
    if which != field:
        raise ContractError(
            "bad_datatype",
            f"metric {metric.name or metric.alias!r}: datatype {dt.name} but value in {which}",
        )
    v = getattr(metric, field)
    bits = _BITS.get(dt)
    if bits is not None:
        # Signed values travel as two's complement in an unsigned field.
        v &= (1 << bits) - 1
        if v >= 1 << (bits - 1):
            v -= 1 << bits
    lo_hi = _INT_RANGE.get(dt)
    if lo_hi is not None and not lo_hi[0] <= v <= lo_hi[1]:
        raise ContractError("bad_value", f"metric {metric.name!r}: {v} is not a {dt.name}")
    out: PointValue = v
    return out


def set_property(metric: Any, key: str, value: str) -> None:
    """Add a String property to ``metric``."""
    props = metric.properties
    props.keys.append(key)
    pv = props.values.add()
    pv.type = DataType.STRING
    pv.string_value = value


def get_properties(metric: Any) -> dict[str, str]:
    """The String and number properties of ``metric`` as text."""
    if not metric.HasField("properties"):
        return {}
    props = metric.properties
    out: dict[str, str] = {}
    for key, pv in zip(props.keys, props.values, strict=False):
        which = pv.WhichOneof("value")
        if which in ("string_value", "int_value", "long_value", "float_value", "double_value"):
            out[key] = str(getattr(pv, which))
        elif which == "boolean_value":
            out[key] = "true" if pv.boolean_value else "false"
    return out


def parse_payload(data: bytes) -> Any:
    """Decode a Sparkplug B payload; raises ContractError('bad_protobuf')."""
    msg = Payload()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # DecodeError, and RuntimeError from some runtimes
        raise ContractError("bad_protobuf", f"payload is not a Sparkplug B payload: {exc}") from exc
    return msg
