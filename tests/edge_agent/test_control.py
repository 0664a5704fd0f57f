"""The control plane from the gateway's seat: a plain MQTT client pushes configurations and
writes to a real agent polling real Modbus simulators through a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import generate_latest
from pymodbus.client import AsyncModbusTcpClient

from device_profiles.loader import BUILTIN_DIR, load_profiles
from device_profiles.schema import Profile
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.discovery import DiscoveryScope
from iiot_common.localservers import Mosquitto, free_port
from protocols.driver import now_ms
from protocols.modbus import codec
from protocols.mqtt.contract import Birth, DataMessage
from protocols.mqtt.control import (
    ConfigReport,
    Proposal,
    ScanReport,
    WriteResult,
    WriteStatus,
)
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from simulators.opcua_server import OpcUaSimServer
from tests.edge_agent.helpers import PersistentMosquitto, agent_dict, modbus_device
from tests.waiting import wait_for

BASE = "iiot/v1/ent-1/agent-1"
INTERVAL = 1.0  # seconds between polls of every device in these tests


@dataclass
class Gateway:
    """A plain paho client in the gateway's seat: publishes control messages, records all."""

    port: int
    client_id: str = "test-gateway"
    messages: list[tuple[str, bytes, bool, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("iiot/v1/#", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                (msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic())
            )

    def __enter__(self) -> Gateway:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(5), "no SUBACK"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, suffix: str, body: dict[str, Any] | bytes, *, retain: bool = False) -> float:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.client.publish(f"{BASE}/{suffix}", payload, qos=1, retain=retain).wait_for_publish(5)
        return time.monotonic()

    def on(self, suffix: str) -> list[tuple[bytes, bool, float]]:
        with self._lock:
            return [(p, r, t) for topic, p, r, t in self.messages if topic == f"{BASE}/{suffix}"]

    def reports(self) -> list[ConfigReport]:
        return [ConfigReport.model_validate_json(p) for p, _, _ in self.on("reported") if p]

    def results(self, device: str) -> list[WriteResult]:
        return [WriteResult.model_validate_json(p) for p, _, _ in self.on(f"{device}/result")]

    def births(self) -> list[Birth]:
        out = []
        for p, _, _ in self.on("agent"):
            body = json.loads(p)
            if body.get("online"):
                out.append(Birth.model_validate(body))
        return out

    def seqs(self, device: str) -> list[int]:
        out: list[int] = []
        for p, _, _ in self.on(f"{device}/data"):
            msg = DataMessage.model_validate_json(p)
            out.extend(range(msg.seq, msg.seq + len(msg.samples)))
        return out

    def values(self, device: str) -> list[dict[str, Any]]:
        """The values of every sample of ``device``, in arrival order."""
        return [
            dict(s.values)
            for p, _, _ in self.on(f"{device}/data")
            for s in DataMessage.model_validate_json(p).samples
        ]

    def first_data_after(self, device: str, t: float) -> float | None:
        return next((at for _, _, at in self.on(f"{device}/data") if at >= t), None)


@dataclass
class Site:
    sim: ModbusSimServer
    kiln: SimDevice
    boiler: SimDevice
    motor: SimDevice


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    profiles = load_profiles()
    kiln = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1)
    boiler = SimDevice(profiles["boiler-steam-coal"], device_id="boiler-1", seed=2)
    motor = SimDevice(profiles["motor-hv-drive"], device_id="motor-1", seed=3)
    sim = ModbusSimServer({1: kiln, 2: boiler, 3: motor}, port=0)
    await sim.start()
    yield Site(sim, kiln, boiler, motor)
    await sim.stop()


def _kiln(site: Site) -> dict[str, Any]:
    return modbus_device("kiln-1", "kiln-rotary-cement", site.sim.port, unit=1, interval=INTERVAL)


def _boiler(site: Site) -> dict[str, Any]:
    return modbus_device("boiler-1", "boiler-steam-coal", site.sim.port, unit=2, interval=INTERVAL)


def _motor(site: Site) -> dict[str, Any]:
    return modbus_device("motor-1", "motor-hv-drive", site.sim.port, unit=3, interval=INTERVAL)


