"""Edge agent at scale over Modbus TCP, run as a user runs it, beside a bare pymodbus loop.

For each N of ``--devices``: N simulated Modbus TCP devices of 40 holding registers, spread
over simulator processes of ``--per-sim`` devices each; Mosquitto on a free loopback port;
the agent started as a user starts it (``python -m iiot agent run -c agent.yaml``, logging
JSON lines; the generated config maps every register as one uint16 point with a scale, so
one poll is 40 datapoints, polls every device every second, keeps the spool in a temporary
folder and has the ``/metrics`` endpoint on); and an MQTT subscriber in a process of its
own, so its CPU is not the agent's. One row per N:

- ``deliv/off``: datapoints of the samples whose ``ts`` falls in the window (each
  (device, seq) counted once), against N·40 per second of window;
- the agent's CPU (% of one core, psutil), µs of agent CPU per delivered datapoint, peak RSS;
- publish lag p50/p99: the subscriber's receive time minus the sample's ``ts``;
- ``first_s``: from starting the agent's process to the first data message (target < 5 s);
- ``sim%``: the simulator processes' CPU together (a reader can see they are no ceiling);
- the same N polled by ``bench/agent_modbus.py``'s bare pymodbus async loop, in the same
  run: its CPU %, µs per register read, and agent/bare CPU per datapoint;
- ``failed``: the agent's polls that failed in the window (``iiot_agent_polls_total``
  with a result other than ok, read from ``/metrics`` a second before the window and
  right after it);
- ``load``: the machine's 1-minute load average at the start and end of the row.

A line under each row adds the agent's CPU seconds until its first data, the subscriber's
CPU, duplicates and seq gaps seen, the agent's skipped ticks (polls not started because
one overran), the CPU pressure (Linux PSI: the share of time some task waited for a CPU;
near 100 % the machine is shared and every figure is an upper bound), the share of the
offered registers the bare loop read and the simulators' CPU meanwhile, the scrapes, and
what went wrong.

The window begins ``--warmup`` seconds after the first data message; samples of the window
are counted until none has arrived for a second (at most ``--drain`` s after its end).
With ``--scrape-every S`` a thread GETs ``/metrics`` every S s during the window, as
Prometheus would; a line under the row gives their number, size and time. ``--shape
batch`` (the default) sets ``mqtt.batch: true``: messages of several devices' samples on
``iiot/v1/{ent}/{agent}/batch``; ``--shape device`` leaves it off: messages per device on
``iiot/v1/{ent}/{agent}/{device}/data``. The subscriber counts either shape. Progress goes
to stderr, the table to stdout. The bench raises its own processes' open-file limit to the
hard limit; the agent gets the limit the bench was started with, as from the user's shell.

    .venv/bin/python bench/agent_scale.py [--devices 200,1000,2000,5000] [--duration 30]
        [--warmup 5] [--shape batch|device] [--scrape-every 5] [--no-bare] [--per-sim 500]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import queue
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import agent_modbus as am  # noqa: E402

from edge_agent.runtime import LoopKind, run_on  # noqa: E402
from iiot_common.localservers import Mosquitto, ephemeral_low  # noqa: E402

PROFILE_ID = "bench-40u16"
ENTERPRISE = "bench"
AGENT_ID = "bench-agent"
INTERVAL = 1.0  # seconds between polls of one device
_FIRST_DATA_TIMEOUT = 120.0
_METRICS_TIMEOUT = 120.0  # an overloaded agent renders /metrics slowly; the count waits
_QUIET = 1.0  # seconds without a new sample of the window before it counts as complete
_MIN_DRAIN = 2.0  # seconds after the window before that quiet counts
_NOFILE_START = resource.getrlimit(resource.RLIMIT_NOFILE)


def _raise_nofile() -> None:
    """Soft open-file limit up to the hard one: 5,000 devices are 10,000 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _user_nofile() -> None:
    """In the agent's child: the limit the bench was started with, as a user's shell gives."""
    resource.setrlimit(resource.RLIMIT_NOFILE, _NOFILE_START)


def _listen_ports(n: int, avoid: set[int] | None = None) -> list[int]:
    """``n`` free TCP ports below the ephemeral range, which no outgoing connection takes."""
    low = ephemeral_low()
    first = 10000 if low - 10000 > 2 * n else 1024
    ports: list[int] = []
    start = random.randrange(first, low)
    for port in [*range(start, low), *range(first, start)]:
        if avoid and port in avoid:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            ports.append(port)
            if len(ports) == n:
                return ports
    sys.exit(f"fewer than {n} free ports between {first} and {low}")


