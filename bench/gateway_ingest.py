"""Gateway ingest throughput and latency against a bare MQTT subscriber on the same broker.

Starts Mosquitto and victoria-metrics on free loopback ports, then in one run:

1. baseline: publisher processes send a steady QoS 1 load for ``--raw-seconds`` to a
   bare paho subscriber (auto-ack, counts messages): the broker's raw rate here;
2. gateway: the same load for ``--seconds`` to ``iiot``'s gateway running in a
   subprocess (real registry, outbox, writer to victoria-metrics).

Prints sustained points/s written to victoria-metrics, end-to-end latency p50/p99
(sample timestamp = publish time → the write that carried it was acknowledged by the
database), gateway CPU% and peak RSS, the raw subscriber's rate and the ratio.

Everything (publishers, broker, database, gateway) shares the machine, so on two cores
the load generator competes with the gateway for CPU. The raw subscriber can only
reach the offered rate: raise ``--rate`` to find either ceiling. When the gateway falls
behind, the test broker's per-client queue (``max_queued_messages 100000``) overflows
and Mosquitto drops the excess; the last line then reports INCOMPLETE.

    .venv/bin/python bench/gateway_ingest.py [--rate 100000] [--seconds 30] [--batch N]

``--batch N`` sends the agent-level batch shape instead: N devices' samples per message
on ``iiot/v1/{enterprise}/{agent}/batch``, as an agent with ``mqtt.batch`` does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENTERPRISE = "bench-ent"
_TOKEN = "bench-platform-token"


# -- publisher processes ---------------------------------------------------------------


def _publisher(
    port: int,
    index: int,
    rate_msgs: float,
    points: int,
    devices: int,
    start_at: float,
    stop_at: float,
    result: Any,
    batch: int = 1,
) -> None:
    """Publish ``rate_msgs`` samples/s (QoS 1) between two wall-clock instants.

    With ``batch`` > 1, ``batch`` devices' samples go in one batch message.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    agent = f"bench-agent-{index}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}-{os.getpid()}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    topics = [f"iiot/v1/{ENTERPRISE}/{agent}/dev-{index}-{d}/data" for d in range(devices)]
    batch_topic = f"iiot/v1/{ENTERPRISE}/{agent}/batch"
    parts: list[str] = []
    seqs = [0] * devices
    # Pre-encoded value sets keep the load generator cheap, leaving the CPU to the gateway.
    value_sets = [
        json.dumps({f"p{i}": round(v * 0.37 + i * 1.5, 3) for i in range(points)})
        for v in range(16)
    ]
    sent = 0
    while time.time() < start_at:
        time.sleep(0.005)
    last_ts = [0] * devices
    t0 = time.time()
    # Pace in 10 ms slices; if the broker pushes back the achieved rate is lower.
    while True:
        now = time.time()
        if now >= stop_at:
            break
        due = int((now - t0) * rate_msgs)
        ts = int(now * 1000)
        while sent < due:
            d = sent % devices
            # A time-series database keeps one sample per series and timestamp, and a real
            # device is never polled twice in a millisecond: keep each device's ts rising.
            ts_d = last_ts[d] = max(ts, last_ts[d] + 1)
            body = (
                f'{{"seq":{seqs[d]},"samples":[{{"ts":{ts_d},"values":{value_sets[sent & 15]}}}]}}'
            )
            seqs[d] += 1
            sent += 1
            if batch <= 1:
                client.publish(topics[d], body, qos=1)
                continue
            parts.append(f'"dev-{index}-{d}":{body}')
            if len(parts) == batch or sent % devices == 0:  # a device once per message
                client.publish(batch_topic, '{"devices":{' + ",".join(parts) + "}}", qos=1)
                parts = []
        time.sleep(0.01)
    if parts:
        client.publish(batch_topic, '{"devices":{' + ",".join(parts) + "}}", qos=1)
    # Let outstanding QoS 1 handshakes finish before leaving.
    deadline = time.time() + 10
    while client._out_messages and time.time() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    result.put((index, sent, time.time() - t0))