def _agent(
    tmp: Path, broker: Mosquitto, devices: list[dict[str, Any]], remote: bool = True
) -> Agent:
    cfg = agent_dict(tmp, broker.port, devices, remote_config={"enabled": remote})
    return Agent(parse_config(cfg))


def _desired(version: int, devices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"version": version, "ts": now_ms(), "devices": devices, **extra}


def _gap_free(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


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
        rr = await client.write_register(address, value, device_id=unit)
        assert not rr.isError()
    finally:
        client.close()


def _metric(agent: Agent, name: str, **labels: str) -> float:
    text = generate_latest(agent.metrics.registry).decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


async def test_pushed_config_adds_a_device_without_a_gap_in_the_others(
    tmp_path: Path, mosquitto: Mosquitto, site: Site
) -> None:
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site), _motor(site)])
        await agent.start()
        try:
            await wait_for(lambda: len(gw.seqs("kiln-1")) >= 3, 15, "kiln data")
            kiln_poller = agent._pollers["kiln-1"]
            pushed = gw.send("config", _desired(1, [_kiln(site), _boiler(site)]), retain=True)
            await wait_for(
                lambda: gw.first_data_after("boiler-1", pushed) is not None, 15, "boiler"
            )
            first_boiler = gw.first_data_after("boiler-1", pushed)
            await wait_for(lambda: bool(gw.reports()), 5, "report")
            before = len(gw.seqs("kiln-1"))
            await wait_for(lambda: len(gw.seqs("kiln-1")) >= before + 3, 15, "kiln goes on")
            assert agent._pollers["kiln-1"] is kiln_poller  # unchanged: never restarted
            # A changed entry restarts that device only; its seq carries on.
            boiler_poller = agent._pollers["boiler-1"]
            faster = {**_kiln(site), "poll_interval": INTERVAL / 2}
            gw.send("config", _desired(2, [faster, _boiler(site)]), retain=True)
            await wait_for(lambda: any(r.version == 2 for r in gw.reports()), 10, "v2")
            before = len(gw.seqs("kiln-1"))
            await wait_for(lambda: len(gw.seqs("kiln-1")) >= before + 3, 15, "kiln restarted")
            assert agent._pollers["kiln-1"] is not kiln_poller
            assert agent._pollers["kiln-1"].device.poll_interval == INTERVAL / 2
            assert agent._pollers["boiler-1"] is boiler_poller
            # The removed motor's series are gone from /metrics, not frozen at its last.
            scraped = generate_latest(agent.metrics.registry).decode()
            assert 'device="motor-1"' not in scraped and 'device="kiln-1"' in scraped
        finally:
            await agent.stop()

    assert first_boiler is not None and first_boiler - pushed <= 2 * INTERVAL
    assert _gap_free(gw.seqs("kiln-1")), gw.seqs("kiln-1")
    assert _gap_free(gw.seqs("boiler-1")), gw.seqs("boiler-1")
    first = next(r for r in gw.reports() if r.version == 1)
    assert (first.applied, first.running_version, first.errors) == (True, 1, {})
    report = gw.reports()[-1]
    assert (report.version, report.applied, report.running_version) == (2, True, 2)
    # The report is retained: a gateway connecting later still finds it.
    with Gateway(mosquitto.port, client_id="late-gateway") as late:
        await wait_for(lambda: bool(late.reports()), 5, "retained report")
    assert late.reports() == [report] and late.on("reported")[0][1]
    # The motor was removed: it went offline with reason 'removed'.
    motor_states = [json.loads(p) for p, _, _ in gw.on("motor-1/state")]
    assert motor_states[-1]["online"] is False and motor_states[-1]["reason"] == "removed"
    # The birth announced again carries the version and the new device set.
    birth = gw.births()[-1]
    assert birth.config_version == 2
    assert {d.id for d in birth.devices} == {"kiln-1", "boiler-1"}
    assert [b.config_version for b in gw.births()] == [None, 1, 2]


