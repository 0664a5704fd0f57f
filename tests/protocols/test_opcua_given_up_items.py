"""Monitored items a device gave up creating are deleted at the server, not left sampling.

A busy server answers CreateMonitoredItems after the device's ``connect_timeout``, and
creates the items all the same. Here the server (the OPC UA simulator) is made to answer
that service late; what it holds is read from its own subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from asyncua.server.monitored_item_service import MonitoredItemService

from protocols import errors
from protocols.opcua.config import OpcUaConnection
from protocols.opcua.driver import OpcUaDriver
from simulators.device import SimDevice
from simulators.opcua_server import OpcUaSimServer
from tests.opcua_profiles import press_profile
from tests.waiting import wait_for

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

PRESS = press_profile(
    [
        {"name": "force", "type": "float64", "range": [0, 500],
         "opcua": {"browse_path": "2:Press/2:Force"}},
        {"name": "strokes", "type": "uint32", "range": [0, 1000],
         "opcua": {"browse_path": "2:Press/2:Strokes"}},
    ]
)  # fmt: skip
GIVE_UP_S = 1.0  # the late device's connect_timeout
LATE_S = 2.5  # how late the server answers a slowed CreateMonitoredItems


@dataclass
class _SlowCreates:
    """Server side: the next ``pending`` CreateMonitoredItems calls are answered late."""

    pending: int = 0
    started_late: int = 0
    answered_late: int = 0


@pytest.fixture
def slow_creates(monkeypatch: pytest.MonkeyPatch) -> Iterator[_SlowCreates]:
    gate = _SlowCreates()
    original = MonitoredItemService.create_monitored_items

    async def create(self: Any, params: Any) -> Any:
        late = gate.pending > 0
        if late:
            gate.pending -= 1
            gate.started_late += 1
            # The service itself waits: the server's other requests on this connection
            # queue behind it, as on a server that is busy.
            await asyncio.sleep(LATE_S)
        results = await original(self, params)
        if late:
            gate.answered_late += 1
        return results

    monkeypatch.setattr(MonitoredItemService, "create_monitored_items", create)
    yield gate


def _conn(endpoint: str, connect_timeout: float) -> OpcUaConnection:
    # timeout (the watchdog's interval) above LATE_S: the session stays healthy.
    return OpcUaConnection(
        endpoint=endpoint,
        timeout=5.0,
        connect_timeout=connect_timeout,
        mode="subscribe",
        sampling_interval=0.1,
    )


def _held(driver: OpcUaDriver) -> list[int]:
    """The monitored item ids the driver holds (what it knows of at the server)."""
    return [i for _, _, ids in driver._items for i in ids]


def _at_server(sim: OpcUaSimServer) -> list[int]:
    return sorted(i for ids in sim.monitored_items().values() for i in ids)


async def _connect_retrying(driver: OpcUaDriver, attempts: int = 10) -> int:
    """Connect as the agent does after a failure: again, after a pause. Returns failures."""
    for n in range(attempts):
        try:
            await driver.connect()
            return n
        except errors.DeviceTimeout:
            await asyncio.sleep(0.2)
    raise AssertionError(f"{driver.name} did not connect in {attempts} attempts")


async def _values_arrive(driver: OpcUaDriver) -> None:
    async def both() -> bool:
        reading = await driver.read(PRESS.points)
        return set(reading.values) == {"force", "strokes"} and not reading.errors

    await wait_for(both, within=10.0, what=f"values of {driver.name}")
    before = driver.stats.notifications
    await wait_for(lambda: driver.stats.notifications > before, within=10.0, what="new values")


async def _give_up(driver: OpcUaDriver, how: str, gate: _SlowCreates) -> None:
    """Connect ``driver`` while the server is slow, and see it give up as ``how`` says."""
    if how == "connect_timeout":
        with pytest.raises(errors.DeviceTimeout, match=driver.name):
            await driver.connect()
        return
    # Stopped while waiting (the agent stopping the device's poller): cancelled.
    connecting = asyncio.create_task(driver.connect())
    await wait_for(lambda: gate.started_late == 1, within=5.0, what="the slow create")
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting


@pytest.mark.parametrize("how", ["connect_timeout", "stopped"])
async def test_items_answered_after_the_device_gave_up_are_deleted_at_the_server(
    how: str, slow_creates: _SlowCreates, caplog: pytest.LogCaptureFixture
) -> None:
    device = SimDevice(PRESS, device_id="press", seed=3)
    async with OpcUaSimServer(device, port=0, update_interval=0.1) as sim:
        first = OpcUaDriver(PRESS, _conn(sim.endpoint, 10.0), name="press-0")
        give_up_s = GIVE_UP_S if how == "connect_timeout" else 10.0
        late = OpcUaDriver(PRESS, _conn(sim.endpoint, give_up_s), name="press-1")
        caplog.set_level(logging.INFO, logger="protocols.opcua")
        try:
            await first.connect()  # keeps the shared session open throughout
            assert _at_server(sim) == sorted(_held(first))
            slow_creates.pending = 1
            await _give_up(late, how, slow_creates)
            assert slow_creates.answered_late == 0  # given up before the server answered
            await _connect_retrying(late)
            assert late.session is first.session and late.session is not None
            assert late.session.opened == 1  # the session was healthy all along
            # The server created the given-up items after all (before the retry's, as it
            # answers in order); once answered, they are deleted: it holds exactly the
            # items of the two devices.
            assert slow_creates.answered_late == 1
            want = sorted(_held(first) + _held(late))
            assert len(want) == 4
            await wait_for(lambda: _at_server(sim) == want, within=10.0, what="given-up deleted")
            session = late.session
            await wait_for(lambda: session.late_items_deleted == 2, within=5.0, what="counted")
            assert session.late_items_left == 0
            # Counted for the device too: its iiot_agent_driver_events_total.
            assert (late.stats.late_items_deleted, late.stats.late_items_left) == (2, 0)
            deleted = [r for r in caplog.records if "given-up monitored items" in r.getMessage()]
            assert len(deleted) == 1
            assert getattr(deleted[0], "items", None) == 2
            await _values_arrive(late)
            await _values_arrive(first)
            assert _at_server(sim) == want
        finally:
            await late.aclose()
            await first.aclose()


async def test_a_device_that_gives_up_part_way_leaves_no_items_at_the_server(
    slow_creates: _SlowCreates,
) -> None:
    """Items created in calls before the one given up on, and that one's, are all deleted."""
    device = SimDevice(PRESS, device_id="press", seed=3)
    async with OpcUaSimServer(device, port=0, update_interval=0.1) as sim:
        first = OpcUaDriver(PRESS, _conn(sim.endpoint, 10.0), name="press-0")
        late = OpcUaDriver(PRESS, _conn(sim.endpoint, GIVE_UP_S), name="press-1")
        try:
            await first.connect()
            session = first.session
            assert session is not None
            # As a server whose MaxMonitoredItemsPerCall is 1: one call per point.
            session.max_per_call = 1
            original = MonitoredItemService.create_monitored_items
            calls = 0

            async def second_late(self: Any, params: Any) -> Any:
                nonlocal calls
                calls += 1
                slow_creates.pending = 1 if calls == 2 else 0
                return await original(self, params)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(MonitoredItemService, "create_monitored_items", second_late)
                with pytest.raises(errors.DeviceTimeout, match="press-1"):
                    await late.connect()
                await wait_for(
                    lambda: slow_creates.answered_late == 1, within=10.0, what="late answer"
                )
            want = sorted(_held(first))
            await wait_for(lambda: _at_server(sim) == want, within=10.0, what="nothing left")
            # The server deletes before it answers: the count follows the answer.
            await wait_for(lambda: session.late_items_deleted == 1, within=5.0, what="counted")
            await _connect_retrying(late)
            await _values_arrive(late)
            assert _at_server(sim) == sorted(_held(first) + _held(late))
        finally:
            await late.aclose()
            await first.aclose()
