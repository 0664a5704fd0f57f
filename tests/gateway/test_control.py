"""The control plane against a real Mosquitto with the gateway's own password and ACL files.

A paho client with the agent's provisioned credentials stands in for the agent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from pydantic import SecretStr

from gateway.config import (
    ApiConfig,
    BrokerAuthConfig,
    ControlConfig,
    GatewayConfig,
    MqttConfig,
)
from gateway.control import ControlService
from gateway.control import tables as control_tables
from gateway.provisioning import Provisioner
from gateway.registry import Registry
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto
from protocols.mqtt.contract import ContractError
from protocols.mqtt.control import ControlKind, ControlTopic
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_ingest import metric
from tests.gateway.test_provisioning import _Client
from tests.waiting import wait_until

ADMIN, OPERATOR, PLATFORM = "admin-token-t", "operator-token-t", "platform-token-t"
ENT, AGENT = "ent-a", "edge-a"
PREFIX = f"iiot/v1/{ENT}/{AGENT}"
# Imported so that the registry metadata a PostgreSQL run empties holds these tables too.
_TABLES = control_tables.CONTROL_TABLES
CNC = {
    "id": "cnc-1",
    "profile": "cnc-machine-tool",
    "opcua": {"endpoint": "opc.tcp://10.0.0.8:4840", "username": "u", "password": "s3cret"},
}
KILN = {"id": "kiln-1", "profile": "kiln-rotary-cement", "modbus": {"host": "10.0.0.7"}}

# The control plane runs on SQLite and on PostgreSQL.
registry_url = _fx.both_registry_urls


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Agent(_Client):
    """The agent's side: answers write commands unless told not to."""

    def __init__(self, port: int, username: str, password: str) -> None:
        super().__init__(port, username, password)
        self.answer: dict[str, Any] | None = None
        self.c.on_message = self._on_agent_message

    def _on_agent_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.got:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.got.notify_all()
        if msg.topic.endswith("/cmd") and self.answer is not None:
            cmd = json.loads(msg.payload)
            device = msg.topic.split("/")[4]
            reply = {"id": cmd["id"], "ts": _now_ms(), **self.answer}
            self.c.publish(f"{PREFIX}/{device}/result", json.dumps(reply), qos=1)

    def on(self, suffix: str, timeout: float = 5) -> dict[str, Any]:
        topic = f"{PREFIX}/{suffix}"
        with self.got:
            assert self.got.wait_for(lambda: any(t == topic for t, _p in self.messages), timeout), (
                f"nothing on {topic}"
            )
            found: dict[str, Any] = json.loads([p for t, p in self.messages if t == topic][-1])
            return found

    def birth(self) -> None:
        payload = {
            "online": True,
            "bdseq": 1,
            "ts": _now_ms(),
            "devices": [{"id": "kiln-1", "profile": "kiln-rotary-cement", "protocol": "modbus"}],
        }
        self.publish(f"{PREFIX}/agent", json.dumps(payload).encode())


@dataclass
class _Plane:
    gw: Gateway
    broker: Mosquitto
    agent_password: str
    api: httpx.Client

    def call(self, method: str, path: str, token: str = ADMIN, **kw: Any) -> httpx.Response:
        return self.api.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)

    def agent(self) -> _Agent:
        a = _Agent(self.broker.port, AGENT, self.agent_password)
        assert a.ok
        for sub in ("config", "scan", "+/cmd"):
            a.subscribe(f"{PREFIX}/{sub}")
        return a

    def online(self) -> None:
        wait_until(
            lambda: any(
                x["id"] == AGENT and x["online"] for x in self.call("GET", "/api/v1/agents").json()
            ),
            what="the agent online",
        )


