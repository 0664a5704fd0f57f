"""What the drivers count going wrong is on the agent's /metrics, across reconnects."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.metrics import driver_events
from iiot_common.localservers import free_port
from protocols.modbus.driver import ModbusStats
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import agent_dict, modbus_device
from tests.waiting import wait_for

_LINE = re.compile(r'^iiot_agent_driver_events_total\{device="([^"]*)",event="([^"]*)"\} (\S+)$')


def _events(text: str) -> dict[tuple[str, str], float]:
    return {
        (m.group(1), m.group(2)): float(m.group(3))
        for m in map(_LINE.match, text.splitlines())
        if m
    }


async def test_exceptions_and_reconnects_are_counted_per_device_and_never_go_back(
    tmp_path: Path,
) -> None:
    profiles = load_profiles()
    bad = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1)
    good = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-2", seed=2)
    sims = [ModbusSimServer({1: bad}, port=0), ModbusSimServer({1: good}, port=0)]
    for sim in sims:
        await sim.start()
    cfg = agent_dict(
        tmp_path,
        free_port(),  # no broker: the metrics are the agent's own
        [
            modbus_device("kiln-1", "kiln-rotary-cement", sims[0].port, interval=0.05),
            modbus_device("kiln-2", "kiln-rotary-cement", sims[1].port, interval=0.05),
        ],
        metrics={"host": "127.0.0.1", "port": 0},
    )
    agent = Agent(parse_config(cfg))
    await agent.start()
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    try:
        async with httpx.AsyncClient() as http:

            async def scrape() -> dict[tuple[str, str], float]:
                return _events((await http.get(url)).text)

            # The device answers "slave device failure" (exception 4) for a while.
            bad.faults.set(FaultMode.EXCEPTION, code=4)
            await wait_for(
                lambda: agent.pollers[0].driver_events().get("exceptions:4", 0) >= 3,
                10,
                "exception 4 counted",
            )
            before = (await scrape())[("kiln-1", "exceptions:4")]
            # Then it drops the connection: the agent reconnects with a new driver, and
            # what the old one counted stays counted.
            bad.faults.set(FaultMode.DROP)
            await wait_for(lambda: agent.pollers[0].health.online is False, 10, "offline")
            bad.faults.set(FaultMode.NONE)
            await wait_for(lambda: agent.pollers[0].health.online is True, 10, "back online")
            after = await scrape()
    finally:
        await agent.stop()
        for sim in sims:
            await sim.stop()
    assert after[("kiln-1", "exceptions:4")] >= before >= 3
    # The device that never failed adds no line; ordinary traffic is not an event.
    assert not [k for k in after if k[0] == "kiln-2"]
    assert not [k for k in after if k[1] in ("requests", "responses", "polls")]


def test_only_trouble_counters_that_moved_are_events() -> None:
    stats = ModbusStats(requests=10, responses=9, timeouts=1, exceptions={2: 3, 4: 0})
    assert driver_events(stats) == {"timeouts": 1, "exceptions:2": 3}
    assert driver_events(None) == {}
