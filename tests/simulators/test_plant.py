"""A simulated plant: the file format, what it serves, run-time faults and the control API."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asyncua import Client as OpcUaClient
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from device_profiles.loader import load_profiles
from device_profiles.schema import Point, Profile
from iiot_common.localservers import free_port
from protocols.modbus.codec import decode
from protocols.modbus.profile import ModbusTable, point_registers
from simulators.control import ControlServer
from simulators.faults import FaultMode
from simulators.plant import Plant, PlantConfig, PlantError, load_plant_config

EXAMPLE = Path(__file__).resolve().parents[2] / "simulators" / "plant.example.yaml"


def free_base(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    # Below the kernel's ephemeral range (32768+), so outgoing connections of other tests
    # on a busy machine do not keep taking ports out of the run.
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(15000, 30000 - count)
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def free_base_and_port(count: int) -> tuple[int, int]:
    """``free_base(count)``, and one more free port outside those ``count`` (a control
    port picked on its own could fall among them)."""
    base = free_base(count)
    for _ in range(200):
        port = free_port()
        if not base <= port < base + count:
            return base, port
    raise RuntimeError("no free port outside the block")


@pytest.fixture(scope="module")
def profiles() -> Any:
    return load_profiles()


def _modbus_only(config: PlantConfig, profiles: Any) -> PlantConfig:
    """The example without its OPC UA devices (they take seconds to start)."""
    ents = []
    for e in config.enterprises:
        devs = [d for d in e.devices if profiles[d.profile].protocol == "modbus"]
        ents.append(e.model_copy(update={"devices": devs}))
    return config.model_copy(update={"enterprises": ents, "base_port": free_base(20)})


@pytest.fixture
async def modbus_plant(profiles: Any) -> AsyncIterator[Plant]:
    config = _modbus_only(load_plant_config(EXAMPLE), profiles)
    plant = Plant(config, profiles=profiles, source=str(EXAMPLE))
    await plant.start()
    yield plant
    await plant.stop()


async def _read(profile: Profile, point: Point, port: int, unit: int, wait: float = 2.0) -> Any:
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=port, timeout=wait, retries=0, reconnect_delay=0
    )
    try:
        assert await client.connect()
        a = point.modbus
        assert a is not None
        if a.table is ModbusTable.INPUT:
            rr = await client.read_input_registers(
                a.address, count=point_registers(point), device_id=unit
            )
        elif a.table is ModbusTable.HOLDING:
            rr = await client.read_holding_registers(
                a.address, count=point_registers(point), device_id=unit
            )
        elif a.table is ModbusTable.COIL:
            rr = await client.read_coils(a.address, count=1, device_id=unit)
        else:
            rr = await client.read_discrete_inputs(a.address, count=1, device_id=unit)
        if rr.isError():
            return rr
        regs = [int(rr.bits[0])] if a.table.is_bit_table else list(rr.registers)
        return decode(point, regs, profile.modbus)
    finally:
        client.close()


def _first_plain(profile: Profile) -> Point:
    """A point that needs no scale-factor register to decode."""
    return next(
        p
        for p in profile.points
        if p.range is not None and p.scale_factor_point is None and p.modbus is not None
    )


# -- the file -----------------------------------------------------------------------------


def test_example_file_describes_a_mixed_site_with_devices_off(profiles: Any) -> None:
    plant = Plant.from_file(EXAMPLE, profiles=profiles)
    assert len({e.enterprise for e in plant.ledger}) >= 2
    cities = {e.region[:4] for e in plant.ledger}
    assert len(cities) >= 2 and all(c.startswith("13") for c in cities)  # Hebei
    off = {e.device for e in plant.ledger if not e.on}
    assert off and off.isdisjoint(plant.endpoints) and off.isdisjoint(plant.devices)
    protocols = {ep.protocol for ep in plant.endpoints.values()}
    assert protocols == {"modbus", "opcua"}
    # Two drives share one gateway port as units 1 and 2.
    m1, m2 = plant.endpoints["ts-motor-1"], plant.endpoints["ts-motor-2"]
    assert m1.port == m2.port and {m1.unit, m2.unit} == {1, 2}
    ports = [ep.port for ep in plant.endpoints.values() if ep.device not in ("ts-motor-2",)]
    assert len(ports) == len(set(ports))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plant.yaml"
    path.write_text(text, encoding="utf-8")
    return path


_ENT = """
enterprises:
  - id: e1
    name: Test works
    region: "130102"
    industry: C30
    devices:
"""


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ("      - {id: k1, profile: no-such-profile}\n", "device 'k1': unknown profile"),
        ("      - {id: k1, profile: kiln-rotary-cement, colour: red}\n", "device 'k1': colour"),
        (
            "      - {id: k1, profile: kiln-rotary-cement}\n"
            "      - {id: k1, profile: boiler-steam-coal}\n",
            "device 'k1': duplicate device id",
        ),
        (
            "      - {id: k1, profile: kiln-rotary-cement, port: 15500}\n"
            "      - {id: k2, profile: boiler-steam-coal, port: 15500}\n",
            "device 'k2': unit 1 on tcp:15500 is already device 'k1'",
        ),
        (
            "      - {id: k1, profile: kiln-rotary-cement, fault: melting}\n",
            "device 'k1': fault",
        ),
        ("      - {id: 'bad id', profile: kiln-rotary-cement}\n", "device 'bad id': id"),
    ],
)
def test_bad_plant_file_names_the_file_and_device(
    tmp_path: Path, devices: str, expected: str, profiles: Any
) -> None:
    path = _write(tmp_path, _ENT + devices)
    with pytest.raises(PlantError) as info:
        Plant.from_file(path, profiles=profiles)
    text = str(info.value)
    assert str(path) in text
    assert expected in text


def test_bad_enterprise_fields_are_named(tmp_path: Path) -> None:
    text = _ENT.replace('"130102"', "Hebei").replace("C30", "cement")
    path = _write(tmp_path, text + "      - {id: k1, profile: kiln-rotary-cement}\n")
    with pytest.raises(PlantError) as info:
        load_plant_config(path)
    assert "enterprise 'e1': region" in str(info.value)
    assert "enterprise 'e1': industry" in str(info.value)


def test_not_yaml_is_a_plant_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "enterprises: [\n")
    with pytest.raises(PlantError) as info:
        load_plant_config(path)
    assert "not valid YAML" in str(info.value)


# -- serving ------------------------------------------------------------------------------


async def test_plant_serves_every_switched_on_modbus_device(
    modbus_plant: Plant, profiles: Any
) -> None:
    for device_id, ep in modbus_plant.endpoints.items():
        assert ep.port is not None and ep.unit is not None
        profile = profiles[ep.profile]
        point = _first_plain(profile)
        value = await _read(profile, point, ep.port, ep.unit)
        lo, hi = point.range or (float("-inf"), float("inf"))
        assert lo - 1e-3 <= value <= hi + 1e-3, f"{device_id}: {point.name}={value!r}"
    off = [e for e in modbus_plant.ledger if not e.on]
    assert off and all(e.device not in modbus_plant.endpoints for e in off)


async def test_fault_set_on_a_plant_device_shows_on_the_wire(
    modbus_plant: Plant, profiles: Any
) -> None:
    ep = modbus_plant.endpoints["ts-motor-1"]
    neighbour = modbus_plant.endpoints["ts-motor-2"]
    assert ep.port is not None and ep.unit is not None and neighbour.unit is not None
    profile = profiles[ep.profile]
    point = _first_plain(profile)
    modbus_plant.devices["ts-motor-1"].faults.set(FaultMode.SILENT)
    with pytest.raises(ModbusIOException):
        await _read(profile, point, ep.port, ep.unit, wait=0.2)
    # The other drive behind the same gateway still answers.
    assert not hasattr(await _read(profile, point, ep.port, neighbour.unit), "isError")
    modbus_plant.devices["ts-motor-1"].faults.clear()
    assert not hasattr(await _read(profile, point, ep.port, ep.unit), "isError")


async def test_control_api_lists_devices_and_changes_faults(
    modbus_plant: Plant, profiles: Any
) -> None:
    control = ControlServer(modbus_plant, port=0)
    await control.start()
    try:
        async with httpx.AsyncClient(base_url=control.url, timeout=5) as http:
            r = await http.get("/devices")
            assert r.status_code == 200
            listed = {d["id"]: d for d in r.json()}
            assert set(listed) == set(modbus_plant.endpoints)
            kiln = listed["sjz-kiln-1"]
            assert kiln["profile"] == "kiln-rotary-cement"
            assert kiln["port"] == modbus_plant.endpoints["sjz-kiln-1"].port
            assert kiln["fault"]["mode"] == "none"

            r = await http.put("/devices/sjz-kiln-1/fault", json={"mode": "exception", "code": 6})
            assert r.status_code == 200 and r.json()["fault"]["mode"] == "exception"
            ep = modbus_plant.endpoints["sjz-kiln-1"]
            assert ep.port is not None and ep.unit is not None
            profile = profiles[ep.profile]
            rr = await _read(profile, _first_plain(profile), ep.port, ep.unit)
            assert rr.isError() and rr.exception_code == 6

            r = await http.delete("/devices/sjz-kiln-1/fault")
            assert r.status_code == 200 and r.json()["fault"]["mode"] == "none"
            value = await _read(profile, _first_plain(profile), ep.port, ep.unit)
            assert not hasattr(value, "isError")
            r = await http.get("/devices/sjz-kiln-1")
            assert r.json()["requests"] == 2

            # Bad requests get a clear answer and change nothing.
            r = await http.put("/devices/sjz-kiln-1/fault", json={"mode": "melting"})
            assert r.status_code == 400 and "mode" in r.json()["error"]
            r = await http.put("/devices/sjz-kiln-1/fault", content=b"{not json")
            assert r.status_code == 400 and "JSON" in r.json()["error"]
            r = await http.put("/devices/no-such/fault", json={"mode": "silent"})
            assert r.status_code == 404 and "no-such" in r.json()["error"]
            r = await http.post("/devices", json={})
            assert r.status_code == 405
            assert modbus_plant.devices["sjz-kiln-1"].faults.mode is FaultMode.NONE
    finally:
        await control.stop()
    assert control.errors == 4


async def test_endpoints_document_lists_served_devices_and_the_whole_ledger(
    modbus_plant: Plant,
) -> None:
    doc = json.loads(json.dumps(modbus_plant.endpoints_document()))
    assert set(doc["devices"]) == set(modbus_plant.endpoints)
    kiln = doc["devices"]["sjz-kiln-1"]
    assert kiln["protocol"] == "modbus" and kiln["unit"] == 1
    assert kiln["url"] == f"tcp://127.0.0.1:{kiln['port']}#unit=1"
    ledger = {e["device"]: e for e in doc["ledger"]}
    assert ledger["zjk-wt-03"]["on"] is False
    assert ledger["zjk-wt-03"]["region"] == "130722"
    assert ledger["sjz-kiln-1"]["category"] == "high_energy_process"


async def test_example_plant_serves_opcua_beside_modbus(profiles: Any) -> None:
    config = load_plant_config(EXAMPLE).model_copy(update={"base_port": free_base(20)})
    plant = Plant(config, profiles=profiles)
    await plant.start()
    try:
        ep = plant.endpoints["ts-boiler-gas-1"]
        assert ep.protocol == "opcua" and ep.url.startswith("opc.tcp://127.0.0.1:")
        profile = profiles[ep.profile]
        point = next(p for p in profile.points if p.range is not None)
        assert point.opcua is not None and point.opcua.node_id is not None
        client = OpcUaClient(ep.url, timeout=5)
        async with client:
            ns = await client.get_namespace_index(profile.opcua.namespace_uri)
            node_id = point.opcua.node_id.replace("ns=2;", f"ns={ns};")
            value = await client.get_node(node_id).read_value()
        lo, hi = point.range or (0.0, 0.0)
        assert lo <= value <= hi
        modbus = plant.endpoints["zjk-wt-01"]
        assert modbus.port is not None and modbus.unit is not None
        wt = profiles[modbus.profile]
        assert not hasattr(await _read(wt, _first_plain(wt), modbus.port, modbus.unit), "isError")
    finally:
        await plant.stop()
    await asyncio.sleep(0)


async def test_a_device_no_agent_configuration_names_is_served_and_marked(
    modbus_plant: Plant, profiles: Any
) -> None:
    doc = json.loads(json.dumps(modbus_plant.endpoints_document()))
    unlisted = {d for d, ep in doc["devices"].items() if not ep["configured"]}
    assert unlisted == {"zjk-genset-2"}
    assert doc["devices"]["sjz-kiln-1"]["configured"] is True
    ep = modbus_plant.endpoints["zjk-genset-2"]
    assert ep.port is not None and ep.unit is not None
    genset = profiles[ep.profile]
    value = await _read(genset, _first_plain(genset), ep.port, ep.unit)
    assert not hasattr(value, "isError"), value
    assert {e.device: e.on for e in modbus_plant.ledger}["zjk-genset-2"] is True
