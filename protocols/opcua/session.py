"""Shared OPC UA sessions: one secure channel and session per server and identity.

Servers cap their sessions (node-opcua: 10 by default), so every device on the same
endpoint with the same security settings and user shares one ``Session``, as Modbus
devices share a line (``protocols.modbus.line``). The pool counts references: the last
``release_session`` closes the client.

A session opens once for all its devices (the first device to need it connects, the
others wait for that attempt, bounded by their ``connect_timeout``) and connects to one
endpoint are made one at a time. When the session is lost, every device on it sees
``healthy`` false on its next read and goes offline; the first to reconnect opens a new
session (a new ``generation``) that the others then reuse.

Subscriptions are shared too: one per publishing interval, holding the monitored items of
many devices up to the server's limits (``max_items_per_subscription``). The session keeps
Publish requests in flight for all of them (``publish.Publisher``) and routes each
notification straight into its device's ``Changes``: the newest value of each point, and
the values not yet handed over, in order, as batches (a point's second value waiting goes
into the next batch, so a queue of several values per point is delivered whole).

A server answers a session's requests in order, and carries out the ones a device gave up
waiting for all the same: monitored items whose CreateMonitoredItems came back after the
device's ``connect_timeout`` are deleted again as soon as that answer arrives (the device
holds none of them, and the server would keep sampling them, sending their values and
counting them against its limits). When the session was lost meanwhile there is nothing
to do: the server ends the session's subscriptions with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary

from protocols.opcua.config import OpcUaConnection
from protocols.opcua.fastread import exchange, late_answer, type_id
from protocols.opcua.publish import Item, Notifications, Publisher

__all__ = [
    "Batch",
    "Changes",
    "LateItemCounts",
    "Session",
    "SharedSubscription",
    "abandon",
    "acquire_session",
    "open_sessions",
    "release_session",
    "teardown",
]


class LateItemCounts(Protocol):
    """A device's counters of the monitored items created after it gave up on them."""

    late_items_deleted: int
    late_items_left: int


_log = logging.getLogger(__name__)

# Settings every device on one session must agree on (their identity on the server).
_SESSION_FIELDS = (
    "endpoint",
    "security_policy",
    "security_mode",
    "certificate",
    "private_key",
    "server_certificate",
    "username",
    "password",
)

# Used when the server does not publish its limits (0 or absent means "no limit").
_DEFAULT_PER_CALL = 1000
_DEFAULT_PER_SUBSCRIPTION = 10_000
# Servers put at most about this many notifications in one publish response (node-opcua:
# 1000) and answer one subscription per publish request: a subscription holds no more
# items than that, and the session keeps a publish request in flight per subscription
# (up to _MAX_PUBLISH_REQUESTS, the least servers keep: open62541 10 per session).
_ITEMS_PER_SUBSCRIPTION = 1000
_MAX_PUBLISH_REQUESTS = 10
# A quiet subscription says it is alive (an empty publish answer) this often, s; one
# silent for _SILENT_AFTER keep-alives is taken as lost.
_KEEPALIVE_S = 10.0
_SILENT_AFTER = 3
# Batches a device may have waiting for hand-over; beyond, the oldest are dropped and
# counted (its poller is not taking them: stopped, or held by a long write).
_MAX_BATCHES = 64
_OVERFLOW = 0x0480  # InfoType DataValue + Overflow: the server's queue dropped values
_CREATE_SUBSCRIPTION = type_id(ua.ObjectIds.CreateSubscriptionRequest_Encoding_DefaultBinary)
_CREATE_ITEMS = type_id(ua.ObjectIds.CreateMonitoredItemsRequest_Encoding_DefaultBinary)
_DELETE_ITEMS = type_id(ua.ObjectIds.DeleteMonitoredItemsRequest_Encoding_DefaultBinary)

# (raw value, status code) of one point, as the publish answer gave it.
Entry = tuple[Any, int]


@dataclass(slots=True)
class Batch:
    """Values of one device not yet handed over: at most one per point."""

    values: dict[str, Entry]
    source_ms: int = 0  # the newest source timestamp among them (server clock), or 0


@dataclass(slots=True, eq=False)
class Changes:
    """What subscriptions brought one device: newest value per point, and batches in order."""

    notify: Callable[[int, int, int], None]  # (values, overflows, dropped batches)
    latest: dict[str, Entry] = field(default_factory=dict)
    batches: deque[Batch] = field(default_factory=deque)
    first: int = 0  # batches taken so far: the number of batches[0]
    slots: dict[str, int] = field(default_factory=dict)  # point → number of its last batch

    def take(self) -> Batch | None:
        """The oldest batch waiting, taken."""
        if not self.batches:
            return None
        self.first += 1
        return self.batches.popleft()


