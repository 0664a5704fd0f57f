"""Batch messages end to end: agent → broker → gateway → victoria-metrics, across an outage.

An agent with ``mqtt.batch`` sends every device's samples in agent-level batch messages.
The gateway reads each device's part as it reads a device's own data message: every
sample lands in victoria-metrics exactly once, sequence numbers are followed per device
(no gap counted), and the registry counts the devices as reporting.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from gateway.config import GatewayConfig, InfluxConfig, MqttConfig
from gateway.registry import Registry
from gateway.service import Gateway
from iiot_common.localservers import VictoriaMetrics
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import PersistentMosquitto, Subscriber, agent_dict, modbus_device
from tests.gateway.test_ingest import metric
from tests.waiting import wait_for

_PROFILE = "kiln-rotary-cement"
_DEVICES = ("kiln-1", "kiln-2", "kiln-3")


def _counts(vm: VictoriaMetrics, field: str) -> dict[str, int]:
    """Values stored per device for one point."""
    out: dict[str, int] = {}
    for s in vm.export(f'{{__name__="telemetry_{field}"}}'):
        labels = s["metric"]
        assert isinstance(labels, dict)
        values = s["values"]
        assert isinstance(values, list)
        out[str(labels["device"])] = out.get(str(labels["device"]), 0) + len(values)
    return out


async def test_batches_survive_a_broker_outage_with_nothing_lost_or_doubled(
    tmp_path: Path, victoria: VictoriaMetrics
) -> None:
    profile = load_profiles()[_PROFILE]
    field = profile.points[0].name
    sims = [
        ModbusSimServer({1: SimDevice(profile, device_id=d, seed=i)}, port=0)
        for i, d in enumerate(_DEVICES)
    ]
    for sim in sims:
        await sim.start()
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = PersistentMosquitto(broker_dir).start()

    reg = Registry(f"sqlite:///{tmp_path / 'gw' / 'registry.db'}")
    reg.add_enterprise("ent-1", "Test Works", "130102", "C30")
    reg.add_agent("ent-1", "agent-1", None)
    reg.close()
    gw = Gateway(
        GatewayConfig(
            data_dir=tmp_path / "gw",
            mqtt=MqttConfig(url=broker.url, client_id="gw-batch"),
            influx=InfluxConfig(url=victoria.url, flush_interval=0.05, timeout=3),
        ),
        serve_api=False,
    )
    devices = [
        modbus_device(d, _PROFILE, sim.port, interval=0.1)
        for d, sim in zip(_DEVICES, sims, strict=True)
    ]
    cfg = agent_dict(tmp_path, broker.port, devices)
    cfg["mqtt"]["batch"] = True
    agent = Agent(parse_config(cfg))
    sub = Subscriber(broker.port, client_id="batch-sub", clean=False).start()
    gw.start()
    try:
        await agent.start()
        await wait_for(
            lambda: set(_counts(victoria, field)) == set(_DEVICES), 20, "data of every device"
        )
        broker.stop()
        depth = agent.spool.depth
        await wait_for(lambda: agent.spool.depth >= depth + 60, 10, "samples piling up")
        broker.start()
        await wait_for(lambda: agent.publisher.connected, 15, "agent reconnected")
        await wait_for(lambda: agent.spool.depth < 10, 15, "spool drained")
        for p in agent.pollers:
            p.stop()
        await asyncio.sleep(0.3)
        produced = {d: agent.spool.last_seq(d) for d in _DEVICES}
        await wait_for(
            lambda: _counts(victoria, field) == produced, 20, "every sample in victoria-metrics"
        )
        await asyncio.sleep(1.0)  # nothing arrives twice later either
        stored = _counts(victoria, field)
        gaps = metric(gw, "iiot_gateway_sequence_gaps_total")
        rejected = metric(gw, "iiot_gateway_rejected_total")
        assert gw.registry is not None
        seen = {d: gw.registry.get_device("ent-1", d) for d in _DEVICES}
    finally:
        await agent.stop()
        gw.stop()
        sub.stop()
        broker.stop()
        for sim in sims:
            await sim.stop()

    assert stored == produced  # every sample of every device once: none lost, none doubled
    assert gaps == 0 and rejected == 0
    for d in _DEVICES:
        assert seen[d] is not None and seen[d]["online"], d
    # It went as batch messages carrying several devices, never per device.
    batches = sub.on("/batch")
    assert batches and not [m for m in sub.messages if m.topic.endswith("/data")]
    assert any(len(getattr(m.decoded, "devices", {})) > 1 for m in batches)
    assert sub.bad == []
