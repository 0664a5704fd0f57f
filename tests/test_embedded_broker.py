"""The embedded broker: Mosquitto-format credentials and ACL, retained births and wills.

Integration tests use real paho-mqtt clients on loopback against the broker, with the
password and ACL files written by the gateway's own provisioning code.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import BrokerAuthConfig, GatewayConfig, MqttConfig
from gateway.provisioning import Provisioner, mosquitto_hash
from iiot.broker import (
    AuthFileError,
    EmbeddedBroker,
    EmbeddedBrokerError,
    filter_covered,
    parse_acl,
    parse_password_file,
    topic_matches,
)
from iiot_common.localservers import Mosquitto, free_port
from protocols.mqtt.contract import Birth, Topic, Will, encode

WAIT = 5.0
REFUSED = "Not authorized"  # CONNACK code 5
GATEWAY_USER, GATEWAY_PW = "iiot-gateway", "gw-secret"


# --------------------------------------------------------------------------- pure ACL


def test_topic_matching_follows_mqtt_wildcards() -> None:
    assert topic_matches("iiot/v1/E1/A/#", "iiot/v1/E1/A/kiln-1/data")
    assert topic_matches("iiot/v1/E1/A/#", "iiot/v1/E1/A")
    assert topic_matches("iiot/v1/+/+/agent", "iiot/v1/E1/A/agent")
    assert not topic_matches("iiot/v1/E1/A/#", "iiot/v1/E2/B/agent")
    assert not topic_matches("iiot/v1/+/agent", "iiot/v1/E1/A/agent")
    assert not topic_matches("#", "$SYS/broker/uptime")
    assert not topic_matches("iiot/v1/#", "iiot/v1/+/A")


def test_subscription_filter_must_be_covered_by_the_grant() -> None:
    assert filter_covered("iiot/v1/E1/A/#", "iiot/v1/E1/A/#")
    assert filter_covered("iiot/v1/E1/A/+/data", "iiot/v1/E1/A/#")
    assert filter_covered("iiot/v1/E1/+/agent", "iiot/v1/+/+/agent")
    assert filter_covered("$share/ingest/iiot/v1/#", "$share/+/iiot/v1/#")
    assert not filter_covered("iiot/v1/#", "iiot/v1/E1/A/#")
    assert not filter_covered("iiot/v1/+/A/#", "iiot/v1/E1/A/#")
    assert not filter_covered("#", "iiot/#")
    assert not filter_covered("iiot/v1/E1/A/#", "iiot/v1/E1/A/+/#")
    assert not filter_covered("$share/ingest/iiot/v1/#", "iiot/v1/#")


_level = st.sampled_from(["a", "b", "c", "+"])
_filters = st.builds(
    lambda levels, hash_: "/".join(levels + (["#"] if hash_ else [])) or "#",
    st.lists(_level, min_size=0, max_size=4),
    st.booleans(),
)
_topics = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=5).map("/".join)


@given(_filters, _filters, st.lists(_topics, min_size=1, max_size=20))
def test_a_covered_filter_never_reaches_a_topic_the_grant_does_not(
    flt: str, pattern: str, topics: list[str]
) -> None:
    if filter_covered(flt, pattern):
        for t in topics:
            assert not topic_matches(flt, t) or topic_matches(pattern, t)


@given(_topics, _filters)
def test_a_plain_topic_is_covered_exactly_when_it_matches(topic: str, pattern: str) -> None:
    assert filter_covered(topic, pattern) == topic_matches(pattern, topic)


def test_acl_grants_read_write_and_deny_per_user() -> None:
    acl = parse_acl(
        "# comment\n"
        "topic read public/#\n"
        "user gw\n"
        "topic read iiot/v1/#\n"
        "topic read $share/+/iiot/v1/#\n"
        "\n"
        "user A\n"
        "topic readwrite iiot/v1/E1/A/#\n"
        "topic deny iiot/v1/E1/A/secret\n"
        "user B\n"
        "topic\twrite   iiot/v1/E1/B/#\n"
        "pattern read clients/%u/#\n"
    )
    assert acl.allows("gw", "g1", "iiot/v1/#", "subscribe")
    assert acl.allows("gw", "g1", "$share/ingest/iiot/v1/#", "subscribe")
    assert not acl.allows("gw", "g1", "iiot/v1/E1/A/agent", "publish")
    assert acl.allows("A", "a", "iiot/v1/E1/A/kiln/data", "publish")
    assert not acl.allows("A", "a", "iiot/v1/E1/A/secret", "publish")
    assert not acl.allows("A", "a", "iiot/v1/E2/B/agent", "publish")
    assert acl.allows("B", "b", "iiot/v1/E1/B/x", "publish")
    assert not acl.allows("B", "b", "iiot/v1/E1/B/x", "receive")  # write only
    assert acl.allows("B", "b", "clients/B/x", "receive")
    assert not acl.allows("B", "b", "clients/A/x", "receive")
    assert not acl.allows("nobody", "n", "public/x", "receive")  # anonymous-only rule
    assert acl.allows(None, "n", "public/x", "receive")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user A\ntopic\n", "acl.conf:2: 'topic' needs a topic"),
        ("user A\ntopic read a/#/b\n", "acl.conf:2: invalid topic pattern 'a/#/b'"),
        ("allow everything\n", "acl.conf:1: unknown ACL directive 'allow'"),
        ("user\n", "acl.conf:1: 'user' needs a name"),
    ],
)
def test_a_malformed_acl_names_file_and_line(text: str, message: str) -> None:
    with pytest.raises(AuthFileError) as err:
        parse_acl(text, source="acl.conf")
    assert str(err.value) == message


def test_a_malformed_password_line_names_file_and_line() -> None:
    assert parse_password_file("a:$7$x\n\n# c\nb:$7$y\n") == {"a": "$7$x", "b": "$7$y"}
    with pytest.raises(AuthFileError, match=r"pw:2: expected 'username:hash'"):
        parse_password_file("a:$7$x\nbroken-line\n", source="pw")


# --------------------------------------------------------------------------- helpers


class _Agents:
    """Stands in for the registry: the (agent, enterprise, hash) rows provisioning reads."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, agent: str, enterprise: str, password: str) -> None:
        self.rows.append((agent, enterprise, mosquitto_hash(password)))

    def agent_credentials(self) -> list[tuple[str, str, str]]:
        return sorted(self.rows)