@pytest.fixture
def plane(tmp_path: Path, registry_url: str) -> Iterator[_Plane]:
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    cfg = GatewayConfig(
        data_dir=tmp_path / "gw",
        database_url=registry_url,
        api=ApiConfig(
            port=0,
            admin_tokens=[SecretStr(ADMIN)],
            operator_tokens=[SecretStr(OPERATOR)],
            platform_tokens=[SecretStr(PLATFORM)],
        ),
        broker_auth=BrokerAuthConfig(password_file=pw, acl_file=acl),
        control=ControlConfig(write_timeout=1.5),
    )
    reg = Registry(cfg.registry_url)
    reg.add_enterprise(ENT, "Enterprise A", "130102", "C30")
    _id, key = reg.create_provisioning_key(ENT)
    cfg.mqtt = MqttConfig(username="gateway", password=SecretStr("gw-pass"))
    password = Provisioner(reg, cfg).provision(key, AGENT)["password"]
    reg.close()
    (tmp_path / "mq").mkdir()
    broker = Mosquitto(tmp_path / "mq", password_file=pw, acl_file=acl).start()
    cfg.mqtt = cfg.mqtt.model_copy(update={"url": broker.url})
    gw = Gateway(cfg)
    try:
        gw.start()
        with httpx.Client(base_url=gw.api_url, timeout=30) as api:
            yield _Plane(gw, broker, password, api)
    finally:
        gw.stop()
        broker.stop()


def test_a_desired_config_is_published_retained_and_the_report_shows(plane: _Plane) -> None:
    path = f"/api/v1/agents/{ENT}/{AGENT}/config"
    r = plane.call("PUT", path, json={"devices": [KILN]})
    assert r.status_code == 200, r.text
    assert r.json()["desired"]["version"] == 1 and r.json()["desired"]["published"]

    agent = plane.agent()  # subscribes after the PUT: the message was retained
    try:
        desired = agent.on("config")
        assert desired["version"] == 1 and desired["devices"] == [KILN]
        assert desired["profiles"] == []  # the kiln profile ships with every agent

        report = {
            "version": 1,
            "applied": False,
            "running_version": 0,
            "ts": _now_ms(),
            "errors": {"kiln-1": "no route to 10.0.0.7"},
        }
        agent.publish(f"{PREFIX}/reported", json.dumps(report).encode())
        wait_until(lambda: plane.call("GET", path).json()["reported"] is not None, what="report")
        shown = plane.call("GET", path, token=PLATFORM).json()
        assert shown["reported"]["errors"] == {"kiln-1": "no route to 10.0.0.7"}
        assert shown["reported"]["applied"] is False and not shown["in_sync"]

        second = plane.call("PUT", path, json={"devices": [{**KILN, "poll_interval": 2}, CNC]})
        assert second.json()["desired"]["version"] == 2
        wait_until(lambda: agent.on("config")["version"] == 2, what="version 2 on the broker")
        # The agent gets the OPC UA password; the API shows it to nobody.
        assert agent.on("config")["devices"][1]["opcua"]["password"] == "s3cret"
        assert "s3cret" not in plane.call("GET", path).text
    finally:
        agent.close()


def test_bad_configs_are_refused_naming_the_device(plane: _Plane) -> None:
    path = f"/api/v1/agents/{ENT}/{AGENT}/config"
    bad = {
        "devices": [
            KILN,
            {**KILN, "modbus": {"host": "10.0.0.8"}},
            {"id": "ghost", "profile": "no-such-profile", "modbus": {"host": "h"}},
            {"id": "half", "profile": "kiln-rotary-cement"},
        ]
    }
    r = plane.call("PUT", path, json=bad)
    assert r.status_code == 422
    msgs = [d["msg"] for d in r.json()["detail"]]
    assert "device 'kiln-1': duplicate device id" in msgs
    assert any("device 'ghost': profile 'no-such-profile' not found" in m for m in msgs)
    assert any(m.startswith("device 'half': ") and "modbus" in m for m in msgs)
    assert plane.call("GET", path).json()["desired"] is None  # nothing stored

    assert plane.call("PUT", path, token=PLATFORM, json={"devices": [KILN]}).status_code == 403
    assert plane.call("PUT", path, token=OPERATOR, json={"devices": [KILN]}).status_code == 403
    assert plane.call("PUT", path, json={"devices": [], "colour": 1}).status_code == 422
    assert plane.call("PUT", f"/api/v1/agents/{ENT}/edge-x/config", json={}).status_code == 404


