"""Device faults and broker outages, against real simulators and a real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import Mosquitto
from protocols.driver import now_ms
from protocols.mqtt.contract import DeviceState
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import PersistentMosquitto, Subscriber, agent_dict, modbus_device
from tests.waiting import wait_for

_WINDOW = 1.5  # seconds of polling counted, with kiln-0 answering and silent


def _states(sub: Subscriber, device: str) -> list[DeviceState]:
    return [m.decoded for m in sub.on(f"/{device}/state") if isinstance(m.decoded, DeviceState)]


async def test_silent_device_goes_offline_and_others_keep_their_rate(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    profiles = load_profiles()
    sims = []
    devices = []
    for i in range(3):
        dev = SimDevice(profiles["kiln-rotary-cement"], device_id=f"kiln-{i}", seed=i)
        sim = ModbusSimServer({1: dev}, port=0)
        await sim.start()
        sims.append(sim)
        # Silent, kiln-0 is polled on every tick (never counted dead and only probed), so
        # each of its polls waits out the whole timeout.
        devices.append(
            modbus_device(
                f"kiln-{i}", "kiln-rotary-cement", sim.port, interval=0.1, poll_timeout=0.3,
                dead_after=10_000,
            )
        )  # fmt: skip
    loaded = parse_config(agent_dict(tmp_path, mosquitto.port, devices))
    agent = Agent(loaded)

    def polled(i: int, window: tuple[int, int]) -> int:
        """Samples of kiln-``i`` polled within ``window`` (ms), wherever they arrived."""
        return sum(1 for _, s in sub.samples(f"kiln-{i}") if window[0] <= s.ts < window[1])

    async def window() -> tuple[int, int]:
        start = now_ms()
        await asyncio.sleep(_WINDOW)
        return start, now_ms()

    with Subscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: all(len(sub.samples(f"kiln-{i}")) >= 3 for i in range(3)))
            # The others' polls while all answer: what this machine manages right now.
            usual = await window()
            sims[0].devices[1].faults.set("silent")
            t0 = time.monotonic()
            await wait_for(
                lambda: any(not s.online for s in _states(sub, "kiln-0")), 5, "kiln-0 offline"
            )
            went_offline = time.monotonic() - t0
            # As long a window in which kiln-0 is silent.
            silent = await window()
            sims[0].devices[1].faults.clear()
            await wait_for(lambda: _states(sub, "kiln-0")[-1].online, 5, "kiln-0 online again")
            await wait_for(
                lambda: all(polled(i, (silent[1], now_ms())) for i in (1, 2)),
                10,
                "the samples of the silent window to arrive",
            )
        finally:
            await agent.stop()
            for sim in sims:
                await sim.stop()

    offline = [s for s in _states(sub, "kiln-0") if not s.online]
    assert offline[0].reason == "timeout"
    assert went_offline < 3.0
    for i in (1, 2):
        before, during = polled(i, usual), polled(i, silent)
        # Every 0.1 s: ~15 polls. Had kiln-0's 0.3 s timeout held them up, a third of that.
        assert before >= 5, f"kiln-{i}: {before} samples in {_WINDOW} s with all answering"
        assert during >= 0.7 * before, (
            f"kiln-{i}: {during} samples while kiln-0 was silent, {before} before"
        )
        assert all(s.online for s in _states(sub, f"kiln-{i}"))
    assert sub.bad == []


@pytest.mark.parametrize("batch", [False, True], ids=["per-device", "batch"])
async def test_broker_outage_loses_and_duplicates_nothing(tmp_path: Path, batch: bool) -> None:
    profiles = load_profiles()
    dev = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=3)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = PersistentMosquitto(broker_dir).start()
    devices = [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.05)]
    cfg = agent_dict(tmp_path, broker.port, devices)
    cfg["mqtt"]["batch"] = batch
    agent = Agent(parse_config(cfg))
    sub = Subscriber(broker.port, client_id="outage-sub", clean=False).start()
    try:
        await agent.start()
        await wait_for(lambda: len(sub.samples("kiln-1")) >= 10, what="first samples")
        broker.stop()
        spooled_before = agent.samples_spooled
        # Polled since the broker went: samples not yet sent when it went are there too.
        await wait_for(
            lambda: agent.samples_spooled - spooled_before >= 30 and agent.spool.depth >= 30,
            10,
            "30 samples polled during the outage piling up in the spool",
        )
        broker.start()
        await wait_for(lambda: agent.publisher.connected, 10, "agent reconnected")
        await wait_for(lambda: agent.spool.depth < 3, 10, "spool drained")
        await asyncio.sleep(0.3)
        for p in agent.pollers:
            p.stop()
        await asyncio.sleep(0.3)
        last_seq = agent.spool.last_seq("kiln-1")
        await wait_for(
            lambda: bool(sub.samples("kiln-1")) and sub.samples("kiln-1")[-1][0] == last_seq,
            10,
            "every sample at the subscriber",
        )
    finally:
        await agent.stop()
        sub.stop()
        broker.stop()
        await sim.stop()
    seqs = [s for s, _ in sub.samples("kiln-1")]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "gap or duplicate after the outage"
    assert any(len(m.samples) > 1 for m in sub.data("kiln-1")), "backlog was not packed"
    assert sub.bad == []
    # The shape asked for, and only it.
    assert bool(sub.on("/batch")) is batch
    assert bool(sub.on("/kiln-1/data")) is not batch


async def test_device_exceptions_become_point_errors_and_are_counted(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    profiles = load_profiles()
    dev = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=3)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    devices = [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.1)]
    agent = Agent(parse_config(agent_dict(tmp_path, mosquitto.port, devices)))
    with Subscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: len(sub.samples("kiln-1")) >= 2, what="samples")
            dev.faults.set("exception", code=4)
            await wait_for(
                lambda: any(s.errors for _, s in sub.samples("kiln-1")), 5, "point errors"
            )
            dev.faults.clear()
            n = len(sub.samples("kiln-1"))
            await wait_for(lambda: len(sub.samples("kiln-1")) >= n + 3, 5, "more samples")
        finally:
            await agent.stop()
            await sim.stop()
    bad = next(s for _, s in sub.samples("kiln-1") if s.errors)
    assert set(bad.errors) == {p.name for p in dev.profile.points}
    assert all("4" in reason for reason in bad.errors.values()), bad.errors
    assert not sub.samples("kiln-1")[-1][1].errors
    errors = sum(
        s.value
        for m in agent.metrics.errors.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["device"] == "kiln-1"
    )
    assert errors > 0
