"""The OPC UA driver (asyncua client): batched reads or a subscription, and writes.

``connect()`` opens a session (security policy None or Basic256Sha256, anonymous or
username/password), finds the index the server gives the profile's ``namespace_uri``
(profile addresses say ``ns=2`` for it) and resolves every browse path to a NodeId in one
TranslateBrowsePathsToNodeIds call; the result is kept until the next ``connect()``.

``read(points)`` in ``mode: read`` sends one Read service request for all points. In
``mode: subscribe`` the driver keeps one subscription with a monitored item per point
(absolute deadband from the point's ``deadband``, converted to raw units) and ``read``
returns the latest values received, without a round trip; a point never reported yet
is ``no_data``. A lost session raises ConnectError on the next ``read`` so that the
agent's reconnect logic calls ``connect()`` again; the driver never reconnects itself.

Per point: Good → value; Uncertain → value plus ``quality[point]`` = status name;
Bad → ``errors[point]`` = status name (``BadDeviceFailure``); a value of the wrong type
→ ``errors[point] = "decode_error"``. Whole-device failures raise from
``protocols.errors``; every network call is bounded by ``connection.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from asyncua import Client, ua
from asyncua.crypto import security_policies
from cryptography import x509

from device_profiles.schema import INT_BOUNDS, Point, Profile, ValueType
from protocols.driver import DriverBase, Reading, Value, now_ms
from protocols.errors import (
    ConfigError,
    ConnectError,
    DecodeError,
    DeviceRejected,
    DeviceTimeout,
    ProtocolError,
)
from protocols.opcua.address import browse_path, decode_value, encode_value, node_id
from protocols.opcua.certs import CLIENT_APPLICATION_URI
from protocols.opcua.client import LiveClient
from protocols.opcua.config import OpcUaConnection
from protocols.opcua.fastread import (
    OTHER,
    PLAIN_FLOAT,
    PLAIN_INT,
    PreparedRead,
    Result,
    decode_plain,
)
from protocols.opcua.session import (
    Batch,
    Changes,
    Session,
    SharedSubscription,
    abandon,
    acquire_session,
    release_session,
    teardown,
)

__all__ = ["OpcUaDriver", "OpcUaStats"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Service results meaning the session or channel is gone: the agent must reconnect.
_SESSION_LOST = frozenset(
    {
        ua.StatusCodes.BadSessionIdInvalid,
        ua.StatusCodes.BadSessionClosed,
        ua.StatusCodes.BadSessionNotActivated,
        ua.StatusCodes.BadSecureChannelIdInvalid,
        ua.StatusCodes.BadSecureChannelClosed,
        ua.StatusCodes.BadConnectionClosed,
        ua.StatusCodes.BadNotConnected,
        ua.StatusCodes.BadServerHalted,
        ua.StatusCodes.BadShutdown,
        ua.StatusCodes.BadCommunicationError,
    }
)
_LOSS_LOG_EVERY = 60.0  # s between warnings of a device losing subscribed values
_TIMEOUT_CODES = frozenset({ua.StatusCodes.BadTimeout, ua.StatusCodes.BadRequestTimeout})
_NUMERIC = frozenset(ValueType) - {ValueType.BOOL, ValueType.STRING}


@dataclass(slots=True)
class OpcUaStats:
    """Counters of one driver (one device), for the agent's /metrics."""

    requests: int = 0  # service requests sent
    responses: int = 0  # service responses received
    timeouts: int = 0
    connect_errors: int = 0
    connects: int = 0  # sessions opened
    sessions_lost: int = 0
    bad_status: dict[str, int] = field(default_factory=dict)  # status name → values
    decode_errors: int = 0
    notifications: int = 0  # data changes received (subscribe mode)
    overflows: int = 0  # values the server says its queue dropped (subscribe mode)
    dropped_batches: int = 0  # batches of changes dropped, not taken in time (subscribe mode)
    polls: int = 0
    writes: int = 0
    # Monitored items the server created after this device gave up waiting for them:
    # deleted again, or left at the server (the delete failed).
    late_items_deleted: int = 0
    late_items_left: int = 0


