"""Ratio queries over a registry of 1,000,000 devices, through uvicorn on loopback.

Builds the registry (20,000 enterprises x 50 devices over Hebei's cities and counties,
SQLite file), marks 70 % as reporting (agent births, device states, samples through the
ingest sink), starts the API under uvicorn on a free loopback port, and times
``GET /api/v1/ratios`` for several groupings with one keep-alive HTTP client.

    .venv/bin/python bench/ratios.py [--devices 1000000] [--requests 200]

With ``--instances 3`` the registry is on a PostgreSQL started on loopback instead, and
three gateway API processes share it (each with the registry's refresh from the
database, as instances behind a shared subscription run) while each ingests samples for
its third of the devices; it times the queries at every instance (from a process of its
own) and measures how long a sample ingested by one instance takes to show at the others
(the consistency lag), for at least ``--lag-s`` seconds. It prints the load average as
the timing starts and ends: the figures mean little without it on a shared machine.

    .venv/bin/python bench/ratios.py --instances 3 [--devices 1000000] [--rate 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import httpx
import uvicorn
from pydantic import SecretStr

from gateway.api import create_app
from gateway.config import ApiConfig, GatewayConfig
from gateway.registry import DeviceInput, Registry
from gateway.registry.codes import FAMILY_CATEGORY
from gateway.sink import SampleSummary
from iiot_common.localservers import PostgreSQL, wait_port
from protocols.mqtt.contract import Birth, BirthDevice, DeviceState

QUERIES = (
    "group_by=city&window=24h",
    "group_by=county&window=24h",
    "group_by=category&window=24h",
    "group_by=industry&window=7d",
    "group_by=city&window=24h&region=1301",
    "group_by=enterprise&window=24h",
)
CITIES = ["1301", "1302", "1303", "1304", "1305", "1306", "1307", "1308", "1309", "1310", "1311"]
INDUSTRIES = ["C30", "C31", "C26", "C25", "D44", "C34", "C35", "C36", "C38", "C39"]
FAMILIES = list(FAMILY_CATEGORY)
PER_ENTERPRISE = 50
TOKEN = "bench-token"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(reg: Registry, devices: int, rng: random.Random) -> list[tuple[str, list[str]]]:
    n_ent = devices // PER_ENTERPRISE
    ents = []
    for e in range(n_ent):
        county = f"{rng.choice(CITIES)}{rng.randint(1, 30):02d}"
        ents.append((f"ent-{e:06d}", f"Enterprise {e}", county, rng.choice(INDUSTRIES)))
    reg.bulk_add_enterprises(ents, with_agents=True)
    plan: list[tuple[str, list[str]]] = []
    batch: list[DeviceInput] = []
    done = 0
    for ent_id, _name, _region, _industry in ents:
        ids = [f"d{k:02d}" for k in range(PER_ENTERPRISE)]
        plan.append((ent_id, ids))
        for dev in ids:
            family = rng.choice(FAMILIES)
            batch.append(DeviceInput(ent_id, dev, None, None, family, FAMILY_CATEGORY[family]))
        if len(batch) >= 100_000:
            done += reg.bulk_load(batch)
            batch = []
            print(f"  devices inserted: {done:>9,}", flush=True)
    if batch:
        done += reg.bulk_load(batch)
        print(f"  devices inserted: {done:>9,}", flush=True)
    return plan


def report(
    reg: Registry, plan: list[tuple[str, list[str]]], rng: random.Random, now_ms: int
) -> int:
    reporting = 0
    for ent_id, ids in plan:
        agent = f"{ent_id}-agent"
        live = [d for d in ids if rng.random() < 0.7]
        if not live:
            continue
        reg.on_birth(
            ent_id,
            agent,
            Birth(
                bdseq=1,
                ts=now_ms - 3600_000,
                devices=[BirthDevice(id=d, profile="generic", protocol="modbus") for d in live],
            ),
        )
        for d in live:
            reg.on_device_state(ent_id, agent, d, DeviceState(online=True, ts=now_ms - 3600_000))
            ts = now_ms - rng.randint(0, 48 * 3600_000)
            reg.on_samples(
                SampleSummary(
                    ent_id,
                    agent,
                    d,
                    count=1,
                    first_ts=ts,
                    last_ts=ts,
                    last_good_ts=ts,
                    latest={"p": 1.0},
                )
            )
        reporting += len(live)
    return reporting


def timed(client: httpx.Client, url: str, n: int) -> tuple[float, float, int]:
    client.get(url).raise_for_status()  # warm-up
    samples = []
    size = 0
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(url)
        samples.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        size = len(r.content)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return statistics.median(samples), p99, size


def serve(url: str, port: int, share: int, instances: int, devices: int, rate: float) -> None:
    """One instance: the API on ``port`` and ingest of samples for its share of devices.

    Prints ``ready`` once serving, then ``probe <enterprise> <device> <ts>`` once a
    second for a sample it has just ingested (for the consistency lag).
    """
    t0 = time.perf_counter()
    reg = Registry(url, refresh_interval=2.0, persist_granularity=5.0)
    print(f"loaded {devices:,} devices in {time.perf_counter() - t0:.1f} s", flush=True)
    config = GatewayConfig(api=ApiConfig(platform_tokens=[SecretStr(TOKEN)]))
    app = create_app(reg, config)  # starts the registry's flush and refresh threads
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    threading.Thread(target=server.run, daemon=True).start()
    wait_port(port, timeout=60)
    print("ready", flush=True)
    rng = random.Random(share)
    n_ent = devices // PER_ENTERPRISE
    mine = [e for e in range(n_ent) if e % instances == share]
    # Probes: devices of this share that never sent a good sample; the first one makes
    # the device connected, which changes every instance's ratios.
    with reg.reading() as idx:
        never = [
            (m.enterprise, m.id)
            for m in idx.meta
            if m.status != "connected" and int(m.enterprise[4:]) % instances == share
        ]
    rng.shuffle(never)
    probes = set(never)
    next_probe = time.monotonic() + 1
    while True:  # until the benchmark terminates this process
        start = time.monotonic()
        for _ in range(max(1, int(rate / 10))):
            e = rng.choice(mine)
            ent, dev = f"ent-{e:06d}", f"d{rng.randrange(PER_ENTERPRISE):02d}"
            if (ent, dev) not in probes:  # a probe's first sample is the probe's
                _sample(reg, ent, dev)
        if time.monotonic() >= next_probe and never:
            next_probe += 1
            ent, dev = never.pop()
            print(f"probe {ent} {dev} {_sample(reg, ent, dev)}", flush=True)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - start)))


def _sample(reg: Registry, ent: str, dev: str) -> int:
    """One good sample of ``dev`` at the current time, through the ingest sink."""
    ts = int(time.time() * 1000)
    reg.on_samples(
        SampleSummary(
            ent,
            f"{ent}-agent",
            dev,
            count=1,
            first_ts=ts,
            last_ts=ts,
            last_good_ts=ts,
            latest={"p": 1.0},
        )
    )
    return ts


def _lag_watch(out: IO[str], ports: list[int], lags: list[float], stop: threading.Event) -> None:
    """For each probe an instance prints: seconds until every other instance counts the
    device as connected."""
    others = [
        httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        for port in ports
    ]
    try:
        _watch(out, others, lags, stop)
    except httpx.HTTPError:
        if not stop.is_set():
            raise
    finally:
        for c in others:
            c.close()


def _watch(
    out: IO[str], others: list[httpx.Client], lags: list[float], stop: threading.Event
) -> None:
    for line in out:
        if stop.is_set():
            return
        parts = line.split()
        if len(parts) == 4 and parts[0] == "probe":
            # One poller per probe, so a slow one does not delay the next probe's start.
            threading.Thread(
                target=_poll_probe,
                args=(others, parts[1], parts[2], int(parts[3]), lags, stop),
                daemon=True,
            ).start()


def _poll_probe(
    others: list[httpx.Client],
    ent: str,
    dev: str,
    ts: int,
    lags: list[float],
    stop: threading.Event,
) -> None:
    path = f"/api/v1/devices/{ent}/{dev}"
    pending = list(others)
    with contextlib.suppress(httpx.HTTPError):
        while pending and not stop.is_set():
            pending = [c for c in pending if c.get(path).json()["status"] != "connected"]
            if not pending:
                lags.append(time.time() - ts / 1000)
                return
            time.sleep(0.1)


def multi(args: argparse.Namespace) -> None:
    """Several instances on one PostgreSQL while they ingest; p99 per instance, lag."""
    rng = random.Random(42)
    pg = PostgreSQL().start()
    procs: list[subprocess.Popen[str]] = []
    stop = threading.Event()
    try:
        reg = Registry(pg.url)
        t0 = time.perf_counter()
        print(f"building a registry of {args.devices:,} devices (PostgreSQL)", flush=True)
        plan = build(reg, args.devices, rng)
        reporting = report(reg, plan, rng, int(time.time() * 1000))
        reg.close()
        print(f"build + {reporting:,} reporting + flush: {time.perf_counter() - t0:6.1f} s")
        ports = [_free_port() for _ in range(args.instances)]
        for k, port in enumerate(ports):
            cmd = [sys.executable, __file__, "--serve", pg.url, "--port", str(port)]
            cmd += ["--share", f"{k}/{args.instances}", "--devices", str(args.devices)]
            cmd += ["--rate", str(args.rate)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        for proc in procs:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(f"  instance: {line.strip()}", flush=True)
                if line.strip() == "ready":
                    break
        lags: list[float] = []
        watchers = []
        for k, proc in enumerate(procs):
            assert proc.stdout is not None
            others = [p for j, p in enumerate(ports) if j != k]
            w = threading.Thread(
                target=_lag_watch, args=(proc.stdout, others, lags, stop), daemon=True
            )
            w.start()
            watchers.append(w)
        measuring = time.monotonic()
        total_rate = args.rate * args.instances
        print(
            f"\n{args.instances} instances, ingest {total_rate:,.0f} samples/s in all; "
            f"GET /api/v1/ratios, {args.requests} requests each; {_load()}"
        )
        print(f"{'query':<44} {'instance':>8} {'p50 ms':>8} {'p99 ms':>8}")
        # The timing client runs in a process of its own: sharing this one's interpreter
        # with the lag pollers' threads would time them too.
        cmd = [sys.executable, __file__, "--time", ",".join(map(str, ports))]
        subprocess.run([*cmd, "--requests", str(args.requests)], check=True)
        # Enough probes for a p99 of the lag, however fast the queries went.
        time.sleep(max(0.0, args.lag_s - (time.monotonic() - measuring)))
        stop.set()
        print(f"\nat the end: {_load()}")
        if lags:
            lags.sort()
            p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
            print(
                f"\nconsistency lag (a device's first sample at one instance -> counted as "
                f"connected at all others), "
                f"{len(lags)} probes: p50 {statistics.median(lags):.2f} s, "
                f"p99 {p99:.2f} s, max {lags[-1]:.2f} s"
            )
    finally:
        stop.set()
        for proc in procs:
            proc.terminate()
            proc.wait(20)
        pg.stop()


def time_queries(ports: list[int], requests: int) -> None:
    """Time every query at every instance, one after the other; print a line each."""
    clients = [
        httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        for port in ports
    ]
    try:
        for q in QUERIES:
            for k, client in enumerate(clients):
                p50, p99, _size = timed(client, f"/api/v1/ratios?{q}", requests)
                flag = "" if p99 < 100 else "   (p99 over the 100 ms target)"
                print(f"{q:<44} {k:>8} {p50:8.1f} {p99:8.1f}{flag}", flush=True)
    finally:
        for c in clients:
            c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--restart", action="store_true", help="also time an index rebuild")
    ap.add_argument("--instances", type=int, default=0, help="instances on one PostgreSQL")
    ap.add_argument("--rate", type=float, default=2000.0, help="samples/s each instance ingests")
    ap.add_argument(
        "--lag-s", type=float, default=120.0, help="seconds of consistency-lag probes, at least"
    )
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--share", help=argparse.SUPPRESS)
    ap.add_argument("--time", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time:
        time_queries([int(p) for p in args.time.split(",")], args.requests)
        return
    if args.serve:
        k, n = (int(x) for x in args.share.split("/"))
        serve(args.serve, args.port, k, n, args.devices, args.rate)
        return
    if args.instances:
        multi(args)
        return
    rng = random.Random(42)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'registry.db'}"
        reg = Registry(url)
        t0 = time.perf_counter()
        print(f"building a registry of {args.devices:,} devices (SQLite, {tmp})", flush=True)
        plan = build(reg, args.devices, rng)
        t_build = time.perf_counter() - t0
        now_ms = int(time.time() * 1000)
        t1 = time.perf_counter()
        reporting = report(reg, plan, rng, now_ms)
        t_report = time.perf_counter() - t1
        t2 = time.perf_counter()
        flushed = reg.flush()
        t_flush = time.perf_counter() - t2
        print(f"registry build (insert + index): {t_build:6.1f} s")
        print(
            f"ingest events for {reporting:,} reporting devices: {t_report:6.1f} s "
            f"({t_report / max(1, reporting) * 1e6:.1f} µs per device: birth+state+samples)"
        )
        print(f"flush of {flushed:,} changed rows to SQLite: {t_flush:6.1f} s")
        if args.restart:
            t3 = time.perf_counter()
            reg.close()
            reg = Registry(url)
            print(f"restart: index rebuilt from the database in {time.perf_counter() - t3:6.1f} s")

        config = GatewayConfig(api=ApiConfig(platform_tokens=[SecretStr(TOKEN)]))
        app = create_app(reg, config)
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        print(f"\nGET /api/v1/ratios via uvicorn on loopback, {args.requests} requests each")
        print(f"{'query':<44} {'p50 ms':>8} {'p99 ms':>8} {'bytes':>9}")
        try:
            with httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
            ) as client:
                for q in QUERIES:
                    p50, p99, size = timed(client, f"/api/v1/ratios?{q}", args.requests)
                    flag = "" if p99 < 100 else "   (p99 over the 100 ms target)"
                    print(f"{q:<44} {p50:8.1f} {p99:8.1f} {size:9,}{flag}")
        finally:
            server.should_exit = True
            thread.join(10)
            reg.close()


if __name__ == "__main__":
    main()