def test_an_uploaded_profile_travels_with_the_config(plane: _Plane) -> None:
    import yaml

    from device_profiles.loader import BUILTIN_DIR

    doc = yaml.safe_load((BUILTIN_DIR / "kiln" / "kiln-rotary-cement.yaml").read_text())
    doc["id"] = "kiln-site-special"
    path = f"/api/v1/agents/{ENT}/{AGENT}/config"
    dev = {**KILN, "profile": "kiln-site-special"}
    r = plane.call("PUT", path, json={"devices": [dev], "profiles": [doc]})
    assert r.status_code == 200, r.text
    assert [p["id"] for p in r.json()["desired"]["config"]["profiles"]] == ["kiln-site-special"]
    # Stored: a later version may use it without uploading it again.
    r = plane.call("PUT", path, json={"devices": [dev]})
    assert r.json()["desired"]["config"]["profiles"][0]["id"] == "kiln-site-special"

    broken = {**doc, "id": "kiln-broken", "points": [{"name": "x"}]}
    r = plane.call("PUT", path, json={"devices": [], "profiles": [broken]})
    assert r.status_code == 422
    assert all(d["msg"].startswith("profile 'kiln-broken'") for d in r.json()["detail"])


def test_an_uploaded_family_travels_with_the_profiles_that_name_it(plane: _Plane) -> None:
    import yaml

    from device_profiles.loader import BUILTIN_DIR

    doc = yaml.safe_load((BUILTIN_DIR / "kiln" / "kiln-rotary-cement.yaml").read_text())
    doc.update(id="acme-saw", family="sawmill")
    family = {"key": "sawmill", "name_zh": "锯木机", "name": "Sawmill", "category": "intelligent"}
    path = f"/api/v1/agents/{ENT}/{AGENT}/config"
    dev = {**KILN, "profile": "acme-saw"}
    r = plane.call("PUT", path, json={"devices": [dev], "profiles": [doc]})
    assert r.status_code == 422
    assert any(d["msg"].startswith("profile 'acme-saw'") and "sawmill" in d["msg"]
               for d in r.json()["detail"]), r.text  # fmt: skip

    r = plane.call("PUT", path, json={"devices": [dev], "profiles": [doc], "families": [family]})
    assert r.status_code == 200, r.text
    assert r.json()["desired"]["config"]["families"] == [family]
    agent = plane.agent()
    try:
        assert agent.on("config")["families"] == [family]
    finally:
        agent.close()
    # A later version uses the stored profile, and its family goes with it again.
    r = plane.call("PUT", path, json={"devices": [{**dev, "poll_interval": 3}]})
    assert r.status_code == 200, r.text
    assert r.json()["desired"]["config"]["families"] == [family]

    shipped = {**family, "key": "kiln"}
    r = plane.call("PUT", path, json={"devices": [], "families": [shipped]})
    assert r.status_code == 422 and "family 'kiln': a shipped family" in r.text, r.text


