"""Discovery over a simulated plant: what is proposed, what is left alone, and its bounds."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from device_profiles.loader import ProfileSet, load_profiles
from edge_agent.config import AgentConfigError, parse_config
from edge_agent.discovery import DiscoveryScope, connection_key, scan
from iiot_common.localservers import PtyPair, free_port
from protocols.modbus.config import ModbusConnection
from protocols.mqtt.control import Proposal
from protocols.opcua.config import OpcUaConnection
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from simulators.plant import Endpoint, Plant, PlantConfig

_FAST = {"rate": 400, "timeout": 0.3}


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_profiles()


def _device(dev_id: str, profile: str, configured: bool, **where: Any) -> dict[str, Any]:
    return {"id": dev_id, "profile": profile, "configured": configured, **where}


@pytest.fixture
async def plant(profiles: ProfileSet, pty_pair: PtyPair) -> AsyncIterator[Plant]:
    """Configured and unconfigured devices on Modbus TCP, a gateway, RS-485 and OPC UA."""
    devices = [
        _device("kiln-1", "kiln-rotary-cement", True),
        _device("boiler-1", "boiler-steam-coal", False),
        _device("pv-1", "pv-inverter-sunspec", False, unit=3),
        # Behind one Modbus TCP gateway: unit 1 is configured, unit 2 is not.
        _device("motor-1", "motor-hv-drive", True, gateway="gw", unit=1),
        _device("genset-1", "genset-diesel", False, gateway="gw", unit=2),
        # On one RS-485 line: unit 1 is configured, unit 3 is not.
        _device("drive-9", "motor-hv-drive", True, serial=pty_pair.a, unit=1),
        _device("comp-3", "aircomp-screw", False, serial=pty_pair.a, unit=3),
        _device("gas-boiler-1", "boiler-steam-gas-opcua", False),
        _device("cnc-1", "cnc-machine-tool", True),
    ]
    config = PlantConfig.model_validate(
        {
            "base_port": free_port(),
            "enterprises": [
                {
                    "id": "e1",
                    "name": "E1",
                    "region": "130102",
                    "industry": "C30",
                    "devices": devices,
                }
            ],
        }
    )
    p = Plant(config, profiles=profiles)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def _connection(ep: Endpoint, serial_line: str) -> ModbusConnection | OpcUaConnection:
    if ep.protocol == "opcua":
        return OpcUaConnection(endpoint=ep.url)
    if ep.serial_port is not None:
        return ModbusConnection(transport="rtu", serial_port=serial_line, unit=ep.unit or 1)
    return ModbusConnection(host=ep.host, port=ep.port or 502, unit=ep.unit or 1)


def _key(p: Proposal) -> str:
    a = p.address[p.protocol]
    if p.protocol == "opcua":
        return f"opcua:{a['endpoint']}"
    return connection_key(ModbusConnection.model_validate(a))


def _rw_values(plant: Plant) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dev_id, dev in plant.devices.items():
        values = dev.values()
        for p in dev.profile.points:
            if p.access == "rw":
                out[f"{dev_id}.{p.name}"] = values.get(p.name)
    return out


def _scope(plant: Plant, serial_line: str, **extra: Any) -> DiscoveryScope:
    tcp_ports = sorted(
        {ep.port for ep in plant.endpoints.values() if ep.protocol == "modbus" and ep.port}
    )
    return DiscoveryScope.model_validate(
        {
            "modbus_tcp": [{"hosts": ["127.0.0.1"], "ports": tcp_ports, "units": ["1-3"]}],
            "serial": [{"port": serial_line, "baudrate": 19200, "units": ["1-4"]}],
            "opcua": [ep.url for ep in plant.endpoints.values() if ep.protocol == "opcua"],
            **_FAST,
            **extra,
        }
    )


async def test_scan_proposes_each_unconfigured_device_with_its_profile_first(
    plant: Plant, profiles: ProfileSet, pty_pair: PtyPair
) -> None:
    eps = plant.endpoints
    configured = {d for d, ep in eps.items() if ep.configured}
    # The agent reaches the RS-485 line through the other end of the pty pair.
    exclude = {connection_key(_connection(eps[d], pty_pair.b)) for d in configured}
    expected = {
        connection_key(_connection(ep, pty_pair.b)): ep.profile
        for d, ep in eps.items()
        if not ep.configured
    }
    before = _rw_values(plant)
    errors: list[str] = []
    proposals = await scan(
        _scope(plant, pty_pair.b),
        profiles,
        exclude=exclude,
        deadline=time.monotonic() + 120,
        errors=errors,
    )
    found = {_key(p): p for p in proposals}
    assert set(found) == set(expected), (sorted(found), errors)
    for key, profile in expected.items():
        p = found[key]
        assert p.candidates, (key, p.answered)
        assert p.candidates[0].profile == profile, (key, p.candidates)
        assert all(0.0 <= c.score <= 1.0 for c in p.candidates)
        scores = [c.score for c in p.candidates]
        assert scores == sorted(scores, reverse=True)
    # What answered: SunSpec models for the inverter, identification, OPC UA objects.
    pv = found[connection_key(_connection(eps["pv-1"], pty_pair.b))]
    assert pv.answered["sunspec"]["models"][:2] == [1, 103]
    assert found[_key(pv)].answered["identification"]["vendor"] == "Generic"
    gas = found[f"opcua:{eps['gas-boiler-1'].url}"]
    assert any(o.endswith(":Boiler") for o in gas.answered["objects"])
    assert "None/None" in gas.answered["security"]
    # Configured devices were not even asked, and nothing was written anywhere.
    for dev_id in configured:
        assert plant.devices[dev_id].requests == 0, dev_id
    assert all(dev.writes == 0 for dev in plant.devices.values())
    assert _rw_values(plant) == before
    assert errors == []
    # Unconfigured, the CNC machine is found too, by its machine-tool structure.
    cnc = plant.endpoints["cnc-1"]
    opcua_only = DiscoveryScope.model_validate({"opcua": [cnc.url], **_FAST})
    (found_cnc,) = await scan(opcua_only, profiles, exclude=set(), deadline=time.monotonic() + 60)
    assert [c.profile for c in found_cnc.candidates] == ["cnc-machine-tool"]
    assert any(o.endswith(":Machine") for o in found_cnc.answered["objects"])


async def test_scan_outside_the_scope_finds_and_touches_nothing(
    plant: Plant, profiles: ProfileSet, pty_pair: PtyPair
) -> None:
    boiler = plant.endpoints["boiler-1"]
    scope = DiscoveryScope.model_validate(
        {
            # Another loopback address, a port nobody listens on, unit ids nobody has.
            "modbus_tcp": [
                {"hosts": ["127.0.0.2-127.0.0.3"], "ports": [boiler.port]},
                {"hosts": ["127.0.0.1"], "ports": [free_port()]},
                {"hosts": ["127.0.0.1"], "ports": [boiler.port], "units": ["5-7"]},
            ],
            "serial": [{"port": pty_pair.b, "baudrate": 19200, "units": ["5-6"]}],
            "opcua": [f"opc.tcp://127.0.0.1:{free_port()}/iiot/"],
            **_FAST,
        }
    )
    proposals = await scan(scope, profiles, exclude=set(), deadline=time.monotonic() + 60)
    assert proposals == []
    assert {d: dev.requests for d, dev in plant.devices.items() if dev.requests} == {}


async def test_scan_stops_at_its_deadline(profiles: ProfileSet, pty_pair: PtyPair) -> None:
    # Nobody on the line: each of 247 unit ids would wait out its timeout (two minutes).
    scope = DiscoveryScope.model_validate(
        {"serial": [{"port": pty_pair.b, "baudrate": 19200}], "timeout": 0.5, "rate": 100}
    )
    errors: list[str] = []
    started = time.monotonic()
    proposals = await scan(scope, profiles, exclude=set(), deadline=started + 1.5, errors=errors)
    elapsed = time.monotonic() - started
    assert proposals == []
    assert 1.4 <= elapsed < 3.5, elapsed
    assert any("deadline" in e for e in errors), errors


async def test_scan_keeps_to_its_request_rate(profiles: ProfileSet) -> None:
    kiln = profiles["kiln-rotary-cement"]
    device = SimDevice(kiln, device_id="k", seed=1)
    sim = ModbusSimServer({6: device, 7: SimDevice(kiln, device_id="k7", seed=2)}, port=0)
    await sim.start()
    try:
        rate = 8.0
        scope = DiscoveryScope.model_validate(
            {
                "modbus_tcp": [{"hosts": ["127.0.0.1"], "ports": [sim.port], "units": ["1-6"]}],
                "rate": rate,
                "timeout": 0.3,
            }
        )
        started = time.monotonic()
        proposals = await scan(scope, [kiln], exclude=set(), deadline=started + 60)
        elapsed = time.monotonic() - started
    finally:
        await sim.stop()
    assert [p.candidates[0].profile for p in proposals] == ["kiln-rotary-cement"]
    # Six unit ids, three SunSpec bases and an identification at least, one at a time.
    assert elapsed >= (6 + 3 + 1 - 1) / rate
    # Every request the device answered (the kiln probe included) kept to the rate.
    assert device.requests <= rate * elapsed + 1, (device.requests, elapsed)


def test_discovery_scope_in_agent_config_is_checked() -> None:
    base = {"agent_id": "a1", "enterprise": "e1", "mqtt": {"url": "mqtt://127.0.0.1:1883"}}
    loaded = parse_config(
        {**base, "discovery": {"modbus_tcp": [{"hosts": ["10.0.0.0/28"], "units": [1, "3-4"]}]}}
    )
    assert loaded.config.discovery is not None
    tcp = loaded.config.discovery.modbus_tcp[0]
    assert len(tcp.addresses()) == 14 and tcp.unit_ids() == [1, 3, 4]
    bad = {
        "modbus_tcp": [{"hosts": ["10.0.0.0/8"], "units": ["0-300"]}],
        "serial": [{"port": "/dev/ttyUSB0", "speed": 9600}],
        "rate": 0,
    }
    with pytest.raises(AgentConfigError) as err:
        parse_config({**base, "discovery": bad})
    text = "\n".join(err.value.problems)
    assert "discovery.modbus_tcp.0.hosts" in text and "most 1024" in text
    assert "discovery.modbus_tcp.0.units" in text and "1..247" in text
    assert "discovery.serial.0.speed: unknown key" in text
    assert "discovery.rate" in text


async def _run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iiot", "agent", "discover", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_discover_command_prints_what_it_found(profiles: ProfileSet, tmp_path: Path) -> None:
    sim = ModbusSimServer(
        {1: SimDevice(profiles["boiler-steam-coal"], device_id="b", seed=3)}, port=0
    )
    await sim.start()
    try:
        flags = ["--rate", "400", "--timeout", "0.3"]
        code, out, err = await _run_cli("--host", "127.0.0.1", "--port", str(sim.port), *flags)
        assert code == 0, out + err
        assert f"modbus tcp 127.0.0.1:{sim.port} unit 1" in out
        assert "boiler-steam-coal" in out and "to poll them" in out
        assert "unit 1: boiler-steam-coal" in err  # progress goes to stderr
        # Once configured, the same device is not proposed again.
        device = {"id": "b", "profile": "boiler-steam-coal",
                  "modbus": {"host": "127.0.0.1", "port": sim.port, "unit": 1}}  # fmt: skip
        agent = {
            "agent_id": "a1",
            "enterprise": "e1",
            "mqtt": {"url": "mqtt://127.0.0.1:1883"},
            "devices": [device],
            "discovery": {
                "modbus_tcp": [{"hosts": ["127.0.0.1"], "ports": [sim.port]}],
                "rate": 400,
                "timeout": 0.3,
            },
        }
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(yaml.safe_dump(agent), encoding="utf-8")
        code, out, err = await _run_cli("--config", str(cfg))
        assert code == 1, out + err
        assert "found no device" in out
        code, out, err = await _run_cli("--host", "10.0.0.0/8")
        assert code == 2 and "most 1024" in err
    finally:
        await sim.stop()
