"""An OPC UA server (asyncua) that serves one simulated device exactly as its profile says.

The profile's ``namespace_uri`` is registered as the first custom namespace (index 2,
unless ``extra_namespaces`` are registered before it); NodeId points get exactly their
NodeId under an object named after the device, browse-path points get the folders and
objects their path names, starting at the Objects folder. A background task copies
``SimDevice.values()`` into the nodes every ``update_interval``; client writes to rw
points go to ``SimDevice.write``.

Faults (``device.faults``), as a client sees them:

none          normal service
silent        a hung server: TCP stays up, requests are swallowed, nothing is sent,
              values freeze; clients time out
slow          every request is answered ``delay`` seconds late
exception     every value carries status BadDeviceFailure (no value)
drop          connections are closed as soon as they are made or used
out_of_range  values beyond the declared range (integers saturate at their type limits)
restart       the listener and every connection go away for ``delay`` seconds, then the
              server listens again on the same port with the same namespace and nodes;
              the fault then clears itself

``max_sessions`` caps the sessions open at once, as real servers do (node-opcua: 10);
one more is refused with BadTooManySessions.

Start-up: asyncua builds the standard OPC UA address space (about 6,000 nodes, well
over a second) for every server. Here the first server of a process builds it once and
later servers copy it in a fraction of that, so starting many simulators stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from asyncua import Server, ua
from asyncua.common.connection import TransportLimits
from asyncua.common.node import Node
from asyncua.common.utils import Buffer
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import (
    AddressSpace,
    AttributeValue,
    NodeData,
    NodeManagementService,
)
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import SessionState
from asyncua.server.monitored_item_service import MonitoredItemService

from device_profiles.schema import Point, Profile, ValueType
from protocols.modbus.codec import to_raw
from protocols.opcua.address import VARIANT_TYPES, browse_path, decode_value, encode_value, node_id
from protocols.opcua.certs import SERVER_APPLICATION_URI
from simulators.device import SimDevice
from simulators.faults import FaultMode

__all__ = ["OpcUaSimServer"]

log = logging.getLogger(__name__)

_UNITS_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"
_NUMERIC = set(ValueType) - {ValueType.BOOL, ValueType.STRING}

# --- standard address space, built once per process --------------------------------------

_template_lock = threading.Lock()
_template: dict[ua.NodeId, NodeData] | None = None


def _copy_nodes(src: dict[ua.NodeId, NodeData]) -> dict[ua.NodeId, NodeData]:
    """A copy of the standard nodes that a server may change without touching ``src``.

    Values are replaced, not mutated, on write, except lists (the namespace array is
    appended to in place), so those are copied. Reference lists are copied, their
    entries shared: asyncua edits an entry only when a node is renamed, which the
    simulator never does to a standard node.
    """
    out: dict[ua.NodeId, NodeData] = {}
    for nid, nd in src.items():
        new = NodeData(nid)
        for attr, av in nd.attributes.items():
            nav = AttributeValue(av.value)
            dv = av.value
            if dv is not None and dv.Value is not None and isinstance(dv.Value.Value, list):
                variant = dataclasses.replace(dv.Value, Value=list(dv.Value.Value))
                nav.value = dataclasses.replace(dv, Value=variant)
            new.attributes[attr] = nav
        new.references = list(nd.references)
        new.call = nd.call
        out[nid] = new
    return out


def _standard_nodes() -> dict[ua.NodeId, NodeData]:
    global _template
    with _template_lock:
        if _template is None:
            from asyncua.server.standard_address_space import standard_address_space

            aspace = AddressSpace()
            standard_address_space.fill_address_space(NodeManagementService(aspace))
            _template = aspace._nodes
        return _copy_nodes(_template)


class _InternalServer(InternalServer):  # type: ignore[misc]
    # At most this many sessions at once (None: no limit), as real servers cap them.
    max_sessions: int | None = None

    async def load_standard_address_space(self, shelf_file: Path | None = None) -> None:
        self.aspace._nodes = await asyncio.to_thread(_standard_nodes)

    def create_session(self, name: str, user: Any = None, external: bool = False) -> Any:
        live: list[Any] | None = getattr(self, "_iiot_sessions", None)
        if live is None:
            live = []
            self._iiot_sessions = live
        live[:] = [s for s in live if s.state is not SessionState.Closed]
        if external and self.max_sessions is not None and len(live) >= self.max_sessions:
            raise ua.uaerrors.BadTooManySessions()
        kwargs = {"user": user} if user is not None else {}
        session = super().create_session(name, external=external, **kwargs)
        if external:
            live.append(session)
        return session


def _free_port(host: str) -> int:
    # The endpoint URL names the port, so it must be known before the server listens.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --- deadband as OPC UA Part 4 specifies it ----------------------------------------------


def _deadband_exceeded(self: Any, values: Any, flt: Any) -> bool:
    """Absolute deadband against the last *reported* value; status changes always pass.

    asyncua 2.1 compares each sample with the previous sample (a slow drift is then never
    reported) and fails on a value that turned null with a Bad status.
    """
    cur = values.get_current_datavalue()
    if cur is None or flt.DeadbandType != ua.DeadbandType.Absolute:
        return bool(_asyncua_deadband_exceeded(self, values, flt))
    last = getattr(values, "_iiot_reported", None)
    a = cur.Value.Value if cur.Value is not None else None
    b = last.Value.Value if last is not None and last.Value is not None else None
    within = (
        last is not None
        and cur.StatusCode == last.StatusCode
        and isinstance(a, int | float)
        and isinstance(b, int | float)
        and abs(a - b) <= flt.DeadbandValue
    )
    if within:
        return False
    values._iiot_reported = cur
    return True


_asyncua_deadband_exceeded = MonitoredItemService._is_deadband_exceeded
MonitoredItemService._is_deadband_exceeded = _deadband_exceeded


# --- users -------------------------------------------------------------------------------


class _UserManager:
    """Username/password users; everyone else (anonymous included) is refused."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


