"""The control plane page in headless Chromium, clicked through against a real gateway,
Mosquitto with the gateway's own password and ACL files, Modbus simulators and an agent."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import SecretStr
from pymodbus.client import AsyncModbusTcpClient

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from gateway.config import ApiConfig, BrokerAuthConfig, GatewayConfig, MqttConfig
from gateway.provisioning import Provisioner
from gateway.registry import Registry
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.gateway.browser import Browser
from tests.gateway.test_provisioning import _Client
from tests.waiting import wait_until

ADMIN, OPERATOR, PLATFORM = "admin-token-web", "operator-token-web", "platform-token-web"
ENT, AGENT = "ent-web", "edge-web"
_T = TypeVar("_T")


class _Loop:
    """An event loop in a thread, for the simulator and the agent beside sync test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class _Site:
    gw: Gateway
    api: httpx.Client
    loop: _Loop
    sim: ModbusSimServer
    agent: Agent
    broker_port: int
    agent_password: str
    agent_running: bool = True

    def stop_agent(self) -> None:
        self.loop.run(self.agent.stop())
        self.agent_running = False

    @property
    def page(self) -> str:
        return f"{self.gw.api_url}/admin"

    def call(self, method: str, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return self.api.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)

    async def _holding(self, unit: int, address: int) -> int:
        client = AsyncModbusTcpClient("127.0.0.1", port=self.sim.port)
        await client.connect()
        try:
            rr = await client.read_holding_registers(address, count=1, device_id=unit)
            assert not rr.isError()
            return int(rr.registers[0])
        finally:
            client.close()

    def holding(self, unit: int, address: int) -> int:
        """A holding register of the simulator, read over Modbus as any client would."""
        return self.loop.run(self._holding(unit, address))


def _gateway_config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(
        data_dir=tmp_path / "gw",
        api=ApiConfig(
            port=0,
            admin_tokens=[SecretStr(ADMIN)],
            operator_tokens=[SecretStr(OPERATOR)],
            platform_tokens=[SecretStr(PLATFORM)],
        ),
        broker_auth=BrokerAuthConfig(
            password_file=tmp_path / "auth" / "passwd", acl_file=tmp_path / "auth" / "acl"
        ),
        mqtt=MqttConfig(username="gateway", password=SecretStr("gw-pass")),
    )


def _provision(cfg: GatewayConfig) -> str:
    reg = Registry(cfg.registry_url)
    try:
        reg.add_enterprise(ENT, "Enterprise Web", "130102", "C30")
        _id, key = reg.create_provisioning_key(ENT)
        return str(Provisioner(reg, cfg).provision(key, AGENT)["password"])
    finally:
        reg.close()


def _desired(sim_port: int) -> dict[str, Any]:
    """kiln-1 on unit 1 configured; a scan may look at units 1 and 2 (the boiler)."""
    kiln = {
        "id": "kiln-1",
        "profile": "kiln-rotary-cement",
        "poll_interval": 1,
        "modbus": {"host": "127.0.0.1", "port": sim_port, "unit": 1, "timeout": 0.5, "retries": 0},
    }
    scope = {
        "modbus_tcp": [{"hosts": ["127.0.0.1"], "ports": [sim_port], "units": [1, 2]}],
        "rate": 200,
        "timeout": 0.5,
    }
    return {"devices": [kiln], "discovery": scope}


async def _start_agent(tmp_path: Path, broker_url: str, password: str) -> Agent:
    agent = Agent(
        parse_config(
            {
                "agent_id": AGENT,
                "enterprise": ENT,
                "data_dir": str(tmp_path / "agent"),
                "mqtt": {
                    "url": broker_url,
                    "username": AGENT,
                    "password": password,
                    "reconnect_min": 0.2,
                    "reconnect_max": 1.0,
                },
                "remote_config": {"enabled": True},
            }
        )
    )
    await agent.start()
    return agent


