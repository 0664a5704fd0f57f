"""The SunSpec models a simulated device serves in full, and what their unmapped registers read.

A SunSpec client reads a model in one request, from its ID to its last register, so a
device must answer every register of each model it carries, not only the points it
implements. A profile lists the points it has data for; this module knows the point
lists of the models the simulator serves in full (common model 1, three-phase inverter
model 103) and gives, for each register of those models the profile leaves out, what a
SunSpec device answers there:

- an optional point reads as SunSpec's "not implemented" value of its type (0xFFFF for
  uint16/enum16/bitfield16, 0x8000 for int16/sunssf, 0xFFFFFFFF for uint32/bitfield32,
  0x80000000 for int32, 0 for string/pad/acc16/acc32);
- a mandatory point has a value: a string reads as the profile id (the device's model),
  a number as 0 (for Evt2: no events).

The models are found from the profile itself: a SunSpec profile (``standard`` names
SunSpec) with a two-register string point, the "SunS" marker, at base 0, 40000 or 50000,
and after it model headers whose ID and length points each have a one-value range
(``range: [103, 103]``). The chain ends at ID 0xFFFF or at a header the profile does not
declare; a model not known here keeps its unmapped registers unmapped.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from device_profiles.schema import Point, Profile, ValueType
from protocols.modbus.profile import ModbusTable, modbus_address, point_registers

__all__ = ["MODELS", "SUNSPEC_BASES", "ModelPoint", "model_fill", "unimplemented"]

SUNSPEC_BASES = (40000, 0, 50000)  # where SunSpec clients look for "SunS", in their order
_END_ID = 0xFFFF

SunSpecType = Literal[
    "uint16", "int16", "enum16", "bitfield16", "sunssf", "acc16", "pad", "count",
    "uint32", "int32", "enum32", "bitfield32", "acc32", "string",
]  # fmt: skip


class ModelPoint(NamedTuple):
    """One point of a SunSpec model: name, type, size in registers, mandatory."""

    name: str
    type: SunSpecType
    size: int = 1
    mandatory: bool = False


def _p(name: str, type_: SunSpecType, size: int = 1, mandatory: bool = False) -> ModelPoint:
    return ModelPoint(name, type_, size, mandatory)


# Point lists after the ID and L header, in register order, from the SunSpec models.
MODELS: dict[int, tuple[ModelPoint, ...]] = {
    1: (  # common
        _p("Mn", "string", 16, True),
        _p("Md", "string", 16, True),
        _p("Opt", "string", 8),
        _p("Vr", "string", 8),
        _p("SN", "string", 16, True),
        _p("DA", "uint16"),
        _p("Pad", "pad"),
    ),
    103: (  # inverter, three phase
        *(_p(n, "uint16", 1, True) for n in ("A", "AphA", "AphB", "AphC")),
        _p("A_SF", "sunssf", 1, True),
        *(_p(n, "uint16") for n in ("PPVphAB", "PPVphBC", "PPVphCA")),
        *(_p(n, "uint16", 1, True) for n in ("PhVphA", "PhVphB", "PhVphC")),
        _p("V_SF", "sunssf", 1, True),
        _p("W", "int16", 1, True),
        _p("W_SF", "sunssf", 1, True),
        _p("Hz", "uint16", 1, True),
        _p("Hz_SF", "sunssf", 1, True),
        _p("VA", "int16"),
        _p("VA_SF", "sunssf"),
        _p("VAr", "int16"),
        _p("VAr_SF", "sunssf"),
        _p("PF", "int16"),
        _p("PF_SF", "sunssf"),
        _p("WH", "acc32", 2, True),
        _p("WH_SF", "sunssf", 1, True),
        _p("DCA", "uint16"),
        _p("DCA_SF", "sunssf"),
        _p("DCV", "uint16"),
        _p("DCV_SF", "sunssf"),
        _p("DCW", "int16"),
        _p("DCW_SF", "sunssf"),
        _p("TmpCab", "int16", 1, True),
        *(_p(n, "int16") for n in ("TmpSnk", "TmpTrns", "TmpOt")),
        _p("Tmp_SF", "sunssf", 1, True),
        _p("St", "enum16", 1, True),
        _p("StVnd", "enum16"),
        _p("Evt1", "bitfield32", 2, True),
        _p("Evt2", "bitfield32", 2, True),
        *(_p(f"EvtVnd{i}", "bitfield32", 2) for i in range(1, 5)),
    ),
}

# The registers of each type's "not implemented" value (strings: every register 0).
_UNIMPLEMENTED: dict[str, tuple[int, ...]] = {
    "uint16": (0xFFFF,),
    "enum16": (0xFFFF,),
    "bitfield16": (0xFFFF,),
    "count": (0xFFFF,),
    "int16": (0x8000,),
    "sunssf": (0x8000,),
    "acc16": (0,),
    "pad": (0,),
    "uint32": (0xFFFF, 0xFFFF),
    "enum32": (0xFFFF, 0xFFFF),
    "bitfield32": (0xFFFF, 0xFFFF),
    "int32": (0x8000, 0),
    "acc32": (0, 0),
}


def unimplemented(point: ModelPoint) -> list[int]:
    """The registers of ``point`` when the device does not implement it."""
    if point.type == "string":
        return [0] * point.size
    return list(_UNIMPLEMENTED[point.type])


def _served(point: ModelPoint, profile: Profile) -> list[int]:
    """What the device answers for a point of one of its models the profile leaves out."""
    if not point.mandatory:
        return unimplemented(point)
    if point.type == "string":
        data = profile.id.encode("ascii", "replace")[: 2 * point.size]
        data = data.ljust(2 * point.size, b"\0")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return [0] * point.size


def _constant(points: dict[int, Point], address: int) -> int | None:
    """The one value a uint16 header point at ``address`` may take, if the profile fixes it."""
    p = points.get(address)
    if p is None or p.type is not ValueType.UINT16 or p.range is None:
        return None
    lo, hi = p.range
    return int(lo) if lo == hi and lo == int(lo) else None


def _holding(profile: Profile) -> tuple[dict[int, Point], set[int]]:
    """Holding points by start address, and every holding register a point occupies."""
    starts: dict[int, Point] = {}
    covered: set[int] = set()
    for p in profile.points:
        a = modbus_address(p)
        if a is None or a.table is not ModbusTable.HOLDING:
            continue
        starts.setdefault(a.address, p)
        covered.update(range(a.address, a.address + max(1, point_registers(p))))
    return starts, covered


def model_fill(profile: Profile) -> dict[int, int]:
    """Holding address -> register value for the unmapped registers of the profile's models.

    Empty unless the profile is a SunSpec map this module can follow (see the module
    docstring); registers the profile maps are never included.
    """
    if "sunspec" not in profile.standard.lower():
        return {}
    starts, covered = _holding(profile)
    markers = [
        b
        for b in SUNSPEC_BASES
        if (m := starts.get(b)) is not None
        and m.type is ValueType.STRING
        and point_registers(m) == 2
    ]
    if not markers:
        return {}
    fill: dict[int, int] = {}
    at = markers[0] + 2
    while at + 1 <= 0xFFFF:
        model_id, length = _constant(starts, at), _constant(starts, at + 1)
        if model_id is None or model_id == _END_ID or length is None:
            break
        offset = at + 2
        for point in MODELS.get(model_id, ()):
            for i, reg in enumerate(_served(point, profile)):
                addr = offset + i
                if addr < at + 2 + length and addr not in covered:
                    fill[addr] = reg
            offset += point.size
        at += 2 + length
    return fill
