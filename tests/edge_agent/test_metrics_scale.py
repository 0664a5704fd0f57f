"""Scraping the agent's /metrics while it polls many simulated devices."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.localservers import free_port
from tests.edge_agent.helpers import agent_dict, modbus_device
from tests.waiting import wait_for

_DEVICES = 300
_IIOT = str(Path(sys.executable).with_name("iiot"))


def _failed_polls(agent: Agent) -> dict[tuple[str, str], float]:
    """Polls that ended in an error, by (device, reason), from the agent's counter."""
    return {
        (s.labels["device"], s.labels["result"]): s.value
        for family in agent.metrics.polls.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.labels["result"] != "ok"
    }


def _distinct_free_ports(n: int) -> list[int]:
    """``n`` different free loopback ports (held open together while they are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _scrape_loop(url: str, stop: threading.Event, sizes: list[int]) -> None:
    """Scrape as fast as every 0.2 s, as an impatient Prometheus would, until stopped."""
    with httpx.Client(timeout=10) as http:
        while not stop.is_set():
            sizes.append(len(http.get(url).content))
            stop.wait(0.2)


async def test_scraping_metrics_does_not_disturb_polling(tmp_path: Path) -> None:
    ports = _distinct_free_ports(_DEVICES)
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
        modbus_device(f"kiln-{i}", "kiln-rotary-cement", p, interval=1.0)
        for i, p in enumerate(ports)
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
        before = _failed_polls(agent)
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        scraper = threading.Thread(target=_scrape_loop, args=(url, stop, sizes))
        scraper.start()
        await asyncio.sleep(10.0)
        stop.set()
        await asyncio.to_thread(scraper.join, 15)
        failed = _failed_polls(agent)
        text = (await asyncio.to_thread(httpx.get, url, timeout=10)).text
    finally:
        stop.set()
        await agent.stop()
        sim.terminate()
        sim.wait(10)
    assert len(sizes) >= 10, f"only {len(sizes)} scrapes in 10 s"
    new_failures = {k: n - before.get(k, 0) for k, n in failed.items() if n > before.get(k, 0)}
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
