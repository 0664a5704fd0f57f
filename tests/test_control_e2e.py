"""The control plane end to end: the real gateway, Mosquitto with the gateway's password and
ACL files, the project's simulated plant and the real agent (``iiot agent run``),
provisioned through the API with nothing but how to reach the broker in its file.

A second gateway instance's credentials (``broker_auth.peer_gateway_users``) watch the
broker, as any peer instance could, to see sequence numbers and replay a command.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr
from typer.testing import CliRunner

from gateway.config import ApiConfig, BrokerAuthConfig, ControlConfig, GatewayConfig, MqttConfig
from gateway.provisioning import mosquitto_hash
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto, PtyPair, free_port, require
from protocols.mqtt.contract import DataMessage
from simulators.plant import Plant, PlantConfig

ADMIN, OPERATOR, PLATFORM = "e2e-admin-token", "e2e-operator-token", "e2e-platform-token"
ENT = "e2e-cement"
INTERVAL = 2.0  # every device's poll interval, s
_T = TypeVar("_T")


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    """Poll ``check`` until it holds or fail naming ``what``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


class _Loop:
    """An event loop in a thread, for the simulated plant."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 60) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class _Watcher:
    """A peer gateway instance's client on ``iiot/v1/#``: records everything it sees."""

    port: int
    password: str
    messages: list[tuple[str, bytes, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher")
        self.client.username_pw_set("watcher", self.password)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("iiot/v1/#", qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), time.monotonic()))

    def start(self) -> _Watcher:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        assert self._ready.wait(10), "the watcher got no SUBACK"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, topic: str) -> list[tuple[bytes, float]]:
        with self._lock:
            return [(p, t) for tp, p, t in self.messages if tp == topic]

    def seqs(self, topic: str) -> list[int]:
        out: list[int] = []
        for p, _t in self.on(topic):
            msg = DataMessage.model_validate_json(p)
            out.extend(range(msg.seq, msg.seq + len(msg.samples)))
        return out

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)


@dataclass
class _AgentProc:
    """``iiot agent run`` on a provisioned agent.yaml, as the box's service runs it."""

    config: Path
    agent_id: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> _AgentProc:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iiot", "agent", "run", "--config", str(self.config)],
            stdout=out,
            stderr=out,
        )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@dataclass
