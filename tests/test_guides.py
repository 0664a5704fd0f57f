"""The README's guides, run as written against real servers on loopback.

Blocks preceded by ``<!-- guide: NAME -->`` are shell commands, run in order in one bash
session; ``<!-- guide: NAME file: PATH -->`` blocks are written to PATH first. Only the
well-known ports and the Mosquitto auth folder are moved to this test's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from iiot_common.localservers import Mosquitto, VictoriaMetrics, free_port, require

README = Path(__file__).resolve().parents[1] / "README.md"
_MARK = re.compile(
    r"<!-- guide: (?P<name>[a-z]+)(?: file: (?P<file>\S+))? -->\n```\w*\n(?P<body>.*?)```", re.S
)


def guide(name: str) -> tuple[dict[str, str], str]:
    """(files to write, shell script) of one guide, in README order."""
    files: dict[str, str] = {}
    script: list[str] = []
    for m in _MARK.finditer(README.read_text(encoding="utf-8")):
        if m["name"] != name:
            continue
        if m["file"]:
            files[m["file"]] = m["body"]
        else:
            script.append(m["body"])
    assert script, f"README has no '{name}' guide blocks"
    return files, "\n".join(script)


def run_guides(
    names: list[str], workdir: Path, replace: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Write the guides' files, then run their commands in one bash session."""
    parts = []
    for name in names:
        files, script = guide(name)
        for rel, body in files.items():
            for old, new in replace.items():
                body = body.replace(old, new)
            (workdir / rel).write_text(body, encoding="utf-8")
        parts.append(script)
    script = "\n".join(parts)
    for old, new in replace.items():
        script = script.replace(old, new)
    # Background commands of the guide (gateway, agent, simulator) stop with the session.
    wrapped = (
        "set -euo pipefail\n"
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT\n" + script
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", wrapped],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sim(profile: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "iiot", "sim", "run", "--profile", profile, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    """Mosquitto reading the password and ACL files the gateway will write."""
    auth = tmp_path / "mosquitto-iiot"
    auth.mkdir()
    (auth / "passwd").write_text("")
    (auth / "acl").write_text("")
    broker = Mosquitto(tmp_path, password_file=auth / "passwd", acl_file=auth / "acl").start()
    yield broker, auth
    broker.stop()


def test_platform_and_factory_guides(
    tmp_path: Path, auth_broker: tuple[Mosquitto, Path], victoria: VictoriaMetrics
) -> None:
    require("curl", "curl")
    broker, auth = auth_broker
    work = tmp_path / "guide"
    work.mkdir()
    api_port, kiln_port, comp_port = free_port(), free_port(), free_port()
    pid = broker.proc.pid if broker.proc else 0
    sims = [_sim("kiln-rotary-cement", kiln_port), _sim("aircomp-screw", comp_port)]
    try:
        proc = run_guides(
            ["platform", "factory"],
            work,
            {
                "127.0.0.1:1883": f"127.0.0.1:{broker.port}",
                "127.0.0.1:8080": f"127.0.0.1:{api_port}",
                "port: 8080": f"port: {api_port}",
                "127.0.0.1:8086": f"127.0.0.1:{victoria.port}",
                "/etc/mosquitto/iiot": str(auth),
                # Only this test's broker is told to re-read its files.
                "[pkill, -HUP, -x, mosquitto]": f"[kill, -HUP, '{pid}']",
                "host: 192.168.10.21, port: 502": f"host: 127.0.0.1, port: {kiln_port}",
                "host: 192.168.10.22, port: 502": f"host: 127.0.0.1, port: {comp_port}",
            },
        )
    finally:
        for s in sims:
            s.terminate()
            s.wait(10)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # Platform: ratios by city answer, and the report has its bilingual headers.
    assert '"group_by":"city"' in proc.stdout.replace(" ", "") or "130100" in proc.stdout
    report = (work / "connection.csv").read_bytes()
    assert report.startswith(b"\xef\xbb\xbf")
    assert "联网设备总量" in report.decode("utf-8-sig")

    # Factory: the two devices the agent polls are online, the ledger's other three are not.
    devices = json.loads((work / "devices.json").read_text())
    items = devices.get("items", devices.get("devices", []))
    online = {d["id"] for d in items if d["online"]}
    assert online == {"sjz-kiln-1", "sjz-aircomp-1"}
    assert len(items) == 5

    # The time series reached the InfluxDB-compatible store.
    series = victoria.export('{__name__=~"telemetry_.*", device="sjz-kiln-1"}')
    assert series, "no telemetry for sjz-kiln-1 in victoria-metrics"


def test_integrator_guide(tmp_path: Path, mosquitto: Mosquitto) -> None:
    work = tmp_path / "guide"
    work.mkdir()
    sim_port = free_port()
    received: list[str] = []
    got = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.topic)
        if msg.topic.endswith("/cc500-1/data"):
            got.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="guide-watch")
    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("iiot/v1/#", qos=1)
    sub.loop_start()
    try:
        proc = run_guides(
            ["integrator"],
            work,
            {
                "127.0.0.1:1883": f"127.0.0.1:{mosquitto.port}",
                "--port 502": f"--port {sim_port}",
                "port: 502": f"port: {sim_port}",
            },
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert got.wait(5), f"no data from the new model's device; topics seen: {received[:10]}"
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert "ok" in proc.stdout and "acme-cc-500" in proc.stdout
    # probe names the new model as the best fit.
    probe = (work / "probe.txt").read_text()
    best = [line for line in probe.splitlines() if "best" in line.lower()]
    assert best and "acme-cc-500" in best[0], probe
