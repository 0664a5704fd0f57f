"""Edge agent against one OPC UA server holding D devices of V changing Double variables.

The load server is node-opcua (Node.js), as in the ThingsBoard IoT Gateway comparison:
devices are folders ``DevNNNN`` under Objects, each with variables ``VNNNN`` (NodeIds
``s=DevNNNN.VNNNN``) whose value is the server's clock in milliseconds, all changing
every second. The agent runs one profile (``node_suffix: .VNNNN``) for every device,
each device giving its own ``root``, and publishes to a Mosquitto on loopback.

The parent measures, over the window after a warm-up, the agent process's CPU (psutil)
and the server's CPU, and counts in the agent process what its pollers hand over for
publishing: new values per second (each value counted once), delivered % (against D·V
per interval), and the lag
of each value (hand-over time minus the server time the value carries; the agent's
clock and the server's are the same machine's). CPU per datapoint = agent CPU seconds /
datapoints handed over. ThingsBoard's figures measured the same way are printed beside.

In subscribe mode the agent asks the server to report each change as it happens
(``--sampling 0``) and to publish once a second (``--publishing 1``), with the queue the
driver derives from them, so every change reaches it; a positive ``--sampling`` makes the
server sample every item on a timer instead, which at 20,000 items and 2-4 samples a
second is more than node-opcua keeps up with on two shared cores (it falls seconds
behind, whatever the client does).

node-opcua: ``npm install --prefix ~/.cache/iiot-bench/node node-opcua`` (or give
``--node-modules``); without it the bench says so and stops.

    .venv/bin/python bench/agent_opcua.py [--devices 100] [--points 10] [--mode read]
        [--interval 1.0] [--duration 20] [--max-sessions 10] [--sampling 0]
        [--publishing 1.0] [--queue N] [--servers 1] [--shape batch|device]
        [--loop uvloop|asyncio]

The agent runs on the event loop ``--loop`` names, uvloop by default as ``iiot agent run``.
``--shape batch`` (the default, as in ``bench/agent_scale.py``) sets ``mqtt.batch: true``:
several devices' samples a message; ``--shape device`` publishes a message per sample.

``--servers N`` splits the devices over N node-opcua processes (one session each), as a
plant's devices sit behind many servers: one node-opcua process is single-threaded and,
on two shared cores, answers at most about 20,000-30,000 values a second of Reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from edge_agent.runtime import LoopKind, run_on

PROFILE_ID = "bench-opcua-folder"
URI = "urn:iiot:bench"
WARMUP = 6.0  # longer than any device's first tick (its phase within the interval)
SETTLE = 60.0  # at most this much longer, until every device is online

# ThingsBoard IoT Gateway 3.8.5, OPC UA connector, same server and layout (µs of gateway
# CPU per datapoint; delivered %; lag p99 ms).
_TB = {
    ("read", 1000): "41.9 µs/dp",
    ("read", 20000): "26-31 µs/dp",
    ("subscribe", 1000): "n/a",
    ("subscribe", 20000): "n/a",
    ("read", 50000): "n/a",
    ("subscribe", 50000): "n/a",
}
_IIOT_BEFORE = {
    ("read", 1000): "58.8 µs/dp",
    ("read", 20000): "17.5-18.0 µs/dp",
    ("subscribe", 1000): "60.3 µs/dp",
    ("subscribe", 20000): "37-43 µs/dp, lag p99 445-940 ms, 98-100 % delivered",
    ("read", 50000): "n/a",
    ("subscribe", 50000): "n/a",
}

_SERVER_JS = r"""
const path = require("path");
const opcua = require(path.join(process.env.NODE_OPCUA, "node-opcua"));
const [port, first, devices, points, maxSessions] = process.argv.slice(2).map(Number);
(async () => {
  const server = new opcua.OPCUAServer({
    port, serverCapabilities: { maxSessions, maxSubscriptionsPerSession: 100 },
  });
  await server.initialize();
  const space = server.engine.addressSpace;
  const ns = space.registerNamespace("urn:iiot:bench");
  const vars = [];
  const now = { dataType: opcua.DataType.Double, value: Date.now() };
  for (let d = first; d < first + devices; d++) {
    const dev = "Dev" + String(d).padStart(4, "0");
    const folder = ns.addObject({ organizedBy: space.rootFolder.objects, browseName: dev,
                                  nodeId: "s=" + dev });
    for (let v = 1; v <= points; v++) {
      const name = "V" + String(v).padStart(4, "0");
      vars.push(ns.addVariable({ componentOf: folder, browseName: name,
        nodeId: "s=" + dev + "." + name, dataType: "Double", value: now }));
    }
  }
  setInterval(() => {
    const t = { dataType: opcua.DataType.Double, value: Date.now() };
    for (const v of vars) v.setValueFromSource(t);
  }, 1000);
  await server.start();
  console.log("READY");
})().catch((e) => { console.error(e); process.exit(1); });
"""


def _profile(points: int) -> dict[str, Any]:
    return {
        "id": PROFILE_ID,
        "name": "Benchmark folder device",
        "name_zh": "基准设备",
        "family": "other",
        "category": "intelligent",
        "protocol": "opcua",
        "opcua": {"namespace_uri": URI},
        "points": [
            {"name": f"v{i:04d}", "type": "float64", "opcua": {"node_suffix": f".V{i:04d}"}}
            for i in range(1, points + 1)
        ],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- the agent role -------------------------------------------------------------------


async def _role_agent(config: Path, duration: float, profile_out: Path | None) -> None:
    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from protocols.driver import Reading

    agent = Agent(load_config(config))
    counted = {"dp": 0, "on": False}
    lags: list[float] = []
    handover = agent._on_sample

    seen: dict[str, dict[str, Any]] = {}

    def on_sample(device: str, reading: Reading) -> None:
        if counted["on"]:
            # Each value once: the server's clock in ms, new every second. Set operations
            # on the items, so that the count costs the agent's process little.
            last = seen.setdefault(device, {})
            fresh = len(reading.values.items() - last.items())
            last.update(reading.values)
            counted["dp"] += fresh
            if fresh:
                # One value per sample is enough for the lag distribution.
                lags.append(time.time() * 1000 - float(next(iter(reading.values.values()))))
        handover(device, reading)

    for p in agent.pollers:  # created with the agent: hand their samples through the count
        p._on_sample = on_sample
    await agent.start()
    await asyncio.sleep(WARMUP)
    # Hundreds of devices take longer to connect and subscribe: wait (bounded) for them.
    for _ in range(int(SETTLE / 0.5)):
        if all(p.health.online for p in agent.pollers):
            break
        await asyncio.sleep(0.5)
    profiler = None
    if profile_out is not None:
        import cProfile

        # The main thread's CPU time, not the wall clock: on a shared machine a wall-clock
        # profile charges a function the time the process waited for a core.
        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
    counted["on"] = True
    errors0, drivers0 = _failed_polls(agent), _driver_counts(agent)
    print("WINDOW", flush=True)
    await asyncio.sleep(duration)
    counted["on"] = False
    print("END", flush=True)
    if profiler is not None:
        profiler.disable()
        assert profile_out is not None
        profiler.dump_stats(str(profile_out))
    failed = {k: v - errors0.get(k, 0) for k, v in _failed_polls(agent).items()}
    failed = {k: v for k, v in failed.items() if v}
    drivers = {k: v - drivers0.get(k, 0) for k, v in _driver_counts(agent).items()}
    offline = [p.device.id for p in agent.pollers if not p.health.online]
    reasons = sorted({p.health.reason for p in agent.pollers if not p.health.online})
    sessions = {
        id(s): s for p in agent.pollers if (s := getattr(p._driver, "session", None)) is not None
    }
    in_flight = max((s.publisher.in_flight for s in sessions.values() if s.publisher), default=0)
    await agent.stop()
    print(
        json.dumps(
            {
                "dp": counted["dp"],
                "lags": lags,
                "failed": failed,
                "offline": len(offline),
                "reasons": reasons[:5],
                "sessions": len(sessions),
                "drivers": drivers,
                "in_flight": in_flight,
            }
        ),
        flush=True,
    )


def _failed_polls(agent: Any) -> dict[str, int]:
    """Polls that ended in a failure, by reason (the counter's other reasons than ``ok``)."""
    out: dict[str, int] = {}
    for metric in agent.metrics.polls.collect():
        for s in metric.samples:
            reason = s.labels.get("result")
            if s.name.endswith("_total") and reason != "ok":
                out[reason] = out.get(reason, 0) + int(s.value)
    return out


def _driver_counts(agent: Any) -> dict[str, int]:
    """The OPC UA drivers' loss counters, summed over devices."""
    out = {"timeouts": 0, "overflows": 0, "dropped_batches": 0}
    for p in agent.pollers:
        stats = getattr(p._driver, "stats", None)
        for k in out:
            out[k] += int(getattr(stats, k, 0))
    return out


# -- the parent ---------------------------------------------------------------------


def _start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if binary is None:
        sys.exit("needs mosquitto (apt-get install mosquitto)")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nlog_dest none\n"
    )
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    sys.exit("mosquitto did not start")


