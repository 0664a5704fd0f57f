"""Three gateway processes on one Mosquitto and one PostgreSQL give one answer.

Each message goes to whichever instance the broker picks ($share subscription); every
instance's `GET /api/v1/ratios` must agree within the stated bound (README: at most
persist_granularity + flush_interval + refresh_interval, 5 + 1 + 2 = 8 s by default).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.registry import Registry, parse_ledger
from iiot_common.localservers import Mosquitto, PostgreSQL, free_port, wait_port
from tests.gateway.test_ingest import Publisher
from tests.waiting import wait_until

TOKEN = "platform-token-for-tests"
ENT, AGENT = "ent-1", "agent-1"
LEDGER = [f"d{k}" for k in range(6)]  # d6 is announced by the agent only
# Freshness for "online" is three poll intervals. For the quality test: 9 s.
POLL_S = 3.0
BOUND_S = 10.0
# For the agreement test: 18 s, so a device that sent one sample is fresh at every instance
# for 10 s after the bound has passed, however late a loaded machine makes the bound.
ONLINE_POLL_S = 6.0
FRESH_S = 3 * ONLINE_POLL_S

Numbers = tuple[int, int, int]


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Instance:
    """One `iiot gateway run` process with its API on a free port."""

    def __init__(self, config: Path, api_port: int) -> None:
        self.config, self.api_port = config, api_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = self._client()

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.api_port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )

    def start(self) -> None:
        # A fresh client: the old one's kept-alive connection went with a killed process,
        # and a request on it would fail with "server disconnected".
        self.http.close()
        self.http = self._client()
        iiot = str(Path(sys.executable).parent / "iiot")
        log = self.config.with_suffix(".log").open("ab")
        self.proc = subprocess.Popen(
            [iiot, "gateway", "run", "--config", str(self.config)], stdout=log, stderr=log
        )
        wait_port(self.api_port, timeout=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.http.close()

    def overall(self) -> Numbers:
        try:
            o = self.http.get("/api/v1/ratios").json()["overall"]
        except httpx.TransportError as exc:
            raise AssertionError(f"{self.config.stem}: {exc}; {self._status()}") from exc
        return int(o["total"]), int(o["connected"]), int(o["online"])

    def quality(self, device: str) -> tuple[int, dict[str, Any]]:
        """quality_connected overall, and the gate's evidence for ``device``."""
        o = self.http.get("/api/v1/ratios").json()["overall"]
        body = self.http.get(f"/api/v1/devices/{ENT}/{device}/telemetry").json()
        return int(o["quality_connected"]), body["quality"]

    def _status(self) -> str:
        """Whether the process still runs, and the end of its log."""
        code = None if self.proc is None else self.proc.poll()
        log = self.config.with_suffix(".log")
        tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
        state = "running" if code is None else f"exited with {code}"
        return f"the process is {state}; its log ends: {tail}"

    def received(self) -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith("iiot_gateway_messages_received_total "):
                return float(line.split()[1])
        return 0.0


def seed_ledger(url: str, devices: list[str]) -> None:
    """The enterprise, its agent and ``devices`` (kilns) in the ledger of the database ``url``."""
    with Registry(url) as reg:
        reg.add_enterprise(ENT, "Test Works", "130102", "C30")
        reg.add_agent(ENT, AGENT, None)
        csv = "device_id,enterprise,family\n" + "".join(f"{d},{ENT},kiln\n" for d in devices)
        rows, _errors = parse_ledger(csv.encode(), "text/csv")
        reg.import_devices(rows)


@contextlib.contextmanager
def gateways(
    tmp_path: Path, url: str, mosquitto: Mosquitto, configs: list[dict[str, Any]]
) -> Iterator[list[_Instance]]:
    """An ``iiot gateway run`` a config (its keys added to the common ones) on the database
    at ``url``, all on one shared subscription, started; stopped after."""
    instances = []
    for k, extra in enumerate(configs):
        port = free_port()
        cfg: dict[str, Any] = {
            "data_dir": str(tmp_path / f"gw{k}"),
            "database_url": url,
            "mqtt": {"url": mosquitto.url, "client_id": f"gw-{k}", "shared_group": "ingest"},
            "api": {"host": "127.0.0.1", "port": port, "platform_tokens": [TOKEN]},
            **extra,
        }
        path = tmp_path / f"gw{k}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        instances.append(_Instance(path, port))
    try:
        for gw in instances:
            gw.start()
        yield instances
    finally:
        for gw in instances:
            gw.stop()


