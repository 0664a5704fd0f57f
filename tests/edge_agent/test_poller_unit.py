"""Poller and backoff behaviour with a fake driver injected through the factory."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from device_profiles.loader import load_profiles
from device_profiles.schema import Point, Profile
from edge_agent.config import DeviceConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.poller import DevicePoller
from iiot_common.backoff import Backoff
from protocols.driver import Reading, Value, now_ms
from protocols.errors import ConnectError
from tests.waiting import wait_for


class FakeDriver:
    """Answers from a script: values, a delay, or an error."""

    def __init__(self, script: dict[str, Any]) -> None:
        self.script = script
        self.connects = 0
        self.closed = False

    async def connect(self) -> None:
        self.connects += 1
        if self.script.get("refuse"):
            raise ConnectError("cannot connect to 10.0.0.9:502")

    async def read(self, points: Sequence[Point]) -> Reading:
        await asyncio.sleep(self.script.get("delay", 0))
        values: dict[str, Value] = {p.name: self.script.get("value", 1.0) for p in points}
        return Reading(now_ms(), values)

    async def write(self, point: Point, value: Value) -> None:
        raise AssertionError("the poller never writes to a device")

    async def aclose(self) -> None:
        self.closed = True

    async def __aenter__(self) -> FakeDriver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _kiln() -> Profile:
    return load_profiles()["kiln-rotary-cement"]


def _poller(
    script: dict[str, Any], **dev: Any
) -> tuple[DevicePoller, list[Reading], list[tuple[bool, str]], list[FakeDriver]]:
    samples: list[Reading] = []
    states: list[tuple[bool, str]] = []
    drivers: list[FakeDriver] = []

    def factory(profile: Profile, conn: Any, *, name: str) -> FakeDriver:
        d = FakeDriver(script)
        drivers.append(d)
        return d

    cfg = DeviceConfig.model_validate(
        {"id": "kiln-1", "profile": "kiln-rotary-cement", "modbus": {"host": "127.0.0.1"}, **dev}
    )
    poller = DevicePoller(
        cfg,
        _kiln(),
        driver_factory=factory,
        on_sample=lambda d, r: samples.append(r),
        on_state=lambda d, on, why: states.append((on, why)),
        metrics=AgentMetrics(),
        backoff=Backoff(0.05, 0.1),
    )
    return poller, samples, states, drivers


async def test_report_on_change_sends_changes_and_heartbeats() -> None:
    script: dict[str, Any] = {"value": 100.0}
    poller, samples, _, _ = _poller(
        script,
        poll_interval=0.02,
        report_on_change=True,
        heartbeat_polls=5,
        points=["burning_zone_temp", "coal_flow"],
    )
    task = asyncio.create_task(poller.run())
    await wait_for(lambda: poller.health.good >= 12)
    script["value"] = 100.01  # inside coal_flow's deadband (0.05) and burning_zone's (2)
    await wait_for(lambda: poller.health.good >= 14)
    script["value"] = 150.0
    await wait_for(lambda: poller.health.good >= 16)
    poller.stop()
    await task
    full = [s for s in samples if len(s.values) == 2 and s.values["coal_flow"] != 150.0]
    # First sample plus one heartbeat every 5 polls, not one sample per poll.
    assert 3 <= len(full) <= 5, [s.values for s in samples]
    assert any(s.values.get("burning_zone_temp") == 150.0 for s in samples)
    assert len(samples) < poller.health.good


async def test_overrunning_polls_skip_ticks_instead_of_bursting() -> None:
    poller, samples, _, _ = _poller({"delay": 0.25}, poll_interval=0.1, poll_timeout=1.0)
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(1.0)
    poller.stop()
    await task
    assert poller.health.skipped >= 4
    assert len(samples) <= 5


async def test_refused_connection_goes_offline_then_backs_off() -> None:
    script: dict[str, Any] = {"refuse": True}
    poller, samples, states, drivers = _poller(script, poll_interval=0.01)
    task = asyncio.create_task(poller.run())
    await wait_for(lambda: len(drivers) >= 3)
    assert states[0] == (False, "connect_failed")
    script["refuse"] = False
    await wait_for(lambda: bool(samples))
    poller.stop()
    await task
    assert states[-1] == (True, "")
    # Backoff: far fewer attempts than the 10 ms schedule would make.
    assert len(drivers) < 20
    assert all(d.closed for d in drivers)


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(0.5, 8.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(12)]
    assert delays[0] <= 0.5
    assert max(delays) <= 8.0 and max(delays) >= 4.0
    assert len(set(delays)) == len(delays)
    assert b.next_delay(auth_failed=True) == 8.0
    b.succeeded()
    assert b.next_delay() <= 0.5
