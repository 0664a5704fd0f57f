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

Subscriptions are shared too: one per sampling interval, holding the monitored items of
many devices up to the server's limits (``max_items_per_subscription``); notifications
go straight from the publish response into each device's table of latest values,
without asyncua's per-notification task.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState

from protocols.opcua.config import OpcUaConnection

__all__ = [
    "Latest",
    "Session",
    "SharedSubscription",
    "abandon",
    "acquire_session",
    "open_sessions",
    "release_session",
    "teardown",
]

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
# items than that, and each extra subscription gets a publish request of its own in
# flight (up to _MAX_PUBLISHERS), so a large session is not limited by round trips.
_ITEMS_PER_SUBSCRIPTION = 1000
_MAX_PUBLISHERS = 8

# Latest values of one device, written by the publish callback: point → DataValue.
Latest = dict[str, ua.DataValue]


@dataclass(slots=True)
class _Target:
    latest: Latest
    point: str
    owner: Any  # the device's driver: ``stats``, ``changed`` and ``data_arrived()``


@dataclass(slots=True)
class SharedSubscription:
    """One server subscription carrying the monitored items of several devices."""

    session: Session
    period_ms: float
    subscription_id: int = 0
    items: int = 0  # monitored items it holds
    lost: str | None = None

    def on_publish(self, result: ua.PublishResult) -> None:
        """Apply a publish response after the callbacks now due (the publish loop calls this).

        Deferred by one turn of the loop, as asyncua's own dispatch does, so the answer to
        a request that arrived with it (a connect's last step) is seen first.
        """
        asyncio.get_running_loop().call_soon(self._apply, result)

    def _apply(self, result: ua.PublishResult) -> None:
        """Put each notification into its device's table."""
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        targets = self.session.targets
        count = 0
        touched: set[Any] = set()
        for notif in data:
            if isinstance(notif, ua.DataChangeNotification):
                for item in notif.MonitoredItems:
                    t = targets.get(item.ClientHandle)
                    if t is not None:
                        t.latest[t.point] = item.Value
                        owner = t.owner
                        owner.changed.add(t.point)
                        owner.stats.notifications += 1
                        touched.add(owner)
                        count += 1
            elif isinstance(notif, ua.StatusChangeNotification) and not notif.Status.is_good():
                self.lost = f"subscription ended: {notif.Status.name}"
        self.session.notifications += count
        for owner in touched:
            owner.data_arrived()


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
        self._handles = itertools.count(1)
        self._publishers: list[asyncio.Task[None]] = []

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
        self._stop_publishers()
        if old is not None:
            abandon(old)
        self.subscriptions = []
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

    def new_handles(self, latest: Latest, points: list[str], owner: Any) -> list[int]:
        """Client handles for ``points``, routed to ``latest`` by the publish callback."""
        handles = []
        for name in points:
            h = next(self._handles)
            self.targets[h] = _Target(latest, name, owner)
            handles.append(h)
        return handles

    def drop_handles(self, handles: list[int]) -> None:
        for h in handles:
            self.targets.pop(h, None)

    async def subscription_for(self, period_ms: float, items: int) -> SharedSubscription:
        """A subscription with room for ``items`` more monitored items (created if needed)."""
        for sub in self.subscriptions:
            if sub.period_ms == period_ms and sub.items + items <= self.max_per_subscription:
                return sub
        assert self.client is not None
        sub = SharedSubscription(self, period_ms)
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=period_ms,
            RequestedLifetimeCount=10_000,
            RequestedMaxKeepAliveCount=self.client.get_keepalive_count(period_ms),
            MaxNotificationsPerPublish=0,  # as many as the server will put in one
            PublishingEnabled=True,
            Priority=0,
        )
        result = await self.client.uaclient.create_subscription(params, sub.on_publish)
        sub.subscription_id = result.SubscriptionId
        self.subscriptions.append(sub)
        if 1 < len(self.subscriptions) <= _MAX_PUBLISHERS:
            # asyncua keeps one publish request in flight; more run beside it.
            loop = self.client.uaclient.session._publish_loop()
            self._publishers.append(asyncio.create_task(loop, name="opcua publish"))
        return sub

    def _stop_publishers(self) -> list[asyncio.Task[None]]:
        tasks, self._publishers = self._publishers, []
        for t in tasks:
            t.cancel()
        return tasks

    async def close(self) -> None:
        stopped = self._stop_publishers()
        if stopped:
            await asyncio.gather(*stopped, return_exceptions=True)
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
