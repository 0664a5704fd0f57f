"""A device's telemetry chart read from victoria-metrics shows every instance's samples.

Three gateway processes share one subscription, one PostgreSQL and one victoria-metrics:
each receives part of a device's messages. gw0 reads telemetry from victoria-metrics,
gw1 too with at most 10 messages an answer, gw2 from its own memory only.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import GatewayConfigError, load_gateway_config
from gateway.telemetry import series_selector
from iiot_common.localservers import Mosquitto, PostgreSQL, VictoriaMetrics
from tests.gateway.test_ingest import Publisher
from tests.gateway.test_multi_instance import _Instance, gateways, seed_ledger
from tests.waiting import wait_until

ENT, AGENT, DEVICE = "ent-1", "agent-1", "d0"
SAMPLES = 30
VM_SOURCE = "victoria-metrics"


@pytest.fixture
def trio(
    tmp_path: Path, mosquitto: Mosquitto, postgres_server: PostgreSQL, victoria: VictoriaMetrics
) -> Iterator[list[_Instance]]:
    url = postgres_server.create_database()
    seed_ledger(url, [DEVICE])
    telemetry: list[dict[str, Any]] = [
        {"source": VM_SOURCE, "timeout": 3},
        {"source": VM_SOURCE, "timeout": 3, "max_points": 10},
        {},
    ]
    influx = {"url": victoria.url, "flush_interval": 0.1, "timeout": 3}
    configs = [{"influx": influx, "telemetry": tel} for tel in telemetry]
    with gateways(tmp_path, url, mosquitto, configs) as instances:
        yield instances


def _telemetry(gw: _Instance) -> dict[str, Any]:
    body: dict[str, Any] = gw.http.get(f"/api/v1/devices/{ENT}/{DEVICE}/telemetry?hours=1").json()
    return body


def _failures(gw: _Instance) -> float:
    total = 0.0
    for line in gw.http.get("/metrics").text.splitlines():
        if line.startswith("iiot_gateway_telemetry_query_failures_total{"):
            total += float(line.split()[-1])
    return total


def test_every_instance_charts_every_sample_from_victoria_metrics(
    trio: list[_Instance], mosquitto: Mosquitto, victoria: VictoriaMetrics
) -> None:
    gw0, gw1, gw2 = trio
    pub = Publisher(mosquitto.url, client_id="agent-under-test")
    try:
        birth = {
            "bdseq": 1,
            "ts": int(time.time() * 1000),
            "devices": [{"id": DEVICE, "profile": "p", "protocol": "modbus"}],
        }
        pub.raw(f"iiot/v1/{ENT}/{AGENT}/agent", json.dumps(birth).encode())
        t0 = int(time.time() * 1000) - 60_000
        sent = {t0 + k * 1000: float(k) for k in range(SAMPLES)}
        for k, (ts, value) in enumerate(sent.items()):
            pub.data(DEVICE, k, [{"ts": ts, "values": {"t": value}}], enterprise=ENT)
    finally:
        pub.close()
    # The broker shared the messages out: more than one instance received some.
    wait_until(
        lambda: sum(gw.received() for gw in trio) >= SAMPLES + 1, 20, "every message ingested", 0.3
    )
    assert sum(1 for gw in trio if gw.received() > 0) >= 2

    def complete() -> bool:
        victoria.flush()
        return len(_telemetry(gw0)["points"]) == SAMPLES

    wait_until(complete, 30, "gw0 to chart every sample", 0.3)
    body = _telemetry(gw0)
    assert body["source"] == VM_SOURCE
    assert body["capped_from_ms"] is None
    assert {p["ts"]: p["values"]["t"] for p in body["points"]} == sent

    # At most 10 messages an answer: the latest 10, and where they start.
    capped = _telemetry(gw1)
    assert capped["source"] == VM_SOURCE
    latest = sorted(sent)[-10:]
    assert [p["ts"] for p in capped["points"]] == latest
    assert capped["capped_from_ms"] == latest[0]

    # Memory alone: this instance's share only.
    mine = _telemetry(gw2)
    assert mine["source"] == "memory"
    assert len(mine["points"]) < SAMPLES
    assert {p["ts"] for p in mine["points"]} <= set(sent)

    # The report reads the same source and names it.
    report = gw0.http.get(
        "/api/v1/reports/telemetry.csv",
        params={"enterprise": ENT, "device": DEVICE, "hours": "1"},
    )
    assert report.status_code == 200
    rows = list(csv.reader(io.StringIO(report.content.decode("utf-8-sig"))))
    assert "source=victoria-metrics" in rows[0][0]
    assert rows[1] == ["时间 ts_ms", "t"]
    assert {int(r[0]): float(r[1]) for r in rows[2:]} == sent

    # victoria-metrics gone: the answer comes from memory, says so, and is counted.
    victoria.stop()
    before = _failures(gw0)
    down = _telemetry(gw0)
    assert down["source"].startswith("memory (victoria-metrics unreachable: ")
    assert len(down["points"]) < SAMPLES
    assert {p["ts"] for p in down["points"]} <= set(sent)
    assert _failures(gw0) == before + 1
    report = gw0.http.get(
        "/api/v1/reports/telemetry.csv",
        params={"enterprise": ENT, "device": DEVICE, "hours": "1"},
    )
    assert "source=memory (victoria-metrics unreachable" in report.content.decode("utf-8-sig")


def test_ids_go_into_the_selector_escaped(victoria: VictoriaMetrics) -> None:
    # Quotes, backslashes and braces stay inside the label values: victoria-metrics parses
    # the selector and matches nothing, rather than a widened or broken query.
    body = (
        "telemetry,device=d1,enterprise=ent-1 t=1 1700000000000\n"
        "telemetry,device=d2,enterprise=ent-1 t=2 1700000000000\n"
    )
    httpx.post(f"{victoria.url}/api/v2/write", params={"precision": "ms"}, content=body)
    victoria.flush()
    assert len(victoria.export(series_selector("ent-1", "d1"))) == 1
    for device in ['d1",device=~".*', "d1\\", 'd"}', "d1\n"]:
        selector = series_selector("ent-1", device)
        r = httpx.get(f"{victoria.url}/api/v1/export", params={"match[]": selector})
        assert r.status_code == 200, (device, r.text)
        assert r.text.strip() == "", device


def test_the_victoria_metrics_source_needs_a_url(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("telemetry:\n  source: victoria-metrics\n")
    with pytest.raises(GatewayConfigError, match=r"gateway\.yaml: .*set telemetry\.url"):
        load_gateway_config(path)
    path.write_text(
        "influx:\n  url: http://127.0.0.1:8428\ntelemetry:\n  source: victoria-metrics\n"
    )
    assert load_gateway_config(path).telemetry_query_url == "http://127.0.0.1:8428"
    path.write_text("influx:\n  url: http://127.0.0.1:8428\n")
    assert load_gateway_config(path).telemetry_query_url is None
