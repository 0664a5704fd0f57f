"""Discovery: find equipment where the agent's ``discovery:`` scope allows, and name its profile.

``scan(scope, profiles, exclude=..., deadline=...)`` returns one :class:`Proposal` per
device that answered and is not configured yet, with the profiles that fit it, best
first. It reads and never writes, sends one request at a time at most ``scope.rate``
per second, and stops at ``deadline`` with what it has found by then.

Modbus (TCP, RTU framed over TCP, RTU on serial lines), for every unit the scope allows:

1. presence   read holding register 0; any answer (data, or an exception other than 0A/0B,
              which a gateway gives for a unit nobody answers) means a unit is there;
2. SunSpec    the "SunS" marker at 40000, 0 or 50000, then the model list after it;
3. identity   Read Device Identification (function 43/14), where the device answers it;
4. profiles   every Modbus profile read once and scored by ``edge_agent.probe``; the ones
              that fit become the candidates, with the identification as extra evidence.

OPC UA, for every endpoint: GetEndpoints (security policies, server names), then an
anonymous session without security where one is offered: the namespaces, the objects
under the Objects folder, and for each OPC UA profile whose namespace the server has,
the share of its points (NodeIds and browse paths) that resolve.

Addresses named in ``exclude`` (``connection_key`` of each configured device) are
never contacted: the agent is already polling them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import typer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from device_profiles.loader import ProfileSet
from device_profiles.schema import Profile
from edge_agent.probe import ProbeResult, probe_profile, rank
from protocols.errors import ConfigError, ConnectError
from protocols.modbus.config import ModbusConnection
from protocols.modbus.line import Line, acquire_line, release_line
from protocols.mqtt.control import Candidate, Proposal
from protocols.opcua.config import OpcUaConnection

__all__ = [
    "DiscoveryScope",
    "ModbusTcpScope",
    "OpcUaScope",
    "SerialScope",
    "connection_key",
    "discover",
    "scan",
]

log = logging.getLogger(__name__)
_NAME = "discovery"  # line user and driver names of a scan

_MAX_HOSTS = 1024  # addresses one hosts entry may name (a /22)
_MAX_TCP_TARGETS = 4096  # host × port pairs in a whole scope
_GATEWAY_NOBODY = frozenset({10, 11})  # exception codes: path unavailable, target silent
_SUNSPEC_BASES = (40000, 0, 50000)
_SUNSPEC_MARKER = [0x5375, 0x6E53]  # "SunS"
_SUNSPEC_MAX_MODELS = 64
_IDENT_NAMES = {
    0: "vendor",
    1: "product_code",
    2: "revision",
    3: "vendor_url",
    4: "product_name",
    5: "model_name",
    6: "application_name",
}
_IDENT_WEIGHT = 0.25  # of the identification part against the probe score (weight 1)
_MAX_LISTED = 50  # objects / namespaces listed in a proposal


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_UnitSpec = Annotated[int | str, Field(description="A unit id, or a range '1-10'.")]


def _units(specs: Iterable[int | str]) -> list[int]:
    """Unit ids named by ``specs`` (ints and 'a-b' ranges), sorted, each in 1..247."""
    out: set[int] = set()
    for spec in specs:
        text = str(spec).strip()
        first, sep, last = text.partition("-")
        try:
            lo, hi = int(first), int(last if sep else first)
        except ValueError:
            raise ValueError(f"unit '{text}' is not a number or a range like 1-10") from None
        if not 1 <= lo <= hi <= 247:
            raise ValueError(f"units '{text}' must lie in 1..247, low to high")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _hosts(spec: str) -> list[str]:
    """Addresses one hosts entry names: an address or name, a CIDR block, or 'first-last'."""
    text = spec.strip()
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise ValueError(f"hosts '{text}': {exc}") from None
        if net.num_addresses > _MAX_HOSTS + 2:
            raise ValueError(
                f"hosts '{text}' names {net.num_addresses} addresses (most {_MAX_HOSTS})"
            )
        hosts = list(net.hosts()) or [net.network_address]
        return [str(h) for h in hosts]
    first, sep, last = text.partition("-")
    if sep:
        try:
            a, b = ipaddress.ip_address(first.strip()), ipaddress.ip_address(last.strip())
        except ValueError as exc:
            raise ValueError(f"hosts '{text}': {exc}") from None
        if a.version != b.version or int(b) < int(a):
            raise ValueError(f"hosts '{text}': the range must run from low to high")
        count = int(b) - int(a) + 1
        if count > _MAX_HOSTS:
            raise ValueError(f"hosts '{text}' names {count} addresses (most {_MAX_HOSTS})")
        return [str(ipaddress.ip_address(int(a) + i)) for i in range(count)]
    if not text or any(ch.isspace() for ch in text):
        raise ValueError(f"hosts '{text}' is not an address, a name, a CIDR block or a range")
    return [text]


class ModbusTcpScope(_Strict):
    """Modbus TCP (or RTU framed over TCP) hosts, ports and unit ids to try."""

    hosts: list[str] = Field(
        min_length=1,
        description="Each '10.0.0.5', 'plc-3.local', '10.0.0.0/28' or '10.0.0.10-10.0.0.40'.",
    )
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default=[502], min_length=1)
    units: list[_UnitSpec] = Field(default=[1], min_length=1)
    transport: Literal["tcp", "rtu-over-tcp"] = "tcp"

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, v: list[str]) -> list[str]:
        for spec in v:
            _hosts(spec)
        return v

    @field_validator("units")
    @classmethod
    def _check_units(cls, v: list[int | str]) -> list[int | str]:
        _units(v)
        return v

    def addresses(self) -> list[str]:
        return list(dict.fromkeys(h for spec in self.hosts for h in _hosts(spec)))

    def unit_ids(self) -> list[int]:
        return _units(self.units)


class SerialScope(_Strict):
    """One RS-485 line: its settings and the unit ids to try on it."""

    port: str = Field(min_length=1, description="e.g. /dev/ttyUSB0")
    baudrate: int = Field(default=9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    units: list[_UnitSpec] = Field(default=["1-247"], min_length=1)

    @field_validator("units")
    @classmethod
    def _check_units(cls, v: list[int | str]) -> list[int | str]:
        _units(v)
        return v

    def unit_ids(self) -> list[int]:
        return _units(self.units)


class OpcUaScope(_Strict):
    """One OPC UA server endpoint to ask."""

    endpoint: str = Field(pattern=r"^opc\.tcp://[^/\s]+", description="opc.tcp://host:port[/path]")

    @model_validator(mode="before")
    @classmethod
    def _plain_url(cls, data: Any) -> Any:
        return {"endpoint": data} if isinstance(data, str) else data


class DiscoveryScope(_Strict):
    """Where a scan may look (the agent config's ``discovery:`` key), and how gently."""

    modbus_tcp: list[ModbusTcpScope] = Field(default_factory=list)
    serial: list[SerialScope] = Field(default_factory=list)
    opcua: list[OpcUaScope] = Field(default_factory=list)
    rate: float = Field(
        default=20.0, ge=0.1, le=1000, description="Requests per second, at most, in all."
    )
    timeout: float = Field(default=0.5, gt=0, le=10, description="Seconds to wait for an answer.")

    @model_validator(mode="after")
    def _bounded(self) -> Self:
        targets = sum(len(s.addresses()) * len(s.ports) for s in self.modbus_tcp)
        if targets > _MAX_TCP_TARGETS:
            raise ValueError(
                f"modbus_tcp names {targets} host:port pairs; at most {_MAX_TCP_TARGETS}"
            )
        ports = [s.port for s in self.serial]
        if len(ports) != len(set(ports)):
            raise ValueError("serial: a line is listed twice")
        return self

    @property
    def empty(self) -> bool:
        return not (self.modbus_tcp or self.serial or self.opcua)


def _opcua_key(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    try:
        port = parts.port or 4840
    except ValueError:
        port = 4840
    return f"opcua:{(parts.hostname or '').lower()}:{port}"


def connection_key(conn: BaseModel) -> str:
    """Where a device is, as ``exclude`` names it: ``modbus:<line>:<unit>`` or ``opcua:<url>``.

    A protocol discovery does not scan gets a key of its own that no proposal can match.
    """
    if isinstance(conn, ModbusConnection):
        return f"modbus:{conn.line_key}:{conn.unit}"
    if isinstance(conn, OpcUaConnection):
        return f"opcua:{conn.endpoint}"
    return f"{type(conn).__name__}:{conn.model_dump_json()}"


class _QuietProbes(logging.Filter):
    """Keep the driver's routine notes about probe reads (refused blocks) out of the log.

    Reading a device as a profile it is not is refused block by block, by design; logged
    at info level per block, one scan would flood the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        device = getattr(record, "device", "")
        return not (
            record.levelno <= logging.INFO
            and isinstance(device, str)
            and device.startswith(f"{_NAME}-")
        )


# --- shared state of one scan ------------------------------------------------------------


class _Pacer:
    """At most ``rate`` requests a second: each waits until its turn."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0

    async def take(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        turn = max(now, self._next)
        self._next = turn + self.interval
        if turn > now:
            await asyncio.sleep(turn - now)

    def after(self) -> None:
        """Requests were made elsewhere until now (a probe): the next one waits its turn."""
        self._next = max(self._next, asyncio.get_running_loop().time() + self.interval)


@dataclass(slots=True)
class _Scan:
    scope: DiscoveryScope
    modbus_profiles: list[Profile]
    opcua_profiles: list[Profile]
    exclude: set[str]
    pacer: _Pacer
    progress: Callable[[str], None] | None
    errors: list[str]
    proposals: list[Proposal] = field(default_factory=list)

    def say(self, text: str) -> None:
        log.debug("discovery progress", extra={"note": text})
        if self.progress is not None:
            self.progress(text)

    def problem(self, text: str) -> None:
        log.warning("discovery problem", extra={"problem": text})
        self.errors.append(text)
        if self.progress is not None:
            self.progress(text)

    def excluded(self, key: str) -> bool:
        if key.startswith("opcua:"):
            return key in self.exclude or _opcua_key(key[6:]) in self.exclude
        return key in self.exclude


# --- the scan ----------------------------------------------------------------------------


async def scan(
    scope: DiscoveryScope,
    profiles: ProfileSet | Iterable[Profile],
    *,
    exclude: set[str],
    deadline: float,
    progress: Callable[[str], None] | None = None,
    errors: list[str] | None = None,
) -> list[Proposal]:
    """Equipment that answers where ``scope`` allows and ``exclude`` does not name.

    ``deadline`` is a ``time.monotonic()`` value: the scan stops then and returns what it
    found so far. ``exclude`` holds ``connection_key`` strings of configured devices.
    ``progress`` is told what the scan is doing; problems met on the way (a serial line
    that cannot be opened, the deadline) are appended to ``errors``.
    """
    known = list(profiles)
    ctx = _Scan(
        scope=scope,
        modbus_profiles=[p for p in known if p.protocol == "modbus"],
        opcua_profiles=[p for p in known if p.protocol == "opcua"],
        exclude={_opcua_key(k[6:]) if k.startswith("opcua:") else k for k in exclude}
        | set(exclude),
        pacer=_Pacer(scope.rate),
        progress=progress,
        errors=errors if errors is not None else [],
    )
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    driver_log = logging.getLogger("protocols.modbus.driver")
    quiet = _QuietProbes()
    driver_log.addFilter(quiet)
    try:
        async with asyncio.timeout_at(loop.time() + (deadline - started)):
            for tcp in scope.modbus_tcp:
                await _scan_tcp(ctx, tcp)
            for line in scope.serial:
                await _scan_serial(ctx, line)
            for ep in scope.opcua:
                await _scan_opcua(ctx, ep)
    except TimeoutError:
        ctx.problem(
            f"scan stopped at its deadline after {time.monotonic() - started:.1f} s, "
            f"{len(ctx.proposals)} device(s) found by then"
        )
    finally:
        driver_log.removeFilter(quiet)
    log.info(
        "discovery scan done",
        extra={"proposals": len(ctx.proposals), "problems": len(ctx.errors)},
    )
    # A device reached through two entries of the scope is one device.
    seen: set[str] = set()
    unique: list[Proposal] = []
    for p in ctx.proposals:
        key = json.dumps(p.address, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _candidates(scored: list[tuple[str, float]]) -> list[Candidate]:
    """Candidates best first, each score clamped to [0, 1]."""
    ranked = sorted(scored, key=lambda item: item[1], reverse=True)
    return [Candidate(profile=pid, score=round(min(1.0, max(0.0, s)), 3)) for pid, s in ranked]


# --- Modbus ------------------------------------------------------------------------------


def _connection(ctx: _Scan, base: dict[str, Any], unit: int) -> ModbusConnection:
    # ``pause`` spaces the probe's own requests on the line as the pacer spaces ours.
    return ModbusConnection.model_validate(
        {
            **base,
            "unit": unit,
            "timeout": ctx.scope.timeout,
            "retries": 0,
            "pause": min(10.0, ctx.pacer.interval),
        }
    )


async def _ask(ctx: _Scan, line: Line, conn: ModbusConnection, call: Any) -> Any:
    """One request on ``line`` in its turn: the response, or None when nothing answered.

    Raises ConnectError when the line cannot be opened.
    """
    await ctx.pacer.take()
    async with line.lock:
        await line.ensure_connected(conn.timeout, _NAME)
        try:
            async with asyncio.timeout(conn.timeout):
                return await line.run(call)
        except TimeoutError:
            if conn.transport != "tcp":
                # RTU frames carry no transaction id: a late answer would pass for the next.
                line.close()
            return None
        except (ConnectionException, ModbusIOException, OSError):
            return None
        except ModbusException:
            return None  # an answer that makes no sense counts as none


def _present(response: Any) -> bool:
    if response is None:
        return False
    if response.isError():
        return int(getattr(response, "exception_code", 0) or 0) not in _GATEWAY_NOBODY
    return True


def _first_answer(response: Any) -> str:
    if response.isError():
        return f"exception {int(getattr(response, 'exception_code', 0) or 0):02X}"
    return "data"


async def _sunspec(ctx: _Scan, line: Line, conn: ModbusConnection) -> dict[str, Any] | None:
    """The SunSpec marker's base register and the ids of the models after it."""
    unit = conn.unit

    def regs(address: int) -> Callable[[Any], Any]:
        return lambda c: c.read_holding_registers(address, count=2, device_id=unit)

    for base in _SUNSPEC_BASES:
        r = await _ask(ctx, line, conn, regs(base))
        if r is None or r.isError() or list(r.registers) != _SUNSPEC_MARKER:
            continue
        models: list[int] = []
        address = base + 2
        for _ in range(_SUNSPEC_MAX_MODELS):
            if address + 2 > 65536:
                break
            r = await _ask(ctx, line, conn, regs(address))
            if r is None or r.isError() or len(r.registers) < 2:
                break
            model, length = int(r.registers[0]), int(r.registers[1])
            if model == 0xFFFF:
                break
            models.append(model)
            address += 2 + length
        return {"base": base, "models": models}
    return None


def _ident_text(raw: Any) -> str:
    parts = raw if isinstance(raw, list) else [raw]
    text = " ".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in parts)
    return "".join(ch for ch in text if ch.isprintable()).strip()[:64]


async def _identification(ctx: _Scan, line: Line, conn: ModbusConnection) -> dict[str, str] | None:
    """Read Device Identification (43/14): regular objects, else the basic ones."""
    unit = conn.unit

    def ask(code: int) -> Callable[[Any], Any]:
        return lambda c: c.read_device_information(read_code=code, object_id=0, device_id=unit)

    r = await _ask(ctx, line, conn, ask(2))
    if r is not None and r.isError() and getattr(r, "exception_code", 0) == 3:
        r = await _ask(ctx, line, conn, ask(1))  # regular objects unsupported: basic only
    if r is None or r.isError():
        return None
    out: dict[str, str] = {}
    for oid, raw in (getattr(r, "information", None) or {}).items():
        name = _IDENT_NAMES.get(int(oid))
        text = _ident_text(raw) if name is not None else ""
        if name is not None and text:
            out[name] = text
    return out or None


def _with_identity(score: float, profile: Profile, ident: dict[str, str] | None) -> float:
    """The probe score with the device's identification as one more, lighter, part."""
    if not ident:
        return score
    names = {ident.get(k, "").lower() for k in ("product_code", "model_name", "product_name")}
    if profile.id.lower() in names or profile.name.lower() in names:
        match = 1.0
    elif profile.manufacturer and ident.get("vendor", "").lower() == profile.manufacturer.lower():
        match = 0.5
    else:
        match = 0.0
    return (score + _IDENT_WEIGHT * match) / (1.0 + _IDENT_WEIGHT)


async def _identify(
    ctx: _Scan, line: Line, base: dict[str, Any], unit: int, first: Any, where: str
) -> Proposal:
    """What one answering unit is: SunSpec, identification, and the profiles that fit."""
    conn = _connection(ctx, base, unit)
    answered: dict[str, Any] = {"unit": unit, "first_answer": _first_answer(first)}
    sunspec = await _sunspec(ctx, line, conn)
    if sunspec is not None:
        answered["sunspec"] = sunspec
    ident = await _identification(ctx, line, conn)
    if ident is not None:
        answered["identification"] = ident
    # A wrong profile on a strict device is refused block by block: give it room.
    limit = 5.0 + 64 * (ctx.scope.timeout + ctx.pacer.interval)
    results: list[ProbeResult] = []
    for prof in ctx.modbus_profiles:
        results.append(await probe_profile(prof, conn, name=f"{_NAME}-{prof.id}", limit=limit))
        ctx.pacer.after()
    fits = [r for r in rank(results) if r.fits]
    candidates = _candidates(
        [(r.profile.id, _with_identity(r.score, r.profile, ident)) for r in fits]
    )
    best = (
        f"{candidates[0].profile} ({candidates[0].score:.2f})" if candidates else "no profile fits"
    )
    ctx.say(f"{where} unit {unit}: {best}")
    return Proposal(
        protocol="modbus",
        address={"modbus": {**base, "unit": unit}},
        answered=answered,
        candidates=candidates,
    )


async def _sweep(
    ctx: _Scan, line: Line, base: dict[str, Any], units: list[int], where: str
) -> list[tuple[int, Any]]:
    """The units that answer, each with its first answer."""
    found: list[tuple[int, Any]] = []
    for i, unit in enumerate(units, 1):
        conn = _connection(ctx, base, unit)
        r = await _ask(
            ctx, line, conn, lambda c, u=unit: c.read_holding_registers(0, count=1, device_id=u)
        )
        if _present(r):
            found.append((unit, r))
        if i % 16 == 0 and i < len(units):
            ctx.say(f"{where}: {i} of {len(units)} unit ids tried, {len(found)} answered")
    return found


async def _scan_line(ctx: _Scan, base: dict[str, Any], units: list[int], where: str) -> None:
    """Find the answering units of one line (a TCP peer or a serial line) and identify them."""
    if not units:
        ctx.say(f"{where}: every unit id in scope is configured already")
        return
    try:
        line = acquire_line(_connection(ctx, base, units[0]), _NAME)
    except ConfigError as exc:
        ctx.problem(f"{where}: {exc}")
        return
    try:
        found = await _sweep(ctx, line, base, units, where)
        if base["transport"] != "rtu" and len(units) >= 3 and len(found) == len(units):
            # A device that ignores the unit id answers them all; it is one device.
            ctx.say(f"{where}: every unit id answers; taken as one device at unit {units[0]}")
            found = found[:1]
        ctx.say(f"{where}: {len(found)} of {len(units)} unit id(s) answered")
        for unit, first in found:
            ctx.proposals.append(await _identify(ctx, line, base, unit, first, where))
    except ConnectError as exc:
        ctx.problem(f"{where}: {exc}")
    finally:
        release_line(line, _NAME)


async def _listening(ctx: _Scan, targets: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The host:port pairs that accept a TCP connection (tried a few at a time)."""
    gate = asyncio.Semaphore(16)

    async def one(host: str, port: int) -> bool:
        async with gate:
            await ctx.pacer.take()
            try:
                async with asyncio.timeout(2 * ctx.scope.timeout):
                    _, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError):
                return False
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True

    up = await asyncio.gather(*(one(h, p) for h, p in targets))
    return [t for t, ok in zip(targets, up, strict=True) if ok]


async def _scan_tcp(ctx: _Scan, tcp: ModbusTcpScope) -> None:
    units = tcp.unit_ids()
    targets: list[tuple[str, int]] = []
    for host in tcp.addresses():
        for port in tcp.ports:
            key = f"modbus:{tcp.transport}:{host}:{port}"
            if all(ctx.excluded(f"{key}:{u}") for u in units):
                ctx.say(f"modbus {tcp.transport} {host}:{port}: configured already, skipped")
            else:
                targets.append((host, port))
    if len(targets) > 1:
        ctx.say(f"modbus {tcp.transport}: trying {len(targets)} host:port pair(s)")
    for host, port in await _listening(ctx, targets):
        where = f"modbus {tcp.transport} {host}:{port}"
        key = f"modbus:{tcp.transport}:{host}:{port}"
        left = [u for u in units if not ctx.excluded(f"{key}:{u}")]
        base = {"transport": tcp.transport, "host": host, "port": port}
        await _scan_line(ctx, base, left, where)


async def _scan_serial(ctx: _Scan, serial: SerialScope) -> None:
    where = f"modbus rtu {serial.port}"
    left = [u for u in serial.unit_ids() if not ctx.excluded(f"modbus:rtu:{serial.port}:{u}")]
    ctx.say(f"{where}: trying {len(left)} unit id(s)")
    base = {
        "transport": "rtu",
        "serial_port": serial.port,
        "baudrate": serial.baudrate,
        "parity": serial.parity,
        "stopbits": serial.stopbits,
        "bytesize": serial.bytesize,
    }
    await _scan_line(ctx, base, left, where)


# --- OPC UA ------------------------------------------------------------------------------

_OPCUA_FIT = 0.5  # share of a profile's points that must resolve for it to be a candidate


def _opcua_timeout(ctx: _Scan) -> float:
    # Opening a session takes several round trips; never less than 2 s for one call.
    return max(2.0, 4 * ctx.scope.timeout)


def _endpoints_answer(url: str, endpoints: list[Any]) -> tuple[dict[str, Any], bool]:
    """What GetEndpoints said, and whether an anonymous endpoint without security exists."""
    from asyncua import ua

    security: set[str] = set()
    open_anonymous = False
    for e in endpoints:
        policy = str(e.SecurityPolicyUri).rpartition("#")[2] or "None"
        security.add(f"{policy}/{ua.MessageSecurityMode(e.SecurityMode).name.rstrip('_')}")
        tokens = {t.TokenType for t in (e.UserIdentityTokens or [])}
        if policy == "None" and ua.UserTokenType.Anonymous in tokens:
            open_anonymous = True
    server = endpoints[0].Server if endpoints else None
    answered: dict[str, Any] = {
        "endpoint": url,
        "server": (server.ApplicationName.Text or "") if server is not None else "",
        "application_uri": (server.ApplicationUri or "") if server is not None else "",
        "product_uri": (server.ProductUri or "") if server is not None else "",
        "security": sorted(security),
    }
    return answered, open_anonymous


async def _close_client(client: Any, wait: float) -> None:
    """Close an asyncua client; never raises, never hangs, leaves no task behind."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(wait):
            await client.disconnect()
    client.uaclient.request_disconnect()
    pending = [
        t
        for t in (
            getattr(client, "_stale_watchdog_task", None),
            getattr(client, "_supervisor_task", None),
            getattr(client, "_renew_channel_task", None),
            getattr(client.uaclient.session, "_publish_task", None),
        )
        if isinstance(t, asyncio.Task) and not t.done()
    ]
    for t in pending:
        t.cancel()
    with contextlib.suppress(Exception):
        client.disconnect_socket()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def _resolved_share(
    ctx: _Scan, client: Any, profile: Profile, namespaces: list[str], wait: float
) -> float:
    """Share of ``profile``'s points that exist on the server."""
    from asyncua import ua

    from protocols.opcua.address import browse_path, node_id

    assert profile.opcua is not None
    uri = profile.opcua.namespace_uri
    ns = namespaces.index(uri)
    ids: list[Any] = []
    paths: list[Any] = []
    objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
    hierarchical = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
    for p in profile.points:
        assert p.opcua is not None
        # Relative addresses are looked for under the profile's default root object.
        root = profile.opcua.root_name or profile.id
        try:
            if p.opcua.node_id is not None:
                ids.append(node_id(p.opcua.node_id, ns, uri))
                continue
            if p.opcua.node_suffix is not None:
                ids.append(ua.NodeId(root + p.opcua.node_suffix, ns))
                continue
            if p.opcua.path is not None:
                names = [ua.QualifiedName(root, ns), *browse_path(p.opcua.path, ns)]
            else:
                assert p.opcua.browse_path is not None
                names = browse_path(p.opcua.browse_path, ns)
        except ValueError:
            continue  # an address this server cannot have
        elements = [
            ua.RelativePathElement(
                ReferenceTypeId=hierarchical, IsInverse=False, IncludeSubtypes=True, TargetName=qn
            )
            for qn in names
        ]
        paths.append(ua.BrowsePath(StartingNode=objects, RelativePath=ua.RelativePath(elements)))
    resolved = 0
    if ids:
        await ctx.pacer.take()
        async with asyncio.timeout(wait):
            values = await client.uaclient.read_attributes(ids, ua.AttributeIds.NodeClass)
        resolved += sum(1 for dv in values if dv.StatusCode is None or dv.StatusCode.is_good())
    if paths:
        await ctx.pacer.take()
        async with asyncio.timeout(wait):
            results = await client.uaclient.translate_browsepaths_to_nodeids(paths)
        resolved += sum(1 for r in results if r.StatusCode.is_good() and r.Targets)
    return resolved / len(profile.points)


async def _browse(ctx: _Scan, url: str, answered: dict[str, Any]) -> list[Candidate]:
    """Open an anonymous session: namespaces, objects, and the OPC UA profiles that resolve."""
    from asyncua import Client

    timeout = _opcua_timeout(ctx)
    client = Client(url, timeout=timeout, watchdog_intervall=timeout)
    client.session_timeout = 60_000  # a server frees a scan's session soon if it is left open
    try:
        await ctx.pacer.take()
        async with asyncio.timeout(timeout):
            await client.connect()
        await ctx.pacer.take()
        async with asyncio.timeout(timeout):
            namespaces = list(await client.get_namespace_array())
        answered["namespaces"] = namespaces[2:][:_MAX_LISTED]
        await ctx.pacer.take()
        async with asyncio.timeout(timeout):
            refs = await client.nodes.objects.get_children_descriptions()
        answered["objects"] = [
            f"{namespaces[r.BrowseName.NamespaceIndex]}:{r.BrowseName.Name}"
            for r in refs
            if 0 < r.BrowseName.NamespaceIndex < len(namespaces)
        ][:_MAX_LISTED]
        scored: list[tuple[str, float]] = []
        for prof in ctx.opcua_profiles:
            if prof.opcua is None or prof.opcua.namespace_uri not in namespaces:
                continue
            share = await _resolved_share(ctx, client, prof, namespaces, timeout)
            if share >= _OPCUA_FIT:
                scored.append((prof.id, share))
        return _candidates(scored)
    finally:
        await _close_client(client, timeout)


async def _scan_opcua(ctx: _Scan, scope: OpcUaScope) -> None:
    from asyncua import Client, ua

    url = scope.endpoint
    where = f"opcua {url}"
    if ctx.excluded(f"opcua:{url}"):
        ctx.say(f"{where}: configured already, skipped")
        return
    timeout = _opcua_timeout(ctx)
    client = Client(url, timeout=timeout)
    await ctx.pacer.take()
    try:
        async with asyncio.timeout(timeout):
            endpoints = await client.connect_and_get_server_endpoints()
    except (TimeoutError, OSError, ua.UaError, ValueError) as exc:
        ctx.say(f"{where}: no answer ({type(exc).__name__})")
        return
    finally:
        with contextlib.suppress(Exception):
            client.disconnect_socket()
    if any(ctx.excluded(f"opcua:{e.EndpointUrl}") for e in endpoints):
        ctx.say(f"{where}: configured already (as the server names itself), skipped")
        return
    answered, open_anonymous = _endpoints_answer(url, endpoints)
    candidates: list[Candidate] = []
    if open_anonymous:
        try:
            candidates = await _browse(ctx, url, answered)
        except (TimeoutError, OSError, ua.UaError, ValueError) as exc:
            answered["browse_error"] = f"{type(exc).__name__}: {exc}"[:200]
    else:
        answered["browse_error"] = "no anonymous endpoint without security to browse"
    best = (
        f"{candidates[0].profile} ({candidates[0].score:.2f})" if candidates else "no profile fits"
    )
    ctx.say(f"{where}: {best}")
    ctx.proposals.append(
        Proposal(
            protocol="opcua",
            address={"opcua": {"endpoint": url}},
            answered=answered,
            candidates=candidates,
        )
    )


# --- iiot agent discover -----------------------------------------------------------------


def _flag_scope(
    hosts: list[str],
    ports: list[int],
    units: str,
    transport: str,
    serial: list[str],
    serial_options: dict[str, Any],
    opcua: list[str],
) -> dict[str, Any]:
    """The scope the command-line flags describe (empty when none was given)."""
    out: dict[str, Any] = {}
    if hosts:
        out["modbus_tcp"] = [
            {
                "hosts": hosts,
                "ports": ports or [502],
                "units": units.split(","),
                "transport": transport,
            }
        ]
    if serial:
        out["serial"] = [{"port": s, **serial_options} for s in serial]
    if opcua:
        out["opcua"] = list(opcua)
    return out


def _describe(p: Proposal) -> list[str]:
    """A proposal as a few plain lines."""
    a = p.address.get(p.protocol, {})
    if p.protocol == "opcua":
        head = f"opcua  {a.get('endpoint')}"
    elif a.get("transport") == "rtu":
        head = f"modbus rtu {a.get('serial_port')} ({a.get('baudrate')} baud) unit {a.get('unit')}"
    else:
        head = f"modbus {a.get('transport')} {a.get('host')}:{a.get('port')} unit {a.get('unit')}"
    lines = [head]
    if p.candidates:
        ranked = ", ".join(f"{c.profile} ({c.score:.2f})" for c in p.candidates[:3])
        lines.append(f"  profiles      {ranked}")
    else:
        lines.append("  profiles      none of the known profiles fits")
    ident = p.answered.get("identification")
    if isinstance(ident, dict):
        lines.append("  identifies as " + " / ".join(str(v) for v in ident.values()))
    sunspec = p.answered.get("sunspec")
    if isinstance(sunspec, dict):
        models = ", ".join(str(m) for m in sunspec.get("models", []))
        lines.append(f"  SunSpec       at {sunspec.get('base')}, models {models}")
    for key in ("server", "objects", "browse_error"):
        if p.answered.get(key):
            value = p.answered[key]
            text = ", ".join(value) if isinstance(value, list) else str(value)
            lines.append(f"  {key:<13} {text}")
    return lines


def _entries(proposals: list[Proposal]) -> list[dict[str, Any]]:
    """agent.yaml device entries for the proposals that have a candidate."""
    entries: list[dict[str, Any]] = []
    used: dict[str, int] = {}
    for p in proposals:
        if not p.candidates:
            continue
        profile = p.candidates[0].profile
        used[profile] = used.get(profile, 0) + 1
        entries.append({"id": f"{profile}-{used[profile]}", "profile": profile, **p.address})
    return entries


def _from_config(
    config: Path | None, profiles_dir: list[Path]
) -> tuple[ProfileSet, set[str], dict[str, Any]]:
    """Profiles, configured addresses and discovery scope of the agent config (if any)."""
    from device_profiles.loader import ProfileSetError, load_profiles
    from edge_agent.config import AgentConfigError, load_config

    if config is None:
        try:
            return load_profiles(profiles_dir), set(), {}
        except ProfileSetError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    try:
        loaded = load_config(config)
    except AgentConfigError as exc:
        typer.echo(f"agent config {exc.source} is not usable:", err=True)
        typer.echo("\n".join(f"  - {p}" for p in exc.problems), err=True)
        raise typer.Exit(2) from None
    exclude = {connection_key(d.connection) for d in loaded.config.devices}
    scope = loaded.config.discovery
    return loaded.profiles, exclude, scope.model_dump() if scope is not None else {}


def discover(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Agent config: its discovery scope, profiles and devices."
    ),
    host: list[str] = typer.Option(
        [], "--host", help="Modbus TCP hosts: address, name, CIDR or first-last (repeatable)."
    ),
    port: list[int] = typer.Option([], "--port", help="Modbus TCP port (repeatable; 502)."),
    units: str = typer.Option("1", "--units", help="Modbus TCP unit ids, e.g. 1,3,10-20."),
    transport: str = typer.Option("tcp", "--transport", help="tcp or rtu-over-tcp."),
    serial: list[str] = typer.Option([], "--serial", help="Serial line to scan (repeatable)."),
    baudrate: int = typer.Option(9600, "--baudrate", help="Serial line speed."),
    parity: str = typer.Option("N", "--parity", help="N, E or O."),
    stopbits: int = typer.Option(1, "--stopbits", help="1 or 2."),
    serial_units: str = typer.Option("1-247", "--serial-units", help="Unit ids on the lines."),
    opcua: list[str] = typer.Option([], "--opcua", help="OPC UA endpoint URL (repeatable)."),
    rate: float | None = typer.Option(None, "--rate", help="Requests per second, at most."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds to wait for answers."),
    duration: float = typer.Option(300.0, "--duration", help="Stop after this many seconds."),
    profiles_dir: list[Path] = typer.Option([], "--profiles", help="Extra profile folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the proposals as JSON."),
) -> None:
    """Scan for devices not in the configuration, and name the profile of each."""
    import yaml
    from pydantic import ValidationError

    known, exclude, raw = _from_config(config, profiles_dir)
    serial_options = {"baudrate": baudrate, "parity": parity, "stopbits": stopbits}
    serial_options["units"] = serial_units.split(",")
    flags = _flag_scope(host, port, units, transport, serial, serial_options, opcua)
    if flags:
        raw = {k: v for k, v in raw.items() if k in ("rate", "timeout")} | flags
    raw |= {k: v for k, v in (("rate", rate), ("timeout", timeout)) if v is not None}
    try:
        scope = DiscoveryScope.model_validate(raw)
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(x) for x in e["loc"]) or "scope"
            typer.echo(f"discovery scope: {where}: {e['msg']}", err=True)
        raise typer.Exit(2) from None
    if scope.empty:
        typer.echo(
            "nothing to scan: give --host, --serial or --opcua, or a discovery: key", err=True
        )
        raise typer.Exit(2)

    def progress(text: str) -> None:
        typer.echo(f"... {text}", err=True)

    proposals = asyncio.run(
        scan(scope, known, exclude=exclude, deadline=time.monotonic() + duration, progress=progress)
    )
    if as_json:
        typer.echo(json.dumps([p.model_dump() for p in proposals], indent=2, ensure_ascii=False))
    elif proposals:
        typer.echo(f"found {len(proposals)} device(s) not in the configuration:\n")
        for p in proposals:
            typer.echo("\n".join(_describe(p)))
        entries = _entries(proposals)
        if entries:
            typer.echo("\nto poll them, add to the devices of agent.yaml:")
            dump = yaml.safe_dump(entries, sort_keys=False, allow_unicode=True)
            typer.echo("\n".join("  " + line for line in dump.splitlines()))
    else:
        typer.echo("found no device that is not configured already")
    if not proposals:
        raise typer.Exit(1)
