"""Scraping the agent's /metrics while it polls many simulated devices."""

from __future__ import annotations

import asyncio
import gc
import itertools
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import free_port
from tests.edge_agent.helpers import agent_dict, modbus_device
from tests.simulators.test_plant import free_base
from tests.waiting import wait_for

_DEVICES = 300
_IIOT = str(Path(sys.executable).with_name("iiot"))
_INTERVAL = 2.0
# 150 polls a second of one request each (input registers 0..6): the agent and the
# simulator keep up with that on a busy machine too, so what the slots compare is the
# scrapes' effect, not a machine falling behind.
_POINTS = ["burning_zone_temp", "transition_zone_temp", "inlet_temp"]
_PAIRS = 8  # pairs of a slot with scraping and as long a quiet one
_SCRAPES = 3  # scrapes in a slot, 0.2 s apart
_LATE = _INTERVAL / 4  # a poll that starts later than this is one a user would see as late


@dataclass
class _Tally:
    """Poll ticks over a stretch of time, and those upset: failed, skipped or started late."""

    ticks: int = 0
    upset: int = 0

    def add(self, other: _Tally) -> None:
        self.ticks += other.ticks
        self.upset += other.upset

    @property
    def share(self) -> float:
        return self.upset / max(self.ticks, 1)


@dataclass(frozen=True)
class _Snapshot:
    counted: float  # polls done, by the agent's counter
    good: int
    skipped: int
    lags: int  # poll start lags the agent has kept (one deque for all its pollers)


def _snapshot(agent: Agent) -> _Snapshot:
    counted = sum(
        s.value
        for family in agent.metrics.polls.collect()
        for s in family.samples
        if s.name.endswith("_total")
    )
    good = sum(p.health.good for p in agent.pollers)
    skipped = sum(p.health.skipped for p in agent.pollers)
    assert len(agent.lags) != agent.lags.maxlen, "the agent's lags deque is full: none to count"
    return _Snapshot(counted, good, skipped, len(agent.lags))


def _tally(agent: Agent, before: _Snapshot, after: _Snapshot) -> _Tally:
    """What happened to the polls between two snapshots."""
    late = sum(1 for lag in itertools.islice(agent.lags, before.lags, after.lags) if lag > _LATE)
    done = int(after.counted - before.counted)
    skipped = after.skipped - before.skipped
    return _Tally(ticks=done + skipped, upset=done - (after.good - before.good) + skipped + late)


async def _settle(agent: Agent) -> None:
    """Wait for an interval in which no poll is upset (the rush of connects over), up to 10 s.

    Under a load that never lets up the slots compare as they are.
    """
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        before = _snapshot(agent)
        await asyncio.sleep(_INTERVAL)
        if _tally(agent, before, _snapshot(agent)).upset == 0:
            return


# A scraper in its own process, as Prometheus is: a thread of the test would take the GIL
# from the agent's loop for every response it parses. Each line read is a number of scrapes
# to make, 0.2 s apart (an impatient Prometheus); it answers with their sizes.
_SCRAPER = """
import sys, time, httpx
with httpx.Client(timeout=10) as http:
    for line in sys.stdin:
        sizes = []
        for _ in range(int(line)):
            sizes.append(len(http.get(sys.argv[1]).content))
            time.sleep(0.2)
        print(*sizes, flush=True)
"""


def _scrape(scraper: subprocess.Popen[str], times: int) -> list[int]:
    """Have ``scraper`` scrape ``times`` times; the sizes of the answers."""
    assert scraper.stdin is not None and scraper.stdout is not None
    scraper.stdin.write(f"{times}\n")
    scraper.stdin.flush()
    return [int(n) for n in scraper.stdout.readline().split()]