def _status_name(code: ua.StatusCode | None) -> str:
    if code is None:
        return "Good"
    try:
        return str(code.name)
    except Exception:  # an unknown code from a device must not crash the poll
        return f"0x{code.value:08X}"


def _certificate_uri(path: Path) -> str | None:
    """The application URI a certificate names (subjectAltName URI), if any."""
    data = path.read_bytes()
    cert = (
        x509.load_pem_x509_certificate(data)
        if data.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(data)
    )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _browse(start: ua.NodeId, names: list[ua.QualifiedName]) -> ua.BrowsePath:
    hierarchical = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
    elements = [
        ua.RelativePathElement(
            ReferenceTypeId=hierarchical, IsInverse=False, IncludeSubtypes=True, TargetName=qn
        )
        for qn in names
    ]
    return ua.BrowsePath(StartingNode=start, RelativePath=ua.RelativePath(elements))


_INTS = frozenset(INT_BOUNDS)


def _kind(p: Point) -> int:
    """Which shortcut a Good value of ``p`` may take: plain numbers go out as they are."""
    if p.scale != 1.0 or p.offset != 0.0:
        return OTHER
    if p.type is ValueType.FLOAT64:
        return PLAIN_FLOAT  # a finite float or an int, kept as it is
    if p.type in _INTS:
        return PLAIN_INT  # an int (not a bool), kept as it is
    return OTHER  # float32 (shortest repr), bool, string, scaled: decode_value


class _Plan:
    """The Read requests for a list of points, and each point's decoding, made once."""

    __slots__ = ("asked", "by_name", "kinds", "names", "points", "reads")

    def __init__(self, points: Sequence[Point], reads: list[PreparedRead]) -> None:
        self.asked = points  # the sequence last asked for (polls pass the same one)
        self.reads = reads
        self.points = [(p.name, p, _kind(p)) for p in points]
        self.names = [p.name for p in points]
        self.by_name = {p.name: (p, kind) for _, p, kind in self.points}
        kinds = [kind for _, _, kind in self.points]
        self.kinds = [kinds[i : i + r.count] for i, r in zip(_starts(reads), reads, strict=True)]


def _starts(reads: list[PreparedRead]) -> list[int]:
    out, at = [], 0
    for r in reads:
        out.append(at)
        at += r.count
    return out


