"""Writes and remote configuration on a Sparkplug agent: the real agent polling a Modbus
simulator, the real gateway, Mosquitto with the gateway's own password and ACL files."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from protocols.driver import now_ms
from protocols.mqtt.control import WriteResult, WriteStatus
from protocols.mqtt.sparkplug.command import dcmd
from protocols.mqtt.sparkplug.node import REASON_METRIC
from protocols.mqtt.sparkplug.payload import DataType, Payload, get_value
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import modbus_device, wait_for
from tests.gateway.test_control import AGENT, ENT, OPERATOR, _Plane, plane
from tests.gateway.test_provisioning import _Client
from tests.sparkplug_client import SpSubscriber

__all__ = ["plane"]  # the fixture, imported for pytest

_RESULTS = f"iiot/v1/{ENT}/{AGENT}/+/result"
_SETPOINT = "burning_zone_temp_setpoint"  # holding register 0 of unit 1, scale 0.1


@dataclass
class _Site:
    plane: _Plane
    sim: ModbusSimServer
    agent: Agent
    sub: SpSubscriber
    host: _Client  # a Sparkplug host with the gateway's account: sends DCMD, reads results

    def results(self, device: str) -> list[WriteResult]:
        topic = f"iiot/v1/{ENT}/{AGENT}/{device}/result"
        with self.host.got:
            found = [p for t, p in self.host.messages if t == topic]
        return [WriteResult.model_validate_json(p) for p in found]

    def dcmd(self, device: str, payload: bytes) -> None:
        self.host.publish(f"spBv1.0/{ENT}/DCMD/{AGENT}/{device}", payload)

    def alias(self, device: str, point: str) -> int:
        birth = self.sub.of("DBIRTH", device)[-1]
        return int(birth.metric(point).alias)


def _kiln(port: int) -> dict[str, Any]:
    return modbus_device("kiln-1", "kiln-rotary-cement", port, unit=1, interval=0.5)


def _motor(port: int) -> dict[str, Any]:
    return modbus_device("motor-1", "motor-hv-drive", port, unit=3, interval=0.5)


async def _holding(port: int, unit: int, address: int) -> int:
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        rr = await client.read_holding_registers(address, count=1, device_id=unit)
        assert not rr.isError()
        return int(rr.registers[0])
    finally:
        client.close()


async def _set_holding(port: int, unit: int, address: int, value: int) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        assert not (await client.write_register(address, value, device_id=unit)).isError()
    finally:
        client.close()


@pytest.fixture
async def site(plane: _Plane, tmp_path: Path) -> AsyncIterator[_Site]:
    profiles = load_profiles()
    kiln = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1)
    motor = SimDevice(profiles["motor-hv-drive"], device_id="motor-1", seed=3)
    sim = ModbusSimServer({1: kiln, 3: motor}, port=0)
    await sim.start()
    cfg = {
        "agent_id": AGENT,
        "enterprise": ENT,
        "data_dir": str(tmp_path / "agent-data"),
        "mqtt": {
            "url": plane.broker.url,
            "username": AGENT,
            "password": plane.agent_password,
            "codec": "sparkplug",
            "reconnect_min": 0.2,
            "reconnect_max": 1.0,
        },
        "remote_config": {"enabled": True},
        "devices": [_kiln(sim.port)],
    }
    agent = Agent(parse_config(cfg))
    sub = SpSubscriber(plane.broker.port, username="gateway", password="gw-pass").start()
    host = _Client(plane.broker.port, "gateway", "gw-pass")
    host.subscribe(_RESULTS)
    await agent.start()
    try:
        await wait_for(lambda: bool(sub.of("DDATA", "kiln-1")), 15, "kiln DDATA")
        yield _Site(plane, sim, agent, sub, host)
    finally:
        await agent.stop()
        sub.stop()
        host.c.disconnect()
        host.c.loop_stop()
        await sim.stop()


def _ddata_values(site: _Site, device: str, alias: int, after_ts: int) -> list[Any]:
    out = []
    for m in site.sub.of("DDATA", device):
        for metric in m.payload.metrics:
            if metric.alias == alias and metric.timestamp >= after_ts:
                out.append(get_value(metric, metric.datatype))
    return out


async def test_a_dcmd_writes_the_device_reports_back_and_is_not_repeated(site: _Site) -> None:
    port = site.sim.port
    before = await _holding(port, 1, 0)
    sent = now_ms()
    command = dcmd([(_SETPOINT, DataType.DOUBLE, 1234.5)])
    site.dcmd("kiln-1", command)
    await wait_for(lambda: len(site.results("kiln-1")) == 1, 10, "a WriteResult")
    first = site.results("kiln-1")[0]
    assert first.status is WriteStatus.OK, first.reason
    assert first.value == 1234.5 and first.id.startswith("sp-")
    assert await _holding(port, 1, 0) == 12345 != before  # what a Modbus client reads
    # The Sparkplug answer: a DDATA with the value read back, by the point's alias.
    alias = site.alias("kiln-1", _SETPOINT)
    await wait_for(
        lambda: 1234.5 in _ddata_values(site, "kiln-1", alias, sent), 10, "DDATA of the write"
    )

    # Someone else changes it; the same DCMD delivered again must not undo that.
    await _set_holding(port, 1, 0, 9000)
    site.dcmd("kiln-1", command)
    await wait_for(lambda: len(site.results("kiln-1")) == 2, 10, "the second answer")
    await asyncio.sleep(0.3)
    assert site.results("kiln-1")[1] == first
    assert await _holding(port, 1, 0) == 9000
    assert site.agent.commands.executed == 1


async def test_refused_and_stale_dcmds_are_never_executed(site: _Site) -> None:
    port = site.sim.port
    holding = [await _holding(port, 1, a) for a in (0, 1)]
    stale = now_ms() - 60_000  # older than the default 30 s bound: an outage's leftover
    site.dcmd("kiln-1", dcmd([("kiln_speed", DataType.DOUBLE, 1.0)]))  # access r
    site.dcmd("kiln-1", dcmd([(_SETPOINT, DataType.DOUBLE, 2000.0)]))  # range [0, 1600]
    site.dcmd("kiln-1", dcmd([(_SETPOINT, DataType.DOUBLE, 1000.0)], ts=stale))
    by_alias = Payload()
    by_alias.timestamp = now_ms()
    m = by_alias.metrics.add()
    m.alias, m.datatype, m.double_value = 99_999, DataType.DOUBLE, 1.0  # never born
    site.dcmd("kiln-1", bytes(by_alias.SerializeToString()))
    site.dcmd("kiln-1", b"\xff\x00 not protobuf")
    await wait_for(lambda: len(site.results("kiln-1")) >= 4, 10, "four answers")
    await asyncio.sleep(0.3)

    answers = site.results("kiln-1")
    assert len(answers) == 4
    # Checks answer at once, the stale one after the executor's look: order may vary.
    for status, why in [
        (WriteStatus.REFUSED, "read-only"),
        (WriteStatus.REFUSED, "out of range"),
        (WriteStatus.EXPIRED, "expired"),
        (WriteStatus.REFUSED, "alias 99999 was never born"),
    ]:
        assert [r for r in answers if r.status is status and why in r.reason], (why, answers)
    assert [await _holding(port, 1, a) for a in (0, 1)] == holding
    assert site.agent.commands.executed == 0
    bad = site.agent.control_metrics.bad.labels("bad_protobuf")._value.get()
    assert bad == 1


def _api_write(plane: _Plane, point: str, value: Any) -> Any:
    path = f"/api/v1/devices/{ENT}/kiln-1/write"
    return plane.call("POST", path, OPERATOR, json={"point": point, "value": value})


async def test_the_write_api_sends_a_sparkplug_agent_a_dcmd_and_audits_it(site: _Site) -> None:
    plane = site.plane
    await asyncio.to_thread(plane.online)
    agents = (await asyncio.to_thread(plane.call, "GET", "/api/v1/agents")).json()
    assert [a["codec"] for a in agents if a["id"] == AGENT] == ["sparkplug"]

    ok = await asyncio.to_thread(_api_write, plane, _SETPOINT, 1111)
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "ok" and ok.json()["value"] == 1111
    assert await _holding(site.sim.port, 1, 0) == 11110
    refused = await asyncio.to_thread(_api_write, plane, "kiln_speed", 1.0)
    assert refused.json()["status"] == "refused" and "read-only" in refused.json()["reason"]

    # It went as a DCMD (metric by name, the profile's datatype), never as a JSON cmd.
    cmds = [m for m in site.sub.of("DCMD", "kiln-1")]
    assert len(cmds) == 2
    metric = cmds[0].payload.metrics[0]
    assert metric.name == _SETPOINT and metric.datatype == DataType.DOUBLE
    assert not [t for t, _ in site.host.messages if t.endswith("/cmd")]
    audit = (await asyncio.to_thread(plane.call, "GET", "/api/v1/writes", OPERATOR)).json()
    rows = {r["id"]: r for r in audit}
    assert rows[ok.json()["id"]]["status"] == "ok"
    assert rows[ok.json()["id"]]["token_label"] == ok.json()["token_label"]
    assert rows[refused.json()["id"]]["status"] == "refused"
    assert site.agent.commands.executed == 1


async def test_a_dcmd_from_another_sparkplug_host_is_audited_from_the_agents_answer(
    site: _Site,
) -> None:
    plane = site.plane
    await asyncio.to_thread(plane.online)
    command = dcmd([(_SETPOINT, DataType.DOUBLE, 1234.5)])  # no request id: derived
    site.dcmd("kiln-1", command)
    site.dcmd("kiln-1", dcmd([("kiln_speed", DataType.DOUBLE, 1.0)]))  # read-only
    await wait_for(lambda: len(site.results("kiln-1")) == 2, 10, "two answers")
    site.dcmd("kiln-1", command)  # delivered again: answered from memory
    await wait_for(lambda: len(site.results("kiln-1")) == 3, 10, "the repeated answer")
    answers = {r.status: r for r in site.results("kiln-1")}

    def audit() -> dict[str, dict[str, Any]]:
        rows = plane.call("GET", "/api/v1/writes", OPERATOR, params={"device": "kiln-1"})
        return {r["id"]: r for r in rows.json()}

    async def both() -> bool:
        return len(await asyncio.to_thread(audit)) == 2

    await wait_for(both, 10, "both writes in the audit")
    rows = await asyncio.to_thread(audit)
    ok = rows[answers[WriteStatus.OK].id]
    assert (ok["role"], ok["token_label"], ok["agent"]) == ("sparkplug host", "", AGENT)
    assert (ok["point"], ok["value"], ok["status"]) == (_SETPOINT, 1234.5, "ok")
    assert ok["read_back"] == 1234.5 and ok["previous"] == answers[WriteStatus.OK].previous
    refused = rows[answers[WriteStatus.REFUSED].id]
    assert (refused["point"], refused["value"], refused["status"]) == ("kiln_speed", 1.0, "refused")
    assert "read-only" in refused["reason"] and refused["role"] == "sparkplug host"
    assert site.agent.commands.executed == 1


async def test_remote_configuration_births_added_devices_and_kills_removed_ones(
    site: _Site,
) -> None:
    plane, port = site.plane, site.sim.port

    def put(devices: list[dict[str, Any]]) -> Any:
        path = f"/api/v1/agents/{ENT}/{AGENT}/config"
        return plane.call("PUT", path, json={"devices": devices})

    kiln_births = len(site.sub.of("DBIRTH", "kiln-1"))
    assert (await asyncio.to_thread(put, [_kiln(port), _motor(port)])).status_code == 200
    await wait_for(lambda: bool(site.sub.of("DBIRTH", "motor-1")), 10, "motor DBIRTH")
    await wait_for(lambda: bool(site.sub.of("DDATA", "motor-1")), 10, "motor DDATA")
    birth = site.sub.of("DBIRTH", "motor-1")[0]
    names = {m.name for m in birth.payload.metrics}
    assert {p.name for p in load_profiles()["motor-hv-drive"].points} <= names
    assert birth.metric("Properties/profile").string_value == "motor-hv-drive"
    # Aliases stay unique in the node: the motor's do not reuse the kiln's.
    kiln_aliases = {m.alias for m in site.sub.of("DBIRTH", "kiln-1")[-1].payload.metrics}
    motor_aliases = {m.alias for m in birth.payload.metrics if m.HasField("alias")}
    assert not (kiln_aliases - {0}) & motor_aliases
    assert len(site.sub.of("DBIRTH", "kiln-1")) == kiln_births  # unchanged: not born again
    assert not [m for m in site.sub.of("DBIRTH") if m.topic.device not in ("kiln-1", "motor-1")]

    t_removed = time.monotonic()
    assert (await asyncio.to_thread(put, [_motor(port)])).status_code == 200
    await wait_for(lambda: bool(site.sub.of("DDEATH", "kiln-1")), 10, "kiln DDEATH")
    death = site.sub.of("DDEATH", "kiln-1")[0]
    assert death.metric(REASON_METRIC).string_value == "removed"
    assert time.monotonic() - t_removed < 10
    await asyncio.sleep(1.5)  # no kiln DDATA after its death
    last = site.sub.all()
    after = last[last.index(death) + 1 :]
    assert not [m for m in after if m.topic.device == "kiln-1" and m.topic.type.value == "DDATA"]

    # The host sees it too: the registry takes the kiln offline with the reason.
    def kiln() -> dict[str, Any]:
        found: dict[str, Any] = plane.call("GET", f"/api/v1/devices/{ENT}/kiln-1").json()
        return found

    await wait_for(lambda: not kiln()["online"], 10, "kiln offline in the registry")
