"""The agent's publisher speaking Sparkplug B (``mqtt.codec: sparkplug``).

Same connection, spool and acknowledgement handling as the JSON publisher; only what is
said differs (``protocols.mqtt.sparkplug.node.EdgeNode`` keeps the session rules):

    will        NDEATH with this session's bdSeq
    connected   NBIRTH, DBIRTH of every device, DDEATH of those known offline
    state       DBIRTH when a device comes online, DDEATH (with the reason) when it goes
    data        DDATA by alias; samples older than the NBIRTH flagged is_historical
    NCMD        ``Node Control/Rebirth``: NBIRTH and every DBIRTH again
    DCMD        handed to ``on_dcmd`` (device, payload): writes, answered by the agent
    devices     ``set_birth`` (remote configuration): DBIRTH of added and changed
                devices, DDEATH of removed ones
    STATE       with ``mqtt.sparkplug.primary_host``: births (and data) only once
                ``spBv1.0/STATE/{host}`` says online; offline: NDEATH, disconnect, and
                births again when the host is back
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
import paho.mqtt.client as mqtt

from device_profiles.schema import Profile
from edge_agent.config import AgentConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.publisher import Publisher
from edge_agent.spool import Spool, SpoolRow
from iiot_common.backoff import Backoff
from protocols.driver import now_ms
from protocols.mqtt.contract import BirthDevice, ContractError, DeviceState
from protocols.mqtt.sparkplug.codec import SPARKPLUG_CODEC
from protocols.mqtt.sparkplug.node import EdgeNode, NodeDevice, is_rebirth_request
from protocols.mqtt.sparkplug.payload import MessageType, datatype_for

__all__ = ["SparkplugPublisher", "node_devices"]

log = logging.getLogger("iiot.agent.sparkplug")


def node_devices(devices: list[BirthDevice], profiles: dict[str, Profile]) -> list[NodeDevice]:
    """The edge node's devices: each birth device with its profile's points."""
    return [
        NodeDevice(
            d.id,
            d.profile,
            d.protocol,
            d.family,
            d.category,
            tuple((p.name, datatype_for(p), p.unit) for p in profiles[d.id].points),
        )
        for d in devices
    ]


class SparkplugPublisher(Publisher):
    """A ``Publisher`` whose messages are Sparkplug B 3.0."""

    def __init__(
        self,
        config: AgentConfig,
        spool: Spool,
        metrics: AgentMetrics,
        *,
        devices: list[BirthDevice],
        profiles: dict[str, Profile],
        version: str,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(
            config,
            spool,
            metrics,
            devices=devices,
            version=version,
            backoff=backoff,
            codec=SPARKPLUG_CODEC,
        )
        self.node = EdgeNode(
            config.enterprise, config.agent_id, node_devices(devices, profiles), version=version
        )
        self._ncmd = self.node.topic(MessageType.NCMD)
        self._dcmd_prefix = f"{self.node.topic(MessageType.DCMD, '_')[:-1]}"
        self.rebirths = 0
        host = config.mqtt.sparkplug.primary_host
        self._state_topic = f"spBv1.0/STATE/{host}" if host else None
        self._host_ts = -1  # timestamp of the newest STATE seen: older ones are stale
        self._born = False  # this connection's NBIRTH is out
        # DDEATHs waiting for their device's DDATA in flight: device -> (mids, reason, ts).
        self._deaths: dict[str, tuple[set[int], str, int | None]] = {}
        # A DCMD (device, payload), on the event loop: the agent turns it into writes.
        self.on_dcmd: Callable[[str, bytes], None] | None = None

    def _will(self, bdseq: int) -> tuple[str, bytes, bool]:
        # Not retained: a Sparkplug host learns of the node from its NBIRTH.
        return self.node.topic(MessageType.NDEATH), self.node.death(bdseq), False

    def _may_send(self) -> bool:
        return self._born

    def _announce(self, client: mqtt.Client, bdseq: int) -> None:
        self._born = False
        self._deaths.clear()  # the new session's births say who is offline
        topics = [(self._ncmd, 1), (self._dcmd_prefix + "+", 1)]
        if self._state_topic is not None:
            # The host's retained STATE answers the subscription; births wait for it.
            client.subscribe([*topics, (self._state_topic, 1)])
            return
        client.subscribe(topics)
        self._births(client, bdseq, new_session=True)

    def set_birth(
        self,
        devices: list[BirthDevice],
        config_version: int | None,
        *,
        profiles: dict[str, Profile] | None = None,
    ) -> None:
        """A new device set: DBIRTH of added and changed devices, DDEATH of removed ones."""
        self.devices = devices
        self.config_version = config_version
        if profiles is None:
            return
        client = self._client
        live = self.connected and client is not None and self._born
        if live:
            assert client is not None
            # A removed device's last samples go out while its aliases are known, before
            # its DDEATH: a host sees no DDATA of a device after its death.
            kept = {d.id for d in devices}
            for dev in [d for d in self.node.devices if d not in kept]:
                self._flush_device(client, dev)
        born, gone = self.node.set_devices(node_devices(devices, profiles))
        if not live or client is None:
            return  # the next births announce the new set
        node = self.node
        for dev in gone:
            st = self._states.pop(dev, None)
            if st is None or st.online:
                self._ddeath(client, dev, "removed")
        for dev in born:
            topic = node.topic(MessageType.DBIRTH, dev)
            self._track(client.publish(topic, node.dbirth(dev), qos=0), "birth")

    def _births(self, client: mqtt.Client, bdseq: int, *, new_session: bool) -> None:
        self._born = True
        node = self.node
        payload = node.nbirth(bdseq, new_session=new_session)
        self._track(client.publish(node.topic(MessageType.NBIRTH), payload, qos=0), "birth")
        for dev in node.devices:
            topic = node.topic(MessageType.DBIRTH, dev)
            self._track(client.publish(topic, node.dbirth(dev), qos=0), "birth")
            st = self._states.get(dev)
            if st is not None and not st.online:
                self._publish_state(dev, st)

    def _publish_state(self, device: str, state: DeviceState) -> None:
        client = self._client
        if client is None or not self._born or device not in self.node.devices:
            return
        node = self.node
        if state.online:
            self._deaths.pop(device, None)  # back before its death went out
            topic, payload = node.topic(MessageType.DBIRTH, device), node.dbirth(device)
            self._track(client.publish(topic, payload, qos=0), "state")
        else:
            self._flush_device(client, device)  # its last samples before its death
            self._ddeath(client, device, state.reason or "offline", state.ts)

    def _ddeath(self, client: mqtt.Client, device: str, reason: str, ts: int | None = None) -> None:
        """DDEATH of ``device`` once the broker has its DDATA in flight, now if none is.

        The MQTT client holds QoS 1 messages (DDATA) back past its in-flight window but
        sends a QoS 0 one (DDEATH) at once: published now, a death could overtake its
        device's last samples.
        """
        waiting = {m for m, f in self._inflight.items() if f.device == device and f.ids}
        if waiting:
            self._deaths[device] = (waiting, reason, ts)
            return
        self._deaths.pop(device, None)
        payload = self.node.ddeath(device, reason, ts)
        self._track(client.publish(self.node.topic(MessageType.DDEATH, device), payload), "state")

    def _acked(self, mid: int) -> None:
        for device, (waiting, reason, ts) in list(self._deaths.items()):
            waiting.discard(mid)
            client = self._client
            if not waiting and client is not None and self._born:
                self._ddeath(client, device, reason, ts)

    def _data_message(self, device: str, rows: list[SpoolRow]) -> tuple[str, bytes]:
        return self.node.topic(MessageType.DDATA, device), self.node.ddata(
            device, [r.body for r in rows]
        )

    def _make_client(self, session: int, bdseq: int) -> mqtt.Client:
        client = super()._make_client(session, bdseq)
        client.on_message = lambda c, u, msg: self._command(session, msg)
        return client

    def _command(self, session: int, msg: mqtt.MQTTMessage) -> None:
        """paho thread: NCMD and DCMD here, the JSON control topics to ``on_message``."""
        topic = msg.topic
        if topic.startswith(self._dcmd_prefix):
            if self.on_dcmd is not None and session == self.session:
                self._call_soon(self.on_dcmd, topic[len(self._dcmd_prefix) :], bytes(msg.payload))
            return
        if topic == self._state_topic:
            self._call_soon(self._host_state, session, bytes(msg.payload))
            return
        if topic != self._ncmd:
            self._message(session, msg)
            return
        payload = bytes(msg.payload)
        try:
            rebirth = is_rebirth_request(payload)
        except ContractError as exc:
            self.metrics.errors.labels("ncmd", exc.reason).inc()
            return
        if rebirth:
            self._call_soon(self._rebirth, session)

    def _host_state(self, session: int, payload: bytes) -> None:
        """The primary host's STATE: be born when it is online, go when it goes."""
        client = self._client
        if session != self.session or client is None or not self.connected:
            return
        assert self.bdseq is not None
        try:
            body = orjson.loads(payload)
            online, ts = body["online"], int(body.get("timestamp", 0))
            if not isinstance(online, bool):
                raise TypeError("online is not a boolean")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            self.metrics.errors.labels("state", "bad_state").inc()
            return
        if ts < self._host_ts:
            return  # an older STATE of the host, delivered late
        self._host_ts = ts
        if online and not self._born:
            log.info("primary host online: births", extra={"bdseq": self.bdseq & 0xFF})
            self._births(client, self.bdseq, new_session=True)
            self._wake.set()
        elif not online and self._born:
            # As the specification says: NDEATH and disconnect; births again once it is back.
            log.warning("primary host offline: disconnecting", extra={"ts": ts})
            self._born = False
            topic, death, _ = self._will(self.bdseq)
            client.publish(topic, death, qos=1)
            client.disconnect()

    def _rebirth(self, session: int) -> None:
        client = self._client
        if session != self.session or client is None or not self.connected or not self._born:
            return
        assert self.bdseq is not None
        self.rebirths += 1
        log.info("rebirth requested", extra={"bdseq": self.bdseq & 0xFF, "ts": now_ms()})
        self._births(client, self.bdseq, new_session=False)