@dataclass(slots=True)
class _Target:
    changes: Changes
    point: str


@dataclass(slots=True)
class SharedSubscription:
    """One server subscription carrying the monitored items of several devices."""

    session: Session
    period_ms: float  # publishing interval asked for
    subscription_id: int = 0
    items: int = 0  # monitored items it holds
    lost: str | None = None
    keepalive_s: float = _KEEPALIVE_S  # as the server revised it
    last_answer: float = 0.0  # monotonic time of its last publish answer

    def silent(self, now: float) -> str | None:
        """Why the subscription is taken as lost, or None."""
        if self.lost is not None:
            return self.lost
        limit = _SILENT_AFTER * self.keepalive_s + self.period_ms / 1000
        if now - self.last_answer > limit:
            return f"no publish answer for {limit:.0f}s"
        return None


class Session:
    """One client (secure channel + session) shared by the devices of one server."""

    def __init__(self, key: tuple[Any, ...], conn: OpcUaConnection, device: str) -> None:
        self.key = key
        self.conn = conn
        self.first_device = device
        self.users: list[str] = []
        self.client: Client | None = None
        self.generation = 0  # one more per session opened
        self.namespaces: list[str] = []
        self.max_per_read = 0  # 0: no limit
        self.max_per_call = _DEFAULT_PER_CALL
        self.max_per_subscription = _DEFAULT_PER_SUBSCRIPTION
        self.lost: str | None = None
        self.lock = asyncio.Lock()  # one connect at a time
        self.subscriptions: list[SharedSubscription] = []
        self.targets: dict[int, _Target] = {}
        self.notifications = 0
        self.opened = 0
        # Monitored items created after their device gave up: deleted again, or not.
        self.late_items_deleted = 0
        self.late_items_left = 0
        self._handles = itertools.count(1)
        self.publisher: Publisher | None = None
        self._by_id: dict[int, SharedSubscription] = {}
        self._subscribing = asyncio.Lock()  # one subscription created at a time
        self._creating: set[asyncio.Future[SharedSubscription]] = set()
        self._tidying: set[asyncio.Task[None]] = set()  # deletes of given-up items

    @property
    def healthy(self) -> bool:
        c = self.client
        return c is not None and self.lost is None and c.uaclient.state is UaClientState.CONNECTED

    def reason(self) -> str:
        """Why the session is not usable."""
        if self.client is None:
            return "not connected"
        if self.lost is not None:
            return self.lost
        return f"session state {self.client.uaclient.state.value}"

    async def open(self, connect: Callable[[], Any]) -> None:
        """Replace a lost client by a new one from ``connect()`` (the caller holds ``lock``)."""
        old, self.client = self.client, None
        self._stop_publishing()
        if old is not None:
            abandon(old)
        for creating in list(self._creating):
            creating.cancel()
        for tidying in list(self._tidying):
            tidying.cancel()  # the old session's items end with it
        self.subscriptions = []
        self._by_id = {}
        self.targets = {}
        async with _endpoint_lock(self.conn.endpoint):
            client: Client = await connect()
        self.client = client
        self.lost = None
        self.generation += 1
        self.opened += 1
        client.connection_lost_callback = self._on_lost

    async def _on_lost(self, exc: Exception) -> None:
        self.lost = f"connection lost: {exc!r}"

    async def read_limits(self, limit: float) -> None:
        """Namespace array and the server's operation limits, once per session."""
        assert self.client is not None
        client = self.client
        async with asyncio.timeout(limit):
            self.namespaces = list(await client.get_namespace_array())
            ids = [
                ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead),
                ua.NodeId(
                    ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall
                ),
                ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_MaxMonitoredItemsPerSubscription),
            ]
            values = await client.uaclient.read_attributes(ids, ua.AttributeIds.Value)
        limits = [_limit(dv) for dv in values]
        self.max_per_read = limits[0]
        self.max_per_call = limits[1] or _DEFAULT_PER_CALL
        self.max_per_subscription = min(
            limits[2] or _DEFAULT_PER_SUBSCRIPTION, _ITEMS_PER_SUBSCRIPTION
        )

    def new_handles(self, changes: Changes, points: list[str]) -> list[int]:
        """Client handles for ``points``, whose notifications go to ``changes``."""
        handles = []
        for name in points:
            h = next(self._handles)
            self.targets[h] = _Target(changes, name)
            handles.append(h)
        return handles

    def drop_handles(self, handles: list[int]) -> None:
        for h in handles:
            self.targets.pop(h, None)

    async def subscription_for(self, period_ms: float, items: int) -> SharedSubscription:
        """A subscription publishing every ``period_ms`` with room for ``items`` more items.

        The room is taken at once (``items``; the caller gives back what it does not use),
        and one subscription is created at a time: devices connecting together fill one
        subscription rather than each creating its own.
        """
        async with self._subscribing:
            for sub in self.subscriptions:
                if sub.period_ms == period_ms and sub.items + items <= self.max_per_subscription:
                    sub.items += items
                    return sub
            # Shielded: a caller that gives up (its timeout) must not leave a subscription
            # on the server that the session does not know; it is kept for the next one.
            creating = asyncio.ensure_future(self._create_subscription(period_ms))
            self._creating.add(creating)
            creating.add_done_callback(self._creating.discard)
            sub = await asyncio.shield(creating)
            sub.items += items
            return sub

    async def _create_subscription(self, period_ms: float) -> SharedSubscription:
        client = self.client
        assert client is not None
        sub = SharedSubscription(self, period_ms, last_answer=time.monotonic())
        keepalive = max(1, math.ceil(_KEEPALIVE_S * 1000 / period_ms))
        lifetime = max(3 * keepalive, math.ceil(client.session_timeout / period_ms))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=period_ms,
            # The server ends a subscription nobody asks to publish for this long (spec:
            # at least three keep-alives); as long as the session outlives a silent client.
            RequestedLifetimeCount=lifetime,
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,  # as many as the server will put in one
            PublishingEnabled=True,
            Priority=0,
        )
        # Created here rather than by asyncua, whose publish loop would then take the answers.
        _, raw, pos = await exchange(
            client,
            _CREATE_SUBSCRIPTION,
            struct_to_binary(params),
            int(self.conn.connect_timeout * 1000),
        )
        result = struct_from_binary(ua.CreateSubscriptionResult, Buffer(raw, pos))
        sub.subscription_id = result.SubscriptionId
        interval = result.RevisedPublishingInterval or period_ms
        sub.keepalive_s = interval * (result.RevisedMaxKeepAliveCount or keepalive) / 1000
        self.subscriptions.append(sub)
        self._by_id[sub.subscription_id] = sub
        if self.publisher is None:
            self.publisher = Publisher(
                client, self._on_publish, self._publish_lost, limit=_MAX_PUBLISH_REQUESTS
            )
        # A request waits at the server until a subscription has something: one each.
        self.publisher.ensure(len(self.subscriptions))
        return sub

    async def create_items(
        self,
        sub: SharedSubscription,
        params: ua.CreateMonitoredItemsParameters,
        device: str,
        counts: LateItemCounts | None = None,
    ) -> list[ua.MonitoredItemCreateResult]:
        """CreateMonitoredItems in ``sub`` for ``device``, bounded by the caller alone.

        Not through asyncua, whose bound is the session's ``timeout``: a busy server
        answers a shared session's requests in order, behind every poll and publish, and
        a device that joins it needs the time its ``connect_timeout`` gives. When this
        raises, the room ``subscription_for`` kept for the items is given back, and items
        the server creates after the caller gave up are deleted when its answer comes.
        """
        client = self.client
        assert client is not None
        count = len(params.ItemsToCreate)
        generation = self.generation
        later: list[asyncio.Future[Any]] = []
        try:
            _, raw, _ = await exchange(
                client,
                _CREATE_ITEMS,
                struct_to_binary(params),
                int(self.conn.connect_timeout * 1000),
                later.append,
            )
        except BaseException:
            if later:  # sent and still to be answered: its items are deleted then
                answered = functools.partial(
                    self._answered_late, client, generation, sub, count, (device, counts)
                )
                later[0].add_done_callback(answered)
            else:
                sub.items -= count
            raise
        try:
            response = struct_from_binary(ua.CreateMonitoredItemsResponse, Buffer(raw))
        except Exception as exc:
            # Which items the server made cannot be known: they stay until the session ends.
            sub.items -= count
            _log.warning(
                "opcua monitored items answer unreadable",
                extra={"device": device, "endpoint": self.conn.endpoint, "items": count,
                       "error": repr(exc)},
            )  # fmt: skip
            raise
        return list(response.Results)

    def _answered_late(
        self,
        client: Client,
        generation: int,
        sub: SharedSubscription,
        count: int,
        device: tuple[str, LateItemCounts | None],
        answer: asyncio.Future[Any],
    ) -> None:
        """The answer to a CreateMonitoredItems given up on came (or the session went)."""
        if (
            answer.cancelled()
            or answer.exception() is not None
            or not self._current(client, generation)
        ):
            sub.items -= count  # the session is gone, and its items with it
            return
        task = asyncio.create_task(
            self._delete_late(client, sub, count, device, answer),
            name=f"opcua delete given-up items {device[0]}",
        )
        self._tidying.add(task)
        task.add_done_callback(self._tidying.discard)

    def _current(self, client: Client, generation: int) -> bool:
        """``client`` is still this session's, healthy, as it was at ``generation``."""
        return self.client is client and self.generation == generation and self.healthy

    async def _delete_late(
        self,
        client: Client,
        sub: SharedSubscription,
        count: int,
        device: tuple[str, LateItemCounts | None],
        answer: asyncio.Future[Any],
    ) -> None:
        """Delete the items a given-up CreateMonitoredItems made; best effort, never raises.

        ``device``: its name, and the device's counters to add the outcome to.
        """
        ids: list[int] = []
        deleted = 0
        error: str | None = None
        try:
            try:
                _, raw, _ = await late_answer(client, answer)
            except ua.UaStatusCodeError:
                return  # the service failed: the server created nothing
            created = struct_from_binary(ua.CreateMonitoredItemsResponse, Buffer(raw))
            ids = [r.MonitoredItemId for r in created.Results if r.StatusCode.is_good()]
            if not ids:
                return
            params = ua.DeleteMonitoredItemsParameters(
                SubscriptionId=sub.subscription_id, MonitoredItemIds=ids
            )
            # As long as creating them may take: the server is answering late.
            limit = max(self.conn.timeout, self.conn.connect_timeout)
            async with asyncio.timeout(limit):
                _, raw, _ = await exchange(
                    client, _DELETE_ITEMS, struct_to_binary(params), int(limit * 1000)
                )
            codes = struct_from_binary(ua.DeleteMonitoredItemsResponse, Buffer(raw)).Results
            deleted = sum(1 for c in codes if c.is_good())
            if deleted < len(ids):
                error = ", ".join(sorted({c.name for c in codes if not c.is_good()}))
        except Exception as exc:  # the poll loop never sees it: counted and logged
            error = f"{exc!r}"
        finally:
            sub.items -= count  # deleted, or not the session's to hold any more
        self.late_items_deleted += deleted
        self.late_items_left += len(ids) - deleted
        name, counts = device
        if counts is not None:
            counts.late_items_deleted += deleted
            counts.late_items_left += len(ids) - deleted
        where = {"device": name, "endpoint": self.conn.endpoint,
                 "subscription_id": sub.subscription_id}  # fmt: skip
        if deleted:
            _log.info("opcua given-up monitored items deleted", extra={**where, "items": deleted})
        if error is not None:
            _log.warning(
                "opcua given-up monitored items not deleted",
                extra={**where, "items": len(ids) - deleted, "error": error},
            )

    def _publish_lost(self, reason: str) -> None:
        self.lost = self.lost or reason

    def _on_publish(self, notes: Notifications) -> None:
        """Route a publish answer after the callbacks now due.

        Deferred by one turn of the loop, as asyncua's own dispatch does, so the answer to
        a request that arrived with it (a connect's last step) is seen first.
        """
        sub = self._by_id.get(notes.subscription_id)
        if sub is None:
            return
        sub.last_answer = time.monotonic()
        if notes.status is not None and notes.status & 0x80000000:
            sub.lost = f"subscription ended: {ua.StatusCode(notes.status).name}"
        if notes.items:
            asyncio.get_running_loop().call_soon(self._route, notes.items)

    def _route(self, items: list[Item]) -> None:
        """Put each notification into its device's ``Changes``."""
        targets = self.targets
        touched: dict[Changes, list[int]] = {}  # values, overflows
        for handle, value, status, source in items:
            t = targets.get(handle)
            if t is None:
                continue
            changes = t.changes
            name = t.point
            entry = (value, status)
            changes.latest[name] = entry
            # The batch after the one holding this point's last value: a server lists a
            # point's queued values together, so its k-th joins the others' k-th.
            batches = changes.batches
            first = changes.first
            slots = changes.slots
            k = slots.get(name, first - 1) + 1 - first
            if k < 0:
                k = 0
            if k < len(batches):
                batch = batches[k]
                batch.values[name] = entry
                if source > batch.source_ms:
                    batch.source_ms = source
            else:
                batches.append(Batch({name: entry}, source))
            slots[name] = first + k
            counts = touched.get(changes)
            if counts is None:
                counts = touched[changes] = [0, 0]
            counts[0] += 1
            if status and status & _OVERFLOW == _OVERFLOW:
                counts[1] += 1
        self.notifications += len(items)
        for changes, (n, overflows) in touched.items():
            dropped = 0
            while len(changes.batches) > _MAX_BATCHES:
                changes.take()
                dropped += 1
            changes.notify(n, overflows, dropped)

    def _stop_publishing(self) -> list[asyncio.Task[None]]:
        publisher, self.publisher = self.publisher, None
        return publisher.cancel() if publisher is not None else []

    async def close(self) -> None:
        for creating in list(self._creating):
            creating.cancel()
        # Closing the session deletes its items at the server: no need to finish these.
        tidying = list(self._tidying)
        for t in tidying:
            t.cancel()
        stopped = self._stop_publishing() + tidying
        if stopped:
            await asyncio.gather(*stopped, return_exceptions=True)
        # A late answer during that wait may have started another delete: the same holds.
        while self._tidying:
            late = list(self._tidying)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        client, self.client = self.client, None
        if client is not None:
            graceful = self.lost is None and client.uaclient.state is UaClientState.CONNECTED
            await teardown(client, graceful=graceful, limit=self.conn.timeout)


