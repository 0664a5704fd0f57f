"""The shipped broker set-up on Debian's Mosquitto, running as its own user, over TLS.

deploy/mosquitto.conf is included from Debian's own main file with ports and paths moved
only; ``iiot gateway init-broker`` makes its first files; the gateway's provisioner
writes the auth files it reads.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr, ValidationError

from edge_agent.config import MqttConfig as AgentMqttConfig
from gateway.config import BrokerAuthConfig, GatewayConfig, MqttConfig
from gateway.provisioning import Provisioner, ProvisioningError
from gateway.registry import Conflict, Registry
from gateway.service import Gateway
from iiot_common.localservers import DebianMosquitto, free_port
from tests.waiting import wait_until

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto.conf"
GW_USER, GW_PASS = "iiot-gateway-1", "gateway-secret"


@pytest.fixture
def broker_root() -> Iterator[Path]:
    """A folder the broker's own user can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="iiot-broker-"))
    d.chmod(0o755)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def _gateway_config(broker: DebianMosquitto, **auth: Any) -> GatewayConfig:
    etc = broker.etc
    return GatewayConfig(
        mqtt=MqttConfig(
            url=broker.tls_url,
            username=GW_USER,
            password=SecretStr(GW_PASS),
            ca_file=etc / "certs" / "ca.crt",
        ),
        broker_auth=BrokerAuthConfig(
            password_file=etc / "iiot" / "passwd",
            acl_file=etc / "iiot" / "acl",
            file_group="mosquitto",
            **auth,
        ),
    )