class _Platform:
    gw: Gateway
    broker: Mosquitto
    api: httpx.Client
    watcher: _Watcher
    tmp: Path
    agents: list[_AgentProc] = field(default_factory=list)

    def call(self, method: str, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return self.api.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)

    def provision(self, agent_id: str) -> _AgentProc:
        """A provisioning key from the API, redeemed by ``iiot agent provision`` on the box."""
        from edge_agent.cli import app

        r = self.call("POST", f"/api/v1/enterprises/{ENT}/provisioning-keys", json={})
        assert r.status_code in (200, 201), r.text
        box = self.tmp / agent_id
        box.mkdir()
        config = box / "agent.yaml"
        done = CliRunner().invoke(
            app,
            ["provision", "--api", self.gw.api_url, "--key", r.json()["key"],
             "--agent-id", agent_id, "--config", str(config),
             "--password-file", str(box / "agent.secret")],
        )  # fmt: skip
        assert done.exit_code == 0, done.output
        data = yaml.safe_load(config.read_text())
        # What the provisioned file says about devices: nothing; they come from the platform.
        assert "devices" not in data and data["remote_config"] == {"enabled": True}
        data["data_dir"] = str(box / "data")
        data["metrics"] = {"port": None}
        data["mqtt"]["reconnect_max"] = 1.0
        config.write_text(yaml.safe_dump(data))
        agent = _AgentProc(config, agent_id, box / "agent.log")
        self.agents.append(agent)
        return agent

    def online(self, agent_id: str, online: bool = True) -> None:
        def check() -> bool:
            rows = self.call("GET", "/api/v1/agents").json()
            return any(a["id"] == agent_id and a["online"] is online for a in rows)

        wait_until(check, what=f"agent {agent_id} online={online}")

    def latest(self, device: str) -> dict[str, Any]:
        r = self.call("GET", f"/api/v1/devices/{ENT}/{device}", token=PLATFORM)
        return dict(r.json()) if r.status_code == 200 else {}

    def put_config(self, agent_id: str, body: dict[str, Any]) -> httpx.Response:
        return self.call("PUT", f"/api/v1/agents/{ENT}/{agent_id}/config", json=body)

    def config_view(self, agent_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/api/v1/agents/{ENT}/{agent_id}/config").json())


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[_Platform]:
    """Mosquitto on the gateway's files, the gateway (reloading the broker), one enterprise."""
    auth = tmp_path / "auth"
    auth.mkdir()
    pw, acl = auth / "passwd", auth / "acl"
    watcher_password = "watcher-pass"
    pw.write_text(f"watcher:{mosquitto_hash(watcher_password)}\n")
    acl.write_text("")
    (tmp_path / "mq").mkdir()
    broker = Mosquitto(tmp_path / "mq", password_file=pw, acl_file=acl).start()
    assert broker.proc is not None
    cfg = GatewayConfig(
        data_dir=tmp_path / "gw",
        mqtt=MqttConfig(url=broker.url, username="gateway", password=SecretStr("gw-pass")),
        api=ApiConfig(
            port=0,
            admin_tokens=[SecretStr(ADMIN)],
            operator_tokens=[SecretStr(OPERATOR)],
            platform_tokens=[SecretStr(PLATFORM)],
        ),
        broker_auth=BrokerAuthConfig(
            password_file=pw,
            acl_file=acl,
            peer_gateway_users=["watcher"],
            reload_command=["kill", "-HUP", str(broker.proc.pid)],
        ),
        control=ControlConfig(write_timeout=3.0),
    )
    gw = Gateway(cfg)
    gw.start()
    watcher = _Watcher(broker.port, watcher_password)
    plat: _Platform | None = None
    try:
        api = httpx.Client(base_url=gw.api_url, timeout=30)
        plat = _Platform(gw, broker, api, watcher, tmp_path)
        wait_until(lambda: api.get("/health/ready").status_code == 200, what="the gateway ready")
        watcher.start()
        r = plat.call(
            "POST",
            "/api/v1/enterprises",
            json={"id": ENT, "name": "E2E Cement", "region": "130110", "industry": "C30"},
        )
        assert r.status_code in (200, 201), r.text
        yield plat
    finally:
        if plat is not None:
            for agent in plat.agents:
                agent.stop()
            plat.api.close()
        watcher.stop()
        gw.stop()
        broker.stop()


def _plant(devices: list[dict[str, Any]]) -> PlantConfig:
    return PlantConfig.model_validate(
        {
            "base_port": free_port(),
            "seed": 3,
            "enterprises": [
                {
                    "id": ENT,
                    "name": "E2E Cement",
                    "region": "130110",
                    "industry": "C30",
                    "devices": devices,
                }
            ],
        }
    )


@pytest.fixture
def loop() -> Iterator[_Loop]:
    lp = _Loop()
    yield lp
    lp.close()


def _started(loop: _Loop, config: PlantConfig) -> Plant:
    plant = Plant(config)
    loop.run(plant.start())
    return plant


def _modbus(plant: Plant, device: str) -> dict[str, Any]:
    ep = plant.endpoints[device]
    return {
        "id": device,
        "profile": ep.profile,
        "poll_interval": INTERVAL,
        "modbus": {"host": ep.host, "port": ep.port, "unit": ep.unit or 1, "timeout": 1.0},
    }


def _mbpoll(port: int, unit: int, address: int, *value: int) -> str:
    """mbpoll, a third-party Modbus client, on one holding register (0-based address)."""
    cmd = [require("mbpoll", "mbpoll"), "-m", "tcp", "-p", str(port), "-a", str(unit),
           "-t", "4", "-0", "-r", str(address), "-1", "-o", "3", "127.0.0.1",
           *map(str, value)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _holding(port: int, unit: int, address: int) -> int:
    """What a third-party Modbus client reads from a holding register."""
    out = _mbpoll(port, unit, address)
    found = re.search(rf"^\[{address}\]:\s*(-?\d+)", out, re.M)
    assert found, out
    return int(found[1])


def _set_holding(port: int, unit: int, address: int, value: int) -> None:
    """A third party (an HMI on the same bus) sets a holding register."""
    _mbpoll(port, unit, address, value)


def _gap_free(seqs: list[int]) -> bool:
    return bool(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))


# -- remote configuration ----------------------------------------------------------------


def test_a_pushed_configuration_adds_a_device_refuses_a_bad_one_and_reaches_an_offline_agent(
    platform: _Platform, loop: _Loop
) -> None:
    plant = _started(
        loop,
        _plant(
            [
                {"id": "kiln-1", "profile": "kiln-rotary-cement"},
                {"id": "boiler-1", "profile": "boiler-steam-coal", "configured": False},
                {"id": "motor-1", "profile": "motor-hv-drive", "configured": False},
            ]
        ),
    )
    try:
        agent = platform.provision("line1-edge")
        r = platform.put_config("line1-edge", {"devices": [_modbus(plant, "kiln-1")]})
        assert r.status_code == 200, r.text
        agent.start()
        platform.online("line1-edge")
        wait_until(lambda: bool(platform.latest("kiln-1").get("latest")), what="kiln-1 data")
        wait_until(lambda: platform.config_view("line1-edge")["in_sync"], what="v1 applied")

        # Version 2 adds the boiler: its data arrives within two poll intervals of the PUT.
        kiln_topic = f"iiot/v1/{ENT}/line1-edge/kiln-1/data"
        boiler_topic = f"iiot/v1/{ENT}/line1-edge/boiler-1/data"
        two = [_modbus(plant, "kiln-1"), _modbus(plant, "boiler-1")]
        pushed = time.monotonic()
        r = platform.put_config("line1-edge", {"devices": two})
        assert r.status_code == 200 and r.json()["desired"]["version"] == 2, r.text
        wait_until(lambda: bool(platform.watcher.on(boiler_topic)), what="boiler-1 data")
        first = platform.watcher.on(boiler_topic)[0][1]
        assert first - pushed <= 2 * INTERVAL, f"first boiler sample {first - pushed:.1f} s"
        wait_until(lambda: bool(platform.latest("boiler-1").get("latest")), what="boiler in API")
        wait_until(lambda: platform.config_view("line1-edge")["in_sync"], what="v2 applied")
        seen = len(platform.watcher.seqs(kiln_topic))
        wait_until(lambda: len(platform.watcher.seqs(kiln_topic)) >= seen + 2, what="kiln polls")
        assert _gap_free(platform.watcher.seqs(kiln_topic)), platform.watcher.seqs(kiln_topic)

        # The API refuses a bad version naming the device; nothing is published.
        bad = [*two, {"id": "ghost", "profile": "no-such-profile", "modbus": {"host": "h"}}]
        r = platform.put_config("line1-edge", {"devices": bad})
        assert r.status_code == 422
        assert any("device 'ghost'" in d["msg"] for d in r.json()["detail"]), r.text
        assert platform.config_view("line1-edge")["desired"]["version"] == 2

        # A version the agent itself refuses (published by a peer gateway instance without
        # the API's check): the report names the device, and the running version goes on.
        _refused_version_reported(platform, plant)

        # Offline during the push: the agent applies the retained version when it is back.
        agent.stop()
        platform.online("line1-edge", online=False)
        three = [*two, _modbus(plant, "motor-1")]
        r = platform.put_config("line1-edge", {"devices": three})
        assert r.status_code == 200, r.text
        version = r.json()["desired"]["version"]
        assert not platform.config_view("line1-edge")["in_sync"]
        agent.start()
        wait_until(lambda: bool(platform.latest("motor-1").get("latest")), what="motor-1 data")

        def applied() -> bool:
            rep = platform.config_view("line1-edge")["reported"] or {}
            return bool(rep.get("running_version") == version and rep.get("applied"))

        wait_until(applied, what=f"version {version} applied after the reconnect")
    finally:
        loop.run(plant.stop())


def _refused_version_reported(platform: _Platform, plant: Plant) -> None:
    view = platform.config_view("line1-edge")
    running = view["desired"]["version"]
    kiln_topic = f"iiot/v1/{ENT}/line1-edge/kiln-1/data"
    document = {
        "version": running + 1,
        "ts": int(time.time() * 1000),
        "devices": [
            _modbus(plant, "kiln-1"),
            {**_modbus(plant, "boiler-1"), "points": ["no_such_point"]},
        ],
        "profiles": [],
    }
    before = len(platform.watcher.seqs(kiln_topic))
    platform.watcher.publish(
        f"iiot/v1/{ENT}/line1-edge/config", json.dumps(document).encode(), retain=True
    )

    def refused() -> bool:
        rep = platform.config_view("line1-edge")["reported"] or {}
        return rep.get("version") == running + 1 and rep.get("applied") is False

    wait_until(refused, what="the agent's refusal reported")
    reported = platform.config_view("line1-edge")["reported"]
    assert "boiler-1" in reported["errors"], reported
    assert "no_such_point" in reported["errors"]["boiler-1"], reported
    assert reported["running_version"] == running
    # The running version keeps polling both its devices.
    wait_until(
        lambda: len(platform.watcher.seqs(kiln_topic)) >= before + 2, what="kiln keeps polling"
    )
    assert _gap_free(platform.watcher.seqs(kiln_topic))
    # The gateway's own desired version goes back on the topic (its next PUT does anyway).
    r = platform.put_config("line1-edge", {"devices": view["desired"]["config"]["devices"]})
    assert r.status_code == 200, r.text


# -- discovery ---------------------------------------------------------------------------


def test_a_scan_proposes_unconfigured_tcp_rtu_and_opcua_devices_and_approval_starts_polling(
    platform: _Platform, loop: _Loop, pty_pair: PtyPair
) -> None:
    plant = _started(
        loop,
        _plant(
            [
                {"id": "kiln-1", "profile": "kiln-rotary-cement"},
                {"id": "boiler-1", "profile": "boiler-steam-coal", "configured": False},
                {
                    "id": "comp-3",
                    "profile": "aircomp-screw",
                    "configured": False,
                    "serial": pty_pair.a,
                    "unit": 3,
                },
                {"id": "gas-boiler-1", "profile": "boiler-steam-gas-opcua", "configured": False},
            ]
        ),
    )
    try:
        eps = plant.endpoints
        scope = {
            "modbus_tcp": [
                {
                    "hosts": ["127.0.0.1"],
                    "ports": sorted(
                        {e.port for e in eps.values() if e.protocol == "modbus" and e.port}
                    ),
                    "units": ["1-3"],
                }
            ],
            "serial": [{"port": pty_pair.b, "baudrate": 19200, "units": ["1-4"]}],
            "opcua": [eps["gas-boiler-1"].url],
            "rate": 200,
            "timeout": 0.5,
        }
        agent = platform.provision("scan-edge")
        r = platform.put_config(
            "scan-edge", {"devices": [_modbus(plant, "kiln-1")], "discovery": scope}
        )
        assert r.status_code == 200, r.text
        agent.start()
        platform.online("scan-edge")
        wait_until(lambda: platform.config_view("scan-edge")["in_sync"], what="v1 applied")
        before = agent.config.read_bytes()

        r = platform.call("POST", f"/api/v1/agents/{ENT}/scan-edge/scan")
        assert r.status_code == 200, r.text

        def proposals() -> dict[str, dict[str, Any]]:
            rows = platform.call(
                "GET", "/api/v1/discovered", token=PLATFORM, params={"agent": "scan-edge"}
            ).json()
            return {_where(p): p for p in rows}

        where = {
            "boiler-1": f"tcp:{eps['boiler-1'].port}",
            "comp-3": f"rtu:{pty_pair.b}:3",
            "gas-boiler-1": f"opcua:{eps['gas-boiler-1'].url}",
        }
        wait_until(lambda: set(proposals()) == set(where.values()), timeout=120, what="3")
        found = proposals()
        for device, key in where.items():
            assert found[key]["candidates"][0]["profile"] == eps[device].profile, found[key]

        for device, key in where.items():
            r = platform.call(
                "POST",
                f"/api/v1/discovered/{found[key]['id']}/approve",
                json={"device_id": device, "poll_interval": INTERVAL},
            )
            assert r.status_code == 200, r.text
        for device in where:
            wait_until(
                lambda d=device: bool(platform.latest(d).get("latest")),  # type: ignore[misc]
                timeout=60,
                what=f"{device} data after approval",
            )
        assert platform.latest("comp-3")["profile"] == "aircomp-screw"
        # Nothing on the box was edited: its file is what provisioning wrote.
        assert agent.config.read_bytes() == before
        assert platform.call("GET", "/api/v1/discovered", params={"status": "new"}).json() == []
    finally:
        loop.run(plant.stop())


def _where(p: dict[str, Any]) -> str:
    a = p["address"]
    if "opcua" in a:
        return f"opcua:{a['opcua']['endpoint']}"
    m = a["modbus"]
    if m.get("transport") == "rtu":
        return f"rtu:{m['serial_port']}:{m['unit']}"
    return f"tcp:{m['port']}"


# -- writes ------------------------------------------------------------------------------


def test_writes_reach_the_device_and_refused_ones_never_do(
    platform: _Platform, loop: _Loop
) -> None:
    plant = _started(loop, _plant([{"id": "comp-1", "profile": "aircomp-screw"}]))
    try:
        ep = plant.endpoints["comp-1"]
        assert ep.port is not None
        port, unit = ep.port, ep.unit or 1
        profile = plant.devices["comp-1"].profile
        # A setpoint in a holding register, and a measurement that is read-only.
        sp = next(p for p in profile.points if p.name == "unload_pressure_setpoint")
        ro = next(p for p in profile.points if p.name == "discharge_pressure")
        assert sp.modbus is not None and sp.range is not None and ro.access == "r"
        address = sp.modbus.address
        scale = sp.scale or 1.0

        agent = platform.provision("write-edge")
        assert platform.put_config("write-edge", {"devices": [_modbus(plant, "comp-1")]}).is_success
        agent.start()
        platform.online("write-edge")
        wait_until(lambda: bool(platform.latest("comp-1").get("latest")), what="comp-1 data")
        write = f"/api/v1/devices/{ENT}/comp-1/write"

        target = round(sp.range[0] + 0.3 * (sp.range[1] - sp.range[0]), 3)
        r = platform.call("POST", write, token=OPERATOR, json={"point": sp.name, "value": target})
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        assert _holding(port, unit, address) == round(target / scale)
        assert r.json()["read_back"] == pytest.approx(target)
        written = r.json()["id"]

        # Refused by the agent, with the reason; the register keeps its value.
        held = _holding(port, unit, address)
        r = platform.call("POST", write, token=OPERATOR, json={"point": ro.name, "value": 1})
        assert r.json()["status"] == "refused" and "read-only" in r.json()["reason"], r.text
        too_high = sp.range[1] + 1
        r = platform.call("POST", write, token=OPERATOR, json={"point": sp.name, "value": too_high})
        assert r.json()["status"] == "refused" and "range" in r.json()["reason"], r.text
        assert _holding(port, unit, address) == held

        # A replayed command (the same request id again) is answered, not written again.
        _set_holding(port, unit, address, held + 7)
        (cmd,) = [
            p
            for p, _t in platform.watcher.on(f"iiot/v1/{ENT}/write-edge/comp-1/cmd")
            if json.loads(p)["id"] == written
        ]
        results = f"iiot/v1/{ENT}/write-edge/comp-1/result"
        answered = len(platform.watcher.on(results))
        platform.watcher.publish(f"iiot/v1/{ENT}/write-edge/comp-1/cmd", cmd)
        wait_until(lambda: len(platform.watcher.on(results)) > answered, what="replay answer")
        assert _holding(port, unit, address) == held + 7

        # A command that arrives after its expiry (the agent stalled) is never executed.
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            r = platform.call("POST", write, token=OPERATOR, json={"point": sp.name,
                                                                  "value": target})  # fmt: skip
            assert r.status_code == 504 and r.json()["status"] == "timeout", r.text
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        late = r.json()["id"]

        def expired() -> bool:
            rows = platform.call("GET", "/api/v1/writes", token=OPERATOR).json()
            return any(w["id"] == late and w["status"] == "expired" for w in rows)

        wait_until(expired, what="the late command answered expired")
        assert _holding(port, unit, address) == held + 7

        # Offline: refused by the gateway at once, never sent.
        agent.stop()
        platform.online("write-edge", online=False)
        r = platform.call("POST", write, token=OPERATOR, json={"point": sp.name, "value": target})
        assert r.status_code == 409 and r.json()["status"] == "offline", r.text
        assert _holding(port, unit, address) == held + 7

        audit = platform.call("GET", "/api/v1/writes", token=OPERATOR, params={"device": "comp-1"})
        rows = audit.json()
        assert [w["status"] for w in rows] == ["offline", "expired", "refused", "refused", "ok"]
        assert [w["point"] for w in rows][2:] == [sp.name, ro.name, sp.name]
        assert all(w["reason"] for w in rows[:4]), rows
        # The replay's answer did not rewrite the record of the write it repeated.
        assert rows[4]["id"] == written and rows[4]["reason"] == "", rows[4]
        # The late answer is kept, saying it came after the API call gave up.
        assert "after the gateway stopped waiting" in rows[1]["reason"], rows[1]
        assert OPERATOR not in audit.text
    finally:
        loop.run(plant.stop())


# -- the broker's ACL --------------------------------------------------------------------


def test_an_agent_cannot_publish_on_any_agents_config_or_cmd_topics(platform: _Platform) -> None:
    platform.provision("acl-edge")
    other = platform.provision("acl-other")
    password = (platform.tmp / "acl-edge" / "agent.secret").read_text().strip()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="acl-edge")
    client.username_pw_set("acl-edge", password)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    client.connect("127.0.0.1", platform.broker.port)
    client.loop_start()
    try:
        assert connected.wait(10), "the provisioned agent could not connect"
        forged = [
            f"iiot/v1/{ENT}/acl-edge/config",
            f"iiot/v1/{ENT}/acl-edge/scan",
            f"iiot/v1/{ENT}/acl-edge/kiln-1/cmd",
            f"iiot/v1/{ENT}/{other.agent_id}/config",
            f"iiot/v1/{ENT}/{other.agent_id}/kiln-9/cmd",
            f"iiot/v1/other-ent/{other.agent_id}/config",
        ]
        for topic in forged:
            client.publish(topic, b"forged", qos=1).wait_for_publish(5)
        marker = f"iiot/v1/{ENT}/acl-edge/reported"
        client.publish(marker, b"marker", qos=1).wait_for_publish(5)
        wait_until(lambda: bool(platform.watcher.on(marker)), what="the marker")
        for topic in forged:
            assert platform.watcher.on(topic) == [], topic
    finally:
        client.loop_stop()
        client.disconnect()
