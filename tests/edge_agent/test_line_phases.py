"""Units behind one line (a serial bus, a TCP-to-RTU gateway) are polled in turn over the
interval, as a bus master polls them, not all at its start: they wait for one another."""

from __future__ import annotations

from pathlib import Path

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import Mosquitto
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import Subscriber, agent_dict, modbus_device
from tests.edge_agent.test_overload import _PROFILE, _failed_polls, _profiles
from tests.waiting import wait_for

_UNITS = 6
_ANSWER_S = 0.12  # each unit answers this late: the line is busy that long a poll
_POLL_TIMEOUT = 0.3  # less than the queue of six units at once (0.72 s)


async def test_units_on_one_line_take_turns_and_none_times_out_in_the_queue(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    folder = _profiles(tmp_path / "profiles")
    profile = load_profiles([folder])[_PROFILE]
    units = {u: SimDevice(profile, device_id=f"u{u}", seed=u) for u in range(1, _UNITS + 1)}
    for unit in units.values():
        unit.faults.set("slow", delay=_ANSWER_S)
    sim = ModbusSimServer(units, port=0)
    await sim.start()
    devices = [
        modbus_device(f"u{u}", _PROFILE, sim.port, unit=u, interval=1.0, poll_timeout=_POLL_TIMEOUT)
        for u in units
    ]
    agent = Agent(
        parse_config(agent_dict(tmp_path, mosquitto.port, devices, profiles=[str(folder)]))
    )
    names = [f"u{u}" for u in units]
    with Subscriber(mosquitto.port) as sub:
        try:
            await agent.start()
            await wait_for(
                lambda: all(len(sub.samples(d)) >= 4 for d in names), 20, "four polls of each unit"
            )
            failed = _failed_polls(agent)
        finally:
            await agent.stop()
            await sim.stop()
    # Every unit got the line in its own turn: no poll spent its bound queueing.
    assert {d: failed.get(d, 0) for d in names} == dict.fromkeys(names, 0)
