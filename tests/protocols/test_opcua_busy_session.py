"""A busy shared session: a server that answers late is kept and joined, a silent one is not."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import pytest

from protocols import errors
from protocols.opcua import fastread
from protocols.opcua.client import LiveClient
from protocols.opcua.config import OpcUaConnection
from protocols.opcua.driver import OpcUaDriver
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.opcua_server import OpcUaSimServer
from tests.opcua_profiles import press_profile
from tests.waiting import wait_for

PRESS = press_profile(
    [
        {"name": "temp", "type": "int16", "range": [-20, 120],
         "opcua": {"node_id": "ns=2;i=1001"}},
    ]
)  # fmt: skip
SERVICE_S = 0.1  # the slow server answers each request this late, one after another
TIMEOUT_S = 1.0  # the driver's timeout, and so the watchdog's interval


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[tuple[SimDevice, OpcUaSimServer]]:
    device = SimDevice(PRESS, device_id="dev-1", seed=7, clock=lambda: 100.0)
    sim = OpcUaSimServer(device, port=0, update_interval=0.05)
    await sim.start()
    try:
        yield device, sim
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def _connected(sim: OpcUaSimServer, request_s: float) -> AsyncIterator[OpcUaDriver]:
    """The press's driver on ``sim``, connected; closed after (bounded: the server may
    have been made silent)."""
    driver = OpcUaDriver(
        PRESS, OpcUaConnection(endpoint=sim.endpoint, timeout=request_s), name="press-1"
    )
    await driver.connect()
    try:
        yield driver
    finally:
        await asyncio.wait_for(driver.aclose(), 5.0)


async def _abandoned_read(driver: OpcUaDriver) -> None:
    """A read the caller gives up on at once, as a poller past its deadline does."""
    with contextlib.suppress(TimeoutError, errors.DeviceTimeout, errors.ConnectError):
        await asyncio.wait_for(driver.read(PRESS.points), 0.01)


async def test_busy_server_that_answers_keeps_its_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests queued longer than the watchdog's interval: answered, so not lost."""
    async with _serving() as (device, sim):
        caplog.set_level(logging.WARNING)
        async with _connected(sim, TIMEOUT_S) as driver:
            session = driver.session
            assert session is not None and isinstance(session.client, LiveClient)
            client = session.client
            device.faults.set(FaultMode.SLOW, delay=SERVICE_S)
            probes0 = client.probes
            # Abandoned reads keep about 1.5 s of work queued at the server for 3.5 s:
            # asyncua's own probe would wait behind them past its 1 s bound.
            for _ in range(15):
                await _abandoned_read(driver)
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                await _abandoned_read(driver)
                await asyncio.sleep(SERVICE_S)
                assert driver.connected, session.reason()
            device.faults.clear()
            reading = await asyncio.wait_for(driver.read(PRESS.points), 5.0)
            assert reading.errors == {}
            assert set(reading.values) == {"temp"}
            assert session.opened == 1
            assert driver.stats.sessions_lost == 0
            assert client.probes == probes0  # answers came all along: no probe needed
            # Late answers to given-up reads are taken quietly, not a warning each.
            late = [r for r in caplog.records if "already done" in r.getMessage()]
            assert late == []


async def test_silent_server_loses_its_session_within_two_intervals() -> None:
    async with _serving() as (device, sim):
        async with _connected(sim, 0.5) as driver:
            await driver.read(PRESS.points)
            device.faults.set(FaultMode.SILENT)
            t0 = time.monotonic()
            # No request of the device's own: the watchdog alone finds the server gone.
            await wait_for(lambda: not driver.connected, within=5.0, what="session lost")
            assert time.monotonic() - t0 < 3.0  # two intervals and the probe's bound, with room
            with pytest.raises(errors.ConnectError, match="press-1"):
                await driver.read(PRESS.points)
            session = driver.session
            assert session is not None and isinstance(session.client, LiveClient)
            assert session.client.probes >= 1


