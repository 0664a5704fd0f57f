"""A device belongs to one agent of its enterprise: another agent's data, birth or state
for it is refused and counted, per device, until the device is moved (audited).

Real broker with the provisioned agents' passwords and ACL, real registry database
(SQLite and PostgreSQL), victoria-metrics, the HTTP API.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from gateway.config import ApiConfig, BrokerAuthConfig, GatewayConfig, InfluxConfig, MqttConfig
from gateway.provisioning import Provisioner
from gateway.registry import Registry
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto, VictoriaMetrics
from protocols.mqtt.sparkplug.node import BDSEQ
from protocols.mqtt.sparkplug.payload import DataType
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_ingest import metric
from tests.gateway.test_provisioning import _Client
from tests.gateway.test_sparkplug import _payload
from tests.waiting import wait_until

registry_url = _fx.both_registry_urls

ADMIN = "admin-token-o"
ENT, A, B = "ent-o", "edge-a", "edge-b"


def _now() -> int:
    return int(time.time() * 1000)


@dataclass
class _World:
    gw: Gateway
    vm: VictoriaMetrics
    api: httpx.Client
    a: _Client
    b: _Client
    url: str

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.api.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"}, **kw)

    @property
    def registry(self) -> Registry:
        reg = self.gw.registry
        assert isinstance(reg, Registry)
        return reg

    def refused(self) -> float:
        return metric(self.gw, "iiot_gateway_rejected_total", {"reason": "device_not_owned"})

    def values(self) -> dict[tuple[str, str], list[float]]:
        """Stored values of point ``v`` by (device, agent tag)."""
        out: dict[tuple[str, str], list[float]] = {}
        for s in self.vm.export('{__name__="telemetry_v"}'):
            labels = s["metric"]
            assert isinstance(labels, dict) and isinstance(s["values"], list)
            key = (str(labels["device"]), str(labels["agent"]))
            out[key] = sorted(out.get(key, []) + [float(v) for v in s["values"]])
        return out

    def stored(self, expected: dict[tuple[str, str], list[float]]) -> None:
        """Wait for victoria-metrics to show ``expected`` (it shows new samples late)."""
        try:
            wait_until(lambda: self.values() == expected, what="the values stored")
        finally:
            assert self.values() == expected

    def settled(self, acked: float) -> None:
        """Every message so far acknowledged and written."""
        wait_until(
            lambda: metric(self.gw, "iiot_gateway_messages_acked_total") >= acked,
            what=f"{acked} messages acknowledged",
        )
        wait_until(lambda: self.gw.outbox is not None and self.gw.outbox.pending_lines == 0)


def _birth(client: _Client, agent: str, *devices: str) -> None:
    body = {
        "online": True,
        "bdseq": 1,
        "ts": _now(),
        "devices": [{"id": d, "profile": "generic-kiln", "protocol": "modbus"} for d in devices],
    }
    client.publish(f"iiot/v1/{ENT}/{agent}/agent", json.dumps(body).encode())


def _state(client: _Client, agent: str, device: str, online: bool, reason: str = "") -> None:
    body = {"online": online, "ts": _now(), "reason": reason}
    client.publish(f"iiot/v1/{ENT}/{agent}/{device}/state", json.dumps(body).encode())


def _data(client: _Client, agent: str, device: str, seq: int, v: float) -> None:
    body = {"seq": seq, "samples": [{"ts": _now(), "values": {"v": v}}]}
    client.publish(f"iiot/v1/{ENT}/{agent}/{device}/data", json.dumps(body).encode())


def _batch(client: _Client, agent: str, parts: dict[str, tuple[int, float]]) -> None:
    devices = {
        d: {"seq": q, "samples": [{"ts": _now(), "values": {"v": v}}]}
        for d, (q, v) in parts.items()
    }
    client.publish(f"iiot/v1/{ENT}/{agent}/batch", json.dumps({"devices": devices}).encode())


@pytest.fixture
def world(tmp_path: Path, registry_url: str, victoria: VictoriaMetrics) -> Iterator[_World]:
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    cfg = GatewayConfig(
        data_dir=tmp_path / "gw",
        database_url=registry_url,
        api=ApiConfig(port=0, admin_tokens=[SecretStr(ADMIN)]),
        broker_auth=BrokerAuthConfig(password_file=pw, acl_file=acl),
        influx=InfluxConfig(url=victoria.url, flush_interval=0.05, timeout=3),
        mqtt=MqttConfig(username="gateway", password=SecretStr("gw-pass")),
    )
    reg = Registry(cfg.registry_url)
    reg.add_enterprise(ENT, "Enterprise O", "130102", "C30")
    _id, key = reg.create_provisioning_key(ENT, max_uses=2)
    provisioner = Provisioner(reg, cfg)
    passwords = {agent: provisioner.provision(key, agent)["password"] for agent in (A, B)}
    reg.close()
    (tmp_path / "mq").mkdir()
    broker = Mosquitto(tmp_path / "mq", password_file=pw, acl_file=acl).start()
    cfg.mqtt = cfg.mqtt.model_copy(update={"url": broker.url})
    gw = Gateway(cfg)
    a = b = None
    try:
        gw.start()
        a, b = _Client(broker.port, A, passwords[A]), _Client(broker.port, B, passwords[B])
        assert a.ok and b.ok
        with httpx.Client(base_url=gw.api_url, timeout=30) as api:
            yield _World(gw, victoria, api, a, b, registry_url)
    finally:
        for c in (a, b):
            if c is not None:
                c.close()
        gw.stop()
        broker.stop()


def test_another_agent_s_data_birth_and_state_are_refused_until_the_device_moves(
    world: _World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ingest")
    w = world
    _birth(w.a, A, "kiln-1", "kiln-2")
    _state(w.a, A, "kiln-1", True)
    # B names A's kiln-1 in its birth: that device is refused, its own kiln-3 is not.
    _birth(w.b, B, "kiln-1", "kiln-3")
    _data(w.a, A, "kiln-1", 0, 1.0)
    _data(w.b, B, "kiln-1", 0, 666.0)
    _batch(w.b, B, {"kiln-1": (1, 667.0), "kiln-3": (0, 3.0)})
    _state(w.b, B, "kiln-1", False, "hijacked")
    _batch(w.a, A, {"kiln-1": (1, 2.0), "kiln-2": (0, 20.0)})
    w.settled(8)

    w.stored({("kiln-1", A): [1.0, 2.0], ("kiln-2", A): [20.0], ("kiln-3", B): [3.0]})
    # The birth's device, the data message, the batch's part and the state: each counted.
    assert w.refused() == 4
    kiln1 = w.registry.get_device(ENT, "kiln-1")
    assert kiln1 is not None
    assert kiln1["agent"] == A and kiln1["online"] and kiln1["latest"] == {"v": 2.0}
    assert kiln1["state_reason"] != "hijacked"
    kiln3 = w.registry.get_device(ENT, "kiln-3")
    assert kiln3 is not None and kiln3["agent"] == B
    logged = [r for r in caplog.records if r.getMessage().startswith("device data refused")]
    assert len(logged) == 1  # once per sender and minute, not once per message
    fields = ("enterprise", "device", "owner", "sender")
    assert [getattr(logged[0], f) for f in fields] == [ENT, "kiln-1", A, B]

    # The device moved to B's box: an admin gives it to B.
    r = w.call("POST", f"/api/v1/devices/{ENT}/kiln-1/move", json={"agent": B})
    assert r.status_code == 200, r.text
    assert r.json()["agent"] == B
    _data(w.b, B, "kiln-1", 0, 5.0)
    _data(w.a, A, "kiln-1", 2, 99.0)
    w.settled(10)
    w.stored(
        {
            ("kiln-1", A): [1.0, 2.0],
            ("kiln-2", A): [20.0],
            ("kiln-3", B): [3.0],
            ("kiln-1", B): [5.0],
        }
    )
    assert w.refused() == 5
    moves = w.call("GET", f"/api/v1/devices/{ENT}/kiln-1/moves").json()["items"]
    assert [(m["from_agent"], m["to_agent"], m["via"]) for m in moves] == [(A, B, "api")]
    assert moves[0]["by"].startswith("admin ")
    # Nobody else's agent, and not a device that does not exist.
    assert (
        w.call("POST", f"/api/v1/devices/{ENT}/kiln-1/move", json={"agent": "nope"}).status_code
        == 404
    )
    assert w.call("POST", f"/api/v1/devices/{ENT}/nope/move", json={"agent": A}).status_code == 404

    # What is in the database: another registry on it sees B as the owner.
    w.registry.flush()
    with Registry(w.url) as again:
        assert again.device_owner(ENT, "kiln-1") == B
        assert again.device_owner(ENT, "kiln-2") == A
        assert len(again.list_moves(ENT, "kiln-1")) == 1


def test_a_sparkplug_node_cannot_write_another_node_s_device(world: _World) -> None:
    w = world
    _birth(w.a, A, "kiln-1")
    _state(w.a, A, "kiln-1", True)
    w.settled(2)
    t = f"spBv1.0/{ENT}"
    nbirth = _payload(0, [{"name": BDSEQ, "datatype": DataType.UINT64, "value": 1}])
    dbirth = _payload(1, [{"name": "v", "alias": 1, "datatype": DataType.DOUBLE, "value": 0.0}])

    def ddata(seq: int, v: float) -> bytes:
        return _payload(seq, [{"alias": 1, "raw": ("double_value", v), "ts": _now() + seq}])

    w.b.publish(f"{t}/NBIRTH/{B}", nbirth)
    w.b.publish(f"{t}/DBIRTH/{B}/kiln-1", dbirth)  # refused: A's device
    w.b.publish(f"{t}/DDATA/{B}/kiln-1", ddata(2, 666.0))
    w.b.publish(f"{t}/DBIRTH/{B}/kiln-4", dbirth)  # its own: accepted
    w.b.publish(f"{t}/DDATA/{B}/kiln-4", ddata(4, 4.0))
    ddeath = _payload(
        5, [{"name": "Device Control/Reason", "datatype": DataType.STRING, "value": "x"}]
    )
    w.b.publish(f"{t}/DDEATH/{B}/kiln-1", ddeath)
    _data(w.a, A, "kiln-1", 0, 1.0)
    w.settled(9)
    w.stored({("kiln-1", A): [1.0], ("kiln-4", B): [4.0]})
    assert w.refused() == 3
    kiln1 = w.registry.get_device(ENT, "kiln-1")
    assert kiln1 is not None and kiln1["agent"] == A and kiln1["online"]


def test_a_remote_configuration_dropping_a_device_frees_it_for_the_next_agent(
    world: _World,
) -> None:
    w = world
    kiln = {"id": "kiln-1", "profile": "kiln-rotary-cement", "modbus": {"host": "10.0.0.7"}}
    r = w.call("PUT", f"/api/v1/agents/{ENT}/{A}/config", json={"devices": [kiln]})
    assert r.status_code == 200, r.text
    # The gateway acknowledges its own configuration messages too: wait on what counts.
    _birth(w.a, A, "kiln-1")
    wait_until(lambda: w.registry.device_owner(ENT, "kiln-1") == A, what="A's birth")
    _data(w.b, B, "kiln-1", 0, 666.0)
    wait_until(lambda: w.refused() == 1, what="B's data refused")

    # Moved to B's box: A's configuration no longer lists it, B's birth then claims it.
    r = w.call("PUT", f"/api/v1/agents/{ENT}/{A}/config", json={"devices": []})
    assert r.status_code == 200, r.text
    assert w.registry.device_owner(ENT, "kiln-1") is None
    _birth(w.b, B, "kiln-1")
    wait_until(lambda: w.registry.device_owner(ENT, "kiln-1") == B, what="B's birth")
    _data(w.b, B, "kiln-1", 0, 7.0)
    _data(w.a, A, "kiln-1", 5, 666.0)
    wait_until(lambda: w.refused() == 2, what="A's data refused")
    wait_until(lambda: w.gw.outbox is not None and w.gw.outbox.pending_lines == 0)
    w.stored({("kiln-1", B): [7.0]})
    moves = w.call("GET", f"/api/v1/devices/{ENT}/kiln-1/moves").json()["items"]
    assert [(m["from_agent"], m["to_agent"], m["via"]) for m in moves] == [(A, None, "config")]

    # Decommissioning frees it too, audited.
    assert w.call("DELETE", f"/api/v1/devices/{ENT}/kiln-1").status_code == 200
    moves = w.call("GET", f"/api/v1/devices/{ENT}/kiln-1/moves").json()["items"]
    assert [(m["from_agent"], m["to_agent"], m["via"]) for m in moves] == [
        (B, None, "decommission"),
        (A, None, "config"),
    ]