# --- transport with faults ---------------------------------------------------------------


class _GatedTransport:
    """The connection's transport; sends nothing while the device is silent."""

    def __init__(self, transport: asyncio.Transport, sim: OpcUaSimServer) -> None:
        self._transport = transport
        self._sim = sim

    def write(self, data: bytes) -> None:
        if self._sim.device.faults.mode is FaultMode.SILENT:
            return
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Protocol(OPCUAProtocol):  # type: ignore[misc]
    def __init__(self, sim: OpcUaSimServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sim = sim

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._sim.device.faults.mode is FaultMode.DROP:
            self._sim.dropped += 1
            transport.close()
            return
        assert isinstance(transport, asyncio.Transport)
        gated: Any = _GatedTransport(transport, self._sim)
        super().connection_made(gated)

    async def _process_one_msg(self, header: Any, buf: Buffer) -> bool:
        faults = self._sim.device.faults
        if faults.mode is FaultMode.SILENT:
            self._sim.ignored += 1
            return True
        if faults.mode is FaultMode.DROP:
            self._sim.dropped += 1
            if self.transport is not None:
                self.transport.close()
            return False
        if faults.mode is FaultMode.SLOW:
            await asyncio.sleep(faults.delay)
        self._sim.device.requests += 1
        self._sim.requests += 1
        return bool(await super()._process_one_msg(header, buf))


class _BinaryServer(BinaryServer):  # type: ignore[misc]
    def __init__(
        self,
        sim: OpcUaSimServer,
        iserver: InternalServer,
        hostname: str,
        port: int,
        limits: TransportLimits,
    ) -> None:
        super().__init__(iserver, hostname, port, limits)
        self._sim = sim

    def _make_protocol(self) -> OPCUAProtocol:
        return _Protocol(
            self._sim,
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )


class _Server(Server):  # type: ignore[misc]
    """asyncua's Server with the fault-injecting transport (mirrors ``Server.start``)."""

    def __init__(self, sim: OpcUaSimServer, iserver: InternalServer) -> None:
        super().__init__(iserver=iserver)
        self._sim = sim

    async def start(self) -> None:
        await self._setup_server_nodes()
        await self.iserver.start()
        host, port = self._get_bind_socket_info()
        assert host is not None and port is not None
        bserver = _BinaryServer(self._sim, self.iserver, host, port, self.limits)
        bserver.set_policies(self._policies)
        self.bserver = bserver
        try:
            await bserver.start()
        except BaseException:
            await self.iserver.stop()
            raise


# --- the simulator -----------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Served:
    point: Point
    node_id: ua.NodeId


class OpcUaSimServer:
    """Serve ``device`` over OPC UA at ``endpoint`` (opc.tcp://host:port/iiot/)."""

    def __init__(
        self,
        device: SimDevice,
        *,
        host: str = "127.0.0.1",
        port: int = 4840,
        security: Literal["none", "basic256sha256"] = "none",
        certificate: Path | None = None,
        private_key: Path | None = None,
        users: Mapping[str, str] | None = None,
        update_interval: float = 0.5,
        extra_namespaces: Sequence[str] = (),
        max_sessions: int | None = None,
    ) -> None:
        profile = device.profile
        if profile.protocol != "opcua" or profile.opcua is None:
            raise ValueError(f"profile '{profile.id}' is not an OPC UA profile")
        if security == "basic256sha256" and (certificate is None or private_key is None):
            raise ValueError("security basic256sha256 needs certificate and private_key")
        if update_interval <= 0:
            raise ValueError("update_interval must be positive")
        self.device = device
        self.host = host
        self.port = port
        self.security = security
        self.certificate = certificate
        self.private_key = private_key
        self.users = dict(users) if users is not None else None
        self.update_interval = update_interval
        self.extra_namespaces = list(extra_namespaces)
        self.max_sessions = max_sessions
        self.endpoint = f"opc.tcp://{host}:{port}/iiot/"
        self.namespace_index = -1
        # point name -> the NodeId it is served at
        self.node_ids: dict[str, ua.NodeId] = {}
        # counters
        self.requests = 0  # protocol messages answered (reads, writes, publishes, ...)
        self.updates = 0
        self.update_errors = 0
        self.client_writes = 0
        self.write_errors = 0
        self.restarts = 0
        self.dropped = 0
        self.ignored = 0
        self.start_seconds = 0.0
        self._served: list[_Served] = []
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._own_write: ua.NodeId | None = None
        self._running = False
        self._free_id: Callable[[str], ua.NodeId] = lambda text: ua.NodeId(text)

    @property
    def profile(self) -> Profile:
        return self.device.profile

    async def start(self) -> None:
        """Build the address space and listen; returns when clients can connect."""
        if self._server is not None:
            raise RuntimeError(f"OPC UA simulator {self.endpoint} is already started")
        t0 = time.perf_counter()
        self._served = []
        self.node_ids = {}
        if self.port == 0:
            self.port = _free_port(self.host)
            self.endpoint = f"opc.tcp://{self.host}:{self.port}/iiot/"
        user_manager = _UserManager(self.users) if self.users is not None else None
        iserver = _InternalServer(user_manager=user_manager)
        iserver.max_sessions = self.max_sessions
        server = _Server(self, iserver)
        await server.init()
        server.disable_clock()  # its 1 s loop would delay stop() by up to a second
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"iiot simulator {self.device.device_id} ({self.profile.id})")
        server.product_uri = "urn:iiot:simulator"
        await server.set_application_uri(SERVER_APPLICATION_URI)
        for uri in self.extra_namespaces:
            await server.register_namespace(uri)
        assert self.profile.opcua is not None
        self.namespace_index = await server.register_namespace(self.profile.opcua.namespace_uri)
        if self.security == "basic256sha256":
            assert self.certificate is not None and self.private_key is not None
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens(
            [ua.UserNameIdentityToken] if self.users is not None else [ua.AnonymousIdentityToken]
        )
        await self._build(server)
        await self._update(server)
        await server.start()
        self._server = server
        self._running = True
        self._task = asyncio.create_task(self._run(), name=f"opcua-sim {self.endpoint}")
        self.start_seconds = time.perf_counter() - t0
        log.info(
            "opcua simulator listening",
            extra={
                "device": self.device.device_id,
                "endpoint": self.endpoint,
                "start_s": round(self.start_seconds, 3),
            },
        )

    async def stop(self) -> None:
        """Stop updating and listening; safe to call twice."""
        self._running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self._server = self._server, None
        if server is not None:
            if server.bserver is not None:
                await server.bserver.stop()
            await self._close_sessions(server)
            await server.stop()

    def monitored_items(self) -> dict[int, list[int]]:
        """The monitored item ids the server holds, per subscription id (every session's)."""
        server = self._server
        if server is None:
            return {}
        subs = server.iserver.subscription_service.subscriptions
        # asyncua keeps a subscription's items in its MonitoredItemService, unexposed.
        return {sid: sorted(sub.monitored_item_srv._monitored_items) for sid, sub in subs.items()}

    async def __aenter__(self) -> OpcUaSimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- address space ---

    async def _build(self, server: _Server) -> None:
        profile = self.profile
        assert profile.opcua is not None
        ns = self.namespace_index
        uri = profile.opcua.namespace_uri
        objects = server.nodes.objects
        root_name = profile.opcua.root_name or profile.id
        wanted: dict[str, ua.NodeId] = {}
        for p in profile.points:
            assert p.opcua is not None
            if p.opcua.node_suffix is not None:
                # Relative to the root object, whose NodeId is ns=<profile>;s=<root_name>.
                wanted[p.name] = ua.NodeId(root_name + p.opcua.node_suffix, ns)
            elif p.opcua.node_id is not None:
                try:
                    wanted[p.name] = node_id(p.opcua.node_id, ns, uri)
                except ValueError as exc:
                    raise ValueError(f"profile '{profile.id}': point '{p.name}': {exc}") from exc
        taken = set(wanted.values())

        def free_id(text: str) -> ua.NodeId:
            nid = ua.NodeId(text, ns)
            while nid in taken:
                nid = ua.NodeId(nid.Identifier + "_", ns)
            taken.add(nid)
            return nid

        self._free_id = free_id

        # NodeId points hang under one object named after the device, which is also the
        # root of the profile's relative (path) points.
        containers: dict[tuple[tuple[int, str], ...], Node] = {(): objects}
        relative = any(p.opcua is not None and p.opcua.path for p in profile.points)
        if wanted or relative:
            root = await objects.add_object(free_id(root_name), ua.QualifiedName(root_name, ns))
            containers[((ns, root_name),)] = root
            for p in profile.points:
                if p.name in wanted:
                    await self._add_point(
                        server, root, p, wanted[p.name], ua.QualifiedName(p.name, ns)
                    )

        # Browse-path points: shallow paths first, so a variable can parent deeper ones.
        by_path: list[tuple[list[ua.QualifiedName], Point]] = []
        for p in profile.points:
            assert p.opcua is not None
            text = p.opcua.browse_path or p.opcua.path
            if text is None:
                continue
            try:
                names = browse_path(text, ns)
            except ValueError as exc:
                raise ValueError(f"profile '{profile.id}': point '{p.name}': {exc}") from exc
            if p.opcua.path is not None:
                names = [ua.QualifiedName(root_name, ns), *names]
            by_path.append((names, p))
        by_path.sort(key=lambda item: len(item[0]))
        for names, p in by_path:
            parent = objects
            keys = [(n.NamespaceIndex, n.Name) for n in names]
            for depth in range(1, len(names)):
                key = tuple(keys[:depth])
                node = containers.get(key)
                if node is None:
                    text = "/".join(name for _, name in key)
                    node = await parent.add_object(free_id(text), names[depth - 1])
                    containers[key] = node
                parent = node
            key = tuple(keys)
            if key in containers:
                where = (p.opcua.browse_path or p.opcua.path) if p.opcua else ""
                raise ValueError(
                    f"profile '{profile.id}': point '{p.name}': browse path "
                    f"'{where}' is already a node"
                )
            nid = free_id("/".join(n.Name for n in names))
            containers[key] = await self._add_point(server, parent, p, nid, names[-1])

        for served in self._served:
            await self._add_properties(server.get_node(served.node_id), served.point)

    async def _add_point(
        self, server: _Server, parent: Node, p: Point, nid: ua.NodeId, bname: ua.QualifiedName
    ) -> Node:
        vtype = VARIANT_TYPES[p.type]
        initial = self.device.values().get(p.name)
        try:
            variant = encode_value(p, initial, saturate=True) if initial is not None else None
        except ValueError:
            variant = None
        value = variant.Value if variant is not None else ua.get_default_value(vtype)
        var = await parent.add_variable(nid, bname, value, varianttype=vtype)
        if p.description:
            await var.write_attribute(
                ua.AttributeIds.Description,
                ua.DataValue(ua.Variant(ua.LocalizedText(p.description))),
            )
        if p.access == "rw":
            await var.set_writable()
            server.set_attribute_value_setter(var.nodeid, self._setter(p))
        self._served.append(_Served(p, var.nodeid))
        self.node_ids[p.name] = var.nodeid
        return var

    async def _add_properties(self, var: Node, p: Point) -> None:
        base = var.nodeid.to_string()
        if p.unit:
            eu = ua.EUInformation(
                NamespaceUri=_UNITS_NAMESPACE,
                UnitId=-1,
                DisplayName=ua.LocalizedText(p.unit),
                Description=ua.LocalizedText(p.unit),
            )
            await var.add_property(
                self._free_id(f"{base}#EngineeringUnits"),
                ua.QualifiedName("EngineeringUnits", 0),
                eu,
                datatype=ua.NodeId(ua.ObjectIds.EUInformation),
            )
        if p.range is not None and p.type in _NUMERIC:
            # EURange describes the value as served, i.e. before the profile's scaling.
            lo, hi = (float(to_raw(p, v)) for v in p.range)
            await var.add_property(
                self._free_id(f"{base}#EURange"),
                ua.QualifiedName("EURange", 0),
                ua.Range(Low=min(lo, hi), High=max(lo, hi)),
                datatype=ua.NodeId(ua.ObjectIds.Range),
            )

    # --- values ---

    def _setter(self, point: Point) -> Any:
        """Store a written value; a client's write also goes to the device."""

        def setter(node: NodeData, attr: ua.AttributeIds, dv: ua.DataValue) -> None:
            node.attributes[attr].value = dv
            if self._own_write is not None and node.nodeid == self._own_write:
                self._own_write = None  # consumed: later writes are the clients'
                return
            raw = dv.Value.Value if dv.Value is not None else None
            try:
                self.device.write(point.name, decode_value(point, raw))
            except (ValueError, PermissionError) as exc:
                self.write_errors += 1
                log.warning(
                    "opcua simulator: write refused",
                    extra={"device": self.device.device_id, "point": point.name, "error": str(exc)},
                )
                return
            self.client_writes += 1

        return setter

    async def _update(self, server: _Server) -> None:
        """Copy the device's values (or its failure) into the nodes: one update."""
        mode = self.device.faults.mode
        now = datetime.now(UTC)
        values = self.device.values()
        self.updates += 1
        for served in self._served:
            p = served.point
            if mode is FaultMode.EXCEPTION:
                dv = ua.DataValue(
                    StatusCode=ua.StatusCode(ua.StatusCodes.BadDeviceFailure),
                    SourceTimestamp=now,
                )
            else:
                value = values.get(p.name)
                if value is None:
                    continue
                try:
                    variant = encode_value(p, value, saturate=True)
                except ValueError as exc:
                    self.update_errors += 1
                    log.warning(
                        "opcua simulator: value not served",
                        extra={"device": self.device.device_id, "point": p.name, "error": str(exc)},
                    )
                    continue
                dv = ua.DataValue(variant, SourceTimestamp=now)
            # asyncua calls the setter synchronously, before this call first awaits.
            self._own_write = served.node_id
            try:
                await server.write_attribute_value(served.node_id, dv)
            finally:
                self._own_write = None

    async def _close_sessions(self, server: _Server) -> None:
        """Forget every client session, as a server that stops does.

        asyncua keeps a session with subscriptions alive after its connection is lost
        (so that a client may resume it); a restarted device has no such memory.
        """
        sessions = list(getattr(server.iserver, "_external_sessions", {}).values())
        for session in sessions:
            with contextlib.suppress(Exception):
                await session.close_session(True)

    def _drop_connections(self, server: _Server) -> None:
        for transport in list(server.iserver.asyncio_transports):
            transport.close()

    async def _restart(self, server: _Server) -> None:
        """Go away for ``faults.delay`` seconds and come back on the same port."""
        delay = self.device.faults.delay
        bserver = server.bserver
        assert bserver is not None
        log.info(
            "opcua simulator restarting",
            extra={"device": self.device.device_id, "endpoint": self.endpoint, "delay_s": delay},
        )
        await bserver.stop()
        await self._close_sessions(server)
        await asyncio.sleep(delay)
        await bserver.start()
        self.restarts += 1
        if self.device.faults.mode is FaultMode.RESTART:
            self.device.faults.clear()

    async def _run(self) -> None:
        """Update loop: one update per ``update_interval`` until stopped."""
        server = self._server
        assert server is not None
        # A single update touches every node once; far below this on any machine.
        step_timeout = max(5.0, 10 * self.update_interval)
        while self._running:
            await asyncio.sleep(self.update_interval)
            mode = self.device.faults.mode
            try:
                if mode is FaultMode.RESTART:
                    await self._restart(server)
                    continue
                if mode is FaultMode.SILENT:
                    continue  # hung: nothing changes
                if mode is FaultMode.DROP:
                    self._drop_connections(server)
                await asyncio.wait_for(self._update(server), timeout=step_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.update_errors += 1
                log.warning(
                    "opcua simulator: update failed",
                    extra={"device": self.device.device_id, "error": repr(exc)},
                )
