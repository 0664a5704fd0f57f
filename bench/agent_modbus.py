"""Edge agent against N simulated Modbus devices, beside a bare pymodbus loop (the ceiling).

Three process roles, so that simulator CPU is never counted as agent CPU:

- ``sim``    one process serving N devices (40 holding registers each), one TCP port each;
- ``agent``  the real agent (pollers, spool, MQTT publisher) for a fixed window;
- ``bare``   a bare pymodbus client loop on the same schedule over the same devices.

The parent starts Mosquitto on a free loopback port, the simulator, then the agent and
the bare loop one after the other, measures each child's CPU and peak RSS with psutil
over its measuring window, and prints registers/s, requests/s, poll jitter (actual start
against scheduled start, p50/p99), CPU % and CPU µs per register delivered, peak RSS,
and the agent/bare ratios. It also prints the simulator's CPU % in each window: when
that nears 100 %, the simulator, not the client, sets the ceiling. Both clients wait up
to 2 s for an answer (the agent's ``poll_timeout`` is set to match the bare loop's
request timeout).

With ``--scrape-every S`` a thread in the agent's process scrapes its ``/metrics`` every
S seconds during the window, as Prometheus would; the agent's figures then include the
polls that failed (timeouts) in the window and the scrapes' size and time.

    .venv/bin/python bench/agent_modbus.py [--devices 200] [--duration 30] [--interval 1.0]
        [--scrape-every 5] [--loop uvloop|asyncio]

The agent and the bare loop run on the event loop ``--loop`` names: uvloop by default,
as ``iiot agent run`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from edge_agent.runtime import LoopKind, run_on

PROFILE_ID = "bench-40reg"
REGISTERS = 40
WARMUP = 3.0


def _profile() -> dict[str, Any]:
    points = [
        {
            "name": f"v{i:02d}",
            "type": "float32",
            "range": [0, 1000],
            "modbus": {"table": "holding", "address": 2 * i},
        }
        for i in range(REGISTERS // 2)
    ]
    return {
        "id": PROFILE_ID,
        "name": "Benchmark device, 40 holding registers",
        "name_zh": "基准设备",
        "family": "other",
        "category": "general_power",
        "protocol": "modbus",
        "points": points,
    }


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- roles ------------------------------------------------------------------------------


async def _role_sim(profile_dir: Path, ports: list[int], profile_id: str = PROFILE_ID) -> None:
    from device_profiles.loader import load_profiles
    from simulators.device import SimDevice
    from simulators.modbus_server import ModbusSimServer

    prof = load_profiles([profile_dir])[profile_id]
    servers = [
        ModbusSimServer({1: SimDevice(prof, device_id=f"d{i}", seed=i)}, port=port)
        for i, port in enumerate(ports)
    ]
    for s in servers:
        await s.start()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    for s in servers:
        await s.stop()


def _scrape(url: str, every: float, stop: threading.Event, out: list[tuple[int, float]]) -> None:
    """GET ``url`` every ``every`` seconds until stopped; (bytes, seconds) per scrape.

    A scrape that fails (refused, or no answer in 30 s) counts as 0 bytes.
    """
    import urllib.request

    while not stop.wait(every):
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                size = len(r.read())
        except OSError:
            size = 0
        out.append((size, time.perf_counter() - t))


async def _role_agent(config: Path, duration: float, scrape_every: float) -> None:
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    agent = Agent(load_config(config))
    await agent.start()
    await asyncio.sleep(WARMUP)
    agent.lags.clear()
    good0 = sum(p.health.good for p in agent.pollers)
    failed0 = _agent_failed_polls(agent)
    req0 = _agent_requests(agent)
    scrapes: list[tuple[int, float]] = []
    stop = threading.Event()
    scraper = threading.Thread(
        target=_scrape,
        args=(f"http://127.0.0.1:{agent.metrics_port}/metrics", scrape_every, stop, scrapes),
        daemon=True,
    )
    if scrape_every > 0:
        scraper.start()
    print("WINDOW", flush=True)
    await asyncio.sleep(duration)
    good = sum(p.health.good for p in agent.pollers) - good0
    failed = _agent_failed_polls(agent) - failed0
    requests = _agent_requests(agent) - req0
    lags = list(agent.lags)
    print("END", flush=True)
    stop.set()
    if scrape_every > 0:
        await asyncio.to_thread(scraper.join, 30)
    await agent.stop()
    result = {
        "polls": good,
        "failed": failed,
        "requests": requests,
        "lags": lags,
        "scrapes": len(scrapes),
        "scrape_bytes": max((b for b, _ in scrapes), default=0),
        "scrape_s": max((s for _, s in scrapes), default=0.0),
    }
    print(json.dumps(result), flush=True)


def _agent_failed_polls(agent: Any) -> int:
    """Polls that ended in an error (timeouts among them), from the agent's own counter."""
    total = 0.0
    for family in agent.metrics.polls.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("result") != "ok":
                total += sample.value
    return int(total)