def _cpu_pressure() -> float:
    """Share of the last 10 s in which some task waited for a CPU (Linux PSI), in %."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return math.nan
    return float(line.split()[1].removeprefix("avg10="))


def _say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _profile() -> dict[str, Any]:
    """40 uint16 points with a scale, one per holding register, as a user maps a meter."""
    points = [
        {
            "name": f"r{i:02d}",
            "type": "uint16",
            "scale": 0.1,
            "range": [0, 6000],
            "modbus": {"table": "holding", "address": i},
        }
        for i in range(am.REGISTERS)
    ]
    name = "Benchmark meter, 40 registers"
    return {**am._profile(), "id": PROFILE_ID, "name": name, "points": points}


# -- the subscriber role ---------------------------------------------------------------


class _Counter:
    """Samples received, each (device, seq) once: (ts ms, receive ms, datapoints)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[tuple[str, int]] = set()
        self.samples: list[tuple[int, float, int]] = []
        self.messages = 0
        self.duplicates = 0
        self.bad = 0
        self.first: float | None = None
        self.first_seen = threading.Event()

    def on_message(self, topic: str, payload: bytes | bytearray) -> None:
        import orjson

        now = time.time() * 1000
        try:
            doc = orjson.loads(payload)
            if topic.endswith("/batch"):
                per_device = list(doc["devices"].items())
            else:
                per_device = [(topic.split("/")[4], doc)]
            with self.lock:
                self.messages += 1
                for device, msg in per_device:
                    for i, s in enumerate(msg["samples"]):
                        key = (device, msg["seq"] + i)
                        if key in self.seen:
                            self.duplicates += 1
                            continue
                        self.seen.add(key)
                        self.samples.append((s["ts"], now, len(s.get("values", {}))))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, IndexError):
            self.bad += 1
            return
        if self.first is None:
            self.first = now
            self.first_seen.set()

    def gaps(self) -> int:
        """Samples missing between the first and last seq received of each device."""
        with self.lock:
            keys = list(self.seen)
        span: dict[str, tuple[int, int, int]] = {}
        for device, seq in keys:
            lo, hi, n = span.get(device, (seq, seq, 0))
            span[device] = (min(lo, seq), max(hi, seq), n + 1)
        return sum(hi - lo + 1 - n for lo, hi, n in span.values())

    def in_window(self, w0: float, w1: float) -> list[tuple[int, float, int]]:
        with self.lock:
            return [s for s in self.samples if w0 <= s[0] < w1]


def _role_sub(mqtt_port: int, max_drain: float) -> None:
    """Count data messages of both shapes; answer ``REPORT w0 w1`` (epoch ms) on stdin."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    counter = _Counter()
    subscribed = threading.Event()
    base = f"iiot/v1/{ENTERPRISE}/{AGENT_ID}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(
        [(f"{base}/+/data", 1), (f"{base}/batch", 1)]
    )
    client.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
    client.on_message = lambda c, u, m: counter.on_message(m.topic, m.payload)
    client.connect("127.0.0.1", mqtt_port)
    client.loop_start()
    if not subscribed.wait(10):
        sys.exit("subscriber: no SUBACK")
    print("READY", flush=True)

    def say_first() -> None:
        counter.first_seen.wait()
        print(f"FIRST {counter.first}", flush=True)

    threading.Thread(target=say_first, daemon=True).start()
    for line in sys.stdin:
        if line.startswith("REPORT"):
            w0, w1 = (float(x) for x in line.split()[1:3])
            print(json.dumps(_report(counter, w0, w1, max_drain)), flush=True)
            break
    client.disconnect()
    client.loop_stop()


def _report(counter: _Counter, w0: float, w1: float, max_drain: float) -> dict[str, Any]:
    """Once the window's samples stop arriving: their datapoints and lag percentiles."""
    deadline = w1 + max_drain * 1000
    last, last_change = -1, time.monotonic()
    while time.time() * 1000 < deadline:
        n = len(counter.in_window(w0, w1))
        if n != last:
            last, last_change = n, time.monotonic()
        elif (
            time.time() * 1000 > w1 + _MIN_DRAIN * 1000 and time.monotonic() - last_change >= _QUIET
        ):
            break
        time.sleep(0.1)
    window = [s for s in counter.in_window(w0, w1) if s[1] <= deadline]
    lags = [recv - ts for ts, recv, _ in window]
    return {
        "samples": len(window),
        "dp": sum(n for _, _, n in window),
        "lag_p50": am._pct(lags, 0.5),
        "lag_p99": am._pct(lags, 0.99),
        "gaps": counter.gaps(),
        "messages": counter.messages,
        "duplicates": counter.duplicates,
        "bad": counter.bad,
    }