def test_writes_are_answered_refused_when_offline_timed_out_and_audited(plane: _Plane) -> None:
    agent = plane.agent()
    write = f"/api/v1/devices/{ENT}/kiln-1/write"
    body = {"point": "kiln_speed_sp", "value": 3.2}
    try:
        agent.birth()
        plane.online()
        agent.answer = {"status": "ok", "previous": 3.0, "value": 3.2}
        r = plane.call("POST", write, token=OPERATOR, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["status"], out["previous"], out["read_back"]) == ("ok", 3.0, 3.2)
        cmd = agent.on("kiln-1/cmd")
        assert cmd["point"] == "kiln_speed_sp" and cmd["value"] == 3.2
        assert cmd["expires"] - cmd["ts"] == 1500

        assert plane.call("POST", write, token=PLATFORM, json=body).status_code == 403
        agent.answer = {"status": "ok", "previous": 0, "value": 1}
        r = plane.call("POST", write, token=OPERATOR, json={"point": "kiln_run", "value": 1})
        assert r.json()["value"] == 1 and r.json()["value"] is not True
        assert agent.on("kiln-1/cmd")["value"] == 1 and agent.on("kiln-1/cmd")["value"] is not True
        unknown = plane.call("POST", f"/api/v1/devices/{ENT}/kiln-404/write", json=body)
        assert unknown.status_code == 404 and "kiln-404" in unknown.text
        bad = plane.call("POST", write, token=OPERATOR, json={"point": "kiln_speed_sp"})
        assert bad.status_code == 422 and "value" in bad.text
        bad = plane.call("POST", write, json={"point": "a b", "value": 1})
        assert bad.status_code == 422 and "point" in bad.text

        agent.answer = None  # the agent stays silent
        started = time.monotonic()
        r = plane.call("POST", write, json=body)
        assert r.status_code == 504 and r.json()["status"] == "timeout"
        assert 1.4 < time.monotonic() - started < 10

        will = {"online": False, "bdseq": 1}
        agent.publish(f"{PREFIX}/agent", json.dumps(will).encode())
        wait_until(
            lambda: not plane.call("GET", "/api/v1/agents").json()[0]["online"], what="offline"
        )
        started = time.monotonic()
        r = plane.call("POST", write, token=OPERATOR, json=body)
        assert r.status_code == 409 and r.json()["status"] == "offline"
        assert time.monotonic() - started < 1.0
    finally:
        agent.close()

    audit = plane.call("GET", "/api/v1/writes", token=OPERATOR, params={"device": "kiln-1"})
    rows = audit.json()
    assert [w["status"] for w in rows] == ["offline", "timeout", "ok", "ok"]
    assert [w["role"] for w in rows] == ["operator", "admin", "operator", "operator"]
    assert all(w["token_label"].startswith("sha256:") for w in rows)
    assert OPERATOR not in audit.text and ADMIN not in audit.text
    assert rows[3]["previous"] == 3.0 and rows[3]["value"] == 3.2
    assert plane.call("GET", "/api/v1/writes", token=PLATFORM).status_code == 403


def test_a_repeated_answer_leaves_the_write_record_alone(plane: _Plane) -> None:
    """An agent answers a redelivered command with its first result; nothing is rewritten."""
    agent = plane.agent()
    try:
        agent.birth()
        plane.online()
        agent.answer = {"status": "ok", "previous": 3.0, "value": 3.2}
        body = {"point": "kiln_speed_sp", "value": 3.2}
        r = plane.call("POST", f"/api/v1/devices/{ENT}/kiln-1/write", token=OPERATOR, json=body)
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        first = plane.call("GET", "/api/v1/writes", token=OPERATOR).json()
        again = {"id": r.json()["id"], "ts": _now_ms(), **agent.answer}
        agent.publish(f"{PREFIX}/kiln-1/result", json.dumps(again).encode())
        assert plane.gw.control is not None
        counters = plane.gw.control.counters
        wait_until(lambda: counters["results_repeated"] == 1, what="the repeated answer")
    finally:
        agent.close()
    assert plane.call("GET", "/api/v1/writes", token=OPERATOR).json() == first


