"""Ratio queries over a registry of 1,000,000 devices, through uvicorn on loopback.

Builds the registry (20,000 enterprises x 50 devices over Hebei's cities and counties,
SQLite file), marks 70 % as reporting (agent births, device states, samples through the
ingest sink), starts the API under uvicorn on a free loopback port, and times
``GET /api/v1/ratios`` for several groupings with one keep-alive HTTP client.

    .venv/bin/python bench/ratios.py [--devices 1000000] [--requests 200]
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from pydantic import SecretStr

from gateway.api import create_app
from gateway.config import ApiConfig, GatewayConfig
from gateway.registry import DeviceInput, Registry
from gateway.registry.codes import FAMILY_CATEGORY
from gateway.sink import SampleSummary
from protocols.mqtt.contract import Birth, BirthDevice, DeviceState

CITIES = ["1301", "1302", "1303", "1304", "1305", "1306", "1307", "1308", "1309", "1310", "1311"]
INDUSTRIES = ["C30", "C31", "C26", "C25", "D44", "C34", "C35", "C36", "C38", "C39"]
FAMILIES = list(FAMILY_CATEGORY)
PER_ENTERPRISE = 50
TOKEN = "bench-token"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--restart", action="store_true", help="also time an index rebuild")
    args = ap.parse_args()
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
                for q in (
                    "group_by=city&window=24h",
                    "group_by=county&window=24h",
                    "group_by=category&window=24h",
                    "group_by=industry&window=7d",
                    "group_by=city&window=24h&region=1301",
                    "group_by=enterprise&window=24h",
                ):
                    p50, p99, size = timed(client, f"/api/v1/ratios?{q}", args.requests)
                    flag = "" if p99 < 100 else "   (p99 over the 100 ms target)"
                    print(f"{q:<44} {p50:8.1f} {p99:8.1f} {size:9,}{flag}")
        finally:
            server.should_exit = True
            thread.join(10)
            reg.close()


if __name__ == "__main__":
    main()