async def test_bad_config_is_refused_naming_the_device_and_the_old_one_runs(
    tmp_path: Path, mosquitto: Mosquitto, site: Site
) -> None:
    bad_device = modbus_device("ghost-1", "no-such-profile", site.sim.port, unit=9)
    typo = {**_boiler(site), "poll_intervall": 2}
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            gw.send("config", _desired(1, [_kiln(site), _motor(site)]), retain=True)
            await wait_for(lambda: any(r.version == 1 for r in gw.reports()), 10, "v1")
            gw.send("config", _desired(2, [_kiln(site), bad_device, typo]), retain=True)
            await wait_for(lambda: any(r.version == 2 for r in gw.reports()), 10, "v2 report")
            at_refusal = {d: len(gw.seqs(d)) for d in ("kiln-1", "motor-1")}
            await wait_for(
                lambda: all(len(gw.seqs(d)) >= n + 2 for d, n in at_refusal.items()),
                15,
                "old devices keep running",
            )
        finally:
            await agent.stop()

    refused = next(r for r in gw.reports() if r.version == 2)
    assert not refused.applied and refused.running_version == 1
    assert set(refused.errors) == {"ghost-1", "boiler-1"}
    assert "profile 'no-such-profile' not found" in refused.errors["ghost-1"]
    assert "poll_intervall" in refused.errors["boiler-1"]
    assert not gw.seqs("boiler-1")
    assert json.loads((tmp_path / "agent-data" / "remote-config.json").read_text())["version"] == 1


async def test_offline_agent_applies_the_retained_config_and_keeps_it_across_restarts(
    tmp_path: Path, mosquitto: Mosquitto, site: Site
) -> None:
    with Gateway(mosquitto.port) as gw:
        # Pushed while no agent is connected: the retained message waits for it.
        gw.send("config", _desired(3, [_boiler(site)]), retain=True)
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            await wait_for(lambda: any(r.version == 3 for r in gw.reports()), 15, "applied")
            await wait_for(lambda: len(gw.seqs("boiler-1")) >= 2, 15, "boiler data")
        finally:
            await agent.stop()
        births_before = len(gw.births())
        # The gateway's retained message is gone: only the agent's own copy remains.
        gw.send("config", b"", retain=True)
        restarted = _agent(tmp_path, mosquitto, [_kiln(site)])
        assert restarted.config_version == 3
        await restarted.start()
        try:
            await wait_for(lambda: len(gw.births()) > births_before, 10, "birth after restart")
            seen = len(gw.seqs("boiler-1"))
            await wait_for(lambda: len(gw.seqs("boiler-1")) >= seen + 2, 15, "boiler after restart")
        finally:
            await restarted.stop()

    birth = gw.births()[-1]
    assert birth.config_version == 3 and [d.id for d in birth.devices] == ["boiler-1"]
    assert all(r.applied and r.running_version == 3 for r in gw.reports())


async def test_remote_config_off_uses_the_local_file_alone(
    tmp_path: Path, mosquitto: Mosquitto, site: Site
) -> None:
    with Gateway(mosquitto.port) as gw:
        gw.send("config", _desired(1, [_boiler(site)]), retain=True)
        agent = _agent(tmp_path, mosquitto, [_kiln(site)], remote=False)
        await agent.start()
        try:
            await wait_for(lambda: bool(gw.reports()), 10, "report")
            await wait_for(lambda: len(gw.seqs("kiln-1")) >= 2, 10, "kiln data")
        finally:
            await agent.stop()
    report = gw.reports()[-1]
    assert not report.applied and report.running_version == 0
    assert "remote_config" in report.errors["config"]
    assert not gw.seqs("boiler-1")


def _cmd(cmd_id: str, point: str, value: Any, *, expires_in_ms: int = 10_000) -> dict[str, Any]:
    now = now_ms()
    return {"id": cmd_id, "point": point, "value": value, "ts": now, "expires": now + expires_in_ms}


async def test_write_to_a_setpoint_reaches_the_device_and_reads_back(
    tmp_path: Path, mosquitto: Mosquitto, site: Site
) -> None:
    kiln_profile = site.kiln.profile
    point = kiln_profile.point("burning_zone_temp_setpoint")
    before_raw = await _holding(site.sim.port, 1, 0)
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            await wait_for(lambda: len(gw.seqs("kiln-1")) >= 1, 15, "kiln data")
            gw.send("kiln-1/cmd", _cmd("w-1", "burning_zone_temp_setpoint", 1234.5))
            await wait_for(lambda: bool(gw.results("kiln-1")), 10, "result")
            after_raw = await _holding(site.sim.port, 1, 0)
            # The next poll's sample carries the written setpoint too.
            await wait_for(
                lambda: any(
                    v.get("burning_zone_temp_setpoint") == 1234.5 for v in gw.values("kiln-1")
                ),
                10,
                "setpoint in data",
            )
        finally:
            await agent.stop()

    result = gw.results("kiln-1")[0]
    assert result.status is WriteStatus.OK, result.reason
    assert after_raw == 12345 != before_raw  # scale 0.1 reversed: 1234.5 degC is 12345
    assert result.value == 1234.5
    assert result.previous == codec.decode(point, [before_raw], kiln_profile.modbus)