def _provisioner(tmp_path: Path, agents: _Agents) -> Provisioner:
    config = GatewayConfig(
        data_dir=tmp_path,
        mqtt=MqttConfig(username=GATEWAY_USER, password=GATEWAY_PW),
        broker_auth=BrokerAuthConfig(
            password_file=tmp_path / "passwd", acl_file=tmp_path / "acl.conf"
        ),
    )
    return Provisioner(cast(Any, agents), config)


class _Client:
    """A paho client on its own network thread, collecting what it receives."""

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = True,
    ) -> None:
        self.port = port
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        self.connacks: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        self.c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(list(rcs))
        self.c.on_message = lambda _c, _u, msg: self.messages.put(msg)

    def connect(self) -> Any:
        """Connect; returns the CONNACK reason code."""
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        # Drive the network by hand until CONNACK, so a refused client never starts the
        # background thread (which would sit in paho's reconnect back-off).
        deadline = time.monotonic() + WAIT
        while self.connacks.empty() and time.monotonic() < deadline:
            self.c.loop(timeout=0.05)
        rc = self.connacks.get_nowait()
        if not rc.is_failure:
            self.c.loop_start()
        return rc

    def subscribe(self, flt: str) -> list[Any]:
        self.c.subscribe(flt, qos=1)
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def next(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT)

    def drop_connection(self) -> None:
        """Lose the connection without DISCONNECT, as a crashed agent does."""
        self.c.loop_stop()
        sock = self.c.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(autouse=True)
def no_threads_left_behind() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    # asyncio_N threads are the default executor of the test's event loop, which
    # pytest-asyncio shuts down with the loop after this check.
    left = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith("asyncio_")
    ]
    for t in left:
        t.join(WAIT)
    assert not [t.name for t in left if t.is_alive()]


