"""The agent on Sparkplug B: session rules, rebirth, will, outage replay, device deaths."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import Mosquitto
from protocols.mqtt.contract import DeviceState
from protocols.mqtt.sparkplug.node import REASON_METRIC, REBIRTH, rebirth_request
from protocols.mqtt.sparkplug.payload import DataType, datatype_for
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import PersistentMosquitto, agent_dict, modbus_device, wait_for
from tests.sparkplug_client import SpMessage, SpSubscriber

_PROFILE = "kiln-rotary-cement"


def _sp_config(tmp_path: Path, port: int, devices: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = agent_dict(tmp_path, port, devices)
    cfg["mqtt"]["codec"] = "sparkplug"
    return cfg


async def _sim(device_id: str, seed: int = 1) -> ModbusSimServer:
    dev = SimDevice(load_profiles()[_PROFILE], device_id=device_id, seed=seed)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    return sim


class _QueueingMosquitto(PersistentMosquitto):
    """Also queues QoS 0 messages (Sparkplug births) for the test's offline subscriber."""

    def _write_conf(self) -> None:
        super()._write_conf()
        self.conf.write_text(self.conf.read_text() + "\nqueue_qos0_messages true\n")


def _bdseq(m: SpMessage) -> int:
    return int(m.metric("bdSeq").long_value)