def _inverter_with_limits(folder: Path) -> Profile:
    """The shipped SunSpec inverter plus two writable limits with scale factors 1 and -1."""
    doc = yaml.safe_load((BUILTIN_DIR / "pv_inverter" / "pv-inverter-sunspec.yaml").read_text())
    doc["id"] = "pv-inverter-limits"
    doc["points"] += [
        {"name": "WMax", "type": "uint16", "access": "rw", "unit": "W",
         "scale_factor_point": "WMax_SF", "range": [0, 30000],
         "modbus": {"table": "holding", "address": 40200}},
        {"name": "WMax_SF", "type": "int16", "range": [1, 1],
         "modbus": {"table": "holding", "address": 40201}},
        {"name": "WMaxLimPct", "type": "uint16", "access": "rw", "unit": "%",
         "scale_factor_point": "WMaxLimPct_SF", "range": [0, 100],
         "modbus": {"table": "holding", "address": 40202}},
        {"name": "WMaxLimPct_SF", "type": "int16", "range": [-1, -1],
         "modbus": {"table": "holding", "address": 40203}},
    ]  # fmt: skip
    folder.mkdir()
    (folder / "pv-inverter-limits.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    return load_profiles([folder])["pv-inverter-limits"]


async def test_a_write_reads_back_to_the_resolution_of_its_scale_factor(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    profile = _inverter_with_limits(tmp_path / "profiles")
    sim = ModbusSimServer({1: SimDevice(profile, device_id="inv-1", seed=4)}, port=0)
    await sim.start()
    device = modbus_device("inv-1", profile.id, sim.port, interval=INTERVAL)
    cfg = agent_dict(tmp_path, mosquitto.port, [device], profiles=[str(tmp_path / "profiles")])
    try:
        with Gateway(mosquitto.port) as gw:
            agent = Agent(parse_config(cfg))
            await agent.start()
            try:
                await wait_for(lambda: len(gw.seqs("inv-1")) >= 1, 15, "inverter data")
                # WMax_SF = 1: the register holds tens of watts, so 1234 W is stored as 123.
                gw.send("inv-1/cmd", _cmd("w-1", "WMax", 1234))
                gw.send("inv-1/cmd", _cmd("w-2", "WMaxLimPct", 87.6))
                await wait_for(lambda: len(gw.results("inv-1")) == 2, 10, "both results")
                wmax_raw = await _holding(sim.port, 1, 40200)
            finally:
                await agent.stop()
    finally:
        await sim.stop()
    results = {r.id: r for r in gw.results("inv-1")}
    assert wmax_raw == 123
    assert results["w-1"].status is WriteStatus.OK, results["w-1"].reason
    assert results["w-1"].value == 1230
    assert results["w-2"].status is WriteStatus.OK, results["w-2"].reason
    assert results["w-2"].value == 87.6


async def test_refused_writes_are_never_executed(
    tmp_path: Path, mosquitto: Mosquitto, site: Site
) -> None:
    refusals = {
        "r-1": ("kiln_speed", 1.0, "read-only"),  # an input register, access r
        "r-2": ("burning_zone_temp_setpoint", 2000, "out of range"),
        "r-3": ("burning_zone_temp_setpoint", "hot", "takes a number"),
        "r-4": ("no_such_point", 1, "not in profile"),
    }
    holding_before = [await _holding(site.sim.port, 1, a) for a in (0, 1)]
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            await wait_for(lambda: len(gw.seqs("kiln-1")) >= 1, 15, "kiln data")
            for cmd_id, (point, value, _) in refusals.items():
                gw.send("kiln-1/cmd", _cmd(cmd_id, point, value))
            gw.send("kiln-1/cmd", _cmd("x-1", "burning_zone_temp_setpoint", 1000, expires_in_ms=-1))
            gw.send("boiler-9/cmd", _cmd("u-1", "steam_pressure_setpoint", 1.0))
            await wait_for(lambda: len(gw.results("kiln-1")) >= 5, 10, "results")
            await wait_for(lambda: bool(gw.results("boiler-9")), 10, "unknown-device result")
        finally:
            await agent.stop()

    by_id = {r.id: r for r in gw.results("kiln-1")}
    for cmd_id, (_, _, why) in refusals.items():
        assert by_id[cmd_id].status is WriteStatus.REFUSED and why in by_id[cmd_id].reason
    assert by_id["x-1"].status is WriteStatus.EXPIRED
    unknown = gw.results("boiler-9")[0]
    assert unknown.status is WriteStatus.REFUSED and "boiler-9" in unknown.reason
    assert [await _holding(site.sim.port, 1, a) for a in (0, 1)] == holding_before
    assert agent.commands.executed == 0


async def test_a_repeated_request_id_is_answered_not_written_again(
    tmp_path: Path, mosquitto: Mosquitto, site: Site
) -> None:
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_motor(site)])
        await agent.start()
        try:
            await wait_for(lambda: len(gw.seqs("motor-1")) >= 1, 15, "motor data")
            command = _cmd("once-1", "speed_setpoint", 900)
            gw.send("motor-1/cmd", command)
            await wait_for(lambda: len(gw.results("motor-1")) == 1, 10, "first result")
            assert await _holding(site.sim.port, 3, 0) == 900
            # Someone else changes the setpoint; a replay of the old request must not undo it.
            await _set_holding(site.sim.port, 3, 0, 700)
            gw.send("motor-1/cmd", command)
            await wait_for(lambda: len(gw.results("motor-1")) == 2, 10, "second result")
            await asyncio.sleep(0.3)
            after_replay = await _holding(site.sim.port, 3, 0)
            replays = _metric(
                agent, "iiot_agent_control_messages_total", kind="cmd", result="repeated"
            )
        finally:
            await agent.stop()

    first, second = gw.results("motor-1")
    assert first.status is WriteStatus.OK and first.value == 900
    assert second == first
    assert after_replay == 700
    assert agent.commands.executed == 1 and replays == 1