def _limit(dv: ua.DataValue) -> int:
    try:
        v = dv.Value.Value if dv.StatusCode is None or dv.StatusCode.is_good() else 0
        return max(0, int(v)) if isinstance(v, int) else 0
    except (AttributeError, TypeError, ValueError):
        return 0


def abandon(client: Client) -> list[asyncio.Task[Any]]:
    """Close the socket and cancel asyncua's background tasks, without waiting."""
    client.uaclient.request_disconnect()
    tasks = [
        getattr(client, "_stale_watchdog_task", None),
        getattr(client, "_supervisor_task", None),
        getattr(client, "_renew_channel_task", None),
        getattr(client.uaclient.session, "_publish_task", None),
    ]
    pending = [t for t in tasks if isinstance(t, asyncio.Task) and not t.done()]
    for t in pending:
        t.cancel()
    with contextlib.suppress(Exception):
        client.disconnect_socket()
    return pending


async def teardown(client: Client, *, graceful: bool, limit: float) -> None:
    """Close ``client``, politely when asked (within ``limit`` s); never raises, never hangs."""
    if graceful:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), limit)
    pending = abandon(client)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


# (event loop, session key) -> Session; (event loop, endpoint) -> its connect lock.
_POOL: dict[tuple[int, tuple[Any, ...]], Session] = {}
_ENDPOINTS: dict[tuple[int, str], asyncio.Lock] = {}