def _agent_requests(agent: Any) -> int:
    total = 0
    for p in agent.pollers:
        stats = getattr(getattr(p, "_driver", None), "stats", None)
        total += getattr(stats, "responses", 0) if stats is not None else 0
    return total


async def _role_bare(ports: list[int], duration: float, interval: float) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    clients = [AsyncModbusTcpClient("127.0.0.1", port=p, timeout=2, retries=0) for p in ports]
    await asyncio.gather(*(c.connect() for c in clients))
    counts = {"polls": 0}
    lags: list[float] = []
    measuring = False
    stop = asyncio.Event()

    async def poll(c: AsyncModbusTcpClient, phase: float) -> None:
        start = time.monotonic() + phase * interval  # staggered, as the agent does
        tick = 0
        while not stop.is_set():
            deadline = start + tick * interval
            wait = deadline - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if measuring:
                lags.append(time.monotonic() - deadline)
            rr = await c.read_holding_registers(0, count=REGISTERS, device_id=1)
            if not rr.isError() and measuring:
                counts["polls"] += 1
            tick = max(tick + 1, math.floor((time.monotonic() - start) / interval) + 1)

    tasks = [asyncio.create_task(poll(c, i / len(clients))) for i, c in enumerate(clients)]
    await asyncio.sleep(WARMUP)
    measuring = True
    print("WINDOW", flush=True)
    await asyncio.sleep(duration)
    measuring = False
    print("END", flush=True)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in clients:
        c.close()
    print(json.dumps({"polls": counts["polls"], "requests": counts["polls"], "lags": lags}))


# -- parent -----------------------------------------------------------------------------


