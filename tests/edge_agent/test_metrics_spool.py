"""The spool cap and the metrics endpoint, as an operator sees them."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_profiles.loader import load_profiles
from device_profiles.schema import Point, Profile
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.spool import Spool
from iiot_common.localservers import Mosquitto, free_port
from protocols.driver import Reading
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import agent_dict, modbus_device
from tests.waiting import wait_for


def _metric(text: str, name: str, labels: str = "") -> float:
    pat = re.escape(name) + (r"\{[^}]*" + re.escape(labels) + r"[^}]*\}" if labels else r"")
    total = 0.0
    for m in re.finditer(r"^" + pat + r"\s+(\S+)$", text, re.M):
        total += float(m.group(1))
    return total


def test_tiny_cap_drops_oldest_and_keeps_newest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_samples=5)
    for i in range(20):
        spool.append("d1", 1000 + i, f'{{"ts":{1000 + i}}}')
    assert spool.depth == 5
    assert spool.dropped == 15
    rows = spool.batch("d1")
    assert [r.seq for r in rows] == [16, 17, 18, 19, 20]
    spool.close()
    # Reopened: seq continues, what was kept is still there.
    again = Spool(tmp_path / "s.db")
    assert again.depth == 5
    assert again.append("d1", 2000, "{}") == 21
    again.close()


def test_byte_cap_keeps_the_spool_under_its_size(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=4096)
    for i in range(200):
        spool.append("d1", i, "x" * 100)
    assert spool.size_bytes <= 4096
    assert spool.dropped > 150
    assert spool.batch("d1", max_samples=1000)[-1].seq == 200
    spool.close()


async def test_metrics_endpoint_and_spool_cap_while_broker_unreachable(tmp_path: Path) -> None:
    profiles = load_profiles()
    dev = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    cfg = agent_dict(
        tmp_path,
        free_port(),  # nothing listens there: every sample stays in the spool
        [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.05)],
        spool={"max_samples": 10},
        metrics={"host": "127.0.0.1", "port": 0},
    )
    agent = Agent(parse_config(cfg))
    await agent.start()
    try:
        assert agent.metrics_port
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        await wait_for(lambda: agent.spool.dropped >= 5, 10, "spool drops")
        async with httpx.AsyncClient() as http:
            first = (await http.get(url)).text
            await wait_for(lambda: agent.spool.dropped >= 15, 10, "more drops")
            second = (await http.get(url)).text
    finally:
        await agent.stop()
        await sim.stop()
    polls1 = _metric(first, "iiot_agent_polls_total", 'result="ok"')
    polls2 = _metric(second, "iiot_agent_polls_total", 'result="ok"')
    assert polls2 > polls1 > 0
    assert (
        _metric(second, "iiot_agent_spool_dropped_total")
        > _metric(first, "iiot_agent_spool_dropped_total")
        > 0
    )
    assert _metric(second, "iiot_agent_spool_depth") == 10
    assert _metric(second, "iiot_agent_mqtt_connected") == 0
    assert _metric(second, "iiot_agent_device_online", 'device="kiln-1"') == 1
    assert _metric(second, "iiot_agent_mqtt_connects_total", 'result="failed"') >= 1
    assert "iiot_agent_poll_duration_seconds_bucket" in second


async def test_published_counters_move_with_a_broker(tmp_path: Path, mosquitto: Mosquitto) -> None:
    profiles = load_profiles()
    dev = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    cfg = agent_dict(
        tmp_path,
        mosquitto.port,
        [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.05)],
        metrics={"port": 0},
    )
    agent = Agent(parse_config(cfg))
    await agent.start()
    try:
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        async with httpx.AsyncClient() as http:
            await wait_for(lambda: agent.publisher.connected, 5)
            await wait_for(lambda: agent.metrics.published_samples._value.get() >= 5, 10)
            text = (await http.get(url)).text
    finally:
        await agent.stop()
        await sim.stop()
    assert _metric(text, "iiot_agent_published_samples_total") >= 5
    assert _metric(text, "iiot_agent_published_messages_total", 'kind="birth"') == 1
    assert _metric(text, "iiot_agent_publish_latency_seconds_count") >= 5
    assert _metric(text, "iiot_agent_mqtt_connected") == 1


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    bdir = tmp_path / "broker"
    bdir.mkdir()
    pwfile = bdir / "passwd"
    pwfile.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "agent-1", "right"], check=True)
    broker = Mosquitto(bdir, password_file=pwfile).start()
    yield broker
    broker.stop()


async def test_refused_login_is_counted_and_samples_are_kept(
    tmp_path: Path, secured_broker: Mosquitto
) -> None:
    broker = secured_broker
    profiles = load_profiles()
    sim = ModbusSimServer(
        {1: SimDevice(profiles["kiln-rotary-cement"], device_id="k", seed=1)}, port=0
    )
    await sim.start()
    cfg = agent_dict(
        tmp_path,
        broker.port,
        [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.1)],
    )
    cfg["mqtt"].update(username="agent-1", password="wrong", reconnect_max=0.6)
    agent = Agent(parse_config(cfg))
    await agent.start()
    try:
        await wait_for(
            lambda: agent.metrics.mqtt_connects.labels("auth_failed")._value.get() >= 1, 10
        )
        assert not agent.publisher.connected
        await wait_for(lambda: agent.spool.depth >= 3, 5, "samples kept for later")
    finally:
        await agent.stop()
        await sim.stop()


async def test_failed_spool_commits_show_on_metrics(tmp_path: Path) -> None:
    profiles = load_profiles()
    dev = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    cfg = agent_dict(
        tmp_path,
        free_port(),
        [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.05)],
        metrics={"host": "127.0.0.1", "port": 0},
    )
    agent = Agent(parse_config(cfg))
    await agent.start()
    blocker = sqlite3.connect(agent.spool.path, isolation_level=None, timeout=0.1)
    try:
        await wait_for(lambda: agent.samples_spooled > 0, 10, "first commit")
        # Another writer holds the database: the agent's commits fail until it lets go.
        blocker.execute("BEGIN EXCLUSIVE")
        await wait_for(lambda: agent.spool.commit_errors >= 1, 30, "a failed commit")
        blocker.execute("ROLLBACK")
        spooled = agent.samples_spooled
        await wait_for(lambda: agent.samples_spooled > spooled, 30, "commits again")
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{agent.metrics_port}/metrics")).text
    finally:
        blocker.close()
        await agent.stop()
        await sim.stop()
    assert _metric(text, "iiot_agent_spool_commit_errors_total") >= 1


async def test_a_sample_the_contract_refuses_is_counted_and_polling_goes_on(
    tmp_path: Path,
) -> None:
    from tests.edge_agent.test_poller_unit import FakeDriver

    class _BadNames(FakeDriver):
        """Every other reading carries a point name the contract refuses (a driver bug)."""

        async def read(self, points: Sequence[Point]) -> Reading:
            reading = await super().read(points)
            self.script["n"] = n = self.script.get("n", 0) + 1
            if n % 2:
                reading.values["bad name"] = 1.0
            return reading

    def factory(profile: Profile, conn: Any, *, name: str) -> FakeDriver:
        return _BadNames({})

    cfg = agent_dict(
        tmp_path,
        free_port(),
        [modbus_device("kiln-1", "kiln-rotary-cement", free_port(), interval=0.02)],
    )
    agent = Agent(parse_config(cfg), driver_factory=factory)
    await agent.start()
    try:
        await wait_for(lambda: agent.samples_spooled >= 5, 10, "good samples spooled")
    finally:
        await agent.stop()
    refused = agent.metrics.registry.get_sample_value(
        "iiot_agent_errors_total", {"device": "kiln-1", "reason": "bad_sample"}
    )
    assert refused is not None and refused >= 4
    again = Spool(agent.cfg.spool_path)
    try:
        assert all("bad name" not in r.body for r in again.batch("kiln-1", max_samples=1000))
    finally:
        again.close()
