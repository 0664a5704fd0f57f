"""The SunSpec inverter as SunSpec clients see it: whole models, not-implemented markers.

The reference is pysunspec2, the SunSpec Alliance's own client library: its model
definitions check the simulator's point lists, and its Modbus TCP client scans the
simulator the way SunSpec tools do (marker, then each model read in one request).
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from pymodbus.client import AsyncModbusTcpClient
from sunspec2 import device as sunspec_device
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from device_profiles.loader import load_profiles, parse_profile
from device_profiles.schema import Profile
from protocols.modbus.profile import ModbusTable, point_registers
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from simulators.models.pv_inverter import DAY_SECONDS, START_HOUR
from simulators.sunspec import MODELS, model_fill

PROFILES = {p.id: p for p in load_profiles()}
PV = PROFILES["pv-inverter-sunspec"]
NOON = (12.0 - START_HOUR) / 24.0 * DAY_SECONDS  # simulation time of 12:00
_BASE = 40000


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _at_noon() -> SimDevice:
    """An inverter run from dawn to noon of its first day, held there."""
    clock = _Clock()
    device = SimDevice(PV, device_id="pv-1", seed=7, clock=clock)
    t = 0.0
    while t < NOON:
        device.values(t)
        t += 5.0
    clock.now = NOON
    device.values()
    return device


@pytest.fixture
async def inverter() -> AsyncIterator[tuple[SimDevice, ModbusSimServer]]:
    device = _at_noon()
    server = ModbusSimServer({1: device}, port=0)
    await server.start()
    yield device, server
    await server.stop()


@pytest.fixture
async def client(inverter: tuple[SimDevice, ModbusSimServer]) -> AsyncIterator[Any]:
    c = AsyncModbusTcpClient(
        "127.0.0.1", port=inverter[1].port, timeout=2.0, retries=0, reconnect_delay=0
    )
    assert await c.connect()
    yield c
    c.close()


def _addr(name: str) -> int:
    a = PV.point(name).modbus
    assert a is not None and a.table is ModbusTable.HOLDING
    return int(a.address)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_model_point_lists_follow_the_sunspec_definitions(model_id: int) -> None:
    group = sunspec_device.get_model_def(model_id)["group"]
    header, points = group["points"][:2], group["points"][2:]
    assert [p["name"] for p in header] == ["ID", "L"]
    theirs = [(p["name"], p["type"], p["size"], p.get("mandatory") == "M") for p in points]
    ours = [(p.name, p.type, p.size, p.mandatory) for p in MODELS[model_id]]
    assert ours == theirs


def test_the_profile_puts_each_sunspec_point_where_the_model_has_it() -> None:
    names = {p.name for p in PV.points}
    for model_id, id_point, len_point in ((1, "C_ID", "C_L"), (103, "I_ID", "I_L")):
        group = sunspec_device.get_model_def(model_id)["group"]
        at = _addr(id_point)
        assert _addr(len_point) == at + 1
        offset = at
        for p in group["points"]:
            if p["name"] in names:
                assert _addr(p["name"]) == offset, p["name"]
                assert point_registers(PV.point(p["name"])) == p["size"], p["name"]
            offset += p["size"]
        length = offset - at - 2
        assert PV.point(id_point).range == (model_id, model_id)
        assert PV.point(len_point).range == (length, length)


def _scan(port: int) -> dict[int, dict[str, Any]]:
    """What pysunspec2 finds: model id -> point name -> (raw value, scaled value), errors."""
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
    try:
        dev.scan()
        found: dict[int, dict[str, Any]] = {}
        for model in dev.model_list:
            points = {n: (p.value, p.cvalue) for n, p in model.points.items()}
            found[model.model_id] = {
                "addr": model.model_addr,
                "len": model.model_len,
                "error": model.error_info,
                "points": points,
            }
        return found
    finally:
        dev.close()


def _close(a: float, b: float, step: float) -> bool:
    return math.isclose(a, b, abs_tol=step / 2 + 1e-9)


async def test_a_sunspec_client_scans_the_inverter_and_reads_both_models(
    inverter: tuple[SimDevice, ModbusSimServer],
) -> None:
    device, server = inverter
    found = await asyncio.to_thread(_scan, server.port)
    assert sorted(found) == [1, 103]
    assert (found[1]["addr"], found[1]["len"]) == (40002, 66)
    assert (found[103]["addr"], found[103]["len"]) == (40070, 50)
    assert found[1]["error"] == "" and found[103]["error"] == ""

    truth = device.values()
    common = {n: v[0] for n, v in found[1]["points"].items()}
    assert common["Mn"] == PV.manufacturer == truth["Mn"]
    assert common["SN"] == truth["SN"] and str(common["SN"]).startswith("PV25K")
    assert common["Md"] == PV.id  # mandatory: the device's model
    assert common["Opt"] is None and common["Vr"] is None and common["DA"] is None

    inv = {n: v[1] for n, v in found[103]["points"].items()}
    for name, step in (("W", 1.0), ("Hz", 0.01), ("PhVphA", 0.1), ("A", 0.01), ("DCV", 0.1)):
        lo, hi = PV.point(name).range or (-math.inf, math.inf)
        assert lo <= inv[name] <= hi, f"{name}={inv[name]}"
        assert _close(inv[name], float(truth[name]), step), f"{name}: {inv[name]} != {truth[name]}"
    assert inv["W"] > 1000  # noon: the inverter is producing
    assert 49.5 < inv["Hz"] < 50.5 and 200 < inv["PhVphA"] < 260
    assert inv["St"] in (4, 5)  # MPPT or throttled
    assert inv["WH"] == truth["WH"]
    # pysunspec2 reports a point that holds SunSpec's "not implemented" value as None.
    for name in ("PPVphAB", "PPVphBC", "PPVphCA", "TmpSnk", "TmpTrns", "TmpOt", "StVnd"):
        assert inv[name] is None, name
    assert [inv[f"EvtVnd{i}"] for i in range(1, 5)] == [None] * 4
    assert inv["Evt1"] == 0 and inv["Evt2"] == 0  # mandatory: no events


async def test_each_model_reads_whole_in_one_request(client: Any) -> None:
    rr = await client.read_holding_registers(_addr("I_ID"), count=52, device_id=1)
    assert not rr.isError(), rr
    regs = rr.registers
    assert regs[:2] == [103, 50]
    body = regs[2:]
    assert body[5:8] == [0xFFFF] * 3  # PPVphAB..PPVphCA: uint16 not implemented
    assert body[32:35] == [0x8000] * 3  # TmpSnk, TmpTrns, TmpOt: int16 not implemented
    assert body[37] == 0xFFFF  # StVnd: enum16
    assert body[40:42] == [0, 0]  # Evt2: mandatory bitfield32, no events
    assert body[42:50] == [0xFFFF] * 8  # EvtVnd1..4: bitfield32 not implemented
    assert body[12] != 0x8000 and body[14] != 0xFFFF  # W and Hz carry data
    assert body[11] == 0xFFFF  # V_SF = -1

    rr = await client.read_holding_registers(_addr("C_ID"), count=68, device_id=1)
    assert not rr.isError(), rr
    regs = rr.registers
    assert regs[:2] == [1, 66]
    text = struct.pack(">16H", *regs[2:18]).rstrip(b"\0")
    assert text == PV.manufacturer.encode()
    assert struct.pack(">16H", *regs[18:34]).rstrip(b"\0") == PV.id.encode()  # Md
    assert regs[34:50] == [0] * 16  # Opt, Vr: strings not implemented
    assert regs[66:68] == [0xFFFF, 0]  # DA not implemented, Pad


async def test_the_whole_map_reads_in_one_request_and_ends_where_it_says(client: Any) -> None:
    rr = await client.read_holding_registers(_BASE, count=124, device_id=1)
    assert not rr.isError(), rr
    regs = rr.registers
    assert struct.pack(">HH", *regs[:2]) == b"SunS"
    assert regs[2:4] == [1, 66] and regs[70:72] == [103, 50] and regs[122:124] == [0xFFFF, 0]
    # Past the end marker, and before the marker, the device has nothing: exception 02.
    rr = await client.read_holding_registers(_BASE + 122, count=3, device_id=1)
    assert rr.isError() and rr.exception_code == 2
    rr = await client.read_holding_registers(_BASE - 1, count=2, device_id=1)
    assert rr.isError() and rr.exception_code == 2


async def test_not_implemented_registers_are_read_only(client: Any) -> None:
    rr = await client.write_register(_BASE + 70 + 2 + 32, 250, device_id=1)  # TmpSnk
    assert rr.isError() and rr.exception_code == 2
    rr = await client.read_holding_registers(_BASE + 70 + 2 + 32, count=1, device_id=1)
    assert not rr.isError() and rr.registers == [0x8000]


_CHAIN = """
id: sunspec-chain
name: SunSpec chain
name_zh: SunSpec 链
family: pv_inverter
category: new_energy
protocol: modbus
standard: SunSpec
points:
  - {name: SunS, type: string, modbus: {table: holding, address: 0, length: 2}}
  - {name: C_ID, type: uint16, range: [1, 1], modbus: {table: holding, address: 2}}
  - {name: C_L, type: uint16, range: [66, 66], modbus: {table: holding, address: 3}}
  - {name: X_ID, type: uint16, range: [64000, 64000], modbus: {table: holding, address: 70}}
  - {name: X_L, type: uint16, range: [4, 4], modbus: {table: holding, address: 71}}
  - {name: I_ID, type: uint16, range: [103, 103], modbus: {table: holding, address: 76}}
  - {name: I_L, type: uint16, range: [50, 50], modbus: {table: holding, address: 77}}
  - {name: W, type: int16, modbus: {table: holding, address: 90}}
  - {name: End_ID, type: uint16, range: [65535, 65535], modbus: {table: holding, address: 128}}
  - {name: End_L, type: uint16, range: [0, 0], modbus: {table: holding, address: 129}}