# -- the parent ------------------------------------------------------------------------


@dataclass
class _Row:
    devices: int
    wall: float = 0.0  # the window's length, seconds
    offered: float = 0.0  # datapoints the window asked for
    delivered: int = 0
    cpu_pct: float = math.nan
    rss_mb: float = math.nan
    lag_p50: float = math.nan
    lag_p99: float = math.nan
    first_s: float = math.nan
    first_cpu: float = math.nan  # the agent's CPU seconds until then
    sim_pct: float = math.nan
    sub_pct: float = math.nan
    failed: int = -1  # -1: not known
    skipped: int = -1
    load: tuple[float, float] = (math.nan, math.nan)
    pressure: tuple[float, float] = (math.nan, math.nan)
    bare_pct: float = math.nan
    bare_us: float = math.nan
    bare_sim_pct: float = math.nan
    bare_ratio: float = math.nan  # registers read / offered
    scrapes: list[tuple[int, float]] = field(default_factory=list)
    duplicates: int = 0
    gaps: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.delivered / self.offered if self.offered else math.nan

    @property
    def us_per_dp(self) -> float:
        cpu_s = self.cpu_pct / 100 * self.wall
        return 1e6 * cpu_s / self.delivered if self.delivered else math.nan


_COLUMNS = [
    ("N", 6, "{:d}"),
    ("offered/s", 10, "{:.0f}"),
    ("deliv/off", 10, "{:.4f}"),
    ("CPU%", 7, "{:.1f}"),
    ("µs/dp", 7, "{:.2f}"),
    ("RSS_MB", 7, "{:.0f}"),
    ("lag_p50", 8, "{:.0f}"),
    ("lag_p99", 8, "{:.0f}"),
    ("first_s", 8, "{:.2f}"),
    ("sim%", 7, "{:.0f}"),
    ("bare%", 7, "{:.1f}"),
    ("bare_µs/dp", 11, "{:.2f}"),
    ("agent/bare", 11, "{:.2f}"),
    ("failed", 7, "{:d}"),
    ("load", 12, "{}"),
]


def _header() -> str:
    return "".join(f"{name:>{width}}" for name, width, _ in _COLUMNS)


def _line(r: _Row) -> str:
    load = f"{r.load[0]:.1f}->{r.load[1]:.1f}"
    values = [
        r.devices, r.devices * am.REGISTERS / INTERVAL, r.ratio, r.cpu_pct, r.us_per_dp,
        r.rss_mb, r.lag_p50, r.lag_p99, r.first_s, r.sim_pct, r.bare_pct, r.bare_us,
        r.us_per_dp / r.bare_us, r.failed, load,
    ]  # fmt: skip
    cells = []
    for (_, width, fmt), v in zip(_COLUMNS, values, strict=True):
        unknown = v < 0 if isinstance(v, int) else isinstance(v, float) and math.isnan(v)
        text = "-" if unknown else fmt.format(v)
        cells.append(f"{text:>{width}}")
    return "".join(cells)


def _details(r: _Row) -> str:
    parts = [
        f"agent CPU to first data {r.first_cpu:.2f} s",
        f"subscriber CPU {r.sub_pct:.0f} %",
        f"duplicates {r.duplicates}",
        f"seq gaps {r.gaps}",
    ]
    if r.skipped >= 0:
        parts.append(f"skipped ticks {r.skipped}")
    if not math.isnan(r.pressure[0]):
        parts.append(f"CPU pressure {r.pressure[0]:.0f}->{r.pressure[1]:.0f} %")
    if not math.isnan(r.bare_sim_pct):
        parts.append(f"bare read {r.bare_ratio:.4f} of the offered registers")
        parts.append(f"simulators during bare {r.bare_sim_pct:.0f} %")
    if r.scrapes:
        sizes = [b for b, _ in r.scrapes if b] or [0]
        times = sorted(s * 1000 for _, s in r.scrapes)
        failed = sum(1 for b, _ in r.scrapes if not b)
        parts.append(
            f"{len(r.scrapes)} scrapes ({failed} failed) of {min(sizes) / 1024:.0f}-"
            f"{max(sizes) / 1024:.0f} KB, p50 {am._pct(times, 0.5):.0f} ms, "
            f"max {times[-1]:.0f} ms"
        )
    parts += r.notes
    return f"{'':6}  " + "; ".join(parts)


