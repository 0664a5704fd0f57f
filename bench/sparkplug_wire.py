"""Bytes on the wire and agent CPU per point: Sparkplug B beside the JSON contract.

One run: Mosquitto on a free loopback port, one simulator process serving N Modbus
devices (20 float32 points each, ``bench/agent_modbus.py``'s profile), then the real agent
twice over the same devices, once with ``mqtt.codec: json`` and once with ``sparkplug``.
A paho subscriber on ``#`` counts the MQTT PUBLISH packets of data messages (topic,
packet id, payload, fixed header) during each agent's measuring window; psutil measures
the agent process's CPU over the same window.

    .venv/bin/python bench/sparkplug_wire.py [--devices 50] [--duration 15] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import agent_modbus as am  # noqa: E402


def _remaining_length_bytes(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


class _WireCounter:
    """Counts PUBLISH packet bytes of data messages (iiot/v1 .../data, spBv1.0 DDATA)."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.payload = 0
        self.messages = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-wire")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("#", qos=0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if not (topic.endswith("/data") or "/DDATA/" in topic):
            return
        # As the agent sent it: QoS 1, so a 2-byte packet id.
        rest = 2 + len(topic.encode()) + 2 + len(msg.payload)
        with self.lock:
            self.bytes += 1 + _remaining_length_bytes(rest) + rest
            self.payload += len(msg.payload)
            self.messages += 1

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.bytes, self.payload, self.messages

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _run_agent(me: list[str], config: Path, duration: float, wire: _WireCounter) -> dict[str, Any]:
    proc = subprocess.Popen(
        [*me, "--role", "agent", "--config", str(config), "--duration", str(duration)],
        stdout=subprocess.PIPE,
        text=True,
    )
    ps = psutil.Process(proc.pid)
    assert proc.stdout is not None
    cpu0 = t0 = 0.0
    w0 = w1 = (0, 0, 0)
    cpu = wall = 0.0
    result: dict[str, Any] = {}
    for line in proc.stdout:
        line = line.strip()
        if line == "WINDOW":
            c = ps.cpu_times()
            cpu0, t0, w0 = c.user + c.system, time.monotonic(), wire.snapshot()
        elif line == "END":
            c = ps.cpu_times()
            cpu, wall = c.user + c.system - cpu0, time.monotonic() - t0
            time.sleep(0.5)  # what the agent sent in the window reaches the counter
            w1 = wire.snapshot()
        elif line.startswith("{"):
            result = json.loads(line)
    proc.wait(60)
    points = result["polls"] * (am.REGISTERS // 2)
    return {
        "points": points,
        "wire_bytes_per_point": (w1[0] - w0[0]) / points,
        "payload_bytes_per_point": (w1[1] - w0[1]) / points,
        "messages": w1[2] - w0[2],
        "cpu_us_per_point": 1e6 * cpu / points,
        "cpu_pct": 100 * cpu / wall,
        "points_per_s": points / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--duration", type=float, default=15.0, help="Measuring window, seconds.")
    ap.add_argument("--interval", type=float, default=0.5, help="Poll interval, seconds.")
    ap.add_argument("--role", choices=["parent", "sim", "agent"], default="parent")
    ap.add_argument("--profiles", type=Path)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--ports", type=str, default="")
    args = ap.parse_args()
    ports = [int(p) for p in args.ports.split(",") if p]
    if args.role == "sim":
        asyncio.run(am._role_sim(args.profiles, ports))
        return
    if args.role == "agent":
        asyncio.run(am._role_agent(args.config, args.duration, 0.0))
        return

    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="iiot-bench-sp-") as tmp:
        work = Path(tmp)
        (work / "profiles").mkdir()
        (work / "profiles" / f"{am.PROFILE_ID}.yaml").write_text(yaml.safe_dump(am._profile()))
        broker, mqtt_port = am._start_mosquitto(work)
        ports = am._free_ports(args.devices)
        port_arg = ",".join(map(str, ports))
        sim = subprocess.Popen(
            [*me, "--role", "sim", "--profiles", str(work / "profiles"), "--ports", port_arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        wire = _WireCounter(mqtt_port)
        results: dict[str, dict[str, Any]] = {}
        try:
            assert sim.stdout is not None
            if sim.stdout.readline().strip() != "READY":
                sys.exit("simulator did not start")
            print(
                f"{args.devices} devices x {am.REGISTERS // 2} float32 points, every "
                f"{args.interval} s, {args.duration:.0f} s window after {am.WARMUP:.0f} s warm-up",
                flush=True,
            )
            for codec in ("json", "sparkplug"):
                config = {
                    "agent_id": f"bench-{codec}",
                    "enterprise": "bench",
                    "data_dir": str(work / f"agent-{codec}"),
                    "profiles": [str(work / "profiles")],
                    "mqtt": {
                        "url": f"mqtt://127.0.0.1:{mqtt_port}",
                        "max_inflight": 100,
                        "codec": codec,
                    },
                    "devices": [
                        {
                            "id": f"dev-{i:04d}",
                            "profile": am.PROFILE_ID,
                            "poll_interval": args.interval,
                            "modbus": {"host": "127.0.0.1", "port": p, "timeout": 2.0},
                        }
                        for i, p in enumerate(ports)
                    ],
                }
                path = work / f"agent-{codec}.yaml"
                path.write_text(yaml.safe_dump(config))
                results[codec] = _run_agent(me, path, args.duration, wire)
        finally:
            wire.close()
            assert sim.stdin is not None
            sim.stdin.close()
            sim.wait(30)
            broker.terminate()
            broker.wait(10)
    rows = [
        ("points in the window", "points", "{:,.0f}"),
        ("points/s", "points_per_s", "{:,.0f}"),
        ("data messages", "messages", "{:,.0f}"),
        ("wire bytes / point (PUBLISH)", "wire_bytes_per_point", "{:.1f}"),
        ("payload bytes / point", "payload_bytes_per_point", "{:.1f}"),
        ("agent CPU µs / point", "cpu_us_per_point", "{:.1f}"),
        ("agent CPU %", "cpu_pct", "{:.1f}"),
    ]
    j, s = results["json"], results["sparkplug"]
    print(f"{'figure':32} {'json':>12} {'sparkplug':>12} {'sparkplug/json':>15}")
    for label, key, fmt in rows:
        ratio = s[key] / j[key] if j[key] else float("nan")
        print(f"{label:32} {fmt.format(j[key]):>12} {fmt.format(s[key]):>12} {ratio:>15.2f}")


if __name__ == "__main__":
    main()