async def test_bad_control_payloads_are_counted_and_never_stop_the_agent(
    tmp_path: Path, mosquitto: Mosquitto, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="iiot.agent.control")
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            await wait_for(lambda: len(gw.seqs("kiln-1")) >= 1, 15, "kiln data")
            for _ in range(3):  # counted three times, logged once
                gw.send("config", b"{not json")
            gw.send("config", {"version": 0, "ts": 1})
            gw.send("kiln-1/cmd", {"id": "c-1", "point": "x"})
            gw.send("scan", {"id": "s 1", "ts": 1, "expires": 2})
            await wait_for(
                lambda: (
                    _metric(agent, "iiot_agent_control_bad_messages_total", reason="invalid_scan")
                    == 1
                ),
                10,
                "bad messages counted",
            )
            seen = len(gw.seqs("kiln-1"))
            await wait_for(lambda: len(gw.seqs("kiln-1")) >= seen + 2, 10, "kiln goes on")
            counts = {
                reason: _metric(agent, "iiot_agent_control_bad_messages_total", reason=reason)
                for reason in ("bad_json", "invalid_config", "invalid_cmd", "invalid_scan")
            }
        finally:
            await agent.stop()
    assert counts == {"bad_json": 3, "invalid_config": 1, "invalid_cmd": 1, "invalid_scan": 1}
    assert not gw.reports() and not gw.results("kiln-1")
    logged = [r.reason for r in caplog.records if r.name == "iiot.agent.control"]  # type: ignore[attr-defined]
    assert logged == ["bad_json", "invalid_config", "invalid_cmd", "invalid_scan"]