async def test_a_poll_after_one_given_up_takes_its_late_answer_not_a_new_request() -> None:
    """The server holds at most one Read of a device: the next poll waits for it."""
    async with _serving() as (device, sim):
        async with _connected(sim, TIMEOUT_S) as driver:
            await driver.read(PRESS.points)
            device.faults.set(FaultMode.SLOW, delay=0.3)
            before = sim.requests
            for _ in range(3):  # each given up long before the server answers
                await _abandoned_read(driver)
            reading = await asyncio.wait_for(driver.read(PRESS.points), 5.0)
            assert reading.errors == {}
            assert set(reading.values) == {"temp"}
            await wait_for(lambda: sim.requests > before, within=2.0, what="request served")
            await asyncio.sleep(0.4)  # a second request, had one been sent, is served by now
            assert sim.requests - before == 1
            # Answered: the next poll sends a request of its own again.
            device.faults.clear()
            await driver.read(PRESS.points)
            assert sim.requests - before == 2


async def test_device_joins_a_session_whose_server_answers_later_than_timeout() -> None:
    """Subscribing is bounded by connect_timeout, not by the timeout of one request."""
    async with _serving() as (device, sim):
        # The session (and its watchdog) is the first device's, with a 2 s timeout; the
        # second device's requests have 0.5 s each, less than the server now takes.
        opener = OpcUaConnection(endpoint=sim.endpoint, timeout=2.0, mode="subscribe")
        first = OpcUaDriver(PRESS, opener, name="press-1")
        await first.connect()
        joiner = opener.model_copy(update={"timeout": 0.5, "connect_timeout": 10.0})
        second = OpcUaDriver(PRESS, joiner, name="press-2")
        try:
            device.faults.set(FaultMode.SLOW, delay=0.8)
            await asyncio.wait_for(second.connect(), 15.0)
            assert second.connected
            assert second.session is first.session
            device.faults.clear()

            async def has_value() -> bool:
                return "temp" in (await second.read(PRESS.points)).values

            await wait_for(has_value, within=10.0, what="a value for the joined device")
        finally:
            await second.aclose()
            await first.aclose()


async def test_a_late_answer_that_came_between_polls_is_the_next_polls_at_its_time() -> None:
    """A poll bounded shorter than the server's delay (a probe) still sees values."""
    async with _serving() as (device, sim):
        async with _connected(sim, 2.0) as driver:
            device.faults.set(FaultMode.SLOW, delay=0.3)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(driver.read(PRESS.points), 0.1)
            await asyncio.sleep(1.0)  # the answer comes meanwhile (after 0.3 s), to nobody
            before = sim.requests
            t_answered = time.time() * 1000
            reading = await asyncio.wait_for(driver.read(PRESS.points), 0.1)
            assert set(reading.values) == {"temp"}
            # Stamped when the answer came (about 0.8 s before this read), not now.
            assert t_answered - 1200 <= reading.ts < t_answered
            assert sim.requests == before  # no request of its own
            # Taken: the next poll asks the server again.
            device.faults.clear()
            await driver.read(PRESS.points)
            assert sim.requests == before + 1


async def test_a_late_answer_seconds_old_still_shows_a_probe_the_device_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the poll timeout (a probe on a backoff) the answer is used; past the window
    it is not, and the server is asked again."""
    async with _serving() as (device, sim):
        async with _connected(sim, 0.5) as driver:
            device.faults.set(FaultMode.SLOW, delay=0.3)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(driver.read(PRESS.points), 0.1)
            await asyncio.sleep(1.5)  # longer than the timeout (0.5 s) since it came
            before = sim.requests
            reading = await asyncio.wait_for(driver.read(PRESS.points), 0.1)
            assert set(reading.values) == {"temp"} and sim.requests == before
            # The same, with the window shorter than the answer's age: asked again.
            monkeypatch.setattr(fastread, "LATE_USE_S", 0.5)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(driver.read(PRESS.points), 0.1)
            await asyncio.sleep(1.5)
            before = sim.requests
            device.faults.clear()
            await driver.read(PRESS.points)
            assert sim.requests == before + 1