async def test_scraping_metrics_does_not_disturb_polling(tmp_path: Path) -> None:
    # Below the ephemeral range, where other programs' connections do not take them meanwhile.
    base = free_base(_DEVICES)
    ports = list(range(base, base + _DEVICES))
    plant = {
        "seed": 1,
        "enterprises": [
            {
                "id": "sim", "name": "Simulated site", "region": "130000", "industry": "C",
                "devices": [
                    {"id": f"kiln-{i}", "profile": "kiln-rotary-cement", "port": p}
                    for i, p in enumerate(ports)
                ],
            }
        ],
    }  # fmt: skip
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(plant))
    ready = tmp_path / "endpoints.json"
    sim = await asyncio.to_thread(
        subprocess.Popen,
        [_IIOT, "sim", "plant", "-c", str(tmp_path / "plant.yaml"), "--endpoints-out", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    devices = [
        modbus_device(f"kiln-{i}", "kiln-rotary-cement", p, interval=_INTERVAL, points=_POINTS)
        for i, p in enumerate(ports)
    ]
    cfg = agent_dict(
        tmp_path, free_port(), devices, metrics={"host": "127.0.0.1", "port": 0}
    )  # no broker: the samples stay in the spool, polling is what is measured
    agent = Agent(parse_config(cfg))
    sizes: list[int] = []
    scraper: subprocess.Popen[str] | None = None
    # Pairs of a slot with scraping and as long a quiet one, short, so that a burst of
    # whatever else loads this machine falls on a few pairs, scraped or not.
    pairs: list[tuple[_Tally, _Tally]] = []
    scraping = 0.0  # seconds
    try:
        await wait_for(lambda: ready.exists() or sim.poll() is not None, 60, "the simulator")
        assert sim.poll() is None, "the simulator exited (one of its ports taken meanwhile?)"
        await agent.start()
        # Answered once: under a load spike some may be offline again at any one moment.
        await wait_for(lambda: all(p.health.good for p in agent.pollers), 30, "every device")
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        scraper = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-c", _SCRAPER, url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        await _settle(agent)
        # A full collection of the test process's heap takes most of a second on a loaded
        # machine and would upset whichever slot it falls in: none while the slots run.
        gc.disable()
        slot = 0.0
        for k in range(_PAIRS):
            scraped, quiet = _Tally(), _Tally()
            # Which slot goes first alternates, so a trend in the load favours neither.
            for scrape in (True, False) if k % 2 == 0 else (False, True):
                before = _snapshot(agent)
                t0 = time.monotonic()
                if scrape:
                    sizes += await asyncio.to_thread(_scrape, scraper, _SCRAPES)
                    slot = time.monotonic() - t0
                    scraping += slot
                else:
                    await asyncio.sleep(slot)
                (scraped if scrape else quiet).add(_tally(agent, before, _snapshot(agent)))
            pairs.append((scraped, quiet))
        counted_before = _snapshot(agent).counted
        text = (await asyncio.to_thread(httpx.get, url, timeout=10)).text
        counted_after = _snapshot(agent).counted
        failed_devices = {
            s.labels["device"]
            for family in agent.metrics.polls.collect()
            for s in family.samples
            if s.name.endswith("_total") and s.labels["result"] != "ok" and s.value
        }
    finally:
        gc.enable()
        if scraper is not None:
            scraper.kill()
            scraper.wait(10)
        await agent.stop()
        sim.terminate()
        sim.wait(10)
    scraped, quiet = _Tally(), _Tally()
    for pair in pairs:
        scraped.add(pair[0])
        quiet.add(pair[1])
    shares = ", ".join(f"{s.share:.2f}/{q.share:.2f}" for s, q in pairs)
    print(f"{len(sizes)} scrapes of {max(sizes)} bytes ({max(sizes) / _DEVICES:.0f} B per "
          f"device); poll ticks upset: {scraped.upset} of {scraped.ticks} while scraped, "
          f"{quiet.upset} of {quiet.ticks} in the quiet slots; by pair: {shares}")  # fmt: skip
    assert len(sizes) == _PAIRS * _SCRAPES
    due = _DEVICES * scraping / _INTERVAL
    assert scraped.ticks >= 0.75 * due, f"{scraped.ticks} poll ticks while scraped, {due:.0f} due"
    # A scrape that held the loop up would make polls late, fail or skip, every time: in
    # every pair. A burst of outside load upsets a few pairs, either slot. A machine so busy
    # that it upsets polls anyway has no room for the scrapes' own work either: the
    # allowance grows with the quiet slot's share.
    within = sum(1 for s, q in pairs if s.share <= 0.05 + 1.25 * q.share)
    assert within > _PAIRS / 2, f"polls upset while scraped (scraped/quiet share): {shares}"
    families = {f.name: f for f in text_string_to_metric_families(text)}  # a valid exposition
    online = families["iiot_agent_device_online"].samples
    assert len(online) == _DEVICES
    # Every device shows online but those whose polls had failed (a load spike may leave
    # some offline at this moment).
    offline = {s.labels["device"] for s in online if s.value != 1}
    assert offline <= failed_devices, f"offline without a failed poll: {offline - failed_devices}"
    # The exposition shows the agent's counters as they were while it was drawn.
    polls = [s.value for s in families["iiot_agent_polls"].samples if s.name.endswith("_total")]
    assert counted_before <= sum(polls) <= counted_after
    # Per-device series stay few: the exposition grows by a few lines per device.
    per_device = max(sizes) / _DEVICES
    assert per_device < 400, f"{per_device:.0f} bytes of metrics per device"