def _node_modules(given: Path | None) -> Path:
    for candidate in (
        given,
        Path.home() / ".cache/iiot-bench/node/node_modules",
        Path("node_modules"),
    ):
        if candidate is not None and (candidate / "node-opcua").is_dir():
            return candidate.resolve()
    sys.exit(
        "needs node-opcua: npm install --prefix ~/.cache/iiot-bench/node node-opcua "
        "(or --node-modules DIR)"
    )


def _start_server(
    work: Path, modules: Path, devices: range, points: int, max_sessions: int
) -> tuple[subprocess.Popen[str], int]:
    """A node-opcua server holding the devices numbered ``devices``."""
    script = work / "server.js"
    script.write_text(_SERVER_JS)
    port = _free_port()
    env = {**os.environ, "NODE_OPCUA": str(modules)}
    argv = [port, devices.start, len(devices), points, max_sessions]
    proc = subprocess.Popen(
        ["node", str(script), *map(str, argv)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # node-opcua prints its warnings on stdout too
        if line.strip() == "READY":
            return proc, port
    proc.kill()
    sys.exit("node-opcua server did not start")


def _measure(cmd: list[str], server_pids: list[int]) -> dict[str, Any]:
    """Run the agent; its CPU seconds and the servers' over the window, and its result."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps, server = psutil.Process(proc.pid), _Servers(server_pids)
    assert proc.stdout is not None
    c0 = s0 = t0 = 0.0
    result: dict[str, Any] = {}
    for line in proc.stdout:
        line = line.strip()
        if line == "WINDOW":
            c, s = ps.cpu_times(), server.cpu_times()
            c0, s0, t0 = c.user + c.system, s.user + s.system, time.monotonic()
        elif line == "END":
            c, s = ps.cpu_times(), server.cpu_times()
            result["cpu"] = c.user + c.system - c0
            result["server_cpu"] = s.user + s.system - s0
            result["wall"] = time.monotonic() - t0
        elif line.startswith("{"):
            result.update(json.loads(line))
    proc.wait(120)
    return result


class _Servers:
    """The CPU times of several server processes, summed."""

    def __init__(self, pids: list[int]) -> None:
        self._procs = [psutil.Process(p) for p in pids]

    def cpu_times(self) -> Any:
        times = [p.cpu_times() for p in self._procs]
        return argparse.Namespace(
            user=sum(t.user for t in times), system=sum(t.system for t in times)
        )


def _config(work: Path, args: argparse.Namespace, ports: list[int], mqtt_port: int) -> Path:
    conn: dict[str, Any] = {
        "mode": args.mode,
        "timeout": 5.0,
        "connect_timeout": 30.0,
    }
    if args.mode == "subscribe":
        conn["sampling_interval"] = args.sampling
        conn["publishing_interval"] = args.publishing
        if args.queue is not None:
            conn["queue_size"] = args.queue
    config = {
        "agent_id": "bench-agent",
        "enterprise": "bench",
        "data_dir": str(work / "agent-data"),
        "profiles": [str(work / "profiles")],
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{mqtt_port}",
            "max_inflight": 100,
            "batch": args.shape == "batch",
        },
        "metrics": {"host": "127.0.0.1", "port": 0},
        "devices": [
            {
                "id": f"dev-{d:04d}",
                "profile": PROFILE_ID,
                # Subscribe mode hands values over as they arrive; the poll is a heartbeat.
                "poll_interval": args.interval if args.mode == "read" else 5.0,
                "opcua": {
                    **conn,
                    "endpoint": f"opc.tcp://127.0.0.1:{ports[_server_of(d, args)]}",
                    "root": f"ns=2;s=Dev{d:04d}",
                },
            }
            for d in range(1, args.devices + 1)
        ],
    }
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _shares(args: argparse.Namespace) -> list[range]:
    """The device numbers each server holds: consecutive, as even as can be."""
    n, per = args.servers, -(-args.devices // args.servers)
    return [range(1 + i * per, min(args.devices, (i + 1) * per) + 1) for i in range(n)]


def _server_of(device: int, args: argparse.Namespace) -> int:
    return int((device - 1) // -(-args.devices // args.servers))


def _report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    wall = r["wall"]
    dp = r["dp"]
    rate = args.devices * args.points / args.interval
    lags = r["lags"]
    print(f"\nuptime: {os.popen('uptime').read().strip()}")
    print(
        f"scheduled: {rate:.0f} dp/s ({args.devices} devices x {args.points} points), "
        f"mqtt shape {args.shape}, loop {args.loop}"
    )
    print(f"datapoints/s         {dp / wall:12.0f}")
    print(f"delivered %          {100 * dp / (rate * wall):12.2f}")
    print(f"agent CPU %          {100 * r['cpu'] / wall:12.1f}")
    print(f"agent CPU µs/dp      {1e6 * r['cpu'] / dp if dp else math.nan:12.1f}")
    print(f"server CPU %         {100 * r['server_cpu'] / wall:12.1f}  (all servers)")
    print(f"lag p50 ms           {_pct(lags, 0.5):12.0f}")
    print(f"lag p99 ms           {_pct(lags, 0.99):12.0f}")
    print(f"failed polls         {sum(r['failed'].values()):12d}  {r['failed']}")
    print(f"devices offline      {r['offline']:12d}  {r['reasons']}")
    print(
        f"sessions             {r['sessions']:12d}  ({args.servers} server(s), "
        f"each allows {args.max_sessions})"
    )
    d = r["drivers"]
    print(f"request timeouts     {d['timeouts']:12d}")
    if args.mode == "subscribe":
        print(
            f"subscription         sampling {args.sampling} s, publishing {args.publishing} s, "
            f"{r['in_flight']} publish requests in flight"
        )
        print(f"server queue overflows {d['overflows']:10d}")
        print(f"batches dropped      {d['dropped_batches']:12d}")
    key = (args.mode, 1000 if rate <= 5000 else 20000 if rate <= 30000 else 50000)
    print(
        f"reference at ~{key[1]} dp/s, {args.mode} mode: ThingsBoard IoT Gateway 3.8.5 "
        f"{_TB[key]}; iiot before shared sessions {_IIOT_BEFORE[key]}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--mode", choices=["read", "subscribe"], default="read")
    ap.add_argument("--interval", type=float, default=1.0, help="Poll interval, seconds.")
    ap.add_argument(
        "--sampling",
        type=float,
        default=0.0,
        help="Subscribe mode: sampling interval, s (0: the server reports each change).",
    )
    ap.add_argument(
        "--publishing", type=float, default=1.0, help="Subscribe mode: publishing interval, s."
    )
    ap.add_argument("--queue", type=int, help="Subscribe mode: queue size (default: derived).")
    ap.add_argument("--duration", type=float, default=20.0, help="Measuring window, seconds.")
    ap.add_argument("--max-sessions", type=int, default=10)
    ap.add_argument(
        "--servers", type=int, default=1, help="node-opcua processes the devices are split over."
    )
    ap.add_argument(
        "--shape",
        choices=["batch", "device"],
        default="batch",
        help="batch: mqtt.batch: true (several devices a message); device: one device a message.",
    )
    ap.add_argument("--loop", choices=[k.value for k in LoopKind], default=LoopKind.UVLOOP.value)
    ap.add_argument("--node-modules", type=Path)
    ap.add_argument(
        "--cprofile", type=Path, help="Write the agent's cProfile stats (main thread CPU) here."
    )
    ap.add_argument("--role", choices=["parent", "agent"], default="parent")
    ap.add_argument("--config", type=Path)
    args = ap.parse_args()
    if args.role == "agent":
        run_on(LoopKind(args.loop), _role_agent(args.config, args.duration, args.cprofile))
        return
    modules = _node_modules(args.node_modules)
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="iiot-bench-") as tmp:
        work = Path(tmp)
        (work / "profiles").mkdir()
        (work / "profiles" / f"{PROFILE_ID}.yaml").write_text(yaml.safe_dump(_profile(args.points)))
        broker, mqtt_port = _start_mosquitto(work)
        servers: list[subprocess.Popen[str]] = []
        try:
            ports = []
            for share in _shares(args):
                server, port = _start_server(work, modules, share, args.points, args.max_sessions)
                servers.append(server)
                ports.append(port)
            config = _config(work, args, ports, mqtt_port)
            cmd = [*me, "--role", "agent", "--config", str(config), "--duration",
                   str(args.duration), "--loop", args.loop]  # fmt: skip
            if args.cprofile is not None:
                cmd += ["--cprofile", str(args.cprofile.resolve())]
            result = _measure(cmd, [s.pid for s in servers])
        finally:
            for server in servers:
                server.terminate()
                server.wait(10)
            broker.terminate()
            broker.wait(5)
    _report(args, result)


if __name__ == "__main__":
    main()
