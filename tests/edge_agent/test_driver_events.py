"""What the drivers count going wrong is on the agent's /metrics, across reconnects."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import generate_latest

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import DeviceConfig, parse_config
from edge_agent.metrics import AgentMetrics, DriverEvents, driver_events
from edge_agent.metrics_http import MetricsServer
from edge_agent.poller import DevicePoller
from iiot_common.backoff import Backoff
from iiot_common.localservers import free_port
from protocols.modbus.driver import ModbusStats
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import agent_dict, modbus_device
from tests.edge_agent.test_poller_unit import FakeDriver
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


async def test_the_scrape_writes_the_events_as_prometheus_client_does() -> None:
    metrics = AgentMetrics()
    metrics.polls.labels("meter-1", "ok").inc()
    events = {
        "meter-1": {"timeouts": 2, "exceptions:4": 1, "overflows": 12_345_678_901_234_567},
        "quiet": {},
        'odd "id"\\x\ny': {"bad_status:BadNodeIdUnknown": 3},
    }
    metrics.registry.register(DriverEvents(lambda: iter(events.items())))
    metrics.spool_depth.set(3)
    server = MetricsServer(metrics.registry, metrics.all())
    text = (await server.render()).decode()
    reference = generate_latest(metrics.registry).decode()
    assert text.splitlines() == [s for s in reference.splitlines() if "_created" not in s]
    assert 'iiot_agent_driver_events_total{device="meter-1",event="exceptions:4"} 1.0' in text
    assert 'device="quiet"' not in text


def test_only_trouble_counters_that_moved_are_events() -> None:
    stats = ModbusStats(requests=10, responses=9, timeouts=1, exceptions={2: 3, 4: 0})
    assert driver_events(stats) == {"timeouts": 1, "exceptions:2": 3}
    assert driver_events(None) == {}


@dataclass
class _Stats:
    timeouts: int = 0
    late_items_deleted: int = 0


class _CountingDriver(FakeDriver):
    def __init__(self, script: dict[str, Any]) -> None:
        super().__init__(script)
        self.stats = _Stats()

    async def connect(self) -> None:
        self.stats.timeouts += 1  # each connection counts one event
        await super().connect()


def _counting_poller(script: dict[str, Any], drivers: list[_CountingDriver]) -> DevicePoller:
    def factory(profile: Any, conn: Any, *, name: str) -> FakeDriver:
        drivers.append(_CountingDriver(script))
        return drivers[-1]

    cfg = DeviceConfig.model_validate(
        {"id": "kiln-1", "profile": "kiln-rotary-cement", "modbus": {"host": "127.0.0.1"},
         "poll_interval": 0.02}
    )  # fmt: skip
    return DevicePoller(
        cfg,
        load_profiles()["kiln-rotary-cement"],
        driver_factory=factory,
        on_sample=lambda d, r: None,
        on_state=lambda d, on, why: None,
        metrics=AgentMetrics(),
        backoff=Backoff(0.02, 0.05),
    )


async def test_a_changed_devices_new_poller_counts_on() -> None:
    """A device changed by remote configuration gets a new poller; its counters go on."""
    drivers: list[_CountingDriver] = []
    script: dict[str, Any] = {}
    old = _counting_poller(script, drivers)
    task = asyncio.create_task(old.run())
    await wait_for(lambda: old.health.good >= 1, 10, "first poller polling")
    old.stop()
    await task
    new = _counting_poller(script, drivers)
    new.keep_counters(old)
    task = asyncio.create_task(new.run())
    await wait_for(lambda: new.health.good >= 1, 10, "second poller polling")
    new.stop()
    await task
    assert new.driver_events() == {"timeouts": 2}  # one connect each

    # The device changes protocol: its new drivers count in stats of another type, and
    # what the old ones counted stays counted.
    @dataclass
    class _OtherStats:
        timeouts: int = 0
        sessions_lost: int = 0

    class _OtherDriver(FakeDriver):
        def __init__(self, script: dict[str, Any]) -> None:
            super().__init__(script)
            self.stats = _OtherStats(timeouts=1, sessions_lost=1)

    def other_factory(profile: Any, conn: Any, *, name: str) -> FakeDriver:
        return _OtherDriver(script)

    other = _counting_poller(script, drivers)
    other._factory = other_factory
    other.keep_counters(new)
    task = asyncio.create_task(other.run())
    await wait_for(lambda: other.health.good >= 1, 10, "third poller polling")
    other.stop()
    await task
    assert other.driver_events() == {"timeouts": 3, "sessions_lost": 1}


async def test_a_closed_drivers_late_news_still_counts_for_its_device() -> None:
    """Every driver of a device shares its counters: a reconnect keeps them, and what a
    closed driver learns later (OPC UA items deleted after it gave up) is not lost."""
    script: dict[str, Any] = {"refuse": True}
    drivers: list[_CountingDriver] = []
    poller = _counting_poller(script, drivers)
    task = asyncio.create_task(poller.run())
    try:
        await wait_for(lambda: len(drivers) >= 3, 10, "three refused connects")
        script["refuse"] = False
        await wait_for(lambda: poller.health.online is True, 10, "connected")
        drivers[0].stats.late_items_deleted += 2  # long closed, it hears back
    finally:
        poller.stop()
        await task
    assert poller.driver_events() == {"timeouts": len(drivers), "late_items_deleted": 2}