def test_scan_then_approve_puts_the_device_in_the_ledger_and_the_config(plane: _Plane) -> None:
    path = f"/api/v1/agents/{ENT}/{AGENT}/config"
    assert plane.call("PUT", path, json={"devices": [KILN]}).status_code == 200
    agent = plane.agent()
    try:
        offline = plane.call("POST", f"/api/v1/agents/{ENT}/{AGENT}/scan")
        assert offline.status_code == 409 and "offline" in offline.text
        agent.birth()
        plane.online()
        assert (
            plane.call("POST", f"/api/v1/agents/{ENT}/{AGENT}/scan", token=OPERATOR).status_code
            == 403
        )
        r = plane.call("POST", f"/api/v1/agents/{ENT}/{AGENT}/scan")
        assert r.status_code == 200, r.text
        scan_id = r.json()["scan"]
        assert agent.on("scan")["id"] == scan_id

        def proposal(host: str, port: int = 502) -> dict[str, Any]:
            return {
                "protocol": "modbus",
                # An agent's report may carry more than where the device is; approval
                # keeps only the address: the admin names the device and its schedule.
                "address": {
                    "modbus": {"host": host, "port": port, "unit": 1},
                    "id": "agent-chosen",
                    "poll_interval": 0.5,
                },
                "answered": {"vendor": "Sim"},
                "candidates": [{"profile": "kiln-rotary-cement", "score": 0.9}],
            }

        report = {
            "scan": scan_id,
            "ts": _now_ms(),
            # 10.0.0.7:502 unit 1 is kiln-1 already: not proposed again.
            "proposals": [proposal("10.0.0.7"), proposal("10.0.0.9"), proposal("10.0.0.10")],
        }
        agent.publish(f"{PREFIX}/discovered", json.dumps(report).encode())
        wait_until(lambda: len(plane.call("GET", "/api/v1/discovered").json()) == 2, what="2")
        found = plane.call("GET", "/api/v1/discovered", token=PLATFORM, params={"agent": AGENT})
        by_host = {p["address"]["modbus"]["host"]: p for p in found.json()}
        assert set(by_host) == {"10.0.0.9", "10.0.0.10"}
        assert by_host["10.0.0.9"]["candidates"][0]["profile"] == "kiln-rotary-cement"

        pid, other = by_host["10.0.0.9"]["id"], by_host["10.0.0.10"]["id"]
        r = plane.call(
            "POST",
            f"/api/v1/discovered/{pid}/approve",
            json={"device_id": "kiln-2", "poll_interval": 2, "name": "Kiln two"},
        )
        assert r.status_code == 200, r.text
        device = plane.call("GET", f"/api/v1/devices/{ENT}/kiln-2").json()
        assert (device["agent"], device["profile"], device["name"]) == (
            AGENT,
            "kiln-rotary-cement",
            "Kiln two",
        )
        desired = agent.on("config")
        wait_until(lambda: agent.on("config")["version"] == 2, what="version 2 published")
        desired = agent.on("config")
        assert [d["id"] for d in desired["devices"]] == ["kiln-1", "kiln-2"]
        assert desired["devices"][1]["modbus"]["host"] == "10.0.0.9"
        assert desired["devices"][1]["poll_interval"] == 2
        again = plane.call("POST", f"/api/v1/discovered/{pid}/approve", json={"device_id": "k3"})
        assert again.status_code == 409

        bad = plane.call(
            "POST", f"/api/v1/discovered/{other}/approve", json={"device_id": "kiln-1"}
        )
        assert bad.status_code == 422 and "duplicate device id" in bad.text
        assert plane.call("POST", f"/api/v1/discovered/{other}/reject").status_code == 200
        # Seen again by a later scan: approved and rejected entries are not proposed again.
        later = plane.call("POST", f"/api/v1/agents/{ENT}/{AGENT}/scan").json()["scan"]
        agent.publish(f"{PREFIX}/discovered", json.dumps({**report, "scan": later}).encode())
        control = plane.gw.control
        assert control is not None
        # Two configured now (kiln-1, kiln-2), one rejected: that one is only seen again.
        wait_until(
            lambda: (
                (control.counters["proposals_configured"], control.counters["proposals"]) == (3, 3)
            ),
            what="the later scan's report stored",
        )
        assert plane.call("GET", "/api/v1/discovered", params={"status": "new"}).json() == []
        assert plane.call("GET", "/api/v1/discovered").json()[0]["status"] == "approved"
    finally:
        agent.close()