def _publish(port: int, topic: str, payload: bytes) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sp-host")
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.publish(topic, payload, qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


async def test_births_data_seq_rebirth_and_orderly_death(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    sim = await _sim("kiln-1")
    devices = [modbus_device("kiln-1", _PROFILE, sim.port, interval=0.1)]
    agent = Agent(parse_config(_sp_config(tmp_path, mosquitto.port, devices)))
    with SpSubscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: len(sub.of("DDATA")) >= 5, 15, "DDATA")
            _publish(mosquitto.port, "spBv1.0/ent-1/NCMD/agent-1", rebirth_request())
            await wait_for(lambda: len(sub.of("NBIRTH")) >= 2, 10, "a second NBIRTH")
            await wait_for(lambda: len(sub.of("DBIRTH")) >= 2, 10, "a second DBIRTH")
            await wait_for(lambda: sub.all()[-1].topic.type.value == "DDATA", 10, "data again")
            rebirths = agent.metrics.registry.get_sample_value
            await wait_for(
                lambda: rebirths("iiot_agent_sparkplug_rebirths_total") == 1, 10, "rebirth counted"
            )
        finally:
            await agent.stop()
            await sim.stop()
        await wait_for(lambda: bool(sub.of("NDEATH")), 5, "NDEATH on stop")

    assert sub.bad == []
    msgs = sub.all()
    assert [m.topic.type.value for m in msgs[:2]] == ["NBIRTH", "DBIRTH"]
    nbirth, dbirth = msgs[0], msgs[1]
    assert str(nbirth.topic) == "spBv1.0/ent-1/NBIRTH/agent-1"
    assert str(dbirth.topic) == "spBv1.0/ent-1/DBIRTH/agent-1/kiln-1"
    assert nbirth.payload.seq == 0
    rebirth = nbirth.metric(REBIRTH)
    assert rebirth.datatype == DataType.BOOLEAN and rebirth.boolean_value is False
    bdseq = _bdseq(nbirth)
    # Every point of the profile is born with its alias, datatype and units.
    profile = load_profiles()[_PROFILE]
    aliases = {}
    for p in profile.points:
        m = dbirth.metric(p.name)
        assert m.datatype == datatype_for(p), p.name
        aliases[m.alias] = p.name
        if p.unit:
            assert m.properties.keys[0] == "engUnit"
            assert m.properties.values[0].string_value == p.unit
    assert len(aliases) == len(profile.points) and 0 not in aliases
    # DDATA by alias only, every alias born.
    for d in sub.of("DDATA"):
        assert all(not m.name and m.alias in aliases for m in d.payload.metrics)
    # seq: +1 per message, 0 again at each NBIRTH; the rebirth keeps the bdSeq.
    expected = 0
    for m in msgs:
        if m.topic.type.value == "NCMD":
            continue  # the host's request, not the node's
        if m.topic.type.value == "NDEATH":
            assert "seq" not in [f.name for f, _ in m.payload.ListFields()]
            continue
        if m.topic.type.value == "NBIRTH":
            expected = 0
            assert _bdseq(m) == bdseq
        assert m.payload.seq == expected, (m.topic, m.payload.seq, expected)
        expected = (expected + 1) % 256
    assert _bdseq(sub.of("NDEATH")[-1]) == bdseq


async def test_device_death_and_rebirth_follow_the_device(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    sim = await _sim("kiln-1")
    devices = [modbus_device("kiln-1", _PROFILE, sim.port, interval=0.1, poll_timeout=0.3)]
    agent = Agent(parse_config(_sp_config(tmp_path, mosquitto.port, devices)))
    with SpSubscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: len(sub.of("DDATA")) >= 3, 15, "DDATA")
            sim.devices[1].faults.set("silent")
            await wait_for(lambda: bool(sub.of("DDEATH", "kiln-1")), 10, "DDEATH")
            sim.devices[1].faults.clear()
            await wait_for(lambda: len(sub.of("DBIRTH", "kiln-1")) >= 2, 10, "DBIRTH again")
        finally:
            await agent.stop()
            await sim.stop()
    death = sub.of("DDEATH", "kiln-1")[0]
    assert death.metric(REASON_METRIC).string_value == "timeout"
    assert sub.bad == []


async def test_a_device_s_last_samples_go_out_before_its_ddeath(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A host must never see DDATA of a device after its DDEATH, even for samples still
    waiting for the spool's group commit when the device goes."""
    sim = await _sim("kiln-1")
    devices = [modbus_device("kiln-1", _PROFILE, sim.port, interval=0.2)]
    agent = Agent(parse_config(_sp_config(tmp_path, mosquitto.port, devices)))
    with SpSubscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: len(sub.of("DDATA")) >= 2, 15, "DDATA")
            await agent._stop_pollers(["kiln-1"])
            # A last sample staged and the device's death, in one step of the event loop:
            # the commit that spools the sample has not run when the death is published.
            last_ts = int(time.time() * 1000)
            body = agent.codec.encode_sample(last_ts, {"kiln_speed": 3.5}, {}, {})
            agent.spool.stage("kiln-1", last_ts, body)
            agent.publisher.set_state("kiln-1", DeviceState(online=False, ts=last_ts, reason="x"))
            await wait_for(lambda: bool(sub.of("DDEATH", "kiln-1")), 10, "DDEATH")
            await asyncio.sleep(0.5)
        finally:
            await agent.stop()
            await sim.stop()
    msgs = [m for m in sub.all() if m.topic.device == "kiln-1"]
    death = sub.of("DDEATH", "kiln-1")[0]
    after = msgs[msgs.index(death) + 1 :]
    assert [m.topic.type.value for m in after if m.topic.type.value == "DDATA"] == []
    before = msgs[: msgs.index(death)]
    assert any(
        m.payload.timestamp and any(x.timestamp == last_ts for x in m.payload.metrics)
        for m in before
        if m.topic.type.value == "DDATA"
    ), "the last sample is lost"
    assert sub.bad == []


async def test_a_long_backlog_goes_out_before_the_ddeath_too(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """More DDATA than the MQTT client sends at once (it holds QoS 1 messages back past
    its in-flight window, never a QoS 0 one): the DDEATH still comes after all of it."""
    sim = await _sim("kiln-1")
    devices = [modbus_device("kiln-1", _PROFILE, sim.port, interval=0.2)]
    cfg = _sp_config(tmp_path, mosquitto.port, devices)
    cfg["mqtt"]["max_inflight"] = 1
    cfg["spool"] = {"batch_samples": 1}  # a DDATA per sample
    agent = Agent(parse_config(cfg))
    with SpSubscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: len(sub.of("DDATA")) >= 2, 15, "DDATA")
            await agent._stop_pollers(["kiln-1"])
            first_ts = int(time.time() * 1000)
            for i in range(60):
                body = agent.codec.encode_sample(first_ts + i, {"kiln_speed": 3.5}, {}, {})
                agent.spool.stage("kiln-1", first_ts + i, body)
            agent.publisher.set_state(
                "kiln-1", DeviceState(online=False, ts=first_ts + 60, reason="x")
            )
            await wait_for(lambda: bool(sub.of("DDEATH", "kiln-1")), 10, "DDEATH")
            await wait_for(lambda: agent.spool.depth == 0, 10, "every sample acknowledged")
            await asyncio.sleep(0.3)
        finally:
            await agent.stop()
            await sim.stop()
    msgs = [m for m in sub.all() if m.topic.device == "kiln-1"]
    death = msgs.index(sub.of("DDEATH", "kiln-1")[0])
    late = [m for m in msgs[death + 1 :] if m.topic.type.value == "DDATA"]
    assert late == [], f"{len(late)} DDATA after the DDEATH"
    assert sub.bad == []


async def test_outage_replays_spooled_samples_as_historical_after_the_births(
    tmp_path: Path,
) -> None:
    sim = await _sim("kiln-1", seed=4)
    bdir = tmp_path / "broker"
    bdir.mkdir()
    broker = _QueueingMosquitto(bdir).start()
    devices = [modbus_device("kiln-1", _PROFILE, sim.port, interval=0.05)]
    agent = Agent(parse_config(_sp_config(tmp_path, broker.port, devices)))
    sub = SpSubscriber(broker.port, client_id="sp-outage", clean=False).start()
    try:
        await agent.start()
        await wait_for(lambda: len(sub.of("DDATA")) >= 5, 15, "first DDATA")
        broker.stop()
        await wait_for(lambda: agent.spool.depth >= 30, 10, "samples piling up in the spool")
        broker.start()
        await wait_for(lambda: agent.publisher.connected, 10, "agent reconnected")
        await wait_for(lambda: agent.spool.depth < 3, 15, "spool drained")
        for p in agent.pollers:
            p.stop()
        await asyncio.sleep(0.5)
        await wait_for(lambda: agent.spool.depth == 0, 10, "spool empty")
        spooled = agent.samples_spooled
        await wait_for(
            lambda: (
                len({m.timestamp for d in sub.of("DDATA") for m in d.payload.metrics}) >= spooled
            ),
            10,
            "every spooled sample at the subscriber",
        )
    finally:
        await agent.stop()
        sub.stop()
        broker.stop()
        await sim.stop()
    assert sub.bad == []
    msgs = sub.all()
    births = [i for i, m in enumerate(msgs) if m.topic.type.value == "NBIRTH"]
    assert len(births) == 2
    second = msgs[births[1]]
    assert msgs[births[1] + 1].topic.type.value == "DBIRTH"
    # One more per CONNECT sent (failed attempts during the outage count, as the spec says).
    assert 1 <= (_bdseq(second) - _bdseq(msgs[births[0]])) % 256 <= 30
    keys: list[tuple[int, int]] = []
    historical: list[int] = []  # of the second session
    born_at = 0
    for i, m in enumerate(msgs):
        if m.topic.type.value == "NBIRTH":
            born_at = m.payload.timestamp
        if m.topic.type.value != "DDATA":
            continue
        for metric in m.payload.metrics:
            keys.append((metric.alias, metric.timestamp))
            # Historical exactly when sampled before the session's NBIRTH (the first
            # session's first polls may be too, when they beat the first CONNACK).
            assert metric.is_historical == (metric.timestamp < born_at), (i, metric)
            if metric.is_historical and i > births[1]:
                historical.append(metric.timestamp)
    assert len(keys) == len(set(keys)), "a sample was sent twice"
    assert len({ts for _, ts in keys}) == spooled, "a spooled sample went missing"
    assert len(set(historical)) >= 20, "the outage's samples were not replayed as historical"
    assert historical == sorted(historical), "historical samples out of order"


def _spawn(cmd: list[str], log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


async def test_kill_9_makes_the_broker_publish_ndeath(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim = await _sim("kiln-1")
    devices = [modbus_device("kiln-1", _PROFILE, sim.port, interval=0.1)]
    cfg = _sp_config(tmp_path, mosquitto.port, devices)
    cfg["mqtt"]["keepalive"] = 5
    config = _write(tmp_path / "agent.yaml", cfg)
    iiot = str(Path(sys.executable).parent / "iiot")
    with (tmp_path / "agent.log").open("wb") as log, SpSubscriber(mosquitto.port) as sub:
        proc = _spawn([iiot, "agent", "run", "-c", str(config)], log)
        try:
            await wait_for(lambda: bool(sub.of("DDATA")), 30, "DDATA from the agent process")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            await wait_for(lambda: bool(sub.of("NDEATH")), 15, "the broker's NDEATH")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            await sim.stop()
    assert _bdseq(sub.of("NDEATH")[0]) == _bdseq(sub.of("NBIRTH")[0])
    assert sub.bad == []


def _host_state(port: int, online: bool, ts: int) -> None:
    body = json.dumps({"online": online, "timestamp": ts}).encode()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="scada-1")
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.publish("spBv1.0/STATE/scada-1", body, qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


async def test_births_wait_for_the_primary_host_and_follow_its_state(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    sim = await _sim("kiln-1")
    cfg = _sp_config(tmp_path, mosquitto.port, [modbus_device("kiln-1", _PROFILE, sim.port)])
    cfg["mqtt"]["sparkplug"] = {"primary_host": "scada-1"}
    agent = Agent(parse_config(cfg))
    t0 = int(time.time() * 1000)
    _host_state(mosquitto.port, False, t0)
    with SpSubscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: agent.spool.depth >= 3, 15, "samples spooled")
            assert agent.publisher.connected
            assert sub.all() == []  # nothing from the node before its host is online
            _host_state(mosquitto.port, True, t0 + 1)
            await wait_for(lambda: bool(sub.of("DDATA")), 10, "data once the host is online")
            first = sub.of("NBIRTH")[0]
            # What was polled while the host was away goes out as history.
            early = [m for d in sub.of("DDATA") for m in d.payload.metrics if m.is_historical]
            assert early
            _host_state(mosquitto.port, False, t0 + 2)
            await wait_for(lambda: bool(sub.of("NDEATH")), 10, "NDEATH when the host goes")
            gone = len(sub.all())
            await asyncio.sleep(1.0)
            assert not [m for m in sub.all()[gone:] if m.topic.type.value == "DDATA"]
            _host_state(mosquitto.port, False, t0 + 1)  # a stale STATE changes nothing
            _host_state(mosquitto.port, True, t0 + 3)
            await wait_for(lambda: len(sub.of("NBIRTH")) >= 2, 10, "births when it is back")
        finally:
            await agent.stop()
            await sim.stop()

    # The subscriber sees the host's STATE messages too; it reads only node topics.
    assert all(b.startswith("spBv1.0/STATE/scada-1:") for b in sub.bad)
    assert _bdseq(sub.of("NDEATH")[0]) == _bdseq(first)
    assert _bdseq(sub.of("NBIRTH")[1]) != _bdseq(first)
