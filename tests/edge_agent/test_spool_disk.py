"""The spool's files on disk through a broker outage and the drain after it."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
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

    def watched(cond: Callable[[], bool]) -> Callable[[], bool]:
        """``cond``, noting the most the files took each time it is asked."""

        def check() -> bool:
            nonlocal peak
            peak = max(peak, on_disk())
            return cond()

        return check

    await agent.start()
    try:
        # Fill past the cap: the oldest samples must be dropped to stay within it; then keep
        # writing at the cap until half a spool's worth more has been dropped.
        spool = agent.spool
        await wait_for(watched(lambda: spool.dropped > 0), 60, "the outage to fill the spool")
        first = spool.dropped
        await wait_for(
            watched(lambda: spool.dropped - first >= spool.depth // 2), 60, "writing at the cap"
        )
        full = spool.depth
        broker.start()
        await wait_for(lambda: spool.depth < full // 50, 60, "the drain")
        # Polling goes on, so the WAL keeps cycling, and the space comes back a little per
        # commit: the least seen is what the spool holds on to. What stays is the working set
        # of live polling (a few hundred KiB), not the backlog.
        after = peak

        def given_back() -> bool:
            nonlocal after
            after = min(after, on_disk())
            return after <= peak * 0.2

        await wait_for(given_back, 30, f"the files to shrink to a fifth of {peak} bytes")
        # The gauge is set as samples are spooled; a checkpoint may have cut the WAL since
        # the last one. By the next poll it shows the files again.
        gauge, now = 0.0, 0

        def gauge_follows() -> bool:
            nonlocal gauge, now
            gauge, now = float(agent.metrics.spool_disk_bytes._value.get()), on_disk()
            return abs(gauge - now) <= 512 * 1024

        await wait_for(gauge_follows, 10, "the gauge to show the files on disk")
    finally:
        await agent.stop()
        broker.stop()
    assert peak <= _CAP * 1.10, f"{peak} bytes on disk for max_bytes {_CAP}"
    assert peak >= _CAP * 0.8, "the outage did not fill the spool's files"
    assert abs(gauge - now) <= 512 * 1024, "the gauge shows the files on disk"