def test_an_agent_cannot_publish_downlink_topics(plane: _Plane) -> None:
    agent = plane.agent()
    watcher = _Client(plane.broker.port, "gateway", "gw-pass")
    try:
        watcher.subscribe("iiot/v1/#")
        for topic in (
            f"{PREFIX}/config",
            f"{PREFIX}/scan",
            f"{PREFIX}/kiln-1/cmd",
            f"iiot/v1/{ENT}/edge-b/config",
            f"iiot/v1/{ENT}/edge-b/kiln-9/cmd",
            f"iiot/v1/{ENT}/edge-b/reported",
        ):
            agent.publish(topic, b"forged")
        agent.publish(f"{PREFIX}/reported", b"marker")
        watcher.wait_for(b"marker")
        assert b"forged" not in [p for _t, p in watcher.messages]
        assert agent.messages == []  # and nothing forged reached the agent's own downlink
    finally:
        agent.close()
        watcher.close()


def test_the_cli_pushes_an_agent_yaml_and_shows_the_report(plane: _Plane, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from device_profiles.loader import BUILTIN_DIR
    from edge_agent.cli import app

    special = yaml.safe_load((BUILTIN_DIR / "kiln" / "kiln-rotary-cement.yaml").read_text())
    special["id"] = "kiln-from-cli"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "special.yaml").write_text(yaml.safe_dump(special))
    agent_yaml = {
        "agent_id": AGENT,
        "enterprise": ENT,
        "mqtt": {"url": plane.broker.url},
        "profiles": ["profiles"],
        "devices": [KILN, {**KILN, "id": "kiln-9", "profile": "kiln-from-cli"}],
    }
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(agent_yaml))
    env = {"IIOT_API": plane.gw.api_url, "IIOT_API_TOKEN": ADMIN}
    runner = CliRunner()
    pushed = runner.invoke(app, ["config", "push", str(tmp_path / "agent.yaml")], env=env)
    assert pushed.exit_code == 0, pushed.output
    assert f"agent '{AGENT}' of '{ENT}': version 1 with 2 device(s)" in pushed.output

    show = ["config", "show", "--enterprise", ENT, "--agent", AGENT]
    shown = runner.invoke(app, show, env=env)
    assert shown.exit_code == 3  # not applied yet
    assert "desired  version 1: devices kiln-1, kiln-9" in shown.output
    assert "reported nothing yet" in shown.output

    agent_yaml["devices"] = [{**KILN, "profile": "nope"}]
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(agent_yaml))
    refused = runner.invoke(app, ["config", "push", str(tmp_path / "agent.yaml")], env=env)
    assert refused.exit_code == 1
    assert "refused (422)" in refused.output and "device 'kiln-1': profile 'nope'" in refused.output


