"""The Modbus TCP simulator's CPU per request: the pymodbus-based path against the lean one.

For each serving path of ``--paths``: ``--devices`` simulated devices of 40 holding
registers (the profile of ``bench/agent_scale.py``: 40 uint16 points with a scale), one
``ModbusSimServer`` per device on its own port, spread over simulator processes of
``--per-sim`` devices; a driver in a process of its own holds one connection per device
and reads all 40 registers of each device ``--rate`` times a second, spread evenly over
the second, as the agent polls. Over a window of ``--duration`` seconds after
``--warmup`` seconds it counts the answers and reads the simulator processes' CPU
(psutil). One row per path:

- ``req/s``: answers received per second of window (``bad``: exception answers);
- ``sim%``: the simulator processes' CPU together, in % of one core;
- ``us/req``: simulator CPU microseconds per answered request;
- ``drv%``: the driver's CPU (so a reader can see it was no ceiling);
- ``lost``: requests sent in the window without an answer by its end.

At one read per device per second every request finds its device's register image a tick
old (``IMAGE_TICK``, 0.1 s), so ``us/req`` includes stepping the device's physics model and
encoding its image; a line under the table gives those two costs, measured in the parent
process, so a reader can tell serving from simulating.
``--loop uvloop`` runs the simulator processes on uvloop instead of asyncio's own loop.

    .venv/bin/python bench/modbus_sim.py [--devices 1000] [--rate 1] [--duration 10]
        [--warmup 3] [--paths pymodbus,lean] [--per-sim 1000] [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

# The scale bench's devices: the same profile, ports and open-file limit.
from agent_modbus import REGISTERS  # noqa: E402
from agent_scale import PROFILE_ID, _listen_ports, _profile, _raise_nofile  # noqa: E402

_REQUEST = struct.Struct(">HHHBBHH")  # MBAP + function 3, address, count


# -- the simulator role ----------------------------------------------------------------


async def _role_sim(profiles: Path, ports: list[int], lean: bool) -> None:
    from device_profiles.loader import load_profiles
    from simulators.device import SimDevice
    from simulators.modbus_server import ModbusSimServer

    prof = load_profiles([profiles])[PROFILE_ID]
    servers = [
        ModbusSimServer({1: SimDevice(prof, device_id=f"d{i}", seed=i)}, port=port, lean=lean)
        for i, port in enumerate(ports)
    ]
    for s in servers:
        await s.start()
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for s in servers:
        await s.stop()


# -- the driver role ---------------------------------------------------------------------


class _Count:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.bad = 0


class _Conn(asyncio.Protocol):
    """One device's connection: counts complete answers, normal and exception."""

    def __init__(self, count: _Count) -> None:
        self.count = count
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.tid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 8:
            end = 6 + int.from_bytes(buf[4:6], "big")
            if len(buf) < end:
                break
            if buf[7] & 0x80:
                self.count.bad += 1
            else:
                self.count.ok += 1
            del buf[:end]

    def send(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.tid = (self.tid + 1) & 0xFFFF
            self.transport.write(_REQUEST.pack(self.tid, 0, 6, 1, 3, 0, REGISTERS))
            self.count.sent += 1


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


async def _role_drive(ports: list[int], pids: list[int], args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    count = _Count()
    conns: list[_Conn] = []
    for port in ports:
        _, proto = await loop.create_connection(lambda: _Conn(count), "127.0.0.1", port)
        conns.append(proto)
    sims = [psutil.Process(p) for p in pids]
    me = psutil.Process()
    per_s = args.rate * len(conns)
    t0 = loop.time()
    window = (t0 + args.warmup, t0 + args.warmup + args.duration)
    marks: list[tuple[float, float, int, int, int, int]] = []
    due_sent = 0
    while True:
        now = loop.time()
        if len(marks) < 2 and now >= window[len(marks)]:
            marks.append((_cpu(sims), _cpu([me]), count.sent, count.ok, count.bad, 0))
        if len(marks) == 2:
            break
        due = int((now - t0) * per_s)
        while due_sent < due:
            conns[due_sent % len(conns)].send()
            due_sent += 1
        await asyncio.sleep(0.005)
    await asyncio.sleep(1.0)  # answers to the window's last requests
    (s0, d0, sent0, ok0, bad0, _), (s1, d1, sent1, ok1, bad1, _) = marks
    result = {
        "answered": ok1 - ok0 + bad1 - bad0,
        "bad": bad1 - bad0,
        "lost": max(0, (sent1 - sent0) - (count.ok + count.bad - ok0 - bad0)),
        "sim_cpu": s1 - s0,
        "drv_cpu": d1 - d0,
    }
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    print(json.dumps(result), flush=True)


# -- the parent ------------------------------------------------------------------------


def _start_sims(
    me: list[str], profiles: Path, ports: list[int], args: argparse.Namespace, path: str
) -> list[subprocess.Popen[str]]:
    procs: list[subprocess.Popen[str]] = []
    for i in range(0, len(ports), args.per_sim):
        chunk = ",".join(map(str, ports[i : i + args.per_sim]))
        cmd = [*me, "--role", "sim", "--path", path, "--loop", args.loop]
        procs.append(
            subprocess.Popen(
                [*cmd, "--profiles", str(profiles), "--ports", chunk],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            _stop(procs)
            sys.exit("a simulator process did not start")
    return procs


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the simulator stops when its stdin closes
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _row(me: list[str], profiles: Path, args: argparse.Namespace, path: str) -> dict[str, Any]:
    ports = _listen_ports(args.devices)
    sims = _start_sims(me, profiles, ports, args, path)
    try:
        cmd = [*me, "--role", "drive", "--ports", ",".join(map(str, ports))]
        cmd += ["--pids", ",".join(str(p.pid) for p in sims)]
        cmd += ["--rate", str(args.rate), "--duration", str(args.duration)]
        cmd += ["--warmup", str(args.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"the driver failed: {out.stderr.strip()}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        _stop(sims)
    result["path"] = path
    return result


def _print(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"devices={args.devices} rate={args.rate}/s per device duration={args.duration}s "
        f"per-sim={args.per_sim} loop={args.loop} load={_load()}"
    )
    print(f"{'path':<9}{'req/s':>9}{'bad':>6}{'sim%':>7}{'us/req':>8}{'drv%':>7}{'lost':>7}")
    for r in rows:
        answered = r["answered"]
        us = r["sim_cpu"] / answered * 1e6 if answered else math.nan
        print(
            f"{r['path']:<9}{answered / args.duration:>9.0f}{r['bad']:>6}"
            f"{r['sim_cpu'] / args.duration * 100:>7.1f}{us:>8.1f}"
            f"{r['drv_cpu'] / args.duration * 100:>7.1f}{r['lost']:>7}"
        )


def _image_cost(profiles: Path, n: int = 2000) -> str:
    """In this process: µs to step one device's model, to encode its image, and to encode
    the 40 registers as the pymodbus path does on every read, with time moving 1 s a call.
    """
    from device_profiles.loader import load_profiles
    from protocols.modbus.profile import ModbusTable
    from simulators.device import SimDevice
    from simulators.modbus_server import RegisterImage

    prof = load_profiles([profiles])[PROFILE_ID]
    now = [0.0]
    device = SimDevice(prof, device_id="d", seed=1, clock=lambda: now[0])
    image = RegisterImage(device)

    def timed(call: Any) -> float:
        t = time.process_time()
        for _ in range(n):
            now[0] += 1.0
            call()
        return (time.process_time() - t) / n * 1e6

    step = timed(device.values)
    both = timed(lambda: image.table(ModbusTable.HOLDING))
    old = timed(lambda: image.read(ModbusTable.HOLDING, 0, REGISTERS))
    return (
        f"per device tick: model step {step:.1f} us, + encoding its image {both - step:.1f} us; "
        f"the pymodbus path's step + encode per read: {old:.1f} us"
    )


def _load() -> str:
    one, five, _ = psutil.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1.0, help="Reads per device per second.")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--paths", default="pymodbus,lean")
    ap.add_argument("--per-sim", type=int, default=1000, help="Devices per simulator process.")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    ap.add_argument("--role", choices=["parent", "sim", "drive"], default="parent")
    ap.add_argument("--path", choices=["pymodbus", "lean"], default="lean")
    ap.add_argument("--profiles", type=Path)
    ap.add_argument("--ports", default="")
    ap.add_argument("--pids", default="")
    args = ap.parse_args()
    _raise_nofile()
    ports = [int(p) for p in args.ports.split(",") if p]
    if args.role == "sim":
        sim = _role_sim(args.profiles, ports, args.path == "lean")
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(sim)
        else:
            asyncio.run(sim)
        return
    if args.role == "drive":
        pids = [int(p) for p in args.pids.split(",") if p]
        asyncio.run(_role_drive(ports, pids, args))
        return
    me = [sys.executable, str(Path(__file__).resolve())]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="iiot-bench-") as tmp:
        profiles = Path(tmp) / "profiles"
        profiles.mkdir()
        (profiles / f"{PROFILE_ID}.yaml").write_text(yaml.safe_dump(_profile()))
        for path in args.paths.split(","):
            t = time.monotonic()
            print(f"{time.strftime('%H:%M:%S')} {path}: running", file=sys.stderr, flush=True)
            rows.append(_row(me, profiles, args, path))
            print(f"  done in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        cost = _image_cost(profiles)
    _print(rows, args)
    print(cost)


if __name__ == "__main__":
    main()