@contextlib.contextmanager
def _cluster(
    tmp_path: Path, mosquitto: Mosquitto, postgres_server: PostgreSQL, poll_s: float
) -> Iterator[list[_Instance]]:
    """Three instances on a fresh database seeded with the ledger."""
    url = postgres_server.create_database()
    seed_ledger(url, LEDGER)
    extra = {"default_poll_interval": poll_s, "registry": {"quality_share_interval": 2}}
    with gateways(tmp_path, url, mosquitto, [extra] * 3) as instances:
        yield instances


@pytest.fixture
def cluster(
    tmp_path: Path, mosquitto: Mosquitto, postgres_server: PostgreSQL
) -> Iterator[list[_Instance]]:
    with _cluster(tmp_path, mosquitto, postgres_server, POLL_S) as instances:
        yield instances


@pytest.fixture
def online_cluster(
    tmp_path: Path, mosquitto: Mosquitto, postgres_server: PostgreSQL
) -> Iterator[list[_Instance]]:
    with _cluster(tmp_path, mosquitto, postgres_server, ONLINE_POLL_S) as instances:
        yield instances


class _Agent:
    """Publishes as the agent; ``keep_sending`` devices send a sample every second."""

    def __init__(self, url: str) -> None:
        self.pub = Publisher(url, client_id="agent-under-test")
        self.keep_sending: set[str] = set()
        self._stop = threading.Event()
        self._seq: dict[str, int] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _topic(self, tail: str) -> str:
        return f"iiot/v1/{ENT}/{AGENT}/{tail}"

    def birth(self, devices: list[str]) -> None:
        birth = {
            "bdseq": 1,
            "ts": _now_ms(),
            "devices": [{"id": d, "profile": "p", "protocol": "modbus"} for d in devices],
        }
        self.pub.raw(self._topic("agent"), json.dumps(birth).encode())

    def state(self, device: str, online: bool) -> None:
        body = {"online": online, "ts": _now_ms(), "reason": "" if online else "unplugged"}
        self.pub.raw(self._topic(f"{device}/state"), json.dumps(body).encode())

    def sample(self, device: str) -> None:
        seq = self._seq.get(device, 0)
        self._seq[device] = seq + 1
        self.pub.data(device, seq, [{"ts": _now_ms(), "values": {"t": 1.0}}], enterprise=ENT)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            for device in sorted(self.keep_sending):
                self.sample(device)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pub.close()


def _agree(
    instances: list[_Instance], want: Numbers, what: str, within: float = BOUND_S + 5
) -> None:
    """Every instance answers ``want`` within the bound (plus time for the HTTP calls)."""
    deadline = time.monotonic() + within
    seen: list[Numbers] = []
    while time.monotonic() < deadline:
        seen = [gw.overall() for gw in instances]
        if all(s == want for s in seen):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"{what}: instances answer {seen}, expected {want} at each; {_devices(instances)}"
    )


def _devices(instances: list[_Instance]) -> str:
    """What each instance holds of each device, for a failure's message."""
    now = _now_ms()
    out = []
    for k, gw in enumerate(instances):
        seen = []
        for d in [*LEDGER, "d6"]:
            try:
                v = gw.http.get(f"/api/v1/devices/{ENT}/{d}").json()
            except (httpx.TransportError, ValueError) as exc:
                seen.append(f"{d}: {exc!r}")
                continue
            age = None if v.get("latest_ts") is None else now - int(v["latest_ts"])
            keep = ("online", "state_reason", "last_good_ms", "last_seen_ms", "offline_since_ms")
            seen.append(f"{d}: age {age} ms { ({f: v[f] for f in keep if f in v}) }")
        agents = gw.http.get("/api/v1/agents").json()
        out.append(f"instance {k}: agents {agents}; " + "; ".join(seen))
    url = yaml.safe_load(instances[0].config.read_text())["database_url"]
    with Registry(url) as reg, reg.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT id, status, online, reported_online, agent, state_xid, updated_xid "
            "FROM devices ORDER BY id"
        ).all()
    out.append(f"database: {[tuple(r) for r in rows]}")
    return " | ".join(out)


