"""The profiles shipped with iiot: the agreed ids, sound register maps, real standards."""

from __future__ import annotations

import pytest

from device_profiles import Category, Profile, ValueType, load_profiles
from protocols import registry
from protocols.modbus.profile import ByteOrder, ModbusTable

LOADED = load_profiles()
PROFILES = {p.id: p for p in LOADED}
_LIMITS = {
    ValueType.INT16: (-(2**15), 2**15 - 1),
    ValueType.UINT16: (0, 2**16 - 1),
    ValueType.INT32: (-(2**31), 2**31 - 1),
    ValueType.UINT32: (0, 2**32 - 1),
    ValueType.INT64: (-(2**63), 2**63 - 1),
}


def test_each_profile_counts_in_its_familys_category() -> None:
    for pid, p in PROFILES.items():
        family = LOADED.families[p.family]
        assert (p.category, p.protocol in registry.names()) == (family.category, True), pid
    # Together the shipped models cover every policy category and every built-in protocol.
    assert {p.category for p in PROFILES.values()} == set(Category)
    assert {p.protocol for p in PROFILES.values()} == {"modbus", "opcua"}


@pytest.mark.parametrize("pid", sorted(PROFILES))
def test_profile_is_complete(pid: str) -> None:
    p = PROFILES[pid]
    assert 15 <= len(p.points) <= 40
    assert p.name and p.name_zh and p.manufacturer and p.description
    if pid != "pv-inverter-sunspec":  # SunSpec model 103 is read-only (controls are model 123)
        assert any(pt.access == "rw" for pt in p.points), "no writable setpoint or command"
    for pt in p.points:
        assert pt.description, pt.name
        numeric = pt.type not in (ValueType.BOOL, ValueType.STRING)
        if numeric and not pt.enum and not pt.bits:
            assert pt.range is not None, f"{pt.name} has no range"


@pytest.mark.parametrize("pid", sorted(PROFILES))
def test_ranges_fit_the_registers(pid: str) -> None:
    """A value anywhere in the declared range can be stored in the declared type."""
    p = PROFILES[pid]
    for pt in p.points:
        if pt.range is None or pt.type not in _LIMITS:
            continue
        step = pt.scale
        if pt.scale_factor_point is not None:
            sf_range = p.point(pt.scale_factor_point).range
            assert sf_range is not None and sf_range[0] == sf_range[1]
            step *= 10.0 ** sf_range[0]
        lo, hi = _LIMITS[pt.type]
        raws = [(v - pt.offset) / step for v in pt.range]
        assert lo <= min(raws) and max(raws) <= hi, f"{pt.name}: range {pt.range} overflows"


def test_profiles_together_cover_the_modbus_features() -> None:
    modbus = [p for p in PROFILES.values() if p.protocol == "modbus"]
    tables = {pt.modbus.table for p in modbus for pt in p.points if pt.modbus}
    assert tables == set(ModbusTable)
    types = {pt.type for p in modbus for pt in p.points}
    assert {
        ValueType.INT16,
        ValueType.UINT16,
        ValueType.INT32,
        ValueType.UINT32,
        ValueType.FLOAT32,
        ValueType.FLOAT64,
        ValueType.INT64,
        ValueType.STRING,
    } <= types
    assert any(p.modbus and p.modbus.word_order is ByteOrder.LITTLE for p in modbus)


@pytest.mark.parametrize("pid", sorted(p.id for p in LOADED if p.protocol == "opcua"))
def test_opcua_profiles_address_their_namespace(pid: str) -> None:
    p = PROFILES[pid]
    assert p.opcua is not None and p.opcua.namespace_uri and p.opcua.root_name
    for pt in p.points:
        assert pt.opcua is not None
        if pt.opcua.browse_path is not None:
            elements = pt.opcua.browse_path.split("/")
            assert all(e.startswith("2:") for e in elements), pt.name
            assert elements[0] == f"2:{p.opcua.root_name}"
        elif pt.opcua.path is not None:  # relative to the device's root (root_name by default)
            assert all(e.startswith("2:") for e in pt.opcua.path.split("/")), pt.name
        else:
            assert pt.opcua.node_id is not None and pt.opcua.node_id.startswith("ns=2;s=")


def test_cnc_follows_machine_tool_structure() -> None:
    p = PROFILES["cnc-machine-tool"]
    assert p.opcua is not None
    # Relative paths start at the machine object, Objects/2:<root_name> by default.
    paths = {
        pt.opcua.browse_path or f"2:{p.opcua.root_name}/{pt.opcua.path}"
        for pt in p.points
        if pt.opcua
    }
    for path in (
        "2:Machine/2:Monitoring/2:MachineTool/2:OperationMode",
        "2:Machine/2:Monitoring/2:Spindle/2:Override",
        "2:Machine/2:Monitoring/2:Channel/2:ChannelState",
        "2:Machine/2:Monitoring/2:Channel/2:FeedOverride",
        "2:Machine/2:Production/2:ActiveProgram/2:Name",
        "2:Machine/2:Production/2:ActiveProgram/2:State",
    ):
        assert path in paths
    assert p.point("channel_state").enum == {0: "Active", 1: "Interrupted", 2: "Reset"}


def _addr(p: Profile, name: str) -> int:
    a = p.point(name).modbus
    assert a is not None and a.table is ModbusTable.HOLDING
    return int(a.address)


def test_pv_inverter_follows_the_sunspec_map() -> None:
    p = PROFILES["pv-inverter-sunspec"]
    sun_s = p.point("SunS")
    assert sun_s.modbus is not None and (sun_s.modbus.address, sun_s.modbus.length) == (40000, 2)
    # Models chain: marker, common model 1 (L=66), inverter 103 (L=50), end model.
    assert _addr(p, "C_ID") == 40002 and p.point("C_L").range == (66, 66)
    assert _addr(p, "I_ID") == _addr(p, "C_ID") + 2 + 66 == 40070
    assert p.point("I_ID").range == (103, 103) and p.point("I_L").range == (50, 50)
    assert _addr(p, "End_ID") == _addr(p, "I_ID") + 2 + 50 == 40122
    assert _addr(p, "End_L") == 40123
    offsets = {
        "A": 0, "AphA": 1, "AphB": 2, "AphC": 3, "A_SF": 4, "PhVphA": 8, "PhVphB": 9,
        "PhVphC": 10, "V_SF": 11, "W": 12, "W_SF": 13, "Hz": 14, "Hz_SF": 15, "VA": 16,
        "VA_SF": 17, "VAr": 18, "VAr_SF": 19, "PF": 20, "PF_SF": 21, "WH": 22, "WH_SF": 24,
        "DCA": 25, "DCA_SF": 26, "DCV": 27, "DCV_SF": 28, "DCW": 29, "DCW_SF": 30,
        "TmpCab": 31, "Tmp_SF": 35, "St": 36, "Evt1": 38,
    }  # fmt: skip
    for name, offset in offsets.items():
        assert _addr(p, name) == 40072 + offset, name
    for pt in p.points:
        if pt.name.endswith("_SF"):
            assert pt.type is ValueType.INT16
        if pt.scale_factor_point is not None:
            assert p.point(pt.scale_factor_point).name == pt.scale_factor_point
    assert p.point("WH").type is ValueType.UINT32
    assert p.point("Evt1").type is ValueType.UINT32 and p.point("Evt1").bits
    assert p.point("St").enum and p.point("St").enum[4] == "MPPT"