@pytest.fixture
def shipped_broker(broker_root: Path, tmp_path: Path) -> Iterator[DebianMosquitto]:
    """The shipped set-up after ``iiot gateway init-broker``, started as root."""
    broker = DebianMosquitto(broker_root / "root", SHIPPED).prepare()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(_gateway_config(broker).model_dump_json(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "iiot", "gateway", "init-broker", "--config", str(cfg),
         "--owner", "root", "--certs-dir", str(broker.etc / "certs"),
         "--hostname", "broker.example.invalid"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    broker.start()
    yield broker
    broker.stop()


class _Client:
    """A paho client over TLS that records its CONNACK, disconnects and messages."""

    def __init__(
        self,
        broker: DebianMosquitto,
        username: str,
        password: str,
        *,
        client_id: str,
        persistent: bool = False,
    ) -> None:
        self.connected = threading.Event()
        self.reason: Any = None
        self.disconnects = 0
        self.messages: list[bytes] = []
        self.got = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=str(broker.etc / "certs" / "ca.crt"))
        self.c.username_pw_set(username, password)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600 if persistent else 0
        self.broker, self.persistent, self.props = broker, persistent, props
        self.connect()

    def connect(self) -> None:
        self.connected.clear()
        self.c.connect(
            "127.0.0.1",
            self.broker.tls_port,
            keepalive=10,
            clean_start=not self.persistent,
            properties=self.props,
        )
        self.c.loop_start()
        assert self.connected.wait(5), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = reason
        self.connected.set()

    def _on_disconnect(self, *_a: Any) -> None:
        self.disconnects += 1

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.got:
            self.messages.append(bytes(msg.payload))
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

    def wait_count(self, n: int, timeout: float = 10) -> bool:
        with self.got:
            return self.got.wait_for(lambda: len(self.messages) >= n, timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _accepted(broker: DebianMosquitto, username: str, password: str) -> bool:
    """Whether the broker lets ``username`` in with ``password`` now."""
    client = _Client(broker, username, password, client_id=f"probe-{username}")
    client.close()
    return client.ok


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@pytest.fixture
def provisioned(
    shipped_broker: DebianMosquitto, tmp_path: Path
) -> Iterator[tuple[DebianMosquitto, Provisioner, dict[str, Any]]]:
    """The gateway's provisioner has written the files for agents ``edge-a`` and ``edge-b``."""
    assert shipped_broker.proc is not None
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    reg.add_enterprise("ent-a", "Enterprise A", "130102", "C30")
    cfg = _gateway_config(
        shipped_broker, reload_command=["kill", "-HUP", str(shipped_broker.proc.pid)]
    )
    prov = Provisioner(reg, cfg)
    _id, key = reg.create_provisioning_key("ent-a")
    cred = prov.provision(key, "edge-a")
    cred["other"] = prov.provision(key, "edge-b")
    # The broker re-reads its files on SIGHUP asynchronously: edge-b gets in once it has.
    wait_until(
        lambda: _accepted(shipped_broker, "edge-b", cred["other"]["password"]), what="the reload"
    )
    try:
        yield shipped_broker, prov, cred
    finally:
        prov.close()
        reg.close()


def test_shipped_broker_runs_as_its_own_user_and_reads_the_gateways_files(
    provisioned: tuple[DebianMosquitto, Provisioner, dict[str, Any]],
) -> None:
    broker, prov, cred = provisioned
    assert broker.proc is not None
    assert _uid_of(broker.proc.pid) == pwd.getpwnam("mosquitto").pw_uid
    for path in (broker.etc / "iiot" / "passwd", broker.etc / "iiot" / "acl"):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640, path
        assert st.st_gid == pwd.getpwnam("mosquitto").pw_gid, path
    assert prov.counters["reloads"] == 2

    gw = _Client(broker, GW_USER, GW_PASS, client_id=GW_USER)
    agent = _Client(broker, "edge-a", cred["password"], client_id="edge-a")
    try:
        assert gw.ok and agent.ok, (gw.reason, agent.reason)
        gw.subscribe("iiot/v1/#")
        agent.publish("iiot/v1/ent-a/edge-a/dev-1/data", b"over-tls")
        assert gw.wait_count(1), "the gateway got nothing from the agent"
        assert gw.messages == [b"over-tls"]
    finally:
        gw.close()
        agent.close()


def test_agent_credentials_cannot_take_the_gateways_client_id(
    provisioned: tuple[DebianMosquitto, Provisioner, dict[str, Any]],
) -> None:
    broker, _prov, cred = provisioned
    gw = _Client(broker, GW_USER, GW_PASS, client_id=GW_USER, persistent=True)
    other = cred["other"]
    agent = _Client(broker, "edge-b", other["password"], client_id="edge-b")
    intruders: list[_Client] = []
    try:
        gw.subscribe("iiot/v1/#")
        # While the gateway is connected: the intruder neither disconnects it ...
        intruders.append(
            _Client(broker, "edge-a", cred["password"], client_id=GW_USER, persistent=True)
        )
        for i in range(20):
            agent.publish("iiot/v1/ent-a/edge-b/dev-1/data", b"live-%d" % i)
        assert gw.wait_count(20), f"gateway got {len(gw.messages)} of 20"
        assert gw.disconnects == 0 and gw.c.is_connected()

        # ... nor, while the gateway is away, receives the messages queued for it.
        gw.close()
        for i in range(20):
            agent.publish("iiot/v1/ent-a/edge-b/dev-1/data", b"queued-%d" % i)
        intruders.append(
            _Client(broker, "edge-a", cred["password"], client_id=GW_USER, persistent=True)
        )
        time.sleep(1.0)
        assert all(c.messages == [] for c in intruders)
        gw.connect()
        assert gw.wait_count(40), f"gateway got {len(gw.messages)} of 40 after reconnecting"
        assert sorted(gw.messages[20:]) == sorted(b"queued-%d" % i for i in range(20))
    finally:
        for c in (gw, agent, *intruders):
            c.close()


def test_gateway_starts_before_its_broker_and_retries_the_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flag = tmp_path / "broker-up"
    cfg = GatewayConfig(
        data_dir=tmp_path / "gw",
        mqtt=MqttConfig(url=f"mqtt://127.0.0.1:{free_port()}"),
        broker_auth=BrokerAuthConfig(
            password_file=tmp_path / "auth" / "passwd",
            acl_file=tmp_path / "auth" / "acl",
            # Fails like `pkill -HUP -x mosquitto` with no broker running, until the flag.
            reload_command=["sh", "-c", f"test -e '{flag}'"],
        ),
    )
    gw = Gateway(cfg, serve_api=False, connect_timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="iiot.gateway.provisioning"):
        gw.start()
    try:
        assert gw.provisioner.counters["reload_errors"] == 1
        assert gw.provisioner.reload_pending
        assert any("broker reload failed" in r.getMessage() for r in caplog.records)
        assert (tmp_path / "auth" / "passwd").exists()
        flag.touch()
        deadline = time.monotonic() + 10
        while gw.provisioner.counters["reloads"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.provisioner.counters["reloads"] == 1
        assert not gw.provisioner.reload_pending
        from prometheus_client import generate_latest

        text = generate_latest(gw.collector).decode()
        assert 'iiot_gateway_broker_files_total{kind="reloads"} 1.0' in text
        assert 'iiot_gateway_broker_files_total{kind="reload_errors"} 1.0' in text
    finally:
        gw.stop()


def test_client_id_is_the_username() -> None:
    assert MqttConfig(username="gw-2").client_id == "gw-2"
    assert MqttConfig().client_id == "iiot-gateway-1"
    with pytest.raises(ValidationError, match="differs from username"):
        MqttConfig(username="gw-2", client_id="iiot-gateway-1")
    with pytest.raises(ValidationError, match="differs from username"):
        AgentMqttConfig(url="mqtts://b:8883", username="edge-a", client_id="iiot-gateway-1")


def test_peer_gateway_users_are_kept_and_cannot_be_agents(tmp_path: Path) -> None:
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    pw.parent.mkdir()
    pw.write_text("gw-2:$7$101$c2FsdA==$aGFzaA==\nstale:$7$101$c2FsdA==$aGFzaA==\n")
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    reg.add_enterprise("ent-a", "Enterprise A", "130102", "C30")
    cfg = GatewayConfig(
        mqtt=MqttConfig(username="gw-1", password=SecretStr("x")),
        broker_auth=BrokerAuthConfig(password_file=pw, acl_file=acl, peer_gateway_users=["gw-2"]),
    )
    prov = Provisioner(reg, cfg)
    try:
        _id, key = reg.create_provisioning_key("ent-a")
        with pytest.raises(Conflict, match="gateway instance"):
            prov.provision(key, "gw-2")
        prov.provision(key, "edge-a")
        users = [line.split(":")[0] for line in pw.read_text().splitlines()]
        assert users == ["gw-1", "gw-2", "edge-a"]
        assert "gw-2:$7$101$c2FsdA==$aGFzaA==" in pw.read_text()
        assert "user gw-2\ntopic read iiot/v1/#" in acl.read_text()
    finally:
        reg.close()


def test_unknown_file_group_is_named(tmp_path: Path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    cfg = GatewayConfig(
        broker_auth=BrokerAuthConfig(
            password_file=tmp_path / "passwd",
            acl_file=tmp_path / "acl",
            file_group="no-such-group-iiot",
        )
    )
    try:
        with pytest.raises(ProvisioningError, match="no-such-group-iiot"):
            Provisioner(reg, cfg).sync()
    finally:
        reg.close()


def test_init_broker_keeps_existing_files(tmp_path: Path) -> None:
    pw = tmp_path / "auth" / "passwd"
    pw.parent.mkdir()
    pw.write_text("someone:$7$1$a$b\n")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"broker_auth: {{password_file: {pw}, acl_file: {tmp_path / 'auth' / 'acl'}}}\n")
    certs = tmp_path / "certs"
    args = [sys.executable, "-m", "iiot", "gateway", "init-broker", "--config", str(cfg)]
    for _ in range(2):
        done = subprocess.run(
            [*args, "--certs-dir", str(certs)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
    assert pw.read_text() == "someone:$7$1$a$b\n"
    assert f"kept    {certs / 'server.key'}" in done.stdout
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600
    assert os.access(tmp_path / "auth" / "acl", os.R_OK)
