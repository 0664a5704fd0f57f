"""An agent whose event loop is behind still delivers what its devices answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import Mosquitto, free_port
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import Subscriber, agent_dict, modbus_device
from tests.waiting import wait_for

_PROFILE = "meter-20u16"
_LIVE = 12
_GONE = 4  # devices whose port nobody listens on
_HOG = 0.25  # seconds each turn of the loop is held up: longer than the poll timeout


def _profiles(folder: Path) -> Path:
    """A meter of 20 scaled registers in a row: one request a poll."""
    points = [
        {"name": f"r{i:02d}", "type": "uint16", "scale": 0.1, "range": [0, 6000],
         "modbus": {"table": "holding", "address": i}}
        for i in range(20)
    ]  # fmt: skip
    profile = {
        "id": _PROFILE, "name": "Meter, 20 registers", "name_zh": "电表", "family": "other",
        "category": "general_power", "protocol": "modbus", "points": points,
    }  # fmt: skip
    folder.mkdir()
    (folder / f"{_PROFILE}.yaml").write_text(yaml.safe_dump(profile))
    return folder


def _failed_polls(agent: Agent) -> dict[str, float]:
    """Polls that failed, by device, as /metrics counts them."""
    out: dict[str, float] = {}
    for metric in agent.metrics.polls.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["result"] != "ok":
                device = sample.labels["device"]
                out[device] = out.get(device, 0) + sample.value
    return out


async def _hog(stop: asyncio.Event) -> None:
    """Hold the loop up on every turn, as thousands of devices on a starved CPU do."""
    while not stop.is_set():
        time.sleep(_HOG)  # noqa: ASYNC251 -- blocking the loop is the point
        await asyncio.sleep(0)


async def test_a_loop_far_behind_still_delivers_every_answering_device_without_calling_it_dead(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    folder = _profiles(tmp_path / "profiles")
    profile = load_profiles([folder])[_PROFILE]
    sims = [
        ModbusSimServer({1: SimDevice(profile, device_id=f"kiln-{i}", seed=i)}, port=0)
        for i in range(_LIVE)
    ]
    for sim in sims:
        await sim.start()
    live = [f"kiln-{i}" for i in range(_LIVE)]
    gone = [f"gone-{i}" for i in range(_GONE)]
    # A poll may take 0.2 s and a probe of a dead device 0.1 s: each turn of the loop
    # takes longer than either, so every answer is read after its deadline has passed.
    devices = [
        modbus_device(d, _PROFILE, sim.port, interval=0.2)
        for d, sim in zip(live, sims, strict=True)
    ] + [modbus_device(d, _PROFILE, free_port(), interval=0.2) for d in gone]
    cfg = agent_dict(tmp_path, mosquitto.port, devices, profiles=[str(folder)])
    agent = Agent(parse_config(cfg))
    stop = asyncio.Event()
    hog = asyncio.create_task(_hog(stop))
    with Subscriber(mosquitto.port) as sub:
        started = time.monotonic()
        try:
            await agent.start()
            await wait_for(lambda: any(sub.samples(d) for d in live), 10, "first data")
            first = time.monotonic() - started
            await wait_for(
                lambda: all(len(sub.samples(d)) >= 3 for d in live), 30, "data of every device"
            )
            failed = _failed_polls(agent)
            probing = [p.device.id for p in agent.pollers if p.probing]
            online = {p.device.id: p.health.online for p in agent.pollers}
        finally:
            stop.set()
            await hog
            await agent.stop()
            for sim in sims:
                await sim.stop()
    assert first < 5.0, f"first data after {first:.1f} s"
    # The agent being behind is not the devices' fault: none of them failed a poll, none
    # is probed as dead, all are online; the ports nobody listens on are offline.
    assert {d: failed.get(d, 0) for d in live} == dict.fromkeys(live, 0)
    assert probing == []
    assert all(online[d] is True for d in live)
    assert all(online[d] is False for d in gone)
    assert all(failed[d] > 0 for d in gone)