@pytest.mark.parametrize("mode", ["read", "subscribe"])
async def test_opcua_write_goes_through_the_agents_session(
    tmp_path: Path, mosquitto: Mosquitto, mode: str
) -> None:
    profile = load_profiles()["boiler-steam-gas-opcua"]
    sim_dev = SimDevice(profile, device_id="ua-1", seed=4)
    server = OpcUaSimServer(sim_dev, port=free_port(), update_interval=0.1)
    await server.start()
    device = {
        "id": "ua-1",
        "profile": profile.id,
        "poll_interval": 0.5,
        "poll_timeout": 3.0,
        "opcua": {"endpoint": server.endpoint, "timeout": 3.0, "mode": mode,
                  "sampling_interval": 0.2},
    }  # fmt: skip
    try:
        with Gateway(mosquitto.port) as gw:
            agent = _agent(tmp_path, mosquitto, [device])
            await agent.start()
            try:
                await wait_for(
                    lambda: any("steam_pressure_setpoint" in v for v in gw.values("ua-1")),
                    20,
                    "the setpoint in OPC UA data",
                )
                gw.send("ua-1/cmd", _cmd("ua-w1", "steam_pressure_setpoint", 1.5))
                await wait_for(lambda: len(gw.results("ua-1")) == 1, 10, "refusal")
                untouched = sim_dev.values()["steam_pressure_setpoint"]
                gw.send("ua-1/cmd", _cmd("ua-w2", "steam_pressure_setpoint", 0.9))
                await wait_for(lambda: len(gw.results("ua-1")) == 2, 15, "write result")
                written = sim_dev.values()["steam_pressure_setpoint"]
            finally:
                await agent.stop()
    finally:
        await server.stop()
    refused, ok = gw.results("ua-1")
    assert refused.status is WriteStatus.REFUSED and "out of range" in refused.reason
    assert untouched != 1.5 and server.client_writes == 1
    assert ok.status is WriteStatus.OK, ok.reason
    assert written == 0.9 and ok.value == 0.9 and ok.previous == untouched


async def test_a_scan_without_a_scope_is_answered_with_the_reason(
    tmp_path: Path, mosquitto: Mosquitto, site: Site
) -> None:
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            # The agent subscribes before it sends data: once data is here, a scan is heard.
            await wait_for(lambda: bool(gw.seqs("kiln-1")), 15, "kiln data")
            gw.send("scan", {"id": "scan-1", "ts": now_ms(), "expires": now_ms() + 5000})
            await wait_for(lambda: bool(gw.on("discovered")), 10, "scan report")
        finally:
            await agent.stop()
    report = ScanReport.model_validate_json(gw.on("discovered")[0][0])
    assert report.scan == "scan-1" and report.proposals == []
    assert report.errors == ["this agent has no discovery scope in its configuration"]


def _fake_discovery(monkeypatch: pytest.MonkeyPatch, scan: Callable[..., Any]) -> None:
    """Stand ``scan`` in for ``edge_agent.discovery.scan``: the seam the agent calls."""
    fake = types.ModuleType("edge_agent.discovery")
    fake.DiscoveryScope = DiscoveryScope  # type: ignore[attr-defined]
    fake.scan = scan  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edge_agent.discovery", fake)


