"""The gateway process: `iiot gateway run`, crash recovery and shared subscriptions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.registry import Registry
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto, VictoriaMetrics, free_port, wait_port
from tests.gateway.test_ingest import (
    BASE_TS,
    MemorySink,
    Publisher,
    gateway_config,
    metric,
    sample,
    series_by_name,
)
from tests.waiting import wait_until

PLATFORM_TOKEN = "platform-token-for-tests"


def _registry_with_agent(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    reg = Registry(f"sqlite:///{data_dir / 'registry.db'}")
    reg.add_enterprise("ent-1", "Test Works", "130102", "C30")
    reg.add_agent("ent-1", "agent-1", None)
    reg.close()


def _write_config(tmp_path: Path, broker: Mosquitto, vm: VictoriaMetrics, api_port: int) -> Path:
    cfg = {
        "data_dir": str(tmp_path / "gw"),
        "mqtt": {"url": broker.url, "client_id": "gw-cli"},
        "influx": {"url": vm.url, "flush_interval": 0.05, "timeout": 3},
        "api": {"host": "127.0.0.1", "port": api_port, "platform_tokens": [PLATFORM_TOKEN]},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class _Proc:
    def __init__(self, config: Path, api_port: int) -> None:
        self.api_port = api_port
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "iiot"), "gateway", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        wait_port(api_port, timeout=30)

    def metrics_text(self) -> str:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/metrics",
            headers={"Authorization": f"Bearer {PLATFORM_TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            body: bytes = r.read()
            return body.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def procs() -> Iterator[list[_Proc]]:
    started: list[_Proc] = []
    yield started
    for p in started:
        p.kill()


def _metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_config_errors_name_the_field_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.yaml"
    bad.write_text("mqtt:\n  url: http://nope\n  colour: blue\n")
    iiot = str(Path(sys.executable).parent / "iiot")
    res = subprocess.run(
        [iiot, "gateway", "run", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "mqtt.url" in res.stderr and "mqtt.colour: unknown key" in res.stderr


def test_sigkill_mid_stream_loses_nothing_acknowledged(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics, procs: list[_Proc]
) -> None:
    _registry_with_agent(tmp_path / "gw")
    api_port = free_port()
    config = _write_config(tmp_path, mosquitto, victoria, api_port)
    procs.append(_Proc(config, api_port))
    pub = Publisher(mosquitto.url)
    total = 600
    killed = threading.Event()

    def publish() -> None:
        for i in range(total):
            pub.data("kiln-1", i, [sample(i, v=float(i), n=i)])
            if i == 200:
                killed.set()

    try:
        worker = threading.Thread(target=publish)
        worker.start()
        killed.wait(30)
        procs[-1].kill()  # SIGKILL mid-stream
        worker.join(60)
        assert not worker.is_alive()
        # Everything was published with QoS 1 into the gateway's persistent session.
        procs.append(_Proc(config, api_port))
        wait_until(
            lambda: (
                _metric_value(procs[-1].metrics_text(), "iiot_gateway_outbox_lines") == 0
                and len(_values(victoria)) >= total
            ),
            timeout=30,
            what="all samples in victoria-metrics",
        )
    finally:
        pub.close()
    points: dict[int, set[float]] = {}
    raw = 0
    for series in series_by_name(victoria)["telemetry_n"]:
        for ts, v in zip(series["timestamps"], series["values"], strict=True):
            points.setdefault(ts, set()).add(v)
            raw += 1
    # Every sample is there, with its own value.
    assert sorted(points) == [BASE_TS + i * 1000 for i in range(total)]
    assert all(points[BASE_TS + i * 1000] == {i} for i in range(total))
    # A batch written just before the kill but not yet removed from the outbox is
    # written again after the restart: the same points, which InfluxDB overwrites.
    assert raw - total <= 5000


def _values(vm: VictoriaMetrics) -> list[float]:
    series = series_by_name(vm).get("telemetry_n", [])
    return [v for s in series for v in s["values"]]


def test_sigterm_stops_cleanly_with_exit_0(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics, procs: list[_Proc]
) -> None:
    _registry_with_agent(tmp_path / "gw")
    api_port = free_port()
    config = _write_config(tmp_path, mosquitto, victoria, api_port)
    p = _Proc(config, api_port)
    procs.append(p)
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health", timeout=5) as r:
        assert json.loads(r.read())["status"] == "ok"
    pub = Publisher(mosquitto.url)
    try:
        for i in range(20):
            pub.data("kiln-1", i, [sample(i, n=i)])
    finally:
        pub.close()
    wait_until(lambda: len(_values(victoria)) == 20, what="samples written")
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(30) == 0
    out = p.proc.stdout.read().decode() if p.proc.stdout else ""
    assert "gateway stopped" in out


def test_two_instances_in_one_shared_group_neither_lose_nor_duplicate(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics
) -> None:
    sink = MemorySink()
    gws = [
        Gateway(
            gateway_config(
                tmp_path,
                mosquitto,
                victoria,
                client_id=f"gw-{n}",
                shared_group="ingest",
                name=f"gw{n}",
            ),
            sink=sink,
            serve_api=False,
        )
        for n in (1, 2)
    ]
    for gw in gws:
        gw.start()
    pub = Publisher(mosquitto.url)
    total = 0
    try:
        for d in range(4):
            for i in range(100):
                pub.data(f"dev-{d}", i, [sample(i, n=d * 1000 + i)])
                total += 1
        wait_until(
            lambda: sum(metric(g, "iiot_gateway_written_lines_total") for g in gws) >= total,
            what="all lines written",
        )
        per_gateway = [metric(g, "iiot_gateway_written_lines_total") for g in gws]
    finally:
        pub.close()
        for gw in gws:
            gw.stop()
    assert sum(per_gateway) == total
    assert all(n > 0 for n in per_gateway), per_gateway  # the broker split the load
    values = sorted(v for s in series_by_name(victoria)["telemetry_n"] for v in s["values"])
    assert values == sorted(d * 1000 + i for d in range(4) for i in range(100))
