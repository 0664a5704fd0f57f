"""MQTT publisher: birth/will, device state, and the spool sender.

paho-mqtt 2.x runs the network in its own thread (``loop_start``); everything else lives
on the agent's event loop and paho callbacks are handed over with
``call_soon_threadsafe``. Each connection session is a fresh paho client, so its will
carries that session's ``bdseq`` (persisted in the spool DB) and messages of a dead
session are never retransmitted behind our back: after a reconnect the sender resumes
from the oldest unacknowledged spool row, so order is kept and nothing is lost.

Fairness between replay and live data: devices are served round-robin, one message
per device per turn, and a backlog is packed up to ``batch_samples`` samples or
``batch_bytes`` per message. One device's backlog therefore never delays another
device's fresh samples, and a device's own fresh sample waits at most
``backlog / batch_samples`` messages (its samples must stay in seq order).

With ``mqtt.batch`` the sender instead takes the spool's rows in the order they were
spooled, whatever their device, and packs them into one batch message (up to the same
limits) with a part per device: at thousands of devices that is a few dozen messages a
second instead of one per device poll. A backlog then goes out oldest first for all
devices at once, which is how an outage leaves it anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_profiles.schema import Profile
from edge_agent.config import AgentConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.spool import Spool, SpoolRow
from iiot_common.backoff import Backoff, ConnState
from iiot_common.deadline import deadline_after
from protocols.driver import now_ms
from protocols.mqtt.codec import (
    BATCH_ENVELOPE_BYTES,
    JSON_CODEC,
    Codec,
    batch_part_bytes,
    pack_batch,
    payload_bytes,
)
from protocols.mqtt.contract import Birth, BirthDevice, DeviceState, Kind, Topic, Will, encode

__all__ = ["Publisher"]

log = logging.getLogger("iiot.agent.mqtt")

_CONNECT_TIMEOUT = 10.0
_STOP_FLUSH_TIMEOUT = 5.0
# With mqtt.batch: how long the sender lets samples gather after a message that was not
# full. Adds at most this much to a sample's publish lag.
_BATCH_LINGER = 0.05


@dataclass(slots=True)
class _InFlight:
    session: int
    device: str | None
    ids: list[int] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    kind: str = "data"


class Publisher:
    """Owns the broker connection and publishes birth, states and spooled samples."""

    def __init__(
        self,
        config: AgentConfig,
        spool: Spool,
        metrics: AgentMetrics,
        *,
        devices: list[BirthDevice],
        version: str,
        backoff: Backoff | None = None,
        codec: Codec = JSON_CODEC,
    ) -> None:
        self.cfg = config
        self.codec = codec
        self.spool = spool
        self.metrics = metrics
        self.devices = devices
        self.version = version
        self.backoff = backoff or Backoff(config.mqtt.reconnect_min, config.mqtt.reconnect_max)
        self.bdseq: int | None = None
        self.session = 0
        self.state = ConnState.DISCONNECTED
        self._agent_topic = str(Topic.agent_topic(config.enterprise, config.agent_id))
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[int, _InFlight] = {}
        self._data_count = 0  # entries of _inflight that carry samples
        self._data_topics: dict[str, str] = {}
        self._acks: deque[tuple[int, int]] = deque()  # (session, mid) from paho's thread
        self._acks_scheduled = False
        self._cursor: dict[str, int] = {}
        self._batch_cursor = 0  # with mqtt.batch: the newest spool id sent this session
        self._batch_topic = str(Topic.batch_topic(config.enterprise, config.agent_id))
        self._dirty: deque[str] = deque()
        self._dirty_set: set[str] = set()
        self._states: dict[str, DeviceState] = {}
        self._connack: asyncio.Future[tuple[bool, bool, str]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.config_version: int | None = None
        # Control plane: topics subscribed after every connect, and who gets their messages.
        self.subscriptions: list[str] = []
        self.on_message: Callable[[str, bytes], None] | None = None

    # -- public API -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for dev in self.spool.devices():
            self._mark_dirty(dev)
        self._tasks = [
            asyncio.create_task(self._connection_loop(), name="mqtt-connection"),
            asyncio.create_task(self._sender_loop(), name="mqtt-sender"),
        ]

    def sample_spooled(self, device: str) -> None:
        """A new sample of ``device`` is in the spool."""
        self._mark_dirty(device)

    def set_state(self, device: str, state: DeviceState) -> None:
        """Record a device's reachability and publish it (retained) when connected."""
        self._states[device] = state
        if self.state is ConnState.CONNECTED:
            self._publish_state(device, state)

    def set_birth(
        self,
        devices: list[BirthDevice],
        config_version: int | None,
        *,
        profiles: dict[str, Profile] | None = None,
    ) -> None:
        """Change what the birth announces, and announce it again when connected.

        ``profiles`` (device id → profile) is what a Sparkplug birth also names.
        """
        self.devices = devices
        self.config_version = config_version
        client = self._client
        if self.state is ConnState.CONNECTED and client is not None and self.bdseq is not None:
            self._publish_birth(client, self.bdseq)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish a control-plane answer (QoS 1) now; False when not connected."""
        client = self._client
        if self.state is not ConnState.CONNECTED or client is None:
            return False
        info = client.publish(topic, payload, qos=1, retain=retain)
        self._track(info, "control")
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    @property
    def connected(self) -> bool:
        return self.state is ConnState.CONNECTED

    async def stop(self, flush_timeout: float = _STOP_FLUSH_TIMEOUT) -> None:
        """Flush what is spooled (bounded), publish the orderly offline message, disconnect."""
        if self.connected:
            deadline = time.monotonic() + flush_timeout
            while time.monotonic() < deadline and self.connected:
                if not self._inflight and not self._dirty:
                    break
                self._wake.set()
                await asyncio.sleep(0.02)
        self._stopping = True
        # Python 3.11's wait_for may swallow the cancel below when a connect finishes at
        # the same moment; the connection loop then waits on _lost, so wake it there too.
        self._lost.set()
        self._wake.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        client = self._client
        if client is not None and self.connected and self.bdseq is not None:
            topic, payload, retain = self._will(self.bdseq)
            info = client.publish(topic, payload, qos=1, retain=retain)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(info.wait_for_publish, 2.0)
            client.disconnect()
        await self._close_client()
        self.state = ConnState.STOPPED
        self.metrics.mqtt_connected.set(0)

    # -- connection -------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        attempts = 0
        while not self._stopping:
            attempts += 1
            ok, auth_failed = await self._connect_once()
            if ok:
                self.metrics.mqtt_connects.labels("ok").inc()
                await self._lost.wait()
                if self._stopping:
                    return  # stop() says offline and closes the client
                log.warning("mqtt connection lost", extra={"bdseq": self.bdseq})
                await self._close_client()
                if self._stopping:
                    return
            else:
                self.metrics.mqtt_connects.labels("auth_failed" if auth_failed else "failed").inc()
            delay = self.backoff.next_delay(auth_failed=auth_failed)
            self.state = ConnState.BACKING_OFF
            log.info(
                "mqtt reconnect scheduled",
                extra={"in_s": round(delay, 2), "attempt": attempts},
            )
            await asyncio.sleep(delay)

    async def _connect_once(self) -> tuple[bool, bool]:
        """One connection session attempt; returns (connected, authentication failed)."""
        assert self._loop is not None
        self.state = ConnState.CONNECTING
        self.backoff.connecting()
        self._lost.clear()
        self.session += 1
        session = self.session
        bdseq = self.spool.next_bdseq()
        m = self.cfg.mqtt
        try:
            client = self._make_client(session, bdseq)
        except (OSError, UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
            # A password or CA file that cannot be read: say so, and try again later.
            log.error(
                "mqtt client cannot be set up",
                extra={"broker": f"{m.host}:{m.port}", "error": f"{type(exc).__name__}: {exc}"},
            )
            return False, False
        self._connack = self._loop.create_future()
        # Both waits move by the time the loop loses meanwhile: an agent busy starting
        # thousands of devices must not take a broker that answered for one that did not.
        try:
            async with deadline_after(_CONNECT_TIMEOUT, stretch=True):
                await asyncio.to_thread(client.connect, m.host, m.port, m.keepalive)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.warning(
                "mqtt connect failed",
                extra={"broker": f"{m.host}:{m.port}", "error": str(exc) or type(exc).__name__},
            )
            return False, False
        self._client = client
        client.loop_start()
        try:
            async with deadline_after(_CONNECT_TIMEOUT, stretch=True):
                ok, auth, reason = await self._connack
        except TimeoutError:
            ok, auth, reason = False, False, "no CONNACK"
        if not ok:
            log.warning("mqtt connection refused", extra={"reason": reason})
            await self._close_client()
            return False, auth
        self.bdseq = bdseq
        self.backoff.succeeded()
        # Everything unacknowledged is sent again by this session, oldest first; deletions
        # still queued in the spool are committed first so acknowledged rows are not resent.
        self.spool.flush()
        self._inflight.clear()
        self._data_count = 0
        self._cursor.clear()
        self._batch_cursor = 0
        for dev in self.spool.devices():
            self._mark_dirty(dev)
        self.state = ConnState.CONNECTED
        self.metrics.mqtt_connected.set(1)
        self._announce(client, bdseq)
        if self.subscriptions:
            client.subscribe([(t, 1) for t in self.subscriptions])
        log.info("mqtt connected", extra={"broker": f"{m.host}:{m.port}", "bdseq": bdseq})
        self._wake.set()
        return True, False

    def _will(self, bdseq: int) -> tuple[str, bytes, bool]:
        """The offline message of session ``bdseq``: (topic, payload, retain)."""
        return self._agent_topic, encode(Will(bdseq=bdseq)), True

    def _announce(self, client: mqtt.Client, bdseq: int) -> None:
        """A new session: the birth, then every device's state."""
        self._publish_birth(client, bdseq)
        for dev, st in self._states.items():
            self._publish_state(dev, st)

    def _data_message(self, device: str, rows: list[SpoolRow]) -> tuple[str, bytes]:
        """(topic, payload) of one data message of ``device``'s spooled ``rows``."""
        topic = self._data_topics.get(device)
        if topic is None:
            topic = str(
                Topic.device_topic(self.cfg.enterprise, self.cfg.agent_id, device, Kind.DATA)
            )
            self._data_topics[device] = topic
        return topic, self.codec.pack(rows[0].seq, [r.body for r in rows])

    def _make_client(self, session: int, bdseq: int) -> mqtt.Client:
        m = self.cfg.mqtt
        proto = mqtt.MQTTv5 if m.protocol == "5" else mqtt.MQTTv311
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id,
            protocol=proto,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(max(m.max_inflight + 8, 20))
        client.max_queued_messages_set(0)
        will_topic, will_payload, will_retain = self._will(bdseq)
        client.will_set(will_topic, will_payload, qos=1, retain=will_retain)
        if m.username is not None:
            client.username_pw_set(m.username, self.cfg.mqtt_password())
        if m.tls:
            client.tls_set(ca_certs=str(m.ca_file) if m.ca_file else None)
        client.on_connect = lambda c, u, f, rc, p: self._threadsafe(self._on_connect, session, rc)
        client.on_disconnect = lambda c, u, f, rc, p: self._threadsafe(self._on_disconnect, session)
        client.on_publish = lambda c, u, mid, rc, p: self._puback(session, mid)
        client.on_message = lambda c, u, msg: self._message(session, msg)
        return client

    def _threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        self._call_soon(fn, *args)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> bool:
        """Hand ``fn`` to the event loop from any thread; False when there is none."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)
                return True
        return False

    def _message(self, session: int, msg: mqtt.MQTTMessage) -> None:
        """paho thread: hand a received message to the loop (``on_message``)."""
        handler = self.on_message
        if handler is not None and session == self.session:
            self._call_soon(handler, msg.topic, bytes(msg.payload))

    def _puback(self, session: int, mid: int) -> None:
        """paho thread: queue a PUBACK; one loop wake-up serves all queued meanwhile."""
        self._acks.append((session, mid))
        if not self._acks_scheduled:
            self._acks_scheduled = True
            if not self._call_soon(self._drain_pubacks):
                self._acks_scheduled = False

    def _drain_pubacks(self) -> None:
        # Cleared before draining: a PUBACK queued after this line schedules a new drain.
        self._acks_scheduled = False
        acks = self._acks
        for _ in range(len(acks)):
            session, mid = acks.popleft()
            self._on_publish(session, mid)

    def _on_connect(self, session: int, rc: Any) -> None:
        if session != self.session or self._connack is None or self._connack.done():
            return
        failed = bool(getattr(rc, "is_failure", False))
        value = int(getattr(rc, "value", 0) or 0)
        # 4/5 (3.1.1) and 0x86/0x87 (5): bad credentials / not authorised.
        auth = failed and value in (4, 5, 0x86, 0x87)
        self._connack.set_result((not failed, auth, str(rc)))

    def _on_disconnect(self, session: int) -> None:
        if session != self.session:
            return
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((False, False, "disconnected before CONNACK"))
        if self.state is ConnState.CONNECTED:
            self.state = ConnState.DISCONNECTED
            self.backoff.lost()
            self.metrics.mqtt_connected.set(0)
        self._lost.set()

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            client.disconnect()
        await asyncio.to_thread(client.loop_stop)

    # -- publishing -------------------------------------------------------------------

    def _publish_birth(self, client: mqtt.Client, bdseq: int) -> None:
        birth = Birth(
            bdseq=bdseq,
            ts=now_ms(),
            version=self.version,
            devices=self.devices,
            config_version=self.config_version,
        )
        self._track(client.publish(self._agent_topic, encode(birth), qos=1, retain=True), "birth")

    def _publish_state(self, device: str, state: DeviceState) -> None:
        if self._client is None or not self._may_send():
            return
        topic = str(Topic.device_topic(self.cfg.enterprise, self.cfg.agent_id, device, Kind.STATE))
        self._track(self._client.publish(topic, encode(state), qos=1, retain=True), "state")

    def _track(
        self, info: mqtt.MQTTMessageInfo, kind: str, flight: _InFlight | None = None
    ) -> None:
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return  # the connection is going; the disconnect path resends what matters
        flight = flight or _InFlight(self.session, None, kind=kind)
        self._inflight[info.mid] = flight
        if flight.ids:
            self._data_count += 1

    def _on_publish(self, session: int, mid: int) -> None:
        if session != self.session or self.state is ConnState.STOPPED:
            return
        flight = self._inflight.pop(mid, None)
        if flight is None:
            return
        if flight.ids:
            self._data_count -= 1
        self.metrics.published_messages.labels(flight.kind).inc()
        if flight.ids:
            self.spool.ack_later(flight.ids)
            now = now_ms()
            for ts in flight.ts:
                self.metrics.publish_latency.observe(max(0, now - ts) / 1000)
            self.metrics.published_samples.inc(len(flight.ids))
            self._update_spool_metrics()
        self._acked(mid)
        self._wake.set()

    def _acked(self, mid: int) -> None:
        """The broker acknowledged tracked message ``mid`` of this session."""

    def _update_spool_metrics(self) -> None:
        self.metrics.spool_depth.set(self.spool.depth)
        self.metrics.spool_bytes.set(self.spool.size_bytes)

    def _mark_dirty(self, device: str) -> None:
        if device not in self._dirty_set:
            self._dirty_set.add(device)
            self._dirty.append(device)
        self._wake.set()

    def _may_send(self) -> bool:
        """Whether data may go out on this connection (a Sparkplug node waits for its host)."""
        return True

    def _data_inflight(self) -> int:
        return self._data_count

    async def _sender_loop(self) -> None:
        batch = self.cfg.mqtt.batch
        while not self._stopping:
            self._wake.clear()
            client = self._client
            if (
                not self.connected
                or not self._may_send()
                or client is None
                or not self._dirty
                or self._data_inflight() >= self.cfg.mqtt.max_inflight
            ):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                continue
            if batch:
                full = self._publish_batch(client)
                if full is None:
                    # Everything spooled is sent: wait for the next commit to mark devices.
                    self._dirty.clear()
                    self._dirty_set.clear()
                # A message that was not full: let a few group commits gather the next one
                # (tens of messages a second at thousands of devices, not one per commit).
                await asyncio.sleep(0 if full else _BATCH_LINGER)
                continue
            device = self._dirty.popleft()
            self._dirty_set.discard(device)
            rows = self._unsent(device)
            if not rows:
                continue
            self._publish_rows(client, device, rows)
            # Back of the queue: the next device gets its turn before this one again.
            self._mark_dirty(device)
            await asyncio.sleep(0)

    def _unsent(self, device: str) -> list[SpoolRow]:
        """The next message's worth of ``device``'s spooled rows not yet sent."""
        sp = self.cfg.spool
        return self.spool.batch(
            device,
            after_id=self._cursor.get(device, 0),
            max_samples=sp.batch_samples,
            max_bytes=sp.batch_bytes,
        )

    def _publish_batch(self, client: mqtt.Client) -> bool | None:
        """One batch message of the oldest unsent rows: whether it was full; None if none."""
        sp = self.cfg.spool
        rows = self.spool.rows_after(self._batch_cursor, max_samples=sp.batch_samples)
        if not rows:
            return None
        parts: dict[str, list[SpoolRow]] = {}
        # The whole payload counts against batch_bytes: envelope, each part's wrapper
        # and the commas, as pack_batch writes them.
        size = BATCH_ENVELOPE_BYTES
        taken = 0
        for r in rows:
            run = parts.get(r.device)
            if run is not None and r.seq != run[-1].seq + 1:
                break  # a device's part carries consecutive seqs only (a cap drop's gap)
            add = payload_bytes(r.body)
            if run is None:  # a new part: its wrapper, and a comma after the one before
                add += batch_part_bytes(r.device, r.seq) + (1 if parts else 0)
            else:  # the comma before this body
                add += 1
            if taken and size + add > sp.batch_bytes:
                break
            if run is None:
                parts[r.device] = [r]
            else:
                run.append(r)
            size += add
            taken += 1
        sent = rows[:taken]
        payload = pack_batch([(d, run[0].seq, [r.body for r in run]) for d, run in parts.items()])
        info = client.publish(self._batch_topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None  # the connection is going; the next session starts over
        self._batch_cursor = sent[-1].id
        flight = _InFlight(self.session, None, [r.id for r in sent], [r.ts for r in sent])
        self._track(info, "data", flight)
        return taken < len(rows) or taken == sp.batch_samples

    def _flush_device(self, client: mqtt.Client, device: str) -> None:
        """Publish every spooled sample of ``device`` not yet sent, now (before its death)."""
        self.spool.flush(bounded=True)  # samples still waiting for the group commit too
        while True:
            rows = self._unsent(device)
            if not rows:
                return
            before = self._cursor.get(device, 0)
            self._publish_rows(client, device, rows)
            if self._cursor.get(device, 0) == before:
                return  # the connection is going: the rows stay spooled

    def _publish_rows(self, client: mqtt.Client, device: str, rows: list[SpoolRow]) -> None:
        topic, payload = self._data_message(device, rows)
        info = client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return
        self._cursor[device] = rows[-1].id
        self._track(
            info,
            "data",
            _InFlight(self.session, device, [r.id for r in rows], [r.ts for r in rows]),
        )
