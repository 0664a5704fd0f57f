"""What a plain MQTT subscriber sees from an agent reading real Modbus simulators."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from device_profiles.loader import load_profiles
from device_profiles.schema import ValueType
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import Mosquitto, PtyPair
from protocols.modbus import codec
from protocols.mqtt.contract import Birth, DeviceState, Will
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import Subscriber, agent_dict, modbus_device
from tests.waiting import wait_for


@pytest.mark.parametrize("mqtt_protocol", ["3.1.1", "5"])
async def test_birth_state_and_data_match_the_simulators(
    tmp_path: Path, mosquitto: Mosquitto, mqtt_protocol: str
) -> None:
    profiles = load_profiles()
    kiln = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1)
    boiler = SimDevice(profiles["boiler-steam-coal"], device_id="boiler-1", seed=2)
    sim = ModbusSimServer({1: kiln, 2: boiler}, port=0)
    await sim.start()
    devices = [
        modbus_device("kiln-1", "kiln-rotary-cement", sim.port, unit=1),
        modbus_device("boiler-1", "boiler-steam-coal", sim.port, unit=2),
    ]
    cfg = agent_dict(tmp_path, mosquitto.port, devices)
    cfg["mqtt"]["protocol"] = mqtt_protocol
    loaded = parse_config(cfg)
    with Subscriber(mosquitto.port) as sub:
        agent = Agent(loaded)
        await agent.start()
        try:
            await wait_for(lambda: len(sub.samples("kiln-1")) >= 5, what="kiln samples")
            await wait_for(lambda: len(sub.samples("boiler-1")) >= 5, what="boiler samples")
            # The simulators' values now, beside the newest sample received by now.
            snapshot = {"kiln-1": kiln.values(), "boiler-1": boiler.values()}
            at_snapshot = {d: len(sub.samples(d)) for d in snapshot}
            # A subscriber arriving later gets the birth and the states as retained messages.
            with Subscriber(mosquitto.port, client_id="late") as late:
                await wait_for(lambda: len(late.on("/state")) >= 2, 5, "retained states")
                await wait_for(lambda: bool(late.on("/agent")), 5, "retained birth")
                retained_birth = late.on("/agent")[0]
                retained_states = late.on("/state")
        finally:
            await agent.stop()
        await sim.stop()
        await asyncio.sleep(0.2)

        assert sub.bad == []
        assert retained_birth.retain and isinstance(retained_birth.decoded, Birth)
        assert all(m.retain and m.decoded.online for m in retained_states)  # type: ignore[union-attr]
        births = [m.decoded for m in sub.on("/agent") if isinstance(m.decoded, Birth)]
        assert births, "no birth message"
        assert {d.id for d in births[0].devices} == {"kiln-1", "boiler-1"}
        kiln_birth = next(d for d in births[0].devices if d.id == "kiln-1")
        assert (kiln_birth.profile, kiln_birth.family, kiln_birth.protocol) == (
            "kiln-rotary-cement",
            "kiln",
            "modbus",
        )
        states = [m.decoded for m in sub.on("/kiln-1/state")]
        assert isinstance(states[0], DeviceState) and states[0].online
        # The orderly offline message replaces the birth on stop.
        last_agent = sub.on("/agent")[-1].decoded
        assert isinstance(last_agent, Will) and last_agent.bdseq == births[0].bdseq

        for dev_id, sim_dev in (("kiln-1", kiln), ("boiler-1", boiler)):
            got = sub.samples(dev_id)
            seqs = [s for s, _ in got]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{dev_id}: {seqs}"
            last = got[at_snapshot[dev_id] - 1][1]
            assert not last.errors, f"{dev_id}: {last.errors}"
            assert set(last.values) == {p.name for p in sim_dev.profile.points}
            for p in sim_dev.profile.points:
                want, have = snapshot[dev_id][p.name], last.values[p.name]
                if (
                    p.range is not None
                    and isinstance(want, float | int)
                    and not isinstance(want, bool)
                ):
                    span = p.range[1] - p.range[0]
                    assert abs(float(have) - float(want)) <= span * 0.05 + 1, (dev_id, p.name)


def _modbus_profiles() -> list[str]:
    return [p.id for p in load_profiles() if p.protocol == "modbus"]


@pytest.mark.parametrize("profile_id", _modbus_profiles())
async def test_every_shipped_modbus_family_arrives_as_simulated(
    tmp_path: Path, mosquitto: Mosquitto, profile_id: str
) -> None:
    profile = load_profiles()[profile_id]
    sim_dev = SimDevice(profile, device_id="dev-1", seed=7)
    sim = ModbusSimServer({profile.modbus.default_unit if profile.modbus else 1: sim_dev}, port=0)
    await sim.start()
    device = modbus_device("dev-1", profile_id, sim.port, interval=0.1)
    device["modbus"].pop("unit")  # the profile's default unit
    agent = Agent(parse_config(agent_dict(tmp_path, mosquitto.port, [device])))
    with Subscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: len(sub.samples("dev-1")) >= 3, what="samples")
            want = sim_dev.values()
            n = len(sub.samples("dev-1"))
        finally:
            await agent.stop()
            await sim.stop()
    assert sub.bad == []
    _, last = sub.samples("dev-1")[n - 1]
    assert not last.errors
    assert set(last.values) == {p.name for p in profile.points}
    for p in profile.points:
        have = last.values[p.name]
        if p.type is ValueType.STRING:
            # What fits the registers: the device itself can hold no more.
            assert have == codec.decode(p, codec.encode(p, want[p.name], profile.modbus))
        elif p.range is not None and p.type is not ValueType.BOOL:
            span = p.range[1] - p.range[0]
            assert abs(float(have) - float(want[p.name])) <= span * 0.05 + 1, p.name


async def test_rtu_line_with_two_units(
    tmp_path: Path, mosquitto: Mosquitto, pty_pair: PtyPair
) -> None:
    profiles = load_profiles()
    kiln = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1)
    kiln2 = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-2", seed=2)
    sim = ModbusSimServer({1: kiln, 2: kiln2}, framer="rtu", serial_port=pty_pair.a, baudrate=19200)
    await sim.start()
    devices = [
        {
            "id": f"kiln-{u}",
            "profile": "kiln-rotary-cement",
            "poll_interval": 0.3,
            "modbus": {
                "transport": "rtu",
                "serial_port": pty_pair.b,
                "baudrate": 19200,
                "unit": u,
                "timeout": 1.0,
            },
        }
        for u in (1, 2)
    ]
    agent = Agent(parse_config(agent_dict(tmp_path, mosquitto.port, devices)))
    with Subscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(
                lambda: all(len(sub.samples(f"kiln-{u}")) >= 3 for u in (1, 2)), 15, "rtu samples"
            )
            want = {1: kiln.values(), 2: kiln2.values()}
            n = {u: len(sub.samples(f"kiln-{u}")) for u in (1, 2)}
        finally:
            await agent.stop()
            await sim.stop()
    assert sub.bad == []
    for u in (1, 2):
        _, last = sub.samples(f"kiln-{u}")[n[u] - 1]
        assert not last.errors
        assert abs(last.values["burning_zone_temp"] - want[u]["burning_zone_temp"]) < 100
    # Two different simulated kilns, told apart by unit id on one line.
    assert sub.samples("kiln-1")[-1][1].values != sub.samples("kiln-2")[-1][1].values
