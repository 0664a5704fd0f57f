"""The agent reading the OPC UA simulator: what a plain subscriber receives."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest

from device_profiles.loader import load_profiles
from device_profiles.schema import ValueType
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import Mosquitto, free_port
from protocols.mqtt.contract import Birth, DeviceState
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.opcua_server import OpcUaSimServer
from tests.edge_agent.helpers import Subscriber, agent_dict
from tests.waiting import wait_for


def _opcua_profiles() -> list[str]:
    return [p.id for p in load_profiles() if p.protocol == "opcua"]


@pytest.mark.parametrize("profile_id", _opcua_profiles())
async def test_opcua_family_arrives_as_simulated(
    tmp_path: Path, mosquitto: Mosquitto, profile_id: str
) -> None:
    profile = load_profiles()[profile_id]
    sim_dev = SimDevice(profile, device_id="ua-1", seed=3)
    server = OpcUaSimServer(sim_dev, port=free_port(), update_interval=0.1)
    await server.start()
    device = {
        "id": "ua-1",
        "profile": profile_id,
        "poll_interval": 0.2,
        "poll_timeout": 3.0,
        "opcua": {"endpoint": server.endpoint, "timeout": 3.0},
    }
    agent = Agent(parse_config(agent_dict(tmp_path, mosquitto.port, [device])))
    with Subscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: len(sub.samples("ua-1")) >= 3, 20, "OPC UA samples")
            want = sim_dev.values()
            n = len(sub.samples("ua-1"))
        finally:
            await agent.stop()
            await server.stop()
    assert sub.bad == []
    birth = next(m.decoded for m in sub.on("/agent") if isinstance(m.decoded, Birth))
    assert birth.devices[0].protocol == "opcua"
    states = [m.decoded for m in sub.on("/ua-1/state")]
    assert isinstance(states[0], DeviceState) and states[0].online
    seqs = [s for s, _ in sub.samples("ua-1")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    _, last = sub.samples("ua-1")[n - 1]
    assert not last.errors, last.errors
    assert set(last.values) == {p.name for p in profile.points}
    for p in profile.points:
        have = last.values[p.name]
        if p.type is ValueType.STRING:
            assert have == want[p.name]
        elif p.range is not None and p.type is not ValueType.BOOL:
            span = p.range[1] - p.range[0]
            assert abs(float(have) - float(want[p.name])) <= span * 0.05 + 1, p.name


async def test_refused_session_and_bad_status_are_spelled_as_the_server_says(
    tmp_path: Path, mosquitto: Mosquitto, opcua_certs: dict[str, Path]
) -> None:
    profile_id = _opcua_profiles()[0]
    profile = load_profiles()[profile_id]
    secure = OpcUaSimServer(
        SimDevice(profile, device_id="ua-locked", seed=1),
        port=free_port(),
        security="basic256sha256",
        certificate=opcua_certs["server_cert"],
        private_key=opcua_certs["server_key"],
        users={"agent": "pa55"},
    )
    failing_dev = SimDevice(profile, device_id="ua-failing", seed=2)
    failing = OpcUaSimServer(failing_dev, port=free_port(), update_interval=0.1)
    await secure.start()
    await failing.start()
    failing_dev.faults.set(FaultMode.EXCEPTION)  # every value BadDeviceFailure
    denied = {
        "id": "ua-denied",
        "profile": profile_id,
        "poll_interval": 0.2,
        "poll_timeout": 3.0,
        "opcua": {
            "endpoint": secure.endpoint,
            "timeout": 3.0,
            "security_policy": "Basic256Sha256",
            "certificate": str(opcua_certs["client_cert"]),
            "private_key": str(opcua_certs["client_key"]),
            "username": "agent",
            "password": "wrong",
        },
    }
    bad = {
        "id": "ua-bad",
        "profile": profile_id,
        "poll_interval": 0.2,
        "poll_timeout": 3.0,
        "opcua": {"endpoint": failing.endpoint, "timeout": 3.0},
    }
    agent = Agent(parse_config(agent_dict(tmp_path, mosquitto.port, [denied, bad])))
    with Subscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: bool(sub.on("/ua-denied/state")), 20, "the refused state")
            await wait_for(
                lambda: any(s.errors for _, s in sub.samples("ua-bad")), 20, "bad values"
            )
            exposition = generate_latest(agent.metrics.registry).decode()
        finally:
            await agent.stop()
            await secure.stop()
            await failing.stop()
    state = sub.on("/ua-denied/state")[-1].decoded
    assert isinstance(state, DeviceState) and not state.online
    assert state.reason == "connect_failed: BadUserAccessDenied"
    _, sample = next((q, s) for q, s in sub.samples("ua-bad") if s.errors)
    assert set(sample.errors.values()) == {"BadDeviceFailure"}
    assert 'device="ua-bad",reason="BadDeviceFailure"' in exposition
    assert "baddevicefailure" not in exposition