class _Lines:
    """A child's stdout lines, read by a thread so that the parent can wait with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._q.put(line.strip())
        self._q.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str | None:
        """The next line starting with ``prefix``; None at end of output or on timeout."""
        deadline = time.monotonic() + timeout
        while not self._ended and (left := deadline - time.monotonic()) > 0:
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                self._ended = True
                return None
            if line.startswith(prefix):
                return line
        return None


class _PeakRss:
    """Samples one process's resident set size every 0.2 s until stopped."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self._proc.memory_info().rss)
            if self._stop.wait(0.2):
                return

    def stop(self) -> float:
        """Stop sampling; the peak in MB."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def _poll_counts(metrics_port: int) -> tuple[int, int] | None:
    """(failed polls, skipped ticks) so far, from the agent's ``/metrics``; None: no answer."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=_METRICS_TIMEOUT) as r:
            text = r.read().decode()
    except OSError:
        return None
    failed = skipped = 0.0
    for line in text.splitlines():
        if line.startswith("iiot_agent_polls_total{") and 'result="ok"' not in line:
            failed += float(line.rsplit(" ", 1)[1])
        elif line.startswith("iiot_agent_skipped_ticks_total{"):
            skipped += float(line.rsplit(" ", 1)[1])
    return int(failed), int(skipped)