def _endpoint_lock(endpoint: str) -> asyncio.Lock:
    key = (id(asyncio.get_running_loop()), endpoint)
    lock = _ENDPOINTS.get(key)
    if lock is None:
        lock = _ENDPOINTS[key] = asyncio.Lock()
    return lock


def _key(conn: OpcUaConnection) -> tuple[Any, ...]:
    password = conn.password.get_secret_value() if conn.password is not None else None
    return tuple(password if f == "password" else getattr(conn, f) for f in _SESSION_FIELDS)


def acquire_session(conn: OpcUaConnection, device: str) -> Session:
    """The session for ``conn``'s server and identity; ``device`` becomes one of its users."""
    key = _key(conn)
    pool_key = (id(asyncio.get_running_loop()), key)
    session = _POOL.get(pool_key)
    if session is None:
        session = _POOL[pool_key] = Session(key, conn, device)
    session.users.append(device)
    return session


async def release_session(session: Session, device: str) -> None:
    """``device`` no longer uses ``session``; the last user closes it."""
    if device in session.users:
        session.users.remove(device)
    if session.users:
        return
    for k, v in list(_POOL.items()):
        if v is session:
            del _POOL[k]
    await session.close()


def open_sessions() -> int:
    """How many sessions this process holds (for metrics and tests)."""
    return len(_POOL)