"""


def _profile(text: str, **changes: Any) -> Profile:
    data = yaml.safe_load(text)
    data.update(changes)
    return parse_profile(data)


def test_models_are_found_along_the_chain_and_unknown_models_stay_unmapped() -> None:
    profile = _profile(_CHAIN)
    fill = model_fill(profile)
    # Model 1 at 2: Mn (mandatory, not in this profile) reads as the profile id.
    assert struct.pack(">2H", fill[4], fill[5]) == b"suns"
    assert fill[4 + 16 + 16] == 0  # Opt
    # Model 64000 is not known here: its registers stay unmapped (exception 02).
    assert not any(72 <= a < 76 for a in fill)
    # Model 103 after it is served whole, except W which the profile maps.
    assert all(a in fill for a in range(78, 128) if a != 90)
    assert 90 not in fill and fill[78 + 5] == 0xFFFF
    assert not any(a >= 128 for a in fill)


@pytest.mark.parametrize(
    "changes",
    [
        {"standard": ""},  # not a SunSpec profile
        {"points": yaml.safe_load(_CHAIN)["points"][1:]},  # no "SunS" marker
    ],
)
def test_only_a_sunspec_map_with_its_marker_is_filled(changes: dict[str, Any]) -> None:
    assert model_fill(_profile(_CHAIN, **changes)) == {}


def test_other_shipped_profiles_are_served_as_they_were() -> None:
    for profile in PROFILES.values():
        if profile.id != PV.id and profile.protocol == "modbus":
            assert model_fill(profile) == {}, profile.id