class _Sims:
    """The simulator processes of one row, ``per`` devices each."""

    def __init__(self, me: list[str], profiles: Path, ports: list[int], per: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        for i in range(0, len(ports), per):
            chunk = ",".join(map(str, ports[i : i + per]))
            self.procs.append(
                subprocess.Popen(
                    [*me, "--role", "sim", "--profiles", str(profiles), "--ports", chunk],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in self.procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                self.stop()
                sys.exit("a simulator process did not start")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()  # the simulator stops when its stdin closes
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _agent_config(
    work: Path, ports: list[int], mqtt_port: int, metrics_port: int, shape: str
) -> Path:
    mqtt: dict[str, Any] = {"url": f"mqtt://127.0.0.1:{mqtt_port}"}
    if shape == "batch":
        mqtt["batch"] = True
    config = {
        "agent_id": AGENT_ID,
        "enterprise": ENTERPRISE,
        "data_dir": str(work / "agent-data"),
        "profiles": [str(work.parent / "profiles")],
        "mqtt": mqtt,
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "devices": [
            {
                "id": f"meter-{i:05d}",
                "profile": PROFILE_ID,
                "poll_interval": INTERVAL,
                "modbus": {"host": "127.0.0.1", "port": p},
            }
            for i, p in enumerate(ports)
        ],
    }
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _log_note(log: Path) -> str:
    """What the agent's log (JSON lines) says went wrong, most frequent first."""
    text = log.read_text(errors="replace") if log.exists() else ""
    if "Too many open files" in text:
        return "agent: Too many open files"
    seen: collections.Counter[str] = collections.Counter()
    other: list[str] = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            other.append(line)  # not a log record: a traceback, or typer's own message
            continue
        if isinstance(doc, dict) and doc.get("level") in ("warning", "error", "critical"):
            reason = f" ({doc['reason']})" if "reason" in doc else ""
            seen[f"{doc.get('msg')}{reason}"] += 1
    # The first lines say why (a config error names the key), a traceback ends with it.
    found = [f"{n}x {msg}" for msg, n in seen.most_common(3)] + other[:3] + other[3:][-1:]
    return "agent log: " + (" | ".join(found) or "nothing logged")


def _stop(proc: subprocess.Popen[Any], grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _window(
    row: _Row, args: argparse.Namespace, agent: int, sims: list[int], sub: int, metrics: int
) -> tuple[float, float]:
    """The steady window: the agent's, simulators' and subscriber's CPU, failed polls, scrapes."""
    procs = [[psutil.Process(agent)], [psutil.Process(p) for p in sims], [psutil.Process(sub)]]
    counts0 = _poll_counts(metrics)
    # A long scrape holds polls back; those would all land early in the window.
    time.sleep(INTERVAL)
    cpu0 = [am._cpu_seconds(p) for p in procs]
    w0 = time.time()
    stop = threading.Event()
    scraper = threading.Thread(
        target=am._scrape,
        args=(f"http://127.0.0.1:{metrics}/metrics", args.scrape_every, stop, row.scrapes),
        daemon=True,
    )
    if args.scrape_every > 0:
        scraper.start()
    time.sleep(args.duration)
    w1 = time.time()
    cpu1 = [am._cpu_seconds(p) for p in procs]
    stop.set()
    counts1 = _poll_counts(metrics)
    if scraper.is_alive():
        scraper.join(30)
    row.wall = wall = w1 - w0
    row.cpu_pct, row.sim_pct, row.sub_pct = (
        100 * (b - a) / wall for a, b in zip(cpu0, cpu1, strict=True)
    )
    if counts0 is None or counts1 is None:
        row.notes.append(
            f"/metrics gave no answer within {_METRICS_TIMEOUT:.0f} s: polls not counted"
        )
    else:
        row.failed, row.skipped = counts1[0] - counts0[0], counts1[1] - counts0[1]
    row.offered = row.devices * am.REGISTERS * wall / INTERVAL
    return w0, w1


def _run_agent(
    row: _Row, args: argparse.Namespace, me: list[str], work: Path, ports: list[int], sims: _Sims
) -> None:
    """The agent over the row's devices, counted by the subscriber; fills ``row``."""
    (work / "broker").mkdir()
    broker = Mosquitto(work / "broker").start()
    sub = subprocess.Popen(
        [*me, "--role", "sub", "--mqtt-port", str(broker.port), "--drain", str(args.drain)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdin is not None and sub.stdout is not None
    lines = _Lines(sub.stdout)
    log = work / "agent.log"
    try:
        if lines.wait_for("READY", 30) is None:
            row.notes.append("the subscriber did not start")
            return
        metrics = _listen_ports(1, avoid=set(ports))[0]
        config = _agent_config(work, ports, broker.port, metrics, args.shape)
        cmd = [sys.executable, "-m", "iiot", "--log-format", "json", "agent", "run", "-c"]
        cmd.append(str(config))
        t_start = time.time()
        with log.open("wb") as out:
            agent = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=work,
                preexec_fn=_user_nofile,
            )
        rss = _PeakRss(agent.pid)
        try:
            first = None
            deadline = time.monotonic() + _FIRST_DATA_TIMEOUT
            while first is None and agent.poll() is None and time.monotonic() < deadline:
                first = lines.wait_for("FIRST", 0.5)
            if first is None:
                code = agent.poll()
                gone = f"the agent exited ({code})" if code is not None else ""
                row.notes += [gone or f"no data within {_FIRST_DATA_TIMEOUT:.0f} s", _log_note(log)]
                return
            row.first_s = float(first.split()[1]) / 1000 - t_start
            row.first_cpu = am._cpu_seconds([psutil.Process(agent.pid)])
            _say(f"  first data {row.first_s:.2f} s after the agent started; warm-up")
            time.sleep(args.warmup)
            _say(f"  window of {args.duration:.0f} s")
            w0, w1 = _window(row, args, agent.pid, sims.pids, sub.pid, metrics)
            _say("  counting the window's samples")
            sub.stdin.write(f"REPORT {w0 * 1000:.0f} {w1 * 1000:.0f}\n")
            sub.stdin.flush()
            report = lines.wait_for("{", args.drain + 60)
            if report is None:
                row.notes.append("the subscriber gave no report")
                return
            rep = json.loads(report)
            row.delivered, row.duplicates, row.gaps = rep["dp"], rep["duplicates"], rep["gaps"]
            row.lag_p50, row.lag_p99 = rep["lag_p50"], rep["lag_p99"]
            if agent.poll() is not None or row.ratio < 0.99:
                row.notes.append(_log_note(log))
        finally:
            _stop(agent, 60)
            row.rss_mb = rss.stop()
    finally:
        _stop(sub, 10)
        broker.stop()


def _run_bare(
    row: _Row, args: argparse.Namespace, me: list[str], ports: list[int], sims: _Sims
) -> None:
    """``bench/agent_modbus.py``'s bare pymodbus loop over the same devices."""
    cmd = [*me, "--role", "bare", "--ports", ",".join(map(str, ports)),
           "--duration", str(args.duration)]  # fmt: skip
    r = am._measure(cmd, args.duration, sims.pids)
    reads = r["polls"] * am.REGISTERS
    row.bare_pct = r["cpu_pct"]
    row.bare_us = 1e6 * r["cpu_pct"] / 100 * r["wall"] / reads if reads else math.nan
    row.bare_sim_pct = r["sim_cpu_pct"]
    row.bare_ratio = reads / (row.devices * am.REGISTERS * r["wall"] / INTERVAL)
    _say(f"  bare loop read {row.bare_ratio:.4f} of the registers offered")


def _row(n: int, args: argparse.Namespace, me: list[str], base: Path) -> _Row:
    row = _Row(devices=n)
    load0, pressure0 = os.getloadavg()[0], _cpu_pressure()
    work = Path(tempfile.mkdtemp(prefix=f"n{n}-", dir=base))
    ports = _listen_ports(n)
    sims_n = math.ceil(n / args.per_sim)
    _say(f"N={n}: {n * am.REGISTERS} datapoints/s offered; {sims_n} simulator process(es)")
    t = time.monotonic()
    sims = _Sims(me, base / "profiles", ports, args.per_sim)
    try:
        _say(f"  simulators up in {time.monotonic() - t:.1f} s; starting the agent ({args.shape})")
        _run_agent(row, args, me, work, ports, sims)
        if not args.no_bare:
            _say("  the bare pymodbus loop over the same devices")
            _run_bare(row, args, me, ports, sims)
    finally:
        sims.stop()
    row.load = (load0, os.getloadavg()[0])
    row.pressure = (pressure0, _cpu_pressure())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="200,1000,2000,5000", help="Comma-separated Ns.")
    ap.add_argument("--duration", type=float, default=30.0, help="Steady window, seconds.")
    ap.add_argument("--warmup", type=float, default=5.0, help="Seconds after the first data.")
    ap.add_argument("--drain", type=float, default=10.0, help="Longest wait for late samples.")
    ap.add_argument(
        "--shape",
        choices=["device", "batch"],
        default="batch",
        help="batch: mqtt.batch: true (several devices a message); device: one device a message.",
    )
    ap.add_argument("--scrape-every", type=float, default=0.0, help="Scrape /metrics (s).")
    ap.add_argument("--no-bare", action="store_true", help="Skip the bare pymodbus loop.")
    ap.add_argument("--per-sim", type=int, default=500, help="Devices per simulator process.")
    ap.add_argument("--role", choices=["parent", "sim", "sub", "bare"], default="parent")
    ap.add_argument("--profiles", type=Path)
    ap.add_argument("--ports", default="")
    ap.add_argument("--mqtt-port", type=int)
    args = ap.parse_args()
    _raise_nofile()
    ports = [int(p) for p in args.ports.split(",") if p]
    if args.role == "sim":
        run_on(LoopKind.UVLOOP, am._role_sim(args.profiles, ports, PROFILE_ID))
        return
    if args.role == "bare":
        # pymodbus logs every timeout with a hex dump; the row counts them instead.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        run_on(LoopKind.UVLOOP, am._role_bare(ports, args.duration, INTERVAL))  # as the agent runs
        return
    if args.role == "sub":
        _role_sub(args.mqtt_port, args.drain)
        return
    me = [sys.executable, str(Path(__file__).resolve())]
    ns = [int(x) for x in args.devices.split(",") if x]
    print(
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; shape {args.shape}; "
        f"{am.REGISTERS} uint16 points per device, every {INTERVAL:.0f} s; window "
        f"{args.duration:.0f} s after {args.warmup:.0f} s warm-up; lag in ms",
        flush=True,
    )
    print(_header(), flush=True)
    rows: list[_Row] = []
    with tempfile.TemporaryDirectory(prefix="iiot-bench-scale-") as tmp:
        base = Path(tmp)
        (base / "profiles").mkdir()
        (base / "profiles" / f"{PROFILE_ID}.yaml").write_text(yaml.safe_dump(_profile()))
        for n in ns:
            row = _row(n, args, me, base)
            rows.append(row)
            print(_line(row), flush=True)
            print(_details(row), flush=True)
    if len(rows) > 1:
        print("\n" + _header())
        for row in rows:
            print(_line(row))


if __name__ == "__main__":
    main()