@pytest.fixture
def site(tmp_path: Path) -> Iterator[_Site]:
    cfg = _gateway_config(tmp_path)
    password = _provision(cfg)
    (tmp_path / "mq").mkdir()
    broker = Mosquitto(
        tmp_path / "mq",
        password_file=cfg.broker_auth.password_file,
        acl_file=cfg.broker_auth.acl_file,
    ).start()
    cfg.mqtt = cfg.mqtt.model_copy(update={"url": broker.url})
    gw = Gateway(cfg)
    loop = _Loop()
    profiles = load_profiles()
    sim = ModbusSimServer(
        {
            1: SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=1),
            2: SimDevice(profiles["boiler-steam-coal"], device_id="boiler-1", seed=2),
        },
        port=0,
    )
    agent: Agent | None = None
    running: _Site | None = None
    try:
        gw.start()
        loop.run(sim.start())
        api = httpx.Client(base_url=gw.api_url, timeout=30, trust_env=False)
        r = api.put(
            f"/api/v1/agents/{ENT}/{AGENT}/config",
            json=_desired(sim.port),
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert r.status_code == 200, r.text
        # Made in the loop's thread: its spool's SQLite connection belongs to that thread.
        agent = loop.run(_start_agent(tmp_path, broker.url, password))
        running = _Site(gw, api, loop, sim, agent, broker.port, password)
        yield running
        api.close()
    finally:
        if agent is not None and (running is None or running.agent_running):
            loop.run(agent.stop())
        loop.run(sim.stop())
        loop.close()
        gw.stop()
        broker.stop()


def _click(b: Browser, selector: str) -> None:
    b.eval(f"document.querySelector({json.dumps(selector)}).click()")


def _type(b: Browser, selector: str, value: str) -> None:
    b.eval(
        f"(function(){{const e=document.querySelector({json.dumps(selector)});"
        f"e.value={json.dumps(value)};e.dispatchEvent(new Event('input'));}})()"
    )


def _row_text(b: Browser, selector: str) -> str:
    return b.text(selector)


def test_approve_a_discovered_device_and_see_its_values(site: _Site, tmp_path: Path) -> None:
    agent_row = f'#agents tr[data-agent="{ENT}/{AGENT}"]'
    with Browser(tmp_path) as b:
        b.goto(f"{site.page}#token={ADMIN}")
        b.wait(
            f"(document.querySelector({json.dumps(agent_row)}) || {{}}).innerText"
            "?.includes('已同步 in sync')",
            what="the agent online with version 1 applied",
        )
        row = _row_text(b, agent_row)
        assert "在线 online" in row and "v1" in row and "kiln-1" in row

        _click(b, f'button.scan[data-agent="{ENT}/{AGENT}"]')
        b.wait(
            "document.querySelector('#discovered tr[data-proposal] input.dev-id')",
            within=40,
            what="the scan's proposal",
        )
        found = _row_text(b, "#discovered tr[data-proposal]")
        # Unit 1 is kiln-1, already polled: only the boiler on unit 2 is proposed.
        assert f"modbus 127.0.0.1:{site.sim.port} unit 2" in found
        assert b.eval("document.querySelector('#discovered input.profile').value") == (
            "boiler-steam-coal"
        )

        _type(b, "#discovered input.dev-id", "boiler-1")
        _type(b, "#discovered input.poll", "1")
        _click(b, "#discovered button.approve")
        b.wait(
            "document.querySelector('#discovered a.dev-link[data-device=\"boiler-1\"]')",
            what="the proposal approved",
        )
        assert "已批准 approved" in _row_text(b, "#discovered tr[data-proposal]")
        # A new version went to the agent, which applied it.
        b.wait(
            f"(document.querySelector({json.dumps(agent_row)}) || {{}}).innerText"
            "?.match(/v2[\\s\\S]*v2[\\s\\S]*已同步 in sync/)",
            what="version 2 applied",
        )
        b.screenshot(tmp_path / "admin-overview.png")

        _click(b, '#discovered a.dev-link[data-device="boiler-1"]')
        b.wait(
            "document.querySelectorAll('#values tr[data-point]').length >= 5",
            within=20,
            what="the boiler's live values",
        )
        values = b.eval(
            "Array.from(document.querySelectorAll('#values tr[data-point]'))"
            ".map(r => [r.dataset.point, r.querySelector('.value').innerText])"
        )
        shown = dict(values)
        # Every point of the boiler's profile the agent read is shown with a value.
        boiler_points = {p.name for p in load_profiles()["boiler-steam-coal"].points}
        assert set(shown) <= boiler_points and len(shown) >= 5
        assert all(v not in ("", "—") for v in shown.values())
        assert b.text("#dev-online") == "在线 online"
        assert b.text("#dev-last") != "—"
        assert "boiler-steam-coal" in b.text("#dev-profile")
        b.screenshot(tmp_path / "admin-device.png")


def test_write_a_setpoint_and_see_the_read_back(site: _Site, tmp_path: Path) -> None:
    with Browser(tmp_path) as b:
        b.goto(f"{site.page}#token={OPERATOR}&device={ENT}/kiln-1")
        b.wait(
            "document.querySelector('#values tr[data-point=\"kiln_speed_setpoint\"]')",
            within=20,
            what="the kiln's values",
        )
        options = b.eval(
            "Array.from(document.querySelectorAll('#write-point option')).map(o => o.value)"
        )
        writable = [
            p.name for p in load_profiles()["kiln-rotary-cement"].points if p.access == "rw"
        ]
        assert options == writable

        # Refused in the page before anything is sent.
        b.eval("document.getElementById('write-point').value = 'kiln_speed_setpoint'")
        _type(b, "#write-value", "fast")
        _click(b, "#write-submit")
        b.wait("document.getElementById('write-result').innerText.includes('not a number')")

        _type(b, "#write-value", "3.25")
        _click(b, "#write-submit")
        status = b.wait(
            "document.getElementById('write-status')?.dataset.status",
            what="the write's answer",
        )
        assert status == "ok", b.text("#write-result")
        assert b.text("#write-readback") == "3.25"
        # The register holds the setpoint in its scaled form (0.01 rpm).
        assert site.holding(1, 1) == 325
        audit = b.wait(
            "document.querySelector('#writes tr[data-write]')?.innerText",
            what="the audit row",
        )
        assert "kiln_speed_setpoint" in audit and "3.25" in audit and "operator" in audit
        # The audit's filters each apply to their own field.
        for params, rows in (({"enterprise": ENT, "device": "kiln-1"}, 1), ({"device": "x"}, 0)):
            assert len(site.call("GET", "/api/v1/writes", params=params).json()) == rows
        b.wait(
            "document.querySelector('#values tr[data-point=\"kiln_speed_setpoint\"] .value')"
            ".innerText === '3.25'",
            what="the next poll showing the setpoint",
        )
        b.screenshot(tmp_path / "admin-write.png")

        # The agent goes away: the device page's state history says so, with the reason.
        site.stop_agent()
        b.wait(
            "document.querySelector('#history tbody tr')?.innerText.includes('agent offline')",
            within=20,
            what="the offline change in the history",
        )
        assert b.text("#dev-online") == "离线 offline"


def test_a_refused_version_shows_each_device_error(site: _Site, tmp_path: Path) -> None:
    agent_row = f'#agents tr[data-agent="{ENT}/{AGENT}"]'
    site.stop_agent()
    # What an agent whose devices could not start answers, sent with its own credentials.
    stand_in = _Client(site.broker_port, AGENT, site.agent_password)
    try:
        assert stand_in.ok
        report = {
            "version": 1,
            "applied": False,
            "running_version": 0,
            "ts": 1,
            "errors": {"kiln-1": "port 502 refused", "config": "discovery: bad scope"},
        }
        stand_in.publish(f"iiot/v1/{ENT}/{AGENT}/reported", json.dumps(report).encode())
        with Browser(tmp_path) as b:
            b.goto(f"{site.page}#token={OPERATOR}")
            b.wait(
                f"(document.querySelector({json.dumps(agent_row)}) || {{}}).innerText"
                "?.includes('已拒绝 refused v1')",
                what="the refused version",
            )
            errors = b.eval(
                f"Array.from(document.querySelectorAll({json.dumps(agent_row + ' ul.errors li')}))"
                ".map(li => li.innerText)"
            )
            assert sorted(errors) == ["config: discovery: bad scope", "kiln-1: port 502 refused"]
            assert "离线 offline" in b.text(agent_row)
            # An operator may not scan: the page says so.
            _click(b, f'button.scan[data-agent="{ENT}/{AGENT}"]')
            b.wait(
                f"document.querySelector({json.dumps(agent_row + ' .note')}).innerText"
                ".includes('403')",
                what="the scan refused",
            )
    finally:
        stand_in.close()


def test_state_history_and_profile_endpoints(site: _Site) -> None:
    kiln = f"/api/v1/devices/{ENT}/kiln-1"
    wait_until(lambda: site.call("GET", kiln).json().get("online") is True, what="kiln online")
    hist = site.call("GET", f"{kiln}/history", token=PLATFORM)
    assert hist.status_code == 200, hist.text
    assert hist.json()["items"][0]["online"] is True

    site.stop_agent()
    wait_until(
        lambda: site.call("GET", f"{kiln}/history").json()["items"][0]["reason"] == "agent offline",
        what="the offline change",
    )
    items = site.call("GET", f"{kiln}/history", params={"limit": 1}).json()["items"]
    assert items == [
        {"ts": items[0]["ts"], "online": False, "reason": "agent offline", "source": "agent"}
    ]
    assert site.call("GET", f"/api/v1/devices/{ENT}/nope/history").status_code == 404
    assert site.call("GET", f"{kiln}/history", params={"limit": 0}).status_code == 422
    assert site.api.get(f"{kiln}/history").status_code == 401

    prof = site.call("GET", "/api/v1/profiles/kiln-rotary-cement", token=PLATFORM)
    assert prof.status_code == 200
    rw = [p["name"] for p in prof.json()["points"] if p["access"] == "rw"]
    assert "kiln_speed_setpoint" in rw
    missing = site.call("GET", "/api/v1/profiles/no-such-profile")
    assert missing.status_code == 404 and "no-such-profile" in missing.text