def _start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if binary is None:
        sys.exit("needs mosquitto (apt-get install mosquitto)")
    port = _free_ports(1)[0]
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nlog_dest none\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    sys.exit("mosquitto did not start")


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` so far (one that has gone counts nothing)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _measure(cmd: list[str], duration: float, sim_pids: list[int]) -> dict[str, Any]:
    """Run a child role; its CPU % and peak RSS, and the simulators' CPU %, over its window."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    sims = [psutil.Process(pid) for pid in sim_pids]
    peak = 0
    sampling = True

    def sample_rss() -> None:
        nonlocal peak
        while sampling:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    cpu0 = t0 = sim0 = None
    cpu = wall = sim_cpu = 0.0
    result: dict[str, Any] = {}
    for line in proc.stdout:
        line = line.strip()
        if line == "WINDOW":
            cpu0, sim0, t0 = _cpu_seconds([ps]), _cpu_seconds(sims), time.monotonic()
        elif line == "END" and cpu0 is not None and sim0 is not None and t0 is not None:
            cpu, wall = _cpu_seconds([ps]) - cpu0, time.monotonic() - t0
            sim_cpu = _cpu_seconds(sims) - sim0
        elif line.startswith("{"):
            result = json.loads(line)
    proc.wait(60)
    sampling = False
    sampler.join()
    result["cpu_pct"] = 100 * cpu / wall if wall else math.nan
    result["sim_cpu_pct"] = 100 * sim_cpu / wall if wall else math.nan
    result["peak_rss_mb"] = peak / 2**20
    result["wall"] = wall or duration
    return result


def _figures(r: dict[str, Any]) -> dict[str, float]:
    lags_ms = [x * 1000 for x in r.get("lags", [])]
    wall = r["wall"]
    registers = r["polls"] * REGISTERS / wall
    return {
        "registers/s": registers,
        "requests/s": r["requests"] / wall,
        "jitter p50 ms": _pct(lags_ms, 0.5),
        "jitter p99 ms": _pct(lags_ms, 0.99),
        "CPU %": r["cpu_pct"],
        # CPU per register (datapoint) delivered: comparable across device counts.
        "CPU us/register": 1e4 * r["cpu_pct"] / registers if registers else math.nan,
        "peak RSS MB": r["peak_rss_mb"],
        "simulator CPU %": r["sim_cpu_pct"],
        "failed polls": r.get("failed", math.nan),
        "delivered %": 100 * r["polls"] / (r["polls"] + r["failed"]) if "failed" in r else math.nan,
        "scrapes": r.get("scrapes", math.nan),
        "scrape max KB": r.get("scrape_bytes", math.nan) / 1024,
        "scrape max ms": r.get("scrape_s", math.nan) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--duration", type=float, default=30.0, help="Measuring window, seconds.")
    ap.add_argument("--interval", type=float, default=1.0, help="Poll interval, seconds.")
    ap.add_argument(
        "--scrape-every", type=float, default=0.0, help="Scrape the agent's /metrics (s)."
    )
    ap.add_argument(
        "--batch", action="store_true", help="The agent sends agent-level batch messages."
    )
    ap.add_argument("--role", choices=["parent", "sim", "agent", "bare"], default="parent")
    ap.add_argument("--profiles", type=Path)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--ports", type=str, default="")
    ap.add_argument("--loop", choices=[k.value for k in LoopKind], default=LoopKind.UVLOOP.value)
    args = ap.parse_args()
    ports = [int(p) for p in args.ports.split(",") if p]
    loop = LoopKind(args.loop)
    if args.role == "sim":
        asyncio.run(_role_sim(args.profiles, ports))
        return
    if args.role == "agent":
        run_on(loop, _role_agent(args.config, args.duration, args.scrape_every))
        return
    if args.role == "bare":
        run_on(loop, _role_bare(ports, args.duration, args.interval))
        return

    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="iiot-bench-") as tmp:
        work = Path(tmp)
        (work / "profiles").mkdir()
        (work / "profiles" / f"{PROFILE_ID}.yaml").write_text(yaml.safe_dump(_profile()))
        broker, mqtt_port = _start_mosquitto(work)
        ports = _free_ports(args.devices)
        port_arg = ",".join(map(str, ports))
        sim = subprocess.Popen(
            [*me, "--role", "sim", "--profiles", str(work / "profiles"), "--ports", port_arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert sim.stdout is not None
            if sim.stdout.readline().strip() != "READY":
                sys.exit("simulator did not start")
            config = {
                "agent_id": "bench-agent",
                "enterprise": "bench",
                "data_dir": str(work / "agent-data"),
                "profiles": [str(work / "profiles")],
                "mqtt": {
                    "url": f"mqtt://127.0.0.1:{mqtt_port}",
                    "max_inflight": 100,
                    "batch": args.batch,
                },
                "metrics": {"host": "127.0.0.1", "port": 0},
                "devices": [
                    {
                        "id": f"dev-{i:04d}",
                        "profile": PROFILE_ID,
                        "poll_interval": args.interval,
                        # The bare loop waits up to 2 s for an answer; so does the agent
                        # (the default poll timeout, one interval, would abandon requests
                        # in flight once the loop is saturated).
                        "poll_timeout": 2.0,
                        "modbus": {"host": "127.0.0.1", "port": p, "timeout": 2.0},
                    }
                    for i, p in enumerate(ports)
                ],
            }
            (work / "agent.yaml").write_text(yaml.safe_dump(config))
            print(
                f"{args.devices} devices x {REGISTERS} registers, every {args.interval} s, "
                f"{args.duration:.0f} s window after {WARMUP:.0f} s warm-up, on {args.loop}",
                flush=True,
            )
            agent = _figures(
                _measure(
                    [*me, "--role", "agent", "--config", str(work / "agent.yaml"),
                     "--duration", str(args.duration), "--scrape-every", str(args.scrape_every),
                     "--loop", args.loop],
                    args.duration, [sim.pid],
                )
            )  # fmt: skip
            bare = _figures(
                _measure(
                    [*me, "--role", "bare", "--ports", port_arg, "--duration",
                     str(args.duration), "--interval", str(args.interval), "--loop", args.loop],
                    args.duration, [sim.pid],
                )
            )  # fmt: skip
        finally:
            if sim.stdin is not None:
                sim.stdin.close()
            try:
                sim.wait(20)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait(5)
            broker.terminate()
            broker.wait(5)
    expected = args.devices * REGISTERS / args.interval
    print(f"\n{'figure':<18}{'agent':>12}{'bare pymodbus':>16}{'agent/bare':>12}")
    for key in agent:
        a, b = agent[key], bare[key]
        ratio = a / b if b and not math.isnan(b) else math.nan
        print(f"{key:<18}{a:>12.1f}{b:>16.1f}{ratio:>12.2f}")
    print(
        f"\nscheduled load: {expected:.0f} registers/s ({args.devices / args.interval:.0f} req/s)"
    )


if __name__ == "__main__":
    main()