def test_a_reply_received_by_another_gateway_instance_answers_the_write(
    plane: _Plane, tmp_path: Path
) -> None:
    # A second instance on the same database, in the same shared subscription group.
    first = plane.gw
    first.stop()
    # New client ids: the first instance's session would keep its unshared subscription.
    mqtt_cfg = first.config.mqtt.model_copy(
        update={"shared_group": "ingest", "client_id": "gw-ctl-1"}
    )
    shared_db = first.config.registry_url
    configs = [
        first.config.model_copy(update={"mqtt": mqtt_cfg, "database_url": shared_db}),
        first.config.model_copy(
            update={
                "mqtt": mqtt_cfg.model_copy(update={"client_id": "gw-ctl-2"}),
                "database_url": shared_db,
                "data_dir": tmp_path / "gw2",
                "broker_auth": BrokerAuthConfig(),
            }
        ),
    ]
    gws = [Gateway(c) for c in configs]
    agent = plane.agent()
    try:
        for gw in gws:
            gw.start()
        agent.birth()
        api = [httpx.Client(base_url=gw.api_url, timeout=30) for gw in gws]
        auth = {"Authorization": f"Bearer {OPERATOR}"}
        wait_until(
            lambda: any(a["online"] for a in api[0].get("/api/v1/agents", headers=auth).json()),
            what="the agent online",
        )
        agent.answer = {"status": "ok", "previous": 1, "value": 2}
        for _ in range(6):
            r = api[0].post(
                f"/api/v1/devices/{ENT}/kiln-1/write",
                json={"point": "kiln_speed_sp", "value": 2},
                headers=auth,
            )
            assert r.status_code == 200 and r.json()["status"] == "ok", r.text
            # The group hands messages out in turn; one more message shifts which
            # instance the next answer reaches.
            report = {"version": 0, "applied": True, "running_version": 0, "ts": _now_ms()}
            agent.publish(f"{PREFIX}/reported", json.dumps(report).encode())
        # Some answers reached the second instance, which stored them for the first.
        assert gws[1].control is not None and gws[1].control.counters["results"] >= 1
        assert gws[0].control is not None and gws[0].control.counters["writes"] == 6
        for c in api:
            c.close()
    finally:
        agent.close()
        for gw in gws:
            gw.stop()


def test_configs_return_to_a_broker_that_lost_them_and_bad_answers_are_counted(
    plane: _Plane,
) -> None:
    path = f"/api/v1/agents/{ENT}/{AGENT}/config"
    assert plane.call("PUT", path, json={"devices": [KILN]}).status_code == 200
    plane.broker.stop()  # no persistence: the retained configuration is gone
    r = plane.call("PUT", path, json={"devices": [{**KILN, "poll_interval": 3}]})
    assert r.status_code == 200 and r.json()["desired"]["published"] is False
    plane.broker.start()
    wait_until(lambda: plane.call("GET", path).json()["desired"]["published"], what="published")
    agent = plane.agent()
    try:
        assert agent.on("config")["version"] == 2
        wait_until(lambda: plane.gw.mqtt_connected, what="gateway connected")
        for payload in (b"not json", b'{"version": -1}'):
            agent.publish(f"{PREFIX}/reported", payload)
        agent.publish(f"{PREFIX}/kiln-1/result", b'{"id": "x", "status": "weird", "ts": 1}')
        rejected = "iiot_gateway_rejected_total"
        wait_until(
            lambda: metric(plane.gw, rejected, {"reason": "bad_payload"}) == 2,
            what="two bad payloads counted",
        )
        assert metric(plane.gw, rejected, {"reason": "not_json"}) == 1
        assert plane.call("GET", path).json()["reported"] is None
        text = plane.call("GET", "/metrics").text
        assert 'iiot_control_events_total{kind="republished"}' in text
    finally:
        agent.close()


def _report(scan: str, host: str, *, done: bool = True) -> bytes:
    proposal = {
        "protocol": "modbus",
        "address": {"modbus": {"host": host, "port": 502, "unit": 1}},
        "candidates": [{"profile": "kiln-rotary-cement", "score": 0.9}],
    }
    body = {"scan": scan, "ts": _now_ms(), "done": done, "proposals": [proposal]}
    return json.dumps(body).encode()