def _raw_subscriber(port: int, ready: Any, result: Any, stop_at: float) -> None:
    """A bare paho subscriber: QoS 1, auto-ack, counts samples (one per "seq")."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    count = [0]
    first: list[float] = []
    last = [0.0]

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        if not first:
            first.append(time.time())
        count[0] += m.payload.count(b'"seq":')
        last[0] = time.time()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw-sub")
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe("iiot/v1/#", qos=1)
    client.loop_start()
    time.sleep(0.5)
    ready.set()
    while time.time() < stop_at + 3:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    span = (last[0] - first[0]) if first else 0.0
    result.put((count[0], span))


# -- gateway child ---------------------------------------------------------------------


def _gateway_child(config_path: str, out_path: str) -> None:
    """Run the gateway in this process, recording write latencies, until SIGTERM."""
    from gateway.config import load_gateway_config
    from gateway.outbox import OutboxBatch
    from gateway.service import Gateway
    from iiot_common.log import setup_logging

    setup_logging("warning")
    cfg = load_gateway_config(config_path)
    gw = Gateway(cfg)
    lat: list[float] = []
    writes: list[tuple[float, int]] = []

    def on_written(batch: OutboxBatch, done: float) -> None:
        now_ms = done * 1000
        lines = batch.body.split("\n")
        # Every 10th line is plenty for percentiles and keeps the hook cheap.
        for line in lines[::10]:
            if line.startswith("telemetry,"):
                lat.append((now_ms - int(line.rsplit(" ", 1)[1])) / 1000)
        writes.append((done, batch.lines))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    gw.start()
    assert gw.writer is not None
    gw.writer.on_written = on_written
    while not stop.wait(0.2):
        pass
    gw.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(out_path).write_text(
        json.dumps(
            {
                "latencies": lat,
                "writes": writes,
                "maxrss_kb": usage.ru_maxrss,
                "cpu_s": usage.ru_utime + usage.ru_stime,
            }
        )
    )


# -- orchestration ---------------------------------------------------------------------


def _prepare_registry(data_dir: Path, publishers: int) -> None:
    from gateway.registry import Registry

    data_dir.mkdir(parents=True, exist_ok=True)
    reg = Registry(f"sqlite:///{data_dir / 'registry.db'}")
    reg.add_enterprise(ENTERPRISE, "Bench Works", "130102", "C30")
    for i in range(publishers):
        reg.add_agent(ENTERPRISE, f"bench-agent-{i}", None)
    reg.close()


def _run_publishers(
    port: int, args: argparse.Namespace, start_at: float, stop_at: float
) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    result: Any = ctx.Queue()
    per = args.rate / args.points / args.publishers
    procs = [
        ctx.Process(
            target=_publisher,
            args=(port, i, per, args.points, args.devices, start_at, stop_at, result, args.batch),
        )
        for i in range(args.publishers)
    ]
    for p in procs:
        p.start()
    sent = 0
    span = 0.0
    for _ in procs:
        _, n, s = result.get(timeout=stop_at - time.time() + 60)
        sent += n
        span = max(span, s)
    for p in procs:
        p.join(10)
    return sent, span


def _metric(api_port: int, name: str) -> float:
    req = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/metrics", headers={"Authorization": f"Bearer {_TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _wait_written(api_port: int, published: int, timeout: float) -> float | None:
    """Seconds until every published sample is written, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            taken = _metric(api_port, "iiot_gateway_samples_total")
            pending = _metric(api_port, "iiot_gateway_outbox_lines")
        except OSError:
            taken, pending = 0.0, 1.0
        if taken >= published and pending == 0:
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _vm_count(url: str) -> int:
    """Values stored for point p0 (one per message), read back through the export API."""
    with urllib.request.urlopen(f"{url}/internal/force_flush", timeout=10):
        pass
    q = urllib.parse.urlencode({"match[]": "telemetry_p0"})
    total = 0
    with urllib.request.urlopen(f"{url}/api/v1/export?{q}", timeout=60) as r:
        for line in r:
            if line.strip():
                total += len(json.loads(line)["values"])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=100_000, help="offered points/s")
    ap.add_argument("--points", type=int, default=20, help="points per message")
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes")
    ap.add_argument("--devices", type=int, default=50, help="devices per publisher")
    ap.add_argument("--seconds", type=float, default=30, help="gateway phase duration")
    ap.add_argument("--batch", type=int, default=1, help="devices' samples per batch message")
    ap.add_argument("--raw-seconds", type=float, default=10, help="baseline phase duration")
    ap.add_argument("--warmup", type=float, default=5, help="seconds left out of the rates")
    ap.add_argument(
        "--catch-up", type=float, default=60, help="longest wait for the backlog after publishing"
    )
    ap.add_argument("--flush-interval", type=float, default=0.2, help="writer flush_interval")
    ap.add_argument("--gateway-child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gateway_child:
        _gateway_child(*args.gateway_child)
        return

    import psutil
    import yaml

    from iiot_common.localservers import Mosquitto, VictoriaMetrics, free_port, wait_port

    with tempfile.TemporaryDirectory(prefix="iiot-bench-") as tmp:
        work = Path(tmp)
        (work / "mq").mkdir()
        (work / "vm").mkdir()
        broker = Mosquitto(work / "mq").start()
        vm = VictoriaMetrics(work / "vm").start()
        child: subprocess.Popen[bytes] | None = None
        try:
            # Phase 1: the broker's raw rate to a bare subscriber.
            ctx = mp.get_context("spawn")
            ready: Any = ctx.Event()
            raw_q: Any = ctx.Queue()
            start_at = time.time() + 2.0
            stop_at = start_at + args.raw_seconds
            sub = ctx.Process(target=_raw_subscriber, args=(broker.port, ready, raw_q, stop_at))
            sub.start()
            ready.wait(20)
            raw_sent, _ = _run_publishers(broker.port, args, start_at, stop_at)
            raw_count, raw_span = raw_q.get(timeout=60)
            sub.join(10)
            raw_msgs = raw_count / raw_span if raw_span else 0.0

            # Phase 2: the gateway in a subprocess.
            data_dir = work / "gw"
            _prepare_registry(data_dir, args.publishers)
            api_port = free_port()
            cfg = {
                "data_dir": str(data_dir),
                "mqtt": {"url": broker.url, "client_id": "bench-gateway"},
                "influx": {"url": vm.url, "flush_interval": args.flush_interval},
                "api": {"host": "127.0.0.1", "port": api_port, "platform_tokens": [_TOKEN]},
                "log_level": "warning",
            }
            cfg_path = work / "gateway.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            out_path = work / "gateway-stats.json"
            child = subprocess.Popen(
                [sys.executable, __file__, "--gateway-child", str(cfg_path), str(out_path)],
                cwd=str(ROOT),
            )
            wait_port(api_port, timeout=60)
            proc = psutil.Process(child.pid)
            start_at = time.time() + 1.0
            stop_at = start_at + args.seconds
            cpu_samples: list[tuple[float, float]] = []
            peak_rss = 0

            def watch() -> None:
                nonlocal peak_rss
                while child is not None and child.poll() is None:
                    try:
                        t = proc.cpu_times()
                        cpu_samples.append((time.time(), t.user + t.system))
                        peak_rss = max(peak_rss, proc.memory_info().rss)
                    except psutil.Error:
                        return
                    time.sleep(0.5)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            gw_sent, _ = _run_publishers(broker.port, args, start_at, stop_at)
            # Let the gateway write what the broker and the outbox still hold (bounded).
            caught_up = _wait_written(api_port, gw_sent, args.catch_up)
            child.send_signal(signal.SIGTERM)
            child.wait(60)
            child = None
            stats = json.loads(out_path.read_text())
            written_in_vm = _vm_count(vm.url)
        finally:
            if child is not None and child.poll() is None:
                child.kill()
                child.wait(10)
            broker.stop()
            vm.stop()

    # Sustained rate: lines written between warm-up and the end of publishing.
    w0, w1 = start_at + args.warmup, stop_at
    steady = sum(n for t, n in stats["writes"] if w0 <= t < w1)
    gw_points = steady * args.points / (w1 - w0)
    cpu_window = [c for c in cpu_samples if w0 <= c[0] <= w1]
    cpu_pct = (
        100 * (cpu_window[-1][1] - cpu_window[0][1]) / (cpu_window[-1][0] - cpu_window[0][0])
        if len(cpu_window) >= 2
        else float("nan")
    )
    lat = stats["latencies"]
    raw_points = raw_msgs * args.points
    print(
        f"offered load          {args.rate:,.0f} points/s ({args.points} points/sample, "
        f"{args.publishers} publishers x {args.devices} devices, "
        + (f"{args.batch} samples per batch message)" if args.batch > 1 else "one per message)")
    )
    print(
        f"raw subscriber        {raw_points:,.0f} points/s  ({raw_count:,} of {raw_sent:,} "
        f"samples in {args.raw_seconds:.0f} s)"
    )
    print(
        f"gateway sustained     {gw_points:,.0f} points/s written to victoria-metrics "
        f"(steady {args.seconds - args.warmup:.0f} s)"
    )
    print(f"ratio gateway/raw     {gw_points / raw_points if raw_points else float('nan'):.2f}")
    print(f"latency publish→write p50 {_pct(lat, 0.5):.3f} s   p99 {_pct(lat, 0.99):.3f} s")
    print(f"gateway CPU           {cpu_pct:.0f} %  (100 % = one core)")
    print(f"gateway peak RSS      {max(peak_rss, stats['maxrss_kb'] * 1024) / 2**20:.0f} MiB")
    backlog = f"{caught_up:.1f} s" if caught_up is not None else f"not within {args.catch_up:.0f} s"
    print(f"backlog after publish {backlog} to write what was still queued")
    wrote = sum(n for _, n in stats["writes"])
    print(f"gateway wrote         {wrote:,} lines (acknowledged by the write API)")
    print(
        f"published / in VM     {gw_sent:,} samples / {written_in_vm:,} lines "
        f"({'complete' if written_in_vm == gw_sent else 'INCOMPLETE'})"
    )


if __name__ == "__main__":
    main()
