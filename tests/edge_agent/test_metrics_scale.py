"""Scraping the agent's /metrics while it polls many simulated devices."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from tests.edge_agent.helpers import agent_dict, modbus_device, wait_for
from tests.servers import free_port
from tests.simulators.test_plant import free_base

_DEVICES = 300
_IIOT = str(Path(sys.executable).with_name("iiot"))


def _scrape_loop(url: str, stop: threading.Event, sizes: list[int]) -> None:
    """Scrape as fast as every 0.2 s, as an impatient Prometheus would, until stopped."""
    with httpx.Client(timeout=10) as http:
        while not stop.is_set():
            sizes.append(len(http.get(url).content))
            stop.wait(0.2)


async def test_scraping_metrics_does_not_disturb_polling(tmp_path: Path) -> None:
    base = free_base(_DEVICES)
    ready = tmp_path / "endpoints.json"
    sim = await asyncio.to_thread(
        subprocess.Popen,
        [_IIOT, "sim", "run", "--profile", "kiln-rotary-cement", "--count", str(_DEVICES),
         "--port", str(base), "--endpoints-out", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    devices = [
        modbus_device(f"kiln-{i}", "kiln-rotary-cement", base + i, interval=1.0)
        for i in range(_DEVICES)
    ]
    cfg = agent_dict(
        tmp_path, free_port(), devices, metrics={"host": "127.0.0.1", "port": 0}
    )  # no broker: the samples stay in the spool, polling is what is measured
    agent = Agent(parse_config(cfg))
    stop = threading.Event()
    sizes: list[int] = []
    scraper: threading.Thread | None = None
    try:
        await wait_for(ready.exists, 60, "the simulator")
        await agent.start()
        await wait_for(
            lambda: all(p.health.online for p in agent.pollers), 30, "every device online"
        )
        before = {p.device.id: p.health.polls - p.health.good for p in agent.pollers}
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        scraper = threading.Thread(target=_scrape_loop, args=(url, stop, sizes))
        scraper.start()
        await asyncio.sleep(10.0)
        stop.set()
        await asyncio.to_thread(scraper.join, 15)
        failed = {p.device.id: p.health.polls - p.health.good for p in agent.pollers}
        text = (await asyncio.to_thread(httpx.get, url, timeout=10)).text
    finally:
        stop.set()
        await agent.stop()
        sim.terminate()
        sim.wait(10)
    assert len(sizes) >= 10, f"only {len(sizes)} scrapes in 10 s"
    new_failures = {d: n - before[d] for d, n in failed.items() if n > before[d]}
    assert new_failures == {}, f"polls failed while scraped: {new_failures}"
    timeouts = re.findall(r'^iiot_agent_polls_total\{device="[^"]+",result="timeout"\} (\S+)$',
                          text, re.M)  # fmt: skip
    assert sum(float(v) for v in timeouts) == 0
    families = {f.name: f for f in text_string_to_metric_families(text)}  # a valid exposition
    online = families["iiot_agent_device_online"].samples
    assert len(online) == _DEVICES and all(s.value == 1 for s in online)
    # Per-device series stay few: the exposition grows by a few lines per device.
    per_device = max(sizes) / _DEVICES
    print(f"{len(sizes)} scrapes of {max(sizes)} bytes ({per_device:.0f} B per device)")
    assert per_device < 400, f"{per_device:.0f} bytes of metrics per device"
