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
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import DataChangeNotif, Subscription
from asyncua.crypto import security_policies
from cryptography import x509

from device_profiles.schema import Point, Profile, ValueType
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
from protocols.opcua.config import OpcUaConnection

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
    polls: int = 0
    writes: int = 0


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


class _Handler:
    """Subscription callbacks: keep the latest DataValue per point."""

    def __init__(self, driver: OpcUaDriver) -> None:
        self._driver = driver

    def datachange_notification(self, node: Any, val: Any, data: DataChangeNotif) -> None:
        item = data.monitored_item
        name = self._driver._handles.get(item.ClientHandle)
        if name is not None:
            self._driver._latest[name] = item.Value
            self._driver.stats.notifications += 1

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        if not status.Status.is_good():
            self._driver._lost = f"subscription ended: {_status_name(status.Status)}"


class OpcUaDriver(DriverBase):
    """Reads and writes one device's points on an OPC UA server."""

    def __init__(self, profile: Profile, connection: OpcUaConnection, *, name: str) -> None:
        if profile.protocol != "opcua" or profile.opcua is None:
            raise ConfigError(f"device '{name}': profile '{profile.id}' is not an OPC UA profile")
        self.profile = profile
        self.connection = connection
        self.name = name
        self.stats = OpcUaStats()
        self.namespace_index: int | None = None
        self._client: Client | None = None
        self._subscription: Subscription | None = None
        self._node_ids: dict[str, ua.NodeId] = {}
        self._handles: dict[int, str] = {}
        self._latest: dict[str, ua.DataValue] = {}
        self._subscribe_errors: dict[str, str] = {}
        self._lost: str | None = None
        self._healthy = False
        self._undecodable: dict[str, str] = {}  # point -> type of the value last logged

    # --- connection ---

    @property
    def connected(self) -> bool:
        return self._client is not None and self._lost is None

    @property
    def node_ids(self) -> dict[str, ua.NodeId]:
        """Point name → NodeId on the connected server (after ``connect()``)."""
        return dict(self._node_ids)

    def _where(self) -> str:
        return f"device '{self.name}' ({self.connection.endpoint})"

    def _new_client(self) -> Client:
        c = self.connection
        client = Client(c.endpoint, timeout=c.timeout, watchdog_intervall=c.timeout)
        client.name = f"iiot edge agent ({self.name})"
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

    async def connect(self) -> None:
        """Open a session and resolve the profile's addresses (ConnectError, DeviceTimeout)."""
        if self._client is not None:
            await self.aclose()
        client = self._new_client()
        self._lost = None
        self._latest = {}
        try:
            async with asyncio.timeout(self.connection.timeout):
                await self._secure(client)
                await client.connect()
        except ProtocolError:
            self.stats.connect_errors += 1
            await self._teardown(client, graceful=False)
            raise
        except TimeoutError as exc:
            self.stats.connect_errors += 1
            self.stats.timeouts += 1
            await self._teardown(client, graceful=False)
            raise DeviceTimeout(
                f"{self._where()}: no answer within {self.connection.timeout}s while connecting"
            ) from exc
        except ua.UaStatusCodeError as exc:
            self.stats.connect_errors += 1
            await self._teardown(client, graceful=False)
            name = _status_name(ua.StatusCode(exc.code))
            raise ConnectError(f"{self._where()}: session refused: {name}", detail=name) from exc
        except (OSError, ua.UaError, ValueError) as exc:
            self.stats.connect_errors += 1
            await self._teardown(client, graceful=False)
            raise ConnectError(
                f"{self._where()}: cannot connect: {exc or type(exc).__name__}"
            ) from exc
        except asyncio.CancelledError:
            # Cancelled from outside (a poll deadline): never leave the socket open.
            self._abandon(client)
            raise
        self._client = client
        self._healthy = True
        client.connection_lost_callback = self._on_connection_lost
        self.stats.connects += 1
        try:
            await self._resolve(client)
            if self.connection.mode == "subscribe":
                await self._subscribe(client)
        except BaseException:
            await self.aclose()
            raise
        _log.info(
            "opcua connected",
            extra={
                "device": self.name,
                "endpoint": self.connection.endpoint,
                "namespace_index": self.namespace_index,
                "mode": self.connection.mode,
            },
        )

    async def _on_connection_lost(self, exc: Exception) -> None:
        self._lost = f"connection lost: {exc!r}"

    async def _resolve(self, client: Client) -> None:
        assert self.profile.opcua is not None
        uri = self.profile.opcua.namespace_uri
        namespaces = await self._call("read namespace array", client.get_namespace_array())
        if uri not in namespaces:
            raise ConfigError(
                f"{self._where()}: the server has no namespace '{uri}' "
                f"(profile '{self.profile.id}'); it has {namespaces}"
            )
        ns = namespaces.index(uri)
        self.namespace_index = ns
        ids: dict[str, ua.NodeId] = {}
        paths: list[tuple[Point, ua.BrowsePath]] = []
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        hierarchical = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
        for p in self.profile.points:
            assert p.opcua is not None
            try:
                if p.opcua.node_id is not None:
                    ids[p.name] = node_id(p.opcua.node_id, ns, uri)
                    continue
                assert p.opcua.browse_path is not None
                names = browse_path(p.opcua.browse_path, ns)
            except ValueError as exc:
                raise ConfigError(f"{self._where()}: point '{p.name}': {exc}") from exc
            elements = [
                ua.RelativePathElement(
                    ReferenceTypeId=hierarchical,
                    IsInverse=False,
                    IncludeSubtypes=True,
                    TargetName=qn,
                )
                for qn in names
            ]
            paths.append(
                (p, ua.BrowsePath(StartingNode=objects, RelativePath=ua.RelativePath(elements)))
            )
        if paths:
            results = await self._call(
                "translate browse paths",
                client.uaclient.translate_browsepaths_to_nodeids([bp for _, bp in paths]),
            )
            missing: list[str] = []
            for (p, _), res in zip(paths, results, strict=True):
                if not res.StatusCode.is_good() or not res.Targets:
                    assert p.opcua is not None
                    missing.append(
                        f"point '{p.name}': browse path '{p.opcua.browse_path}' not found "
                        f"({_status_name(res.StatusCode)})"
                    )
                    continue
                t = res.Targets[0].TargetId
                ids[p.name] = ua.NodeId(t.Identifier, t.NamespaceIndex, t.NodeIdType)
            if missing:
                raise ConfigError(f"{self._where()}: " + "; ".join(missing))
        self._node_ids = ids

    async def _subscribe(self, client: Client) -> None:
        c = self.connection
        period_ms = c.sampling_interval * 1000.0
        sub = await self._call(
            "create subscription", client.create_subscription(period_ms, _Handler(self))
        )
        self._subscription = sub
        requests: list[ua.MonitoredItemCreateRequest] = []
        self._handles = {}
        for handle, p in enumerate(self.profile.points, start=1):
            params = ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=period_ms,
                QueueSize=1,
                DiscardOldest=True,
            )
            if p.deadband and p.type in _NUMERIC:
                # The server compares raw values; the profile's deadband is after scaling.
                params.Filter = ua.DataChangeFilter(
                    Trigger=ua.DataChangeTrigger.StatusValue,
                    DeadbandType=ua.DeadbandType.Absolute,
                    DeadbandValue=p.deadband / abs(p.scale),
                )
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(
                        NodeId=self._node_ids[p.name], AttributeId=ua.AttributeIds.Value
                    ),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=params,
                )
            )
            self._handles[handle] = p.name
        results = await self._call("create monitored items", sub.create_monitored_items(requests))
        self._subscribe_errors = {}
        for handle, result in zip(self._handles, results, strict=True):
            if isinstance(result, ua.StatusCode):
                self._subscribe_errors[self._handles[handle]] = _status_name(result)

    async def _teardown(self, client: Client, *, graceful: bool) -> None:
        """Close ``client``, politely when the server answers; never raises, never hangs."""
        if graceful:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), self.connection.timeout)
        # Whatever happened above: stop asyncua's background tasks and close the socket.
        pending = self._abandon(client)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    @staticmethod
    def _abandon(client: Client) -> list[asyncio.Task[Any]]:
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

    async def aclose(self) -> None:
        """Close the session; safe to call twice."""
        client, self._client = self._client, None
        self._subscription = None
        if client is None:
            return
        connected = client.uaclient.state is UaClientState.CONNECTED
        await self._teardown(client, graceful=self._healthy and connected and self._lost is None)

    # --- requests ---

    def _require(self) -> Client:
        client = self._client
        if client is None:
            raise ConnectError(f"{self._where()}: not connected")
        if self._lost is not None or client.uaclient.state is not UaClientState.CONNECTED:
            reason = self._lost or f"session state {client.uaclient.state.value}"
            self.stats.sessions_lost += 1
            self._healthy = False
            raise ConnectError(f"{self._where()}: {reason}")
        return client

    async def _call(self, what: str, aw: Awaitable[_T]) -> _T:
        """One service call, bounded by the timeout, with asyncua's errors mapped."""
        self.stats.requests += 1
        timeout = self.connection.timeout
        try:
            result = await asyncio.wait_for(aw, timeout)
        except TimeoutError as exc:
            self.stats.timeouts += 1
            self._healthy = False
            raise DeviceTimeout(f"{self._where()}: no answer to {what} within {timeout}s") from exc
        except ua.UaStatusCodeError as exc:
            code = ua.StatusCode(exc.code)
            name = _status_name(code)
            if exc.code in _SESSION_LOST:
                self._healthy = False
                self.stats.sessions_lost += 1
                raise ConnectError(f"{self._where()}: {what}: {name}", detail=name) from exc
            if exc.code in _TIMEOUT_CODES:
                self.stats.timeouts += 1
                raise DeviceTimeout(f"{self._where()}: {what}: {name}", detail=name) from exc
            raise DeviceRejected(
                f"{self._where()}: {what} refused: {name}", code=exc.code, detail=name
            ) from exc
        except (ConnectionError, OSError, ua.UaError) as exc:
            self._healthy = False
            self.stats.connect_errors += 1
            raise ConnectError(f"{self._where()}: {what}: {exc or type(exc).__name__}") from exc
        self.stats.responses += 1
        return result

    def _node_for(self, point: Point) -> ua.NodeId:
        nid = self._node_ids.get(point.name)
        if nid is None:
            raise ConfigError(
                f"{self._where()}: point '{point.name}' is not a point of profile "
                f"'{self.profile.id}'"
            )
        return nid

    def _accept(self, reading: Reading, point: Point, dv: ua.DataValue) -> None:
        """Put one DataValue into the reading as value, quality, or error."""
        status = dv.StatusCode
        if status is not None and status.is_bad():
            name = _status_name(status)
            reading.errors[point.name] = name
            self.stats.bad_status[name] = self.stats.bad_status.get(name, 0) + 1
            return
        raw = dv.Value.Value if dv.Value is not None else None
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
        """Read these points: one Read request, or the subscription's latest values."""
        client = self._require()
        self.stats.polls += 1
        reading = Reading(ts=now_ms())
        node_ids = [self._node_for(p) for p in points]
        if not points:
            return reading
        if self.connection.mode == "subscribe":
            for p in points:
                dv = self._latest.get(p.name)
                if dv is not None:
                    self._accept(reading, p, dv)
                else:
                    reading.errors[p.name] = self._subscribe_errors.get(p.name, "no_data")
            return reading
        results = await self._call(
            "read", client.uaclient.read_attributes(node_ids, ua.AttributeIds.Value)
        )
        if len(results) != len(points):
            raise DecodeError(
                f"{self._where()}: read of {len(points)} values answered {len(results)}"
            )
        for p, dv in zip(points, results, strict=True):
            self._accept(reading, p, dv)
        return reading

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
