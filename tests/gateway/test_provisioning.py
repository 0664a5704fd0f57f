"""Provisioning against a real Mosquitto: password file, ACL, reload."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr

from gateway.config import BrokerAuthConfig, GatewayConfig, MqttConfig
from gateway.provisioning import (
    Provisioner,
    ProvisioningError,
    mosquitto_hash,
    verify_mosquitto_hash,
)
from gateway.registry import Conflict, NotFound, Registry
from iiot_common.localservers import Mosquitto, PostgreSQL
from tests.gateway import test_registry_fixtures as _fx
from tests.waiting import wait_until

_ids = itertools.count()

# These run on SQLite and on PostgreSQL.
registry_url = _fx.both_registry_urls


class _Client:
    """A paho client that records the CONNACK and the messages it receives."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.connected = threading.Event()
        self.reason: Any = None
        self.messages: list[tuple[str, bytes]] = []
        self.got = threading.Condition()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"t-{username}-{next(_ids)}",
            protocol=mqtt.MQTTv311,
        )
        self.c.username_pw_set(username, password)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        assert self.connected.wait(5), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = reason
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.got:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.got.notify_all()

    @property
    def ok(self) -> bool:
        return not self.reason.is_failure

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *_a: done.set()
        self.c.subscribe(topic, qos=1)
        assert done.wait(5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def wait_for(self, payload: bytes, timeout: float = 5) -> None:
        with self.got:
            assert self.got.wait_for(lambda: any(p == payload for _t, p in self.messages), timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _accepted(port: int, username: str, password: str) -> bool:
    """Whether the broker lets ``username`` in with ``password`` now (files reloaded)."""
    client = _Client(port, username, password)
    client.close()
    return client.ok


def test_password_hash_is_mosquittos_format() -> None:
    entry = mosquitto_hash("secret", salt=b"0123456789ab")
    assert entry.startswith("$7$101$MDEyMzQ1Njc4OWFi$")
    assert verify_mosquitto_hash("secret", entry)
    assert not verify_mosquitto_hash("Secret", entry)


@pytest.fixture
def broker_setup(
    tmp_path: Path, registry_url: str
) -> Iterator[tuple[Registry, Mosquitto, Path, Path]]:
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    reg = Registry(registry_url)
    reg.add_enterprise("ent-a", "Enterprise A", "130102", "C30")
    reg.add_enterprise("ent-b", "Enterprise B", "130203", "C31")
    # Write the gateway's own entry first so the broker starts with a valid file.
    Provisioner(reg, _config(pw, acl, None)).sync()
    (tmp_path / "mq").mkdir()
    broker = Mosquitto(tmp_path / "mq", password_file=pw, acl_file=acl).start()
    try:
        yield reg, broker, pw, acl
    finally:
        broker.stop()
        reg.close()


def _config(pw: Path, acl: Path, reload: list[str] | None) -> GatewayConfig:
    return GatewayConfig(
        mqtt=MqttConfig(username="gateway", password=SecretStr("gw-pass")),
        broker_auth=BrokerAuthConfig(
            password_file=pw,
            acl_file=acl,
            reload_command=reload,
            broker_url_for_agents="mqtts://broker.example.invalid:8883",
        ),
    )


def test_agents_are_confined_to_their_own_prefix(
    broker_setup: tuple[Registry, Mosquitto, Path, Path],
) -> None:
    reg, broker, pw, acl = broker_setup
    assert broker.proc is not None
    prov = Provisioner(reg, _config(pw, acl, ["kill", "-HUP", str(broker.proc.pid)]))
    _id, key_a = reg.create_provisioning_key("ent-a")
    _id, key_b = reg.create_provisioning_key("ent-b", max_uses=1)
    a = prov.provision(key_a, "edge-a")
    b = prov.provision(key_b, "edge-b")
    assert a["topic_prefix"] == "iiot/v1/ent-a/edge-a"
    assert b["broker_url"] == "mqtts://broker.example.invalid:8883"
    assert prov.counters["reloads"] == 2
    assert "topic write iiot/v1/ent-b/edge-b/+/data" in acl.read_text()
    assert a["password"] not in pw.read_text()
    with pytest.raises(NotFound, match="used up"):
        prov.provision(key_b, "edge-b2")

    # The broker re-reads its files on SIGHUP asynchronously.
    wait_until(lambda: _accepted(broker.port, "edge-b", b["password"]), what="the reload")
    gw = _Client(broker.port, "gateway", "gw-pass")
    agent_a = _Client(broker.port, "edge-a", a["password"])
    agent_b = _Client(broker.port, "edge-b", b["password"])
    intruder = _Client(broker.port, "edge-a", "wrong-password")
    try:
        assert gw.ok and agent_a.ok and agent_b.ok
        assert not intruder.ok  # refused at connect
        gw.subscribe("iiot/v1/#")
        agent_a.publish("iiot/v1/ent-b/edge-b/dev-1/data", b"forged")
        agent_a.publish("iiot/v1/ent-a/edge-b/dev-1/data", b"forged-agent")
        agent_a.publish("iiot/v1/ent-b/edge-b/batch", b"forged-batch")
        agent_a.publish("iiot/v1/ent-a/edge-a/dev-1/data", b"from-a")
        agent_a.publish("iiot/v1/ent-a/edge-a/batch", b"batch-from-a")
        agent_b.publish("iiot/v1/ent-b/edge-b/dev-1/data", b"from-b")
        gw.wait_for(b"from-a")
        gw.wait_for(b"batch-from-a")
        gw.wait_for(b"from-b")
        payloads = [p for _t, p in gw.messages]
        # QoS 1 from one connection arrives in order: the forged ones would be here by now.
        assert not {b"forged", b"forged-agent", b"forged-batch"} & set(payloads)
        # An agent cannot read another enterprise's data either.
        agent_b.subscribe("iiot/v1/ent-a/#")
        agent_a.publish("iiot/v1/ent-a/edge-a/dev-1/data", b"secret-a")
        gw.wait_for(b"secret-a")
        agent_b.publish("iiot/v1/ent-b/edge-b/dev-1/data", b"marker-b")
        gw.wait_for(b"marker-b")
        assert agent_b.messages == []
    finally:
        for c in (gw, agent_a, agent_b, intruder):
            c.close()


def test_rotating_an_agent_password_locks_out_the_old_one(
    broker_setup: tuple[Registry, Mosquitto, Path, Path],
) -> None:
    reg, broker, pw, acl = broker_setup
    prov = Provisioner(reg, _config(pw, acl, None))
    _id, key = reg.create_provisioning_key("ent-a")
    first = prov.provision(key, "edge-a")
    # Any key of the enterprise may not take over a live agent's id.
    with pytest.raises(Conflict, match="already provisioned"):
        prov.provision(key, "edge-a")
    second = prov.rotate("ent-a", "edge-a", by="admin test")
    broker.reload()
    wait_until(lambda: _accepted(broker.port, "edge-a", second["password"]), what="the reload")
    old = _Client(broker.port, "edge-a", first["password"])
    new = _Client(broker.port, "edge-a", second["password"])
    try:
        assert not old.ok and new.ok
    finally:
        old.close()
        new.close()


def test_gateway_instances_sharing_a_database_see_each_others_agents(
    tmp_path: Path, registry_url: str
) -> None:
    url = registry_url
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    a = Registry(url)
    a.add_enterprise("ent-a", "Enterprise A", "130102", "C30")
    b = Registry(url)
    a.add_enterprise("ent-late", "Added after B started", "130203", "C31")
    pa, pb = Provisioner(a, _config(pw, acl, None)), Provisioner(b, _config(pw, acl, None))
    try:
        _id, key = a.create_provisioning_key("ent-late")
        pa.provision(key, "edge-a")
        # B's ingest accepts the agent (and enterprise) that A added.
        assert b.check_publisher("ent-late", "edge-a") is None
        assert b.check_publisher("ent-a", "edge-a") == "agent_enterprise_mismatch"

        # B rewrites the broker files: A's agent stays in them.
        _id, key_b = b.create_provisioning_key("ent-a")
        pb.provision(key_b, "edge-b")
        assert {line.split(":")[0] for line in pw.read_text().splitlines()} == {
            "gateway",
            "edge-a",
            "edge-b",
        }
        assert "topic write iiot/v1/ent-late/edge-a/+/data" in acl.read_text()

        # A flood from an unknown agent costs one database lookup, not one per message.
        lookups = b.counters["publisher_lookups"]
        for _ in range(100):
            assert b.check_publisher("ent-a", "edge-c") == "unknown_agent"
        assert b.counters["publisher_lookups"] == lookups + 1
        _id, key_c = a.create_provisioning_key("ent-a")
        pa.provision(key_c, "edge-c")
        assert b.check_publisher("ent-a", "edge-c") == "unknown_agent"  # still remembered
        b.publisher_miss_ttl = 0.0  # as when the miss has aged out
        assert b.check_publisher("ent-a", "edge-c") is None
    finally:
        a.close()
        b.close()


def test_a_single_use_key_works_once_across_gateway_instances(
    tmp_path: Path, registry_url: str
) -> None:
    url = registry_url
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    a = Registry(url)
    a.add_enterprise("ent-a", "Enterprise A", "130102", "C30")
    b = Registry(url)
    pa, pb = Provisioner(a, _config(pw, acl, None)), Provisioner(b, _config(pw, acl, None))
    try:
        _id, once = a.create_provisioning_key("ent-a", max_uses=1)
        pa.provision(once, "edge-1")
        with pytest.raises(NotFound, match="used up"):
            pb.provision(once, "edge-2")

        # The same, with A redeeming just after B has read the key's use count.
        _id, once = a.create_provisioning_key("ent-a", max_uses=1)
        first: list[dict[str, Any]] = []

        def a_redeems_meanwhile(_conn: Any, _cur: Any, statement: str, *_rest: Any) -> None:
            if (
                not first
                and statement.lstrip().startswith("SELECT")
                and "provisioning_keys" in (statement)
            ):
                first.append(pa.provision(once, "edge-3"))

        sa.event.listen(b._engine, "after_cursor_execute", a_redeems_meanwhile)
        with pytest.raises(NotFound, match="used up"):
            pb.provision(once, "edge-4")
        assert [c["agent_id"] for c in first] == ["edge-3"]
        assert [ag.id for ag in a.list_agents()] == ["edge-1", "edge-3"]
        assert "edge-4" not in pw.read_text()
    finally:
        a.close()
        b.close()


def test_an_empty_gateway_password_is_never_written_to_the_broker(tmp_path: Path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    try:
        cfg = _config(tmp_path / "passwd", tmp_path / "acl", None)
        cfg.mqtt = MqttConfig(username="gateway", password=SecretStr(""))
        with pytest.raises(ProvisioningError, match=r"mqtt\.password of gateway user 'gateway'"):
            Provisioner(reg, cfg).sync()
        assert not (tmp_path / "passwd").exists()
    finally:
        reg.close()


def test_instances_provisioning_at_once_both_keep_their_agents_in_the_files(
    tmp_path: Path, postgres_server: PostgreSQL
) -> None:
    # PostgreSQL: two instances' transactions run side by side (SQLite takes one at a time).
    url = postgres_server.create_database()
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    a = Registry(url)
    a.add_enterprise("ent-a", "Enterprise A", "130102", "C30")
    b = Registry(url)
    pa, pb = Provisioner(a, _config(pw, acl, None)), Provisioner(b, _config(pw, acl, None))
    try:
        _id, key_a = a.create_provisioning_key("ent-a")
        _id, key_b = a.create_provisioning_key("ent-a")
        done: list[str] = []

        def a_provisions_meanwhile(_conn: Any, _cur: Any, statement: str, *_rest: Any) -> None:
            # B has read the credentials for its files; A commits its agent before B does.
            if not done and "password_hash IS NOT NULL" in statement:
                done.append(pa.provision(key_a, "edge-a")["agent_id"])

        sa.event.listen(b._engine, "after_cursor_execute", a_provisions_meanwhile)
        pb.provision(key_b, "edge-b")
        assert done == ["edge-a"]
        users = {line.split(":")[0] for line in pw.read_text().splitlines()}
        assert users == {"gateway", "edge-a", "edge-b"}
        assert "user edge-a" in acl.read_text() and "user edge-b" in acl.read_text()
    finally:
        a.close()
        b.close()
