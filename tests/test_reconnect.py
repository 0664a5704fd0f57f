"""After the broker restarts, the gateway and the agents are back within 5 s (default backoff)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from gateway.config import GatewayConfig, MqttConfig
from gateway.service import Gateway
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import agent_dict, modbus_device
from tests.gateway.test_ingest import MemorySink

if TYPE_CHECKING:  # the fixture's type only
    from iiot_common.localservers import Mosquitto

_OUTAGE = 15.0  # long enough for an uncapped backoff to have grown well past 5 s
_RESUME_WITHIN = 5.0


async def _seconds_until(cond: Callable[[], bool], within: float, what: str) -> float:
    return (await _seconds_until_each({what: cond}, within))[what]


async def _seconds_until_each(
    conds: dict[str, Callable[[], bool]], within: float
) -> dict[str, float]:
    """Seconds from now until each condition first holds (watched together)."""
    t0 = time.monotonic()
    took: dict[str, float] = {}
    while time.monotonic() - t0 < within:
        for what, cond in conds.items():
            if what not in took and cond():
                took[what] = time.monotonic() - t0
        if len(took) == len(conds):
            return took
        await asyncio.sleep(0.02)
    missing = sorted(set(conds) - set(took))
    raise AssertionError(f"{', '.join(missing)}: not within {within} s")


async def test_gateway_and_agent_resume_within_5s_of_a_broker_restart(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    sink = MemorySink(agents={"agent-1": "ent-1"})
    gw = Gateway(
        GatewayConfig(data_dir=tmp_path / "gw", mqtt=MqttConfig(url=mosquitto.url)),
        sink=sink,
        serve_api=False,
    )
    sim = ModbusSimServer(
        {1: SimDevice(load_profiles()["kiln-rotary-cement"], device_id="kiln-1", seed=1)}, port=0
    )
    await sim.start()
    cfg = agent_dict(
        tmp_path, mosquitto.port, [modbus_device("kiln-1", "kiln-rotary-cement", sim.port)]
    )
    cfg["mqtt"] = {"url": mosquitto.url}  # the shipped reconnect bounds, not the tests' short ones
    agent = Agent(parse_config(cfg))
    gw.start()
    await agent.start()
    try:
        ingest = gw.ingest
        assert ingest is not None
        await _seconds_until(lambda: bool(sink.summaries), 15, "first samples at the gateway")

        mosquitto.stop()
        await _seconds_until(lambda: not agent.publisher.connected, 10, "agent sees the outage")
        await asyncio.sleep(_OUTAGE)
        assert not ingest.connected and not agent.publisher.connected

        mosquitto.start()  # same port; returns once it accepts connections
        back = time.monotonic()
        back_ms = int(time.time() * 1000)
        took = await _seconds_until_each(
            {"gateway": lambda: ingest.connected, "agent": lambda: agent.publisher.connected}, 40
        )
        gateway_s, agent_s = took["gateway"], took["agent"]
        await _seconds_until(
            lambda: any(s.last_ts >= back_ms for s in sink.summaries), 15, "fresh samples"
        )
        fresh_s = time.monotonic() - back
    finally:
        await agent.stop()
        gw.stop()
        await sim.stop()
    print(f"resumed after the broker restart: gateway {gateway_s:.2f} s, agent {agent_s:.2f} s")
    assert gateway_s < _RESUME_WITHIN, f"gateway took {gateway_s:.2f} s"
    assert agent_s < _RESUME_WITHIN, f"agent took {agent_s:.2f} s"
    # A sample polled after the restart reached the gateway soon after both were back.
    assert fresh_s < _RESUME_WITHIN + 2, f"first fresh sample after {fresh_s:.2f} s"
