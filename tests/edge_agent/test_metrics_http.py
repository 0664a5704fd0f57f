"""The agent's /metrics endpoint serves what prometheus_client writes, scrape after scrape."""

from __future__ import annotations

import httpx
from prometheus_client import generate_latest

from edge_agent.metrics import AgentMetrics
from edge_agent.metrics_http import MetricsServer


def _reference(metrics: AgentMetrics) -> list[str]:
    """prometheus_client's own exposition, without the ``_created`` lines the agent leaves out."""
    text = generate_latest(metrics.registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


async def test_scrapes_match_prometheus_client_as_values_and_devices_change() -> None:
    metrics = AgentMetrics()
    for i in range(50):
        dev = f"meter-{i:02d}"
        metrics.polls.labels(dev, "ok").inc(i)
        metrics.device_online.labels(dev).set(i % 2)
        metrics.skipped_ticks.labels(dev)
    # Label values that need escaping, and a histogram and plain gauges beside them.
    metrics.errors.labels("meter-01", 'odd "reason"\\with\nnewline').inc()
    metrics.poll_duration.observe(0.003)
    metrics.spool_depth.set(12)
    server = MetricsServer(metrics.registry, metrics.all())
    await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        async with httpx.AsyncClient() as http:
            first = (await http.get(url)).text.splitlines()
            assert first == _reference(metrics)
            # Values move, a device goes, another comes: the next scrape follows.
            metrics.polls.labels("meter-03", "ok").inc(7)
            metrics.device_online.labels("meter-04").set(1)
            metrics.polls.remove("meter-05", "ok")
            metrics.polls.labels("meter-99", "timeout").inc()
            second = (await http.get(url)).text.splitlines()
            assert second == _reference(metrics)
    finally:
        await server.stop()
    assert 'iiot_agent_polls_total{device="meter-03",result="ok"} 10.0' in second
    assert not [line for line in second if 'device="meter-05",result="ok"' in line]