class OpcUaDriver(DriverBase):
    """Reads and writes one device's points on an OPC UA server (over a shared session)."""

    def __init__(self, profile: Profile, connection: OpcUaConnection, *, name: str) -> None:
        if profile.protocol != "opcua" or profile.opcua is None:
            raise ConfigError(f"device '{name}': profile '{profile.id}' is not an OPC UA profile")
        if (
            connection.root is None
            and profile.opcua.root_name is None
            and any(p.opcua is not None and p.opcua.relative for p in profile.points)
        ):
            raise ConfigError(
                f"device '{name}': profile '{profile.id}' addresses points relative to the "
                "device's root and has no root_name: give 'opcua: {root: ...}'"
            )
        self.profile = profile
        self.connection = connection
        self.name = name
        self.stats = OpcUaStats()
        self.namespace_index: int | None = None
        self._session: Session | None = None
        self._generation = -1
        self._node_ids: dict[str, ua.NodeId] = {}
        self._changes = Changes(self._arrived)
        self._last_ts = 0  # of the last batch handed over (subscribe mode)
        self._loss_logged = -_LOSS_LOG_EVERY  # monotonic time values lost were last logged
        self._subscribe_errors: dict[str, str] = {}
        # Monitored items this device holds: (subscription, client handles, server ids).
        self._items: list[tuple[SharedSubscription, list[int], list[int]]] = []
        self._lost: str | None = None
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._plan: _Plan | None = None  # the last one used: polls ask for the same points
        # Subscribe mode: who to tell when values arrive.
        self.on_data: Callable[[], None] | None = None
        self._undecodable: dict[str, str] = {}  # point -> type of the value last logged

    # --- connection ---

    @property
    def connected(self) -> bool:
        return self._usable() is None

    @property
    def connect_timeout(self) -> float:
        """Seconds a ``connect()`` may take, independent of the poll interval."""
        return self.connection.connect_timeout

    @property
    def session(self) -> Session | None:
        """The shared session this device uses (after ``connect()``)."""
        return self._session

    @property
    def node_ids(self) -> dict[str, ua.NodeId]:
        """Point name → NodeId on the connected server (after ``connect()``)."""
        return dict(self._node_ids)

    def _where(self) -> str:
        return f"device '{self.name}' ({self.connection.endpoint})"

    def _new_client(self) -> Client:
        c = self.connection
        client = LiveClient(c.endpoint, timeout=c.timeout, watchdog_intervall=c.timeout)
        # The session serves every device of this server and identity.
        client.name = f"iiot edge agent ({c.endpoint})"
        client.description = client.name
        client.application_uri = CLIENT_APPLICATION_URI
        client.product_uri = "urn:iiot:edge-agent"
        # Ten minutes: long enough to outlive any poll gap, short enough that a server
        # frees the session of an agent that died; servers revise it to their own limit.
        client.session_timeout = 600_000
        if c.username is not None and c.password is not None:
            client.set_user(c.username)
            client.set_password(c.password.get_secret_value())
        return client

    async def _secure(self, client: Client) -> None:
        c = self.connection
        if c.security_policy == "None":
            return
        assert c.certificate is not None and c.private_key is not None
        for what, path in (
            ("certificate", c.certificate),
            ("private_key", c.private_key),
            ("server_certificate", c.server_certificate),
        ):
            if path is not None and not path.is_file():
                raise ConfigError(f"{self._where()}: {what} {path} is not a readable file")
        try:
            uri = _certificate_uri(c.certificate)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self._where()}: cannot read certificate {c.certificate}: {exc}"
            ) from exc
        if uri:
            # Servers check that the certificate names the application URI the client gives.
            client.application_uri = uri
        mode = getattr(ua.MessageSecurityMode, c.security_mode)
        await client.set_security(
            security_policies.SecurityPolicyBasic256Sha256,
            certificate=str(c.certificate),
            private_key=str(c.private_key),
            server_certificate=str(c.server_certificate) if c.server_certificate else None,
            mode=mode,
        )

    async def _open_client(self) -> Client:
        """A new connected client; asyncua's errors mapped, the socket never left open."""
        client = self._new_client()
        try:
            await self._secure(client)
            await client.connect()
        except ProtocolError:
            await teardown(client, graceful=False, limit=self.connection.timeout)
            raise
        except TimeoutError as exc:  # asyncua's own per-request timeout (an OSError)
            await teardown(client, graceful=False, limit=self.connection.timeout)
            raise DeviceTimeout(
                f"{self._where()}: no answer within {self.connection.timeout}s while connecting"
            ) from exc
        except ua.UaStatusCodeError as exc:
            await teardown(client, graceful=False, limit=self.connection.timeout)
            name = _status_name(ua.StatusCode(exc.code))
            raise ConnectError(f"{self._where()}: session refused: {name}", detail=name) from exc
        except (OSError, ua.UaError, ValueError) as exc:
            await teardown(client, graceful=False, limit=self.connection.timeout)
            raise ConnectError(
                f"{self._where()}: cannot connect: {exc or type(exc).__name__}"
            ) from exc
        except BaseException:
            # Cancelled (the connect deadline, or from outside): never leave the socket open.
            abandon(client)
            raise
        return client

    async def connect(self) -> None:
        """Join (or open) the server's session and resolve the profile's addresses."""
        if self._session is not None:
            await self.aclose()
        session = acquire_session(self.connection, self.name)
        self._session = session
        self._lost = None
        self._changes = Changes(self._arrived)
        self._plans = {}
        self._plan = None
        limit = self.connection.connect_timeout
        try:
            try:
                async with asyncio.timeout(limit):
                    # Another device may be opening this session: wait for its attempt.
                    async with session.lock:
                        if not session.healthy:
                            await session.open(self._open_client)
                            await session.read_limits(self.connection.timeout)
                            _log.info(
                                "opcua session opened",
                                extra={"endpoint": self.connection.endpoint,
                                       "devices": len(session.users)},
                            )  # fmt: skip
                    client = session.client
                    assert client is not None
                    self._generation = session.generation
                    await self._resolve(client, session)
                    if self.connection.mode == "subscribe":
                        await self._subscribe(session)
            except TimeoutError as exc:
                self.stats.timeouts += 1
                raise DeviceTimeout(
                    f"{self._where()}: not connected within connect_timeout {limit}s"
                ) from exc
            except ProtocolError:
                raise
            except ua.UaStatusCodeError as exc:
                name = _status_name(ua.StatusCode(exc.code))
                session.lost = session.lost or name
                raise ConnectError(f"{self._where()}: {name}", detail=name) from exc
            except (OSError, ua.UaError, ValueError) as exc:
                session.lost = session.lost or str(exc)
                raise ConnectError(f"{self._where()}: {exc or type(exc).__name__}") from exc
        except BaseException:
            self.stats.connect_errors += 1
            await self.aclose()
            raise
        self.stats.connects += 1
        _log.debug(
            "opcua device ready",
            extra={"device": self.name, "endpoint": self.connection.endpoint,
                   "namespace_index": self.namespace_index, "mode": self.connection.mode},
        )  # fmt: skip

    def _root(self, ns: int, uri: str) -> tuple[ua.NodeId | None, list[ua.QualifiedName]]:
        """The device's root as a NodeId, or as a browse path from Objects."""
        assert self.profile.opcua is not None
        root = self.connection.root
        try:
            if isinstance(root, str):
                return node_id(root, ns, uri), []
            if isinstance(root, list):
                return None, browse_path("/".join(root), ns)
        except ValueError as exc:
            raise ConfigError(f"{self._where()}: root: {exc}") from exc
        name = self.profile.opcua.root_name
        return None, ([ua.QualifiedName(name, ns)] if name else [])

    def _root_text(self) -> str:
        root = self.connection.root
        if isinstance(root, list):
            return "/".join(root)
        if root is not None:
            return root
        assert self.profile.opcua is not None
        return f"2:{self.profile.opcua.root_name}"

    async def _resolve(self, client: Client, session: Session) -> None:
        assert self.profile.opcua is not None
        uri = self.profile.opcua.namespace_uri
        namespaces = session.namespaces
        if uri not in namespaces:
            raise ConfigError(
                f"{self._where()}: the server has no namespace '{uri}' "
                f"(profile '{self.profile.id}'); it has {namespaces}"
            )
        ns = namespaces.index(uri)
        self.namespace_index = ns
        root_node, root_path = self._root(ns, uri)
        ids: dict[str, ua.NodeId] = {}
        paths: list[tuple[str, str, ua.BrowsePath]] = []  # (key, address text, path)
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        suffixed: list[Point] = []
        for p in self.profile.points:
            a = p.opcua
            assert a is not None
            try:
                if a.node_id is not None:
                    ids[p.name] = node_id(a.node_id, ns, uri)
                elif a.node_suffix is not None:
                    suffixed.append(p)
                elif a.browse_path is not None:
                    names = browse_path(a.browse_path, ns)
                    paths.append((p.name, a.browse_path, _browse(objects, names)))
                else:
                    assert a.path is not None
                    names = browse_path(a.path, ns)
                    start = root_node if root_node is not None else objects
                    prefix = [] if root_node is not None else root_path
                    text = f"{self._root_text()}/{a.path}"
                    paths.append((p.name, text, _browse(start, prefix + names)))
            except ValueError as exc:
                raise ConfigError(f"{self._where()}: point '{p.name}': {exc}") from exc
        if suffixed and root_node is None:
            paths.append(("", self._root_text(), _browse(objects, root_path)))
        if paths:
            found = await self._translate(client, paths)
            root_node = found.pop("", root_node)
            ids.update(found)
        for p in suffixed:
            assert p.opcua is not None and p.opcua.node_suffix is not None
            if root_node is None or not isinstance(root_node.Identifier, str):
                raise ConfigError(
                    f"{self._where()}: point '{p.name}': node_suffix needs a root NodeId with "
                    f"a string identifier, the root is {root_node}"
                )
            ids[p.name] = ua.NodeId(
                root_node.Identifier + p.opcua.node_suffix, root_node.NamespaceIndex
            )
        self._node_ids = ids

    async def _translate(
        self, client: Client, paths: list[tuple[str, str, ua.BrowsePath]]
    ) -> dict[str, ua.NodeId]:
        """TranslateBrowsePathsToNodeIds, in calls of at most the server's limit."""
        assert self._session is not None
        step = self._session.max_per_call
        found: dict[str, ua.NodeId] = {}
        missing: list[str] = []
        for i in range(0, len(paths), step):
            chunk = paths[i : i + step]
            results = await self._call(
                "translate browse paths",
                client.uaclient.translate_browsepaths_to_nodeids([bp for _, _, bp in chunk]),
            )
            for (key, text, _), res in zip(chunk, results, strict=True):
                if not res.StatusCode.is_good() or not res.Targets:
                    what = f"point '{key}'" if key else "root"
                    missing.append(
                        f"{what}: browse path '{text}' not found ({_status_name(res.StatusCode)})"
                    )
                    continue
                t = res.Targets[0].TargetId
                found[key] = ua.NodeId(t.Identifier, t.NamespaceIndex, t.NodeIdType)
        if missing:
            raise ConfigError(f"{self._where()}: " + "; ".join(missing))
        return found

    async def _subscribe(self, session: Session) -> None:
        """Monitored items for every point, in the session's shared subscriptions."""
        c = self.connection
        sampling_ms = c.sampling_interval * 1000.0
        publishing_ms = c.publishing * 1000.0
        points = list(self.profile.points)
        handles = session.new_handles(self._changes, [p.name for p in points])
        by_handle = dict(zip(handles, points, strict=True))
        self._subscribe_errors = {}
        self._items = []
        step = max(1, min(session.max_per_call, session.max_per_subscription))
        for i in range(0, len(handles), step):
            chunk = handles[i : i + step]
            # Bounded by connect_timeout alone: a busy server answers late (session.py).
            sub = await self._call(
                "create subscription",
                session.subscription_for(publishing_ms, len(chunk)),
                c.connect_timeout,
            )
            requests = [self._item_request(h, by_handle[h], sampling_ms, c.queue) for h in chunk]
            params = ua.CreateMonitoredItemsParameters(
                SubscriptionId=sub.subscription_id,
                # The source time orders queued values; the server's own is not needed.
                TimestampsToReturn=ua.TimestampsToReturn.Source,
                ItemsToCreate=requests,
            )
            assert session.client is not None
            try:
                # Given up on, the session gives the room back and deletes what the
                # server creates after all; the items made by earlier calls are in
                # self._items, which aclose() deletes.
                results = await self._call(
                    "create monitored items",
                    session.create_items(sub, params, self.name, self.stats),
                    c.connect_timeout,
                )
            except BaseException:
                session.drop_handles(handles[i:])  # late notifications for them go nowhere
                raise
            ids: list[int] = []
            for j, result in enumerate(results):
                if result.StatusCode.is_good():
                    ids.append(result.MonitoredItemId)
                elif j < len(chunk):
                    name = by_handle[chunk[j]].name
                    self._subscribe_errors[name] = _status_name(result.StatusCode)
            sub.items -= len(chunk) - len(ids)
            # Held before any check, so that aclose() deletes them whatever follows.
            self._items.append((sub, chunk, ids))
            if len(results) != len(chunk):
                raise DecodeError(
                    f"{self._where()}: {len(chunk)} monitored items asked for, "
                    f"{len(results)} results"
                )

    def _item_request(
        self, handle: int, p: Point, sampling_ms: float, queue: int
    ) -> ua.MonitoredItemCreateRequest:
        # DiscardOldest: when the queue overflows the newest values are kept.
        params = ua.MonitoringParameters(
            ClientHandle=handle, SamplingInterval=sampling_ms, QueueSize=queue, DiscardOldest=True
        )
        if p.deadband and p.type in _NUMERIC:
            # The server compares raw values; the profile's deadband is after scaling.
            params.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute,
                DeadbandValue=p.deadband / abs(p.scale),
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=self._node_ids[p.name], AttributeId=ua.AttributeIds.Value
            ),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=params,
        )

    async def _unsubscribe(self, session: Session) -> None:
        """Delete this device's monitored items (best effort: the session may be gone)."""
        items, self._items = self._items, []
        for _sub, handles, _ids in items:
            session.drop_handles(handles)
        if session.healthy and session.generation == self._generation and session.client:
            for sub, _, ids in items:
                if not ids:
                    continue
                sub.items -= len(ids)
                params = ua.DeleteMonitoredItemsParameters(
                    SubscriptionId=sub.subscription_id, MonitoredItemIds=ids
                )
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        session.client.uaclient.delete_monitored_items(params),
                        self.connection.timeout,
                    )

    async def aclose(self) -> None:
        """Leave the session (the last device on it closes it); safe to call twice."""
        session, self._session = self._session, None
        if session is None:
            return
        try:
            await self._unsubscribe(session)
        finally:
            await release_session(session, self.name)

    # --- requests ---

    def _usable(self) -> str | None:
        """Why this device cannot use its session now, or None."""
        session = self._session
        if session is None:
            return "not connected"
        if not session.healthy:
            return session.reason()
        if session.generation != self._generation:
            return "session reopened since this device connected"
        if self._lost is not None:
            return self._lost
        if self._items:
            now = time.monotonic()
            for sub, _, _ in self._items:
                why = sub.silent(now)
                if why is not None:
                    return why
        return None

    def _require(self) -> Client:
        reason = self._usable()
        if reason is not None:
            if self._session is not None:
                self.stats.sessions_lost += 1
            raise ConnectError(f"{self._where()}: {reason}")
        assert self._session is not None and self._session.client is not None
        return self._session.client

    async def _call(self, what: str, aw: Awaitable[_T], limit: float | None = None) -> _T:
        """One service call, bounded by ``limit`` (default: the timeout), errors mapped."""
        self.stats.requests += 1
        timeout = self.connection.timeout if limit is None else limit
        try:
            # A timeout context rather than wait_for: no task per request.
            async with asyncio.timeout(timeout):
                result = await aw
        except TimeoutError as exc:
            self.stats.timeouts += 1
            raise DeviceTimeout(f"{self._where()}: no answer to {what} within {timeout}s") from exc
        except ua.UaStatusCodeError as exc:
            code = ua.StatusCode(exc.code)
            name = _status_name(code)
            if exc.code in _SESSION_LOST:
                # The session is gone for every device on it: all reconnect together.
                self._mark_lost(name)
                self.stats.sessions_lost += 1
                raise ConnectError(f"{self._where()}: {what}: {name}", detail=name) from exc
            if exc.code in _TIMEOUT_CODES:
                self.stats.timeouts += 1
                raise DeviceTimeout(f"{self._where()}: {what}: {name}", detail=name) from exc
            raise DeviceRejected(
                f"{self._where()}: {what} refused: {name}", code=exc.code, detail=name
            ) from exc
        except (ConnectionError, OSError, ua.UaError) as exc:
            self._mark_lost(str(exc) or type(exc).__name__)
            self.stats.connect_errors += 1
            raise ConnectError(f"{self._where()}: {what}: {exc or type(exc).__name__}") from exc
        self.stats.responses += 1
        return result

    def _mark_lost(self, reason: str) -> None:
        session = self._session
        if session is not None and session.generation == self._generation and not session.lost:
            session.lost = reason

    def _node_for(self, point: Point) -> ua.NodeId:
        nid = self._node_ids.get(point.name)
        if nid is None:
            raise ConfigError(
                f"{self._where()}: point '{point.name}' is not a point of profile "
                f"'{self.profile.id}'"
            )
        return nid

    def _take(self, reading: Reading, point: Point, raw: Any, code: int) -> None:
        """Put one raw value and its status code into the reading."""
        status = ua.StatusCode(code) if code else None
        if status is not None and status.is_bad():
            name = _status_name(status)
            reading.errors[point.name] = name
            self.stats.bad_status[name] = self.stats.bad_status.get(name, 0) + 1
            return
        try:
            value = decode_value(point, raw)
        except ValueError as exc:
            self.stats.decode_errors += 1
            reading.errors[point.name] = "decode_error"
            # Once per change of the value's type: a point stuck sending the wrong type
            # would otherwise log every poll (the text names the value, which may vary).
            kind = type(raw).__name__
            if self._undecodable.get(point.name) != kind:
                self._undecodable[point.name] = kind
                _log.warning(
                    "opcua value not decoded",
                    extra={"device": self.name, "point": point.name, "error": str(exc)},
                )
            return
        if self._undecodable.pop(point.name, None) is not None:
            _log.info("opcua value decoded again", extra={"device": self.name, "point": point.name})
        reading.values[point.name] = value
        if status is not None and status.is_uncertain():
            reading.quality[point.name] = _status_name(status)

    async def read(self, points: Sequence[Point]) -> Reading:
        """Read these points: one Read request, or the subscription's newest values."""
        client = self._require()
        self.stats.polls += 1
        reading = Reading(ts=now_ms())
        plan = self._plan_for(points)
        if not points:
            return reading
        if self.connection.mode == "subscribe":
            # The newest values, without taking the batches waiting for read_changes.
            latest = self._changes.latest
            for name, p, kind in plan.points:
                entry = latest.get(name)
                if entry is not None:
                    self._put(reading, p, kind, entry[0], entry[1])
                else:
                    reading.errors[name] = self._subscribe_errors.get(name, "no_data")
            if self._changes.batches:
                self.data_arrived()  # left waiting (a write held the poller): take them now
            return reading
        timeout = self.connection.timeout
        answers = [await self._call("read", r.send_raw(client, timeout)) for r in plan.reads]
        for r in plan.reads:
            if r.answered_ms:  # an answer that came after its own poll gave up: its time
                reading.ts = min(reading.ts, r.answered_ms)
        if not self._undecodable:
            # The usual answer, Good plain numbers only: decoded in one pass, as they are.
            plain: list[Any] = []
            for r, kinds, (raw, pos) in zip(plan.reads, plan.kinds, answers, strict=True):
                got = decode_plain(raw, r.count, pos, kinds)
                if got is None:
                    break
                plain += got
            else:
                reading.values.update(zip(plan.names, plain, strict=True))
                return reading
        results: list[Result] = []
        for r, (raw, pos) in zip(plan.reads, answers, strict=True):
            results += r.results(raw, pos)
        if len(results) != len(points):
            raise DecodeError(
                f"{self._where()}: read of {len(points)} values answered {len(results)}"
            )
        for p, (raw, code) in zip(points, results, strict=True):
            self._take(reading, p, raw, code)
        return reading

    def _put(self, reading: Reading, p: Point, kind: int, raw: Any, code: int) -> None:
        """``_take``, with a shortcut for Good plain numbers (what decode_value returns)."""
        if not code and not self._undecodable:
            t = type(raw)
            if kind == PLAIN_FLOAT and ((t is float and raw - raw == 0.0) or t is int):
                reading.values[p.name] = raw
                return
            if kind == PLAIN_INT and t is int:
                reading.values[p.name] = raw
                return
        self._take(reading, p, raw, code)

    def _arrived(self, values: int, overflows: int, dropped: int) -> None:
        """A publish answer brought values for this device (the session calls this)."""
        stats = self.stats
        stats.notifications += values
        if overflows or dropped:
            stats.overflows += overflows
            stats.dropped_batches += dropped
            now = time.monotonic()
            if now >= self._loss_logged + _LOSS_LOG_EVERY:
                # A server that cannot keep up loses values every message: once a minute.
                self._loss_logged = now
                _log.warning(
                    "opcua values lost",
                    extra={"device": self.name, "server_queue_overflows": stats.overflows,
                           "batches_dropped": stats.dropped_batches},
                )  # fmt: skip
        self.data_arrived()

    def data_arrived(self) -> None:
        """Tell the poller that values are waiting for ``read_changes``."""
        if self.on_data is not None:
            self.on_data()

    def read_changes(self, points: Sequence[Point]) -> Reading:
        """Subscribe mode: the next batch of values received, without a round trip.

        A batch holds at most one value per point; when a point brought several values
        since the last call, each goes out in its own batch, in order, and ``on_data`` is
        called again while batches remain. A batch's time is the agent's at hand-over,
        less how much older its values are than the newest waiting (by the server's
        source timestamps), and always after the previous batch's.
        """
        self._require()
        batch = self._changes.take()
        if batch is None:
            return Reading(ts=now_ms())
        batches = self._changes.batches
        reading = Reading(ts=self._batch_time(batch, batches[-1] if batches else batch))
        by_name = self._plan_for(points).by_name
        for name, (raw, code) in batch.values.items():
            found = by_name.get(name)
            if found is not None:
                self._put(reading, found[0], found[1], raw, code)
        if batches:
            self.data_arrived()
        return reading

    def _batch_time(self, batch: Batch, newest: Batch) -> int:
        ts = now_ms()
        if batch.source_ms and newest.source_ms > batch.source_ms:
            ts -= newest.source_ms - batch.source_ms
        ts = max(ts, self._last_ts + 1)
        self._last_ts = ts
        return ts

    def _plan_for(self, points: Sequence[Point]) -> _Plan:
        """How to ask for and decode these points (made on first use, per session)."""
        plan = self._plan
        if plan is not None and plan.asked is points:
            return plan
        key = tuple(p.name for p in points)
        plan = self._plans.get(key)
        if plan is None:
            node_ids = [self._node_for(p) for p in points]
            reads = []
            if self.connection.mode == "read" and node_ids:
                assert self._session is not None
                step = self._session.max_per_read or len(node_ids)
                starts = range(0, len(node_ids), step)
                reads = [PreparedRead(node_ids[i : i + step]) for i in starts]
            if len(self._plans) >= 16:  # point subsets asked for by commands: bounded
                self._plans.clear()
            plan = self._plans[key] = _Plan(points, reads)
        plan.asked = points
        self._plan = plan
        return plan

    async def write(self, point: Point, value: Value) -> None:
        """Write one rw point (engineering value; scale and offset are reversed)."""
        if point.access != "rw":
            raise ConfigError(f"{self._where()}: point '{point.name}' is read-only")
        nid = self._node_for(point)
        try:
            variant = encode_value(point, value)
        except ValueError as exc:
            raise ConfigError(f"{self._where()}: {exc}") from exc
        client = self._require()
        # No timestamps: many servers refuse writes that carry them.
        results = await self._call(
            f"write of '{point.name}'",
            client.uaclient.write_attributes([nid], [ua.DataValue(variant)], ua.AttributeIds.Value),
        )
        status = results[0]
        if not status.is_good():
            raise DeviceRejected(
                f"{self._where()}: write of '{point.name}' refused: {_status_name(status)}",
                code=status.value,
            )
        self.stats.writes += 1