def test_instances_agree_catch_up_after_a_kill_and_drop_silent_devices(
    online_cluster: list[_Instance], mosquitto: Mosquitto
) -> None:
    cluster = online_cluster
    agent = _Agent(mosquitto.url)
    try:
        # The birth reaches one instance; d6 (not in the ledger) is created there.
        agent.birth([*LEDGER, "d6"])
        _agree(cluster, (7, 0, 0), "device d6 created by one instance")
        for d in [*LEDGER, "d6"]:
            agent.state(d, True)
        agent.keep_sending |= {"d0", "d1", "d2"}
        agent.sample("d3")  # one message: one instance ingests it, all must count it
        _agree(cluster, (7, 4, 4), "connected and online everywhere")
        # The broker shared the work out: more than one instance received messages.
        assert sum(1 for gw in cluster if gw.received() > 0) >= 2

        # d3 sends nothing more: after the freshness (18 s) it is offline everywhere.
        _agree(cluster, (7, 4, 3), "silent d3 dropped out of online", FRESH_S + BOUND_S + 5)

        # An instance killed; meanwhile d1 reports offline and d4 sends its first sample.
        # (The broker keeps the share of messages it hands the dead instance's persistent
        # session until that instance is back, so these are only all applied after it.)
        cluster[2].kill()
        agent.state("d1", False)
        agent.state("d4", False)
        agent.sample("d4")
        time.sleep(3)
        cluster[2].start()
        _agree(cluster, (7, 5, 2), "the restarted instance caught up")

        # Changes after the restart reach it too, whichever instance ingests them.
        agent.keep_sending.discard("d2")
        _agree(cluster, (7, 5, 1), "silent d2 dropped out of online", FRESH_S + BOUND_S + 5)
        agent.state("d1", True)
        wait_until(
            lambda: all(gw.overall() == (7, 5, 2) for gw in cluster), BOUND_S + 5, "d1 back", 0.2
        )
    finally:
        agent.close()


def test_the_quality_gate_counts_every_instances_samples_and_survives_a_restart(
    cluster: list[_Instance], mosquitto: Mosquitto
) -> None:
    # d0 sends a sample every 2 s with moving values: 1.5 times what its 3 s poll
    # interval implies, but each instance receives about a third of them, half of what
    # it expects. d1 sends every second the same value: frozen.
    agent = _Agent(mosquitto.url)
    sent = [0]
    stop = threading.Event()

    def _send() -> None:
        tick = 0
        while not stop.wait(1.0):
            tick += 1
            ts = _now_ms()
            agent.pub.data("d1", tick, [{"ts": ts, "values": {"t": 1.0}}], enterprise=ENT)
            if tick % 2 == 0:
                values = {"t": float(tick)}
                agent.pub.data("d0", tick // 2, [{"ts": ts, "values": values}], enterprise=ENT)
                sent[0] += 1

    sender = threading.Thread(target=_send, daemon=True)
    try:
        agent.birth(LEDGER)
        for d in LEDGER:
            agent.state(d, True)
        sender.start()

        def _agree_on_quality() -> bool:
            try:
                answers = [gw.quality("d0") for gw in cluster]
                frozen = [gw.quality("d1")[1]["frozen"] for gw in cluster]
            except httpx.TransportError:
                # An instance just started may drop the first connections; one that
                # exited is a failure.
                for gw in cluster:
                    assert gw.proc is not None and gw.proc.poll() is None, gw._status()
                return False
            return all(q == 1 and ev["passes"] for q, ev in answers) and all(frozen)

        # Enough samples that a third of them (what one instance receives) is far from
        # all of them.
        wait_until(lambda: sent[0] >= 20, 90, "d0 sending 20 samples", 0.2)
        wait_until(_agree_on_quality, 120, "every instance passing d0 and finding d1 frozen", 0.2)
        assert sum(1 for gw in cluster if gw.received() > 0) >= 2
        # Each instance counts (nearly) every sample d0 sent, not the third it received.
        for gw in cluster:
            assert gw.quality("d0")[1]["samples"] >= sent[0] - 4, gw.config.stem

        # A restarted instance starts from the shared counts and the watched span the
        # others kept, so it agrees at once rather than after a span of its own.
        cluster[2].stop()
        cluster[2] = _Instance(cluster[2].config, cluster[2].api_port)
        cluster[2].start()
        wait_until(_agree_on_quality, 60, "agreement after the restart", 0.2)
        before, after = cluster[0].quality("d0")[1], cluster[2].quality("d0")[1]
        assert after["expected"] >= before["expected"] - 2
        assert after["samples"] >= before["samples"] - 4
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(5)
        agent.close()