@pytest.fixture
def clients() -> Iterator[list[_Client]]:
    made: list[_Client] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, Provisioner, _Agents]]:
    """A broker in its own thread, on the files provisioning wrote for agent A of E1."""
    agents = _Agents()
    agents.add("A", "E1", "pw-a")
    agents.add("B", "E2", "pw-b")
    prov = _provisioner(tmp_path, agents)
    assert prov.sync()
    broker = EmbeddedBroker(
        port=free_port(),
        password_file=tmp_path / "passwd",
        acl_file=tmp_path / "acl.conf",
        connect_timeout=0.5,
    )
    broker.run_in_thread()
    yield broker, prov, agents
    broker.stop_thread()
    assert not any(t.name.startswith("iiot-broker") for t in threading.enumerate())


def _connect(clients: list[_Client], port: int, *args: Any, **kw: Any) -> _Client:
    client = _Client(port, *args, **kw)
    clients.append(client)
    return client


# --------------------------------------------------------------------------- integration


def test_agent_publishes_its_own_topics_and_the_gateway_receives_them(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, _, _ = secured
    gw = _connect(clients, broker.port, "gw-1", GATEWAY_USER, GATEWAY_PW)
    assert gw.connect() == 0
    assert gw.subscribe("iiot/v1/#") == [1]
    agent = _connect(clients, broker.port, "agent-A", "A", "pw-a")
    assert agent.connect() == 0

    agent.publish("iiot/v1/E2/B/kiln-9/data", b"forged")  # another enterprise's topic
    agent.publish("iiot/v1/E1/A/kiln-1/data", b'{"seq": 1}')
    msg = gw.next()
    # The forged message would have arrived first: messages from one client keep order.
    assert (msg.topic, msg.payload) == ("iiot/v1/E1/A/kiln-1/data", b'{"seq": 1}')
    assert gw.messages.empty()
    assert broker.counters["publish_denied"] == 1


def test_agents_may_not_subscribe_beyond_their_own_prefix(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, _, _ = secured
    agent = _connect(clients, broker.port, "agent-A", "A", "pw-a")
    assert agent.connect() == 0
    assert agent.subscribe("iiot/v1/#")[0].is_failure
    assert agent.subscribe("iiot/v1/E2/B/#")[0].is_failure
    assert agent.subscribe("$share/ingest/iiot/v1/#")[0].is_failure
    assert agent.subscribe("iiot/v1/E1/A/+/cmd") == [1]


def test_wrong_password_and_anonymous_clients_are_refused_at_connect(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, _, _ = secured
    wrong = _connect(clients, broker.port, "agent-A", "A", "not-the-password")
    assert str(wrong.connect()) == REFUSED
    anonymous = _connect(clients, broker.port, "anon")
    assert str(anonymous.connect()) == REFUSED
    stranger = _connect(clients, broker.port, "x", "nobody", "pw-a")
    assert str(stranger.connect()) == REFUSED
    assert broker.counters["connect_refused_password"] == 2
    assert broker.counters["connect_refused_anonymous"] == 1


def test_a_refused_client_cannot_take_over_a_connected_session(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, _, _ = secured
    gw = _connect(clients, broker.port, "gw-1", GATEWAY_USER, GATEWAY_PW)
    assert gw.connect() == 0
    assert gw.subscribe("iiot/v1/#") == [1]
    intruder = _connect(clients, broker.port, "gw-1", GATEWAY_USER, "guess")
    assert str(intruder.connect()) == REFUSED
    agent = _connect(clients, broker.port, "agent-A", "A", "pw-a")
    assert agent.connect() == 0
    agent.publish("iiot/v1/E1/A/kiln-1/state", b'{"online": true}')
    assert gw.next().payload == b'{"online": true}'


def test_a_newly_provisioned_agent_connects_without_a_broker_restart(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, prov, agents = secured
    newcomer = _connect(clients, broker.port, "agent-C", "C", "pw-c")
    assert str(newcomer.connect()) == REFUSED
    newcomer.close()

    agents.add("C", "E1", "pw-c")
    assert prov.sync()  # rewrites both files atomically, as provisioning does

    gw = _connect(clients, broker.port, "gw-1", GATEWAY_USER, GATEWAY_PW)
    assert gw.connect() == 0
    assert gw.subscribe("iiot/v1/E1/#") == [1]
    again = _connect(clients, broker.port, "agent-C", "C", "pw-c")
    assert again.connect() == 0
    again.publish("iiot/v1/E1/C/motor-1/data", b"{}")
    assert gw.next().topic == "iiot/v1/E1/C/motor-1/data"


def test_a_broken_acl_on_reload_keeps_the_previous_rules(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client], tmp_path: Path
) -> None:
    broker, _, _ = secured
    (tmp_path / "acl.conf").write_text("user A\ntopic readwrite iiot/v1/E1/A/#/x\n")
    with pytest.raises(AuthFileError, match=r"acl\.conf:2: invalid topic pattern"):
        broker.reload()
    agent = _connect(clients, broker.port, "agent-A", "A", "pw-a")
    assert agent.connect() == 0  # the automatic reload fails too, and is counted
    assert broker.counters["reload_errors"] == 1
    assert agent.subscribe("iiot/v1/E1/A/+/cmd") == [1]


def test_retained_birth_and_will_reach_the_gateway_on_abnormal_disconnect(
    either_broker: int, clients: list[_Client]
) -> None:
    port = either_broker
    topic = str(Topic.agent_topic("E1", "A"))
    birth = encode(Birth(bdseq=3, ts=1_700_000_000_000, version="1.0", devices=[]))
    will = encode(Will(bdseq=3))
    agent = _connect(clients, port, "agent-A", "A", "pw-a", will=(topic, will))
    assert agent.connect() == 0
    agent.publish(topic, birth, retain=True)

    gw = _connect(clients, port, "gw-1", GATEWAY_USER, GATEWAY_PW)
    assert gw.connect() == 0
    assert gw.subscribe("iiot/v1/+/+/agent") == [1]
    got = gw.next()
    assert (got.topic, got.payload, got.retain) == (topic, birth, True)

    agent.drop_connection()
    got = gw.next()
    assert (got.topic, got.payload) == (topic, will)

    # The will is retained too: a gateway that connects later learns the agent is gone.
    late = _connect(clients, port, "gw-2", GATEWAY_USER, GATEWAY_PW)
    assert late.connect() == 0
    assert late.subscribe("iiot/v1/E1/#") == [1]
    got = late.next()
    assert (got.topic, got.payload, got.retain) == (topic, will, True)


def test_a_will_on_a_foreign_topic_is_refused_at_connect(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, _, _ = secured
    forged = _connect(
        clients, broker.port, "agent-A", "A", "pw-a", will=("iiot/v1/E2/B/agent", b"{}")
    )
    assert str(forged.connect()) == REFUSED


def test_a_refused_connect_cannot_change_a_connected_agents_will(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, _, _ = secured
    topic = "iiot/v1/E1/A/agent"
    will = b'{"online": false, "bdseq": 1}'
    agent = _connect(
        clients, broker.port, "agent-A", "A", "pw-a", will=(topic, will), clean_session=False
    )
    assert agent.connect() == 0
    forger = _connect(
        clients,
        broker.port,
        "agent-A",
        "A",
        "guess",
        will=(topic, b'{"online": true}'),
        clean_session=False,
    )
    assert str(forger.connect()) == REFUSED
    gw = _connect(clients, broker.port, "gw-1", GATEWAY_USER, GATEWAY_PW)
    assert gw.connect() == 0
    assert gw.subscribe("iiot/v1/+/+/agent") == [1]
    agent.drop_connection()
    assert gw.next().payload == will


def test_another_user_cannot_take_the_gateways_client_id_or_its_queued_messages(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, _, _ = secured
    gw = _connect(clients, broker.port, "gw-1", GATEWAY_USER, GATEWAY_PW, clean_session=False)
    assert gw.connect() == 0
    assert gw.subscribe("iiot/v1/#") == [1]
    agent = _connect(clients, broker.port, "agent-A", "A", "pw-a")
    assert agent.connect() == 0
    # Agent B, correctly authenticated, claims the gateway's client id while it is online.
    live = _connect(clients, broker.port, "gw-1", "B", "pw-b", clean_session=False)
    assert str(live.connect()) == REFUSED
    agent.publish("iiot/v1/E1/A/kiln-1/data", b"live")
    assert gw.next().payload == b"live"  # the gateway was not disconnected

    gw.close()
    assert broker._broker is not None
    stored = broker._broker._sessions["gw-1"][0]
    deadline = time.monotonic() + WAIT
    while stored.transitions.is_connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    agent.publish("iiot/v1/E1/A/kiln-1/data", b"queued")  # kept for the gateway's session
    resume = _connect(clients, broker.port, "gw-1", "B", "pw-b", clean_session=False)
    assert str(resume.connect()) == REFUSED
    assert resume.messages.empty()
    wipe = _connect(clients, broker.port, "gw-1", "B", "pw-b", clean_session=True)
    assert str(wipe.connect()) == REFUSED
    assert broker.counters["connect_refused_client_id"] == 3

    back = _connect(clients, broker.port, "gw-1", GATEWAY_USER, GATEWAY_PW, clean_session=False)
    assert back.connect() == 0
    assert back.next().payload == b"queued"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x10\x05hello",  # a CONNECT that is not one
        b"\x40\x02\x00\x01",  # a PUBACK before CONNECT
        b"GET / HTTP/1.1\r\n",  # half a packet, then silence
    ],
)
def test_garbage_instead_of_connect_is_dropped_and_counted(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client], garbage: bytes
) -> None:
    broker, _, _ = secured
    with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT) as raw:
        raw.sendall(garbage)
        assert raw.recv(100) == b""  # the broker hangs up
    agent = _connect(clients, broker.port, "agent-A", "A", "pw-a")
    assert agent.connect() == 0
    assert broker.counters["connect_malformed"] == 1


def test_reconnecting_agent_gets_no_retained_messages_of_others(
    secured: tuple[EmbeddedBroker, Provisioner, _Agents], clients: list[_Client]
) -> None:
    broker, _, _ = secured
    gw = _connect(clients, broker.port, "gw-1", GATEWAY_USER, GATEWAY_PW)
    assert gw.connect() == 0
    assert gw.subscribe("iiot/v1/#") == [1]
    b = _connect(clients, broker.port, "agent-B", "B", "pw-b")
    assert b.connect() == 0
    b.publish("iiot/v1/E2/B/agent", b'{"online": true, "bdseq": 0}', retain=True)
    assert gw.next().topic == "iiot/v1/E2/B/agent"

    a = _connect(clients, broker.port, "agent-A", "A", "pw-a")
    assert a.connect() == 0
    assert a.subscribe("iiot/v1/E1/A/+/cmd") == [1]
    gw.publish("iiot/v1/E1/A/kiln-1/cmd", b"marker")  # only the gateway writes an agent's cmd
    assert a.next().payload == b"marker"  # nothing of B's arrived before it


def test_shared_subscription_splits_messages_between_gateways(
    either_broker: int, clients: list[_Client]
) -> None:
    port = either_broker
    gws = []
    for i in range(2):
        gw = _connect(clients, port, f"gw-{i}", GATEWAY_USER, GATEWAY_PW)
        assert gw.connect() == 0
        assert gw.subscribe("$share/ingest/iiot/v1/#") == [1]
        gws.append(gw)
    agent = _connect(clients, port, "agent-A", "A", "pw-a")
    assert agent.connect() == 0
    for n in range(10):
        agent.publish("iiot/v1/E1/A/kiln-1/data", str(n).encode())
    received: list[bytes] = []
    per_gateway = [0, 0]
    deadline = time.monotonic() + WAIT
    while len(received) < 10 and time.monotonic() < deadline:
        for i, gw in enumerate(gws):
            with contextlib.suppress(queue.Empty):
                received.append(bytes(gw.messages.get(timeout=0.02).payload))
                per_gateway[i] += 1
    assert sorted(received) == sorted(str(n).encode() for n in range(10))
    assert per_gateway[0] > 0 and per_gateway[1] > 0


@pytest.fixture(params=["embedded", "mosquitto"])
def either_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    """The embedded broker and the production Mosquitto, on the same provisioned files."""
    agents = _Agents()
    agents.add("A", "E1", "pw-a")
    agents.add("B", "E2", "pw-b")
    assert _provisioner(tmp_path, agents).sync()
    pw, acl = tmp_path / "passwd", tmp_path / "acl.conf"
    if request.param == "embedded":
        broker = EmbeddedBroker(port=free_port(), password_file=pw, acl_file=acl)
        broker.run_in_thread()
        yield broker.port
        broker.stop_thread()
    else:
        (tmp_path / "mosquitto").mkdir()
        mosq = Mosquitto(tmp_path / "mosquitto", password_file=pw, acl_file=acl).start()
        yield mosq.port
        mosq.stop()


def _topics_until(client: _Client, marker: str) -> set[str]:
    """Topics a client receives up to and including ``marker``."""
    seen: set[str] = set()
    while marker not in seen:
        seen.add(client.next().topic)
    return seen


def test_embedded_broker_lets_through_what_mosquitto_does(
    either_broker: int, clients: list[_Client]
) -> None:
    port = either_broker
    assert str(_connect(clients, port, "x1", "A", "nope").connect()) == REFUSED
    assert str(_connect(clients, port, "x2").connect()) == REFUSED
    gw = _connect(clients, port, "gw-1", GATEWAY_USER, GATEWAY_PW)
    assert gw.connect() == 0
    gw.subscribe("iiot/v1/#")
    a = _connect(clients, port, "agent-A", "A", "pw-a")
    assert a.connect() == 0
    a.subscribe("iiot/v1/#")  # wider than its grant: refused here, filtered by Mosquitto
    a.subscribe("iiot/v1/E1/A/+/cmd")
    b = _connect(clients, port, "agent-B", "B", "pw-b")
    assert b.connect() == 0

    b.publish("iiot/v1/E2/B/agent", b'{"online": true, "bdseq": 0}')
    a.publish("iiot/v1/E2/B/kiln-9/data", b"forged")
    # Downlink topics, even the agent's own, are the gateway's alone.
    a.publish("iiot/v1/E1/A/kiln-1/cmd", b"forged")
    a.publish("iiot/v1/E1/A/config", b"forged")
    marker = "iiot/v1/E1/A/kiln-1/result"
    a.publish(marker, b"{}")
    assert _topics_until(gw, marker) == {"iiot/v1/E2/B/agent", marker}
    gw.publish("iiot/v1/E1/A/kiln-1/cmd", b"from-gateway")
    first = a.next()
    assert (first.topic, first.payload) == ("iiot/v1/E1/A/kiln-1/cmd", b"from-gateway")


# --------------------------------------------------------------------------- lifecycle


def test_a_taken_port_gives_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        broker = EmbeddedBroker(port=port)
        with pytest.raises(EmbeddedBrokerError, match=rf"cannot listen on 127\.0\.0\.1:{port}"):
            broker.run_in_thread()
    assert not any(t.name.startswith("iiot-broker") for t in threading.enumerate())


def test_missing_password_file_is_named_at_start(tmp_path: Path) -> None:
    (tmp_path / "acl.conf").write_text("")
    broker = EmbeddedBroker(
        port=free_port(), password_file=tmp_path / "passwd", acl_file=tmp_path / "acl.conf"
    )
    with pytest.raises(AuthFileError, match="passwd: cannot read"):
        broker.run_in_thread()


async def test_runs_in_the_callers_loop_and_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    broker = EmbeddedBroker(port=0)  # anonymous: only for tests of other parts
    await broker.start()
    assert broker.port > 0
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"

    def exchange() -> mqtt.MQTTMessage:
        sub, pub = _Client(broker.port, "sub"), _Client(broker.port, "pub")
        try:
            assert sub.connect() == 0
            assert sub.subscribe("t/#") == [1]
            assert pub.connect() == 0
            pub.publish("t/1", b"hello")
            return sub.next()
        finally:
            sub.close()
            pub.close()

    msg = await asyncio.to_thread(exchange)
    assert msg.payload == b"hello"
    await broker.stop()
    assert asyncio.all_tasks() == before