async def test_a_scan_calls_discovery_with_the_configured_scope(
    tmp_path: Path, mosquitto: Mosquitto, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seam to ``edge_agent.discovery``: scope, profiles, exclusions and deadline."""
    calls: list[dict[str, Any]] = []

    async def scan(
        scope: DiscoveryScope, profiles: Any, *, exclude: set[str], deadline: float
    ) -> list[Proposal]:
        calls.append({"scope": scope, "exclude": exclude, "left": deadline - time.monotonic(),
                      "has_kiln": "kiln-rotary-cement" in profiles})  # fmt: skip
        address = {"modbus": {"host": "127.0.0.1", "port": site.sim.port, "unit": 3}}
        return [Proposal(protocol="modbus", address=address)]

    _fake_discovery(monkeypatch, scan)
    scope = {"modbus_tcp": [{"hosts": ["127.0.0.1"]}]}
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            gw.send("config", _desired(1, [_kiln(site)], discovery=scope), retain=True)
            await wait_for(lambda: bool(gw.reports()), 10, "config applied")
            gw.send("scan", {"id": "scan-2", "ts": now_ms(), "expires": now_ms() + 8000})
            await wait_for(lambda: bool(gw.on("discovered")), 10, "scan report")
        finally:
            await agent.stop()
    report = ScanReport.model_validate_json(gw.on("discovered")[0][0])
    assert report.errors == [] and report.proposals[0].address["modbus"]["unit"] == 3
    (call,) = calls
    assert call["scope"] == DiscoveryScope.model_validate(scope) and call["has_kiln"]
    assert call["exclude"] == {f"modbus:tcp:127.0.0.1:{site.sim.port}:1"}
    assert 5 < call["left"] <= 8


async def test_a_scan_request_delivered_twice_is_scanned_and_answered_once(
    tmp_path: Path, mosquitto: Mosquitto, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repeat (QoS 1 redelivery) must not answer "busy" as if the scan were over."""
    calls = 0

    async def scan(
        scope: DiscoveryScope, profiles: Any, *, exclude: set[str], deadline: float
    ) -> list[Proposal]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.5)
        return [Proposal(protocol="modbus", address={"modbus": {"host": "127.0.0.1"}})]

    _fake_discovery(monkeypatch, scan)
    scope = {"modbus_tcp": [{"hosts": ["127.0.0.1"]}]}
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            gw.send("config", _desired(1, [_kiln(site)], discovery=scope), retain=True)
            await wait_for(lambda: bool(gw.reports()), 10, "config applied")
            request = {"id": "scan-9", "ts": now_ms(), "expires": now_ms() + 8000}
            gw.send("scan", request)
            gw.send("scan", request)
            await wait_for(lambda: bool(gw.on("discovered")), 10, "scan report")
            await asyncio.sleep(1.0)  # a second answer would be here by now
        finally:
            await agent.stop()
    reports = [ScanReport.model_validate_json(p) for p, *_ in gw.on("discovered")]
    assert [(r.scan, r.errors, len(r.proposals)) for r in reports] == [("scan-9", [], 1)]
    assert calls == 1


async def test_a_scan_sent_right_after_a_config_uses_that_configs_scope(
    tmp_path: Path, mosquitto: Mosquitto, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The platform pushes a scope and asks for a scan at once: the scan waits for it."""
    scopes: list[DiscoveryScope] = []

    async def scan(
        scope: DiscoveryScope, profiles: Any, *, exclude: set[str], deadline: float
    ) -> list[Proposal]:
        scopes.append(scope)
        return []

    _fake_discovery(monkeypatch, scan)
    scope = {"modbus_tcp": [{"hosts": ["127.0.0.1"]}]}
    with Gateway(mosquitto.port) as gw:
        agent = _agent(tmp_path, mosquitto, [_kiln(site)])
        await agent.start()
        try:
            # The agent subscribes before it sends data: once data is here, a scan is heard.
            await wait_for(lambda: bool(gw.seqs("kiln-1")), 15, "kiln data")
            gw.send("config", _desired(1, [_kiln(site)], discovery=scope), retain=True)
            gw.send("scan", {"id": "scan-3", "ts": now_ms(), "expires": now_ms() + 8000})
            await wait_for(lambda: bool(gw.on("discovered")), 10, "scan report")
        finally:
            await agent.stop()
    report = ScanReport.model_validate_json(gw.on("discovered")[0][0])
    assert report.errors == [], report.errors
    assert scopes == [DiscoveryScope.model_validate(scope)]


async def test_a_push_during_a_broker_outage_is_applied_after_the_reconnect(
    tmp_path: Path, site: Site
) -> None:
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = PersistentMosquitto(broker_dir).start()
    agent = _agent(tmp_path, broker, [_kiln(site)])
    try:
        await agent.start()
        await wait_for(lambda: agent.publisher.connected, 10, "connected")
        broker.stop()
        await wait_for(lambda: not agent.publisher.connected, 10, "connection lost")
        broker.start()
        # The gateway is back first and pushes; the agent is still waiting out its backoff.
        with Gateway(broker.port) as gw:
            gw.send("config", _desired(5, [_kiln(site), _boiler(site)]), retain=True)
            await wait_for(lambda: any(r.version == 5 for r in gw.reports()), 15, "applied")
            await wait_for(lambda: len(gw.seqs("boiler-1")) >= 2, 15, "boiler data")
            reconnects = _metric(agent, "iiot_agent_mqtt_connects_total", result="ok")
    finally:
        await agent.stop()
        broker.stop()
    report = next(r for r in gw.reports() if r.version == 5)
    assert report.applied and reconnects == 2
    assert gw.births()[-1].config_version == 5
