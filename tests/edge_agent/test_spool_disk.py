"""The spool's files on disk through a broker outage and the drain after it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_profiles.loader import load_profiles
from device_profiles.schema import Point, Profile
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import Mosquitto, free_port
from protocols.driver import DriverBase, Reading, Value, now_ms
from tests.edge_agent.helpers import agent_dict
from tests.waiting import wait_for

_CAP = 4 * 1024 * 1024


class _KilnDriver(DriverBase):
    """Answers every point with a fresh plausible value, as a busy device would."""

    def __init__(self, profile: Profile, conn: Any, *, name: str) -> None:
        self._rng = random.Random(name)

    async def connect(self) -> None:
        return None

    async def read(self, points: Sequence[Point]) -> Reading:
        values: dict[str, Value] = {}
        for p in points:
            lo, hi = p.range if p.range is not None else (0.0, 1000.0)
            values[p.name] = round(self._rng.uniform(float(lo), float(hi)), 3)
        return Reading(now_ms(), values)

    async def write(self, point: Point, value: Value) -> None:
        raise AssertionError("not written")

    async def aclose(self) -> None:
        return None


def _devices(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"kiln-{i}",
            "profile": "kiln-rotary-cement",
            "poll_interval": 0.05,
            "modbus": {"host": "127.0.0.1", "port": 1502},
        }
        for i in range(n)
    ]


async def test_outage_fill_and_drain_keep_the_files_within_max_bytes(tmp_path: Path) -> None:
    assert load_profiles()["kiln-rotary-cement"].points
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir, port=free_port())  # not started: the outage
    cfg = agent_dict(tmp_path, broker.port, _devices(40), spool={"max_bytes": _CAP})
    agent = Agent(parse_config(cfg), driver_factory=_KilnDriver)
    files = [agent.spool.path, Path(f"{agent.spool.path}-wal"), Path(f"{agent.spool.path}-shm")]

    def on_disk() -> int:
        return sum(f.stat().st_size for f in files if f.exists())

    peak = 0
    await agent.start()
    try:
        # Fill well past the cap: the oldest samples must be dropped to stay within it.
        for _ in range(200):
            await asyncio.sleep(0.05)
            peak = max(peak, on_disk())
            if agent.spool.dropped > agent.spool.depth:
                break
        assert agent.spool.dropped > 0, "the outage did not fill the spool"
        for _ in range(40):  # and keep writing at the cap for a while
            await asyncio.sleep(0.05)
            peak = max(peak, on_disk())
        full = agent.spool.depth
        broker.start()
        await wait_for(lambda: agent.spool.depth < full // 50, 60, "the drain")
        # Polling goes on, so the WAL keeps cycling: the least seen over a few seconds of
        # checkpoints is what the spool holds on to.
        after = peak
        for _ in range(60):
            await asyncio.sleep(0.05)
            after = min(after, on_disk())
        gauge = agent.metrics.spool_disk_bytes._value.get()
        now = on_disk()
    finally:
        await agent.stop()
        broker.stop()
    assert peak <= _CAP * 1.10, f"{peak} bytes on disk for max_bytes {_CAP}"
    assert peak >= _CAP * 0.8, "the outage did not fill the spool's files"
    # What stays is the working set of live polling (a few hundred KiB), not the backlog.
    assert after <= peak * 0.2, f"{after} of {peak} bytes left on disk after the drain"
    assert abs(gauge - now) <= 512 * 1024, "the gauge shows the files on disk"