def test_scan_reports_nobody_asked_for_are_refused_and_never_shown(plane: _Plane) -> None:
    key = plane.gw.registry.create_provisioning_key(ENT)[1]
    assert plane.gw.provisioner is not None
    other_password = plane.gw.provisioner.provision(key, "edge-b")["password"]
    plane.broker.reload()
    agent = plane.agent()
    other = _Client(plane.broker.port, "edge-b", other_password)
    assert other.ok
    rejected = "iiot_gateway_rejected_total"
    try:
        agent.birth()
        plane.online()
        r = plane.call("POST", f"/api/v1/agents/{ENT}/{AGENT}/scan")
        assert r.status_code == 200, r.text
        scan_id = r.json()["scan"]

        # A scan id the gateway never issued.
        agent.publish(f"{PREFIX}/discovered", _report("0123456789abcdef", "10.0.0.21"))
        # Another agent reporting for edge-a's scan, under its own topics.
        other.publish(f"iiot/v1/{ENT}/edge-b/discovered", _report(scan_id, "10.0.0.22"))
        wait_until(
            lambda: (
                metric(plane.gw, rejected, {"reason": "scan_unknown"}) == 1
                and metric(plane.gw, rejected, {"reason": "scan_other_agent"}) == 1
            ),
            what="both refusals counted",
        )
        # A partial report and then the final one are the scan's own: both are shown.
        agent.publish(f"{PREFIX}/discovered", _report(scan_id, "10.0.0.23", done=False))
        agent.publish(f"{PREFIX}/discovered", _report(scan_id, "10.0.0.24"))
        wait_until(lambda: len(plane.call("GET", "/api/v1/discovered").json()) == 2, what="2")
        # After its final report the scan is finished: a further report is refused.
        agent.publish(f"{PREFIX}/discovered", _report(scan_id, "10.0.0.25"))
        wait_until(
            lambda: metric(plane.gw, rejected, {"reason": "scan_finished"}) == 1,
            what="the late report refused",
        )
        shown = plane.call("GET", "/api/v1/discovered", params={"status": "new"}).json()
        assert sorted(p["address"]["modbus"]["host"] for p in shown) == ["10.0.0.23", "10.0.0.24"]
        assert {p["agent"] for p in shown} == {AGENT}
    finally:
        agent.close()
        other.close()


def test_a_scan_report_is_taken_until_shortly_after_expiry_and_only_once_final(
    registry_url: str,
) -> None:
    now = [1_700_000_000.0]
    reg = Registry(registry_url)
    try:
        reg.add_enterprise(ENT, "Enterprise A", "130102", "C30")
        reg.add_agent(ENT, AGENT, None)
        service = ControlService(reg, GatewayConfig(), clock=lambda: now[0])
        topic = ControlTopic(ENT, AGENT, ControlKind.DISCOVERED)
        for scan, expires_s in (("late", 300), ("twice", 300)):
            service.store.insert_scan(
                {
                    "id": scan,
                    "enterprise": ENT,
                    "agent": AGENT,
                    "requested_ms": int(now[0] * 1000),
                    "expires_ms": int((now[0] + expires_s) * 1000),
                }
            )
        # 20 s past the expiry: an agent that needed its last seconds still gets through.
        now[0] += 320
        service.accept(topic, _report("late", "10.0.0.31"))()
        # Two final reports that both passed the first look (one batch, or two
        # instances): the second finds the scan finished and stores nothing.
        first = service.accept(topic, _report("twice", "10.0.0.32"))
        second = service.accept(topic, _report("twice", "10.0.0.33"))
        first()
        second()
        assert service.counters["refused_scan_finished"] == 1
        hosts = [p["address"]["modbus"]["host"] for p in service.list_discovered(ENT, None, None)]
        assert hosts == ["10.0.0.31", "10.0.0.32"]

        service.store.insert_scan(
            {
                "id": "expired",
                "enterprise": ENT,
                "agent": AGENT,
                "requested_ms": int(now[0] * 1000),
                "expires_ms": int((now[0] + 10) * 1000),
            }
        )
        now[0] += 41  # 31 s past its expiry
        with pytest.raises(ContractError, match="expired") as refused:
            service.accept(topic, _report("expired", "10.0.0.34"))
        assert refused.value.reason == "scan_finished"
    finally:
        reg.close()
