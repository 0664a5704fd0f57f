"""Modbus TCP / RTU servers that answer like the real equipment a profile describes.

One :class:`ModbusSimServer` is one listener — a TCP port, or a serial line — with one or
more simulated devices behind it, keyed by unit id. Every register a client reads is
produced from ``SimDevice.values()`` through :mod:`protocols.modbus.codec`, so the
served image is exactly what the profile declares; addresses the profile does not map
answer exception 02 (ILLEGAL DATA ADDRESS) unless ``strict_addresses`` is off. The one
exception is a SunSpec map: every register of its models reads (see
:mod:`simulators.sunspec`).

Modbus TCP is served by :mod:`simulators.modbus_tcp`, which parses MBAP frames itself and
answers reads from each device's encoded image (:meth:`RegisterImage.table`: encoded at
most once per :data:`IMAGE_TICK` of simulated time, or after a write or a fault change).
RTU, on a serial line or over TCP, and Modbus TCP with ``lean=False`` go through
pymodbus 3.16's framing and listener. Its datastore hooks cannot keep a request
unanswered, delay one unit without delaying the others, or close a connection, so this
module gives pymodbus a request handler of its own: each request runs as its own task,
checks the unit's fault first, and only then touches the register image.

Faults (see :mod:`simulators.faults`), checked on every request:

silent        no answer; the client times out, the TCP connection stays open
slow          the answer leaves after ``delay`` seconds; other units keep answering
exception     Modbus exception ``exception_code``
drop          the client's connection is closed (on a serial line: no answer)
out_of_range  served as usual; the device itself returns values beyond the range
restart       the listener closes for ``delay`` seconds and reopens on the same port;
              the fault then clears itself, as a device that has rebooted
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import operator
import struct
import termios
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, cast

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest, ReadDeviceInformationResponse
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import SimData
from pymodbus.simulator import SimDevice as _PymodbusDevice
from pymodbus.transaction import TransactionManager

from device_profiles.schema import INT_BOUNDS, Point, Profile, ValueType
from protocols.modbus.codec import STRUCT_CODES, Value, decode, encode
from protocols.modbus.profile import (
    ByteOrder,
    ModbusTable,
    modbus_address,
    modbus_settings,
    point_registers,
)
from simulators.device import SimDevice
from simulators.faults import FaultMode, FaultState
from simulators.modbus_tcp import LeanConnection
from simulators.sunspec import model_fill

__all__ = ["IMAGE_TICK", "ModbusSimServer", "RegisterImage"]

log = logging.getLogger(__name__)

# Function code -> the table it addresses (reads, writes, and their read-backs).
_FC_TABLE: dict[int, ModbusTable] = {
    1: ModbusTable.COIL,
    5: ModbusTable.COIL,
    15: ModbusTable.COIL,
    2: ModbusTable.DISCRETE,
    3: ModbusTable.HOLDING,
    6: ModbusTable.HOLDING,
    16: ModbusTable.HOLDING,
    22: ModbusTable.HOLDING,
    23: ModbusTable.HOLDING,
    4: ModbusTable.INPUT,
}
_FC_DEVICE_ID = 43  # Encapsulated Interface Transport; MEI type 14 = Read Device Identification
_MAX_PENDING = 256  # requests in flight per listener; more go unanswered (counted: busy)
_RELISTEN_ATTEMPTS = 50
_RELISTEN_PAUSE = 0.1


class RegisterImage:
    """The four Modbus tables of one simulated device, computed from its values on demand."""

    def __init__(self, device: SimDevice, *, strict_addresses: bool = True) -> None:
        self.device = device
        self.strict_addresses = strict_addresses
        profile = device.profile
        if profile.protocol != "modbus":
            raise ValueError(
                f"device '{device.device_id}': profile '{profile.id}' is not a Modbus profile"
            )
        self.settings = modbus_settings(profile)
        # table -> address -> points occupying it (several for bools packed in one register)
        self._cover: dict[ModbusTable, dict[int, list[Point]]] = {t: {} for t in ModbusTable}
        for p in profile.points:
            a = modbus_address(p)
            assert a is not None  # the schema guarantees it for modbus profiles
            for reg in range(a.address, a.address + point_registers(p)):
                self._cover[a.table].setdefault(reg, []).append(p)
        # Holding registers of the device's SunSpec models that the profile leaves out:
        # read-only constants, so a client can read a whole model in one request.
        self._fixed: dict[int, int] = model_fill(profile)
        # The encoded tables of the current tick (see IMAGE_TICK), built on first read.
        self._plans: dict[ModbusTable, _TablePlan] = {}
        self._tables: dict[ModbusTable, bytes] = {}
        self._stamp: tuple[float, int, bool] = (math.inf, -1, False)
        self._values: Mapping[str, Value] | None = None

    def table(self, table: ModbusTable) -> tuple[_TablePlan, bytes]:
        """One table's plan and its encoded image, at most once per tick, write or fault."""
        device = self.device
        t = device.sim_time
        oor = device.faults.mode is FaultMode.OUT_OF_RANGE
        at, writes, was_oor = self._stamp
        if writes != device.writes or was_oor is not oor or not at <= t < at + IMAGE_TICK:
            self._stamp = (t, device.writes, oor)
            self._tables.clear()
            self._values = None
        plan = self._plans.get(table)
        if plan is None:
            plan = self._plans[table] = _shared_plan(self, table)
        data = self._tables.get(table)
        if data is None:
            if self._values is None:
                self._values = device.values(t)
            data = self._tables[table] = plan.render(self, self._values)
        return plan, data

    def read_bytes(self, table: ModbusTable, address: int, count: int) -> bytes | int:
        """``count`` registers (2 bytes each) or bits (1 byte each) as served, or an exception."""
        end = address + count
        if count < 1 or end > 65536:
            return ExcCodes.ILLEGAL_ADDRESS
        plan, data = self.table(table)
        lo, hi = plan.lo, plan.hi
        width = 1 if plan.bits else 2
        if lo <= address and end <= hi:
            if self.strict_addresses and plan.readable.find(0, address - lo, end - lo) != -1:
                return ExcCodes.ILLEGAL_ADDRESS
            return data[(address - lo) * width : (end - lo) * width]
        if self.strict_addresses:
            return ExcCodes.ILLEGAL_ADDRESS
        out = bytearray(count * width)  # unmapped addresses of a lenient device read 0
        first, last = max(address, lo), min(end, hi)
        if first < last:
            out[(first - address) * width : (last - address) * width] = data[
                (first - lo) * width : (last - lo) * width
            ]
        return bytes(out)

    def _points(self, table: ModbusTable, address: int, count: int) -> list[Point] | None:
        """Points touched by [address, address+count); None when strict and a gap is hit."""
        cover = self._cover[table]
        fixed = self._fixed if table is ModbusTable.HOLDING else {}
        seen: dict[str, Point] = {}
        for reg in range(address, address + count):
            pts = cover.get(reg)
            if pts is None:
                if self.strict_addresses and reg not in fixed:
                    return None
                continue
            for p in pts:
                seen.setdefault(p.name, p)
        return list(seen.values())

    def _sf(self, p: Point, values: Mapping[str, Value]) -> int | None:
        if p.scale_factor_point is None:
            return None
        sf = values.get(p.scale_factor_point, 0)
        return int(sf) if isinstance(sf, int | float) and math.isfinite(sf) else 0

    def encode_point(self, p: Point, values: Mapping[str, Value]) -> list[int]:
        """The registers of one point; values that do not fit saturate like a real device."""
        value = values.get(p.name)
        count = max(1, point_registers(p))
        if value is None:
            return [0] * count
        sf = self._sf(p, values)
        try:
            return encode(p, value, self.settings, sf_exponent=sf)
        except (ValueError, OverflowError, TypeError):
            pass
        bounds = INT_BOUNDS.get(p.type)
        if bounds is not None and isinstance(value, int | float) and not math.isnan(value):
            raw = bounds[1] if value > 0 else bounds[0]
            clamp: Value = raw * p.scale * (10.0**sf if sf else 1.0) + p.offset
            with contextlib.suppress(ValueError, OverflowError, TypeError):
                return encode(p, clamp, self.settings, sf_exponent=sf)
        # Whatever cannot be represented reads as all ones, the usual "no value" marker.
        return [0xFFFF] * count

    def read(self, table: ModbusTable, address: int, count: int) -> list[int] | ExcCodes:
        """Registers (or bits as 0/1) of ``count`` addresses from ``address``."""
        if count < 1 or address + count > 65536:
            return ExcCodes.ILLEGAL_ADDRESS
        points = self._points(table, address, count)
        if points is None:
            return ExcCodes.ILLEGAL_ADDRESS
        if table is ModbusTable.HOLDING and self._fixed:
            out = [self._fixed.get(reg, 0) for reg in range(address, address + count)]
        else:
            out = [0] * count
        if not points:
            return out
        values = self.device.values()
        for p in points:
            a = modbus_address(p)
            assert a is not None
            regs = self.encode_point(p, values)
            if table.is_bit_table:
                out[a.address - address] = 1 if regs[0] else 0
            elif a.bit is not None:
                if regs[0]:
                    out[a.address - address] |= 1 << a.bit
            else:
                for i, reg in enumerate(regs):
                    idx = a.address + i - address
                    if 0 <= idx < count:
                        out[idx] = reg
        return out

    def write(self, table: ModbusTable, address: int, data: list[int]) -> ExcCodes | None:
        """Apply a client's write; refuses unmapped or read-only addresses and bad values."""
        if not table.writable:
            return ExcCodes.ILLEGAL_FUNCTION
        cover = self._cover[table]
        touched: dict[str, Point] = {}
        for reg in range(address, address + len(data)):
            pts = cover.get(reg)
            if pts is None:
                return ExcCodes.ILLEGAL_ADDRESS
            for p in pts:
                touched.setdefault(p.name, p)
        if any(p.access != "rw" for p in touched.values()):
            return ExcCodes.ILLEGAL_ADDRESS
        current = self.device.values()
        new: dict[str, Value] = {}
        for p in touched.values():
            a = modbus_address(p)
            assert a is not None
            if table.is_bit_table:
                new[p.name] = bool(data[a.address - address])
                continue
            if a.bit is not None:
                new[p.name] = bool((data[a.address - address] >> a.bit) & 1)
                continue
            regs = self.encode_point(p, current)
            for i in range(len(regs)):
                idx = a.address + i - address
                if 0 <= idx < len(data):
                    regs[i] = data[idx] & 0xFFFF
            try:
                value = decode(p, regs, self.settings, sf_exponent=self._sf(p, current))
            except (ValueError, UnicodeError):
                return ExcCodes.ILLEGAL_VALUE
            if isinstance(value, float) and not math.isfinite(value):
                return ExcCodes.ILLEGAL_VALUE
            if (
                p.range is not None
                and isinstance(value, int | float)
                and not isinstance(value, bool)
                and not _within(value, p.range)
            ):
                return ExcCodes.ILLEGAL_VALUE
            new[p.name] = value
        for name, value in new.items():
            self.device.write(name, value)
        return None


# How long one computed register image serves reads, in simulated seconds: a device's scan
# cycle. Reads within it see one consistent image; a write or a fault change renews it.
IMAGE_TICK = 0.1

_PLAIN, _SCALED, _FLOAT = 0, 1, 2  # how a fast point's raw value comes from its value


class _TablePlan:
    """How one table's image is built: its span, which addresses read, and fast runs.

    A point is *fast* when it alone occupies its registers, is numeric, big-endian in
    both orders and has no scale-factor point: its raw value goes straight into a
    ``struct`` run with its neighbours. Every other point is encoded the way
    :meth:`RegisterImage.read` does it, in the same order, so both give the same image.
    """

    def __init__(self, image: RegisterImage, table: ModbusTable) -> None:
        cover = image._cover[table]
        fixed = image._fixed if table is ModbusTable.HOLDING else {}
        addresses = set(cover) | set(fixed)
        self.lo = min(addresses, default=0)
        self.hi = max(addresses, default=-1) + 1
        self.bits = table.is_bit_table
        width = 1 if self.bits else 2
        span = max(0, self.hi - self.lo)
        self.readable = bytes(1 if self.lo + i in addresses else 0 for i in range(span))
        base = bytearray(span * width)
        for reg, word in fixed.items():
            base[(reg - self.lo) * 2 : (reg - self.lo) * 2 + 2] = word.to_bytes(2, "big")
        self.base = bytes(base)
        fast: list[tuple[int, Point]] = []
        self.slow: list[Point] = []
        seen: set[str] = set()
        for reg in sorted(cover):  # the order RegisterImage.read applies points in
            for p in cover[reg]:
                if p.name in seen:
                    continue
                seen.add(p.name)
                if not self.bits and _is_fast(image, p, cover):
                    fast.append((reg, p))
                else:
                    self.slow.append(p)
        self.runs = _runs(fast, self.lo)

    def render(self, image: RegisterImage, values: Mapping[str, Value]) -> bytes:
        """The table's bytes (registers big-endian, or one 0/1 byte per bit) for ``values``."""
        out = bytearray(self.base)
        for run in self.runs:
            try:
                run.pack(out, values)
            except (KeyError, ValueError, OverflowError, TypeError, struct.error):
                # A value the type cannot hold (or none at all): point by point, as read().
                pos = run.at
                for p in run.points:
                    regs = image.encode_point(p, values)
                    out[pos : pos + 2 * len(regs)] = b"".join(r.to_bytes(2, "big") for r in regs)
                    pos += 2 * len(regs)
        for p in self.slow:
            a = modbus_address(p)
            assert a is not None
            regs = image.encode_point(p, values)
            i = a.address - self.lo
            if self.bits:
                out[i] = 1 if regs[0] else 0
            elif a.bit is not None:
                if regs[0]:
                    word = int.from_bytes(out[2 * i : 2 * i + 2], "big") | (1 << a.bit)
                    out[2 * i : 2 * i + 2] = word.to_bytes(2, "big")
            else:
                for j, reg in enumerate(regs):
                    out[2 * (i + j) : 2 * (i + j) + 2] = (reg & 0xFFFF).to_bytes(2, "big")
        return bytes(out)


# Plans depend only on the profile (and the SunSpec fill it implies): devices of one
# profile share them. Keyed by the profile's identity, which the entry keeps alive.
_PLANS: dict[tuple[int, ModbusTable], tuple[Profile, _TablePlan]] = {}


def _shared_plan(image: RegisterImage, table: ModbusTable) -> _TablePlan:
    profile = image.device.profile
    key = (id(profile), table)
    hit = _PLANS.get(key)
    if hit is None or hit[0] is not profile:
        hit = _PLANS[key] = (profile, _TablePlan(image, table))
    return hit[1]


def _is_fast(image: RegisterImage, p: Point, cover: Mapping[int, list[Point]]) -> bool:
    a = modbus_address(p)
    assert a is not None
    if p.type not in STRUCT_CODES or a.bit is not None or p.scale_factor_point is not None:
        return False
    byte_order = a.byte_order or image.settings.byte_order
    word_order = a.word_order or image.settings.word_order
    if byte_order is not ByteOrder.BIG or word_order is not ByteOrder.BIG:
        return False
    regs = range(a.address, a.address + point_registers(p))
    return all(cover.get(r) == [p] for r in regs)


class _Run:
    """Fast points of one kind in adjacent registers, packed with one ``struct`` call.

    The raw values are what :func:`protocols.modbus.codec.to_raw` gives for them; a value
    that is not an int or a float raises, and the caller encodes the run point by point.
    """

    __slots__ = ("at", "factors", "get", "kind", "packer", "points")

    def __init__(self, at: int, kind: int, points: list[Point]) -> None:
        self.at = at
        self.kind = kind
        self.points = points
        self.packer = struct.Struct(">" + "".join(STRUCT_CODES[p.type] for p in points))
        names = [p.name for p in points]
        # itemgetter of one name gives the value itself, not a tuple of one.
        self.get: Callable[[Mapping[str, Value]], tuple[Value, ...]] = (
            operator.itemgetter(*names) if len(names) > 1 else lambda v: (v[names[0]],)
        )
        self.factors = [(p.offset, p.scale) for p in points]

    def pack(self, out: bytearray, values: Mapping[str, Value]) -> None:
        got = self.get(values)
        if not _NUMBER_TYPES.issuperset(map(type, got)):
            raise TypeError("not a number")
        vals = cast(tuple[float, ...], got)
        raws: list[int] | list[float]
        if self.kind == _PLAIN:
            raws = [v if type(v) is int else round(v) for v in vals]
        elif self.kind == _SCALED:
            raws = [round((v - o) / s) for v, (o, s) in zip(vals, self.factors, strict=True)]
        else:
            raws = [(v - o) / s for v, (o, s) in zip(vals, self.factors, strict=True)]
        self.packer.pack_into(out, self.at, *raws)


_NUMBER_TYPES = frozenset({int, float})


def _kind(p: Point) -> int:
    if p.type in (ValueType.FLOAT32, ValueType.FLOAT64):
        return _FLOAT
    return _PLAIN if p.scale == 1.0 and p.offset == 0.0 else _SCALED


def _runs(fast: list[tuple[int, Point]], lo: int) -> list[_Run]:
    """Fast points grouped into runs of adjacent registers and one kind."""
    runs: list[_Run] = []
    points: list[Point] = []
    start = end = -1
    for reg, p in fast:
        if points and (reg != end or _kind(p) != _kind(points[0])):
            runs.append(_Run(2 * (start - lo), _kind(points[0]), points))
            points = []
        if not points:
            start = reg
        points.append(p)
        end = reg + point_registers(p)
    if points:
        runs.append(_Run(2 * (start - lo), _kind(points[0]), points))
    return runs


def _within(value: float, rng: tuple[float, float]) -> bool:
    lo, hi = rng
    slack = (hi - lo) * 1e-6 + 1e-9  # float32 round trips land a hair outside
    return lo - slack <= value <= hi + slack


class _Store:
    """What pymodbus's request PDUs call ``context``: unit id -> register image."""

    def __init__(self, images: Mapping[int, RegisterImage]) -> None:
        self.images = images

    def device_ids(self) -> list[int]:
        return list(self.images)

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        table = _FC_TABLE.get(func_code)
        image = self.images.get(device_id)
        if table is None or image is None:
            return ExcCodes.ILLEGAL_FUNCTION
        regs = image.read(table, address, count)
        if isinstance(regs, ExcCodes):
            return regs
        if table.is_bit_table:
            return [bool(r) for r in regs]
        return regs

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        table = _FC_TABLE.get(func_code)
        image = self.images.get(device_id)
        if table is None or image is None:
            return ExcCodes.ILLEGAL_FUNCTION
        return image.write(table, address, [int(v) for v in values])


def _placeholder() -> _PymodbusDevice:
    # pymodbus insists on a datastore at construction; requests never reach it.
    return _PymodbusDevice(id=0, simdata=[SimData(0)])


class _Handler(ServerRequestHandler):
    """One client connection (or the serial line): answers each request as its own task."""

    def __init__(self, owner: Any, sim: ModbusSimServer) -> None:
        super().__init__(owner, None, None, None)  # type: ignore[no-untyped-call]
        self._sim = sim

    def callback_connected(self) -> None:
        super().callback_connected()
        if self._sim._refuses_connections():
            self._sim.dropped += 1
            self.close()

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        try:
            used: int = TransactionManager.callback_data(self, data, addr)
        except ModbusIOException as exc:
            # A frame pymodbus cannot decode: answer ILLEGAL FUNCTION, as pymodbus does.
            self._sim.bad_frames += 1
            response = ExceptionResponse(
                exc.fcode if exc.fcode is not None else self._function_code(data),
                exception_code=ExcCodes.ILLEGAL_FUNCTION,
                device_id=exc.dev_id or 0,
                transaction=exc.transaction_id or 0,
            )
            self._send(response, addr)
            return len(data)
        pdu: ModbusPDU | None = self.last_pdu
        if pdu is not None:
            self._sim._spawn(self._answer(pdu, self.last_addr))
        return used

    def _function_code(self, data: bytes) -> int:
        # The function code of the undecodable frame, so the client can match the answer.
        at = 1 if self._sim.framer == "rtu" else 7
        return data[at] & 0x7F if len(data) > at else 0

    def _send(self, response: ModbusPDU, addr: tuple[Any, ...] | None) -> None:
        if self.transport is not None and not self.is_closing:
            self.pdu_send(response, addr=addr)

    async def _answer(self, pdu: ModbusPDU, addr: tuple[Any, ...] | None) -> None:
        sim = self._sim
        unit = sim._resolve_unit(pdu.dev_id)
        if unit is None:
            if sim.framer == "rtu" and sim.serial_port is not None:
                return  # nobody on the line has that address: the bus stays quiet
            response: ModbusPDU = ExceptionResponse(pdu.function_code, ExcCodes.GATEWAY_NO_RESPONSE)
        else:
            device = sim.devices[unit]
            device.requests += 1
            sim.requests += 1
            faults = device.faults
            mode = faults.mode
            if mode is FaultMode.SILENT:
                return
            if mode in (FaultMode.DROP, FaultMode.RESTART):
                if sim.serial_port is None:
                    sim.dropped += 1
                    self.close()
                return
            if mode is FaultMode.SLOW:
                await asyncio.sleep(faults.delay)
            if mode is FaultMode.EXCEPTION:
                response = ExceptionResponse(pdu.function_code, faults.exception_code)
            elif isinstance(pdu, ReadDeviceInformationRequest):
                response = _identification(device, pdu)
            elif pdu.function_code not in _FC_TABLE:
                response = ExceptionResponse(pdu.function_code, ExcCodes.ILLEGAL_FUNCTION)
            else:
                try:
                    response = await pdu.datastore_update(cast(Any, sim._store), unit)
                except Exception:
                    sim.errors += 1
                    log.exception(
                        "request failed",
                        extra={"device": device.device_id, "function": pdu.function_code},
                    )
                    response = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE)
        response.transaction_id = pdu.transaction_id
        response.dev_id = pdu.dev_id
        self._send(response, addr)


def _identification(device: SimDevice, pdu: ReadDeviceInformationRequest) -> ModbusPDU:
    """Function 43/14: the device's identification objects, from its profile."""
    profile = device.profile
    objects = {
        0: profile.manufacturer or "unknown",  # VendorName
        1: profile.id,  # ProductCode
        2: "1.0",  # MajorMinorRevision
        4: profile.name,  # ProductName
        5: profile.id,  # ModelName
        6: device.device_id,  # UserApplicationName
    }
    code, first = pdu.read_code, pdu.object_id
    if code == 4:  # one specific object
        if first not in objects:
            return ExceptionResponse(_FC_DEVICE_ID, ExcCodes.ILLEGAL_ADDRESS)
        wanted = [first]
    elif code in (1, 2, 3):  # basic: 0..2; regular and extended (no private objects): 0..6
        last = 2 if code == 1 else 6
        start = first if first in objects and first <= last else 0
        wanted = [i for i in sorted(objects) if start <= i <= last]
    else:
        return ExceptionResponse(_FC_DEVICE_ID, ExcCodes.ILLEGAL_VALUE)
    info = {i: objects[i].encode("utf-8")[:64] for i in wanted}
    return ReadDeviceInformationResponse(read_code=code, information=info)


class _TcpServer(ModbusTcpServer):
    def __init__(self, sim: ModbusSimServer, **kwargs: Any) -> None:
        super().__init__(_placeholder(), **kwargs)
        self.sim = sim
        self.context = cast(Any, sim._store)  # answers the same calls as pymodbus's own

    def callback_new_connection(self) -> _Handler:
        return _Handler(self, self.sim)


class _SerialServer(ModbusSerialServer):
    def __init__(self, sim: ModbusSimServer, **kwargs: Any) -> None:
        super().__init__(_placeholder(), **kwargs)
        self.sim = sim
        self.context = cast(Any, sim._store)  # answers the same calls as pymodbus's own

    def callback_new_connection(self) -> _Handler:
        return _Handler(self, self.sim)


class ModbusSimServer:
    """Serve simulated devices, keyed by unit id, on one TCP port or one serial line.

    ``framer="tcp"`` is Modbus TCP; ``framer="rtu"`` with ``serial_port`` is RTU on a
    serial line; ``framer="rtu"`` without it is RTU framing over TCP. ``port=0`` picks a
    free port (see :attr:`port` after :meth:`start`). ``lean=False`` serves Modbus TCP
    through pymodbus's server instead of :mod:`simulators.modbus_tcp` (same answers, several
    times the CPU per request; kept for comparison).
    """

    def __init__(
        self,
        devices: Mapping[int, SimDevice],
        *,
        host: str = "127.0.0.1",
        port: int = 502,
        framer: Literal["tcp", "rtu"] = "tcp",
        serial_port: str | None = None,
        baudrate: int = 19200,
        parity: Literal["N", "E", "O"] = "N",
        stopbits: Literal[1, 2] = 1,
        strict_addresses: bool = True,
        lean: bool = True,
    ) -> None:
        if not devices:
            raise ValueError("a Modbus simulator needs at least one device")
        for unit, dev in devices.items():
            if not 0 <= unit <= 247:
                raise ValueError(f"device '{dev.device_id}': unit id {unit} is not in 0..247")
        if framer not in ("tcp", "rtu"):
            raise ValueError(f"framer must be 'tcp' or 'rtu', not {framer!r}")
        if serial_port is not None and framer != "rtu":
            raise ValueError("a serial line needs framer 'rtu'")
        self._devices = dict(devices)
        self.host = host
        self.port = port
        self.framer = framer
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self.strict_addresses = strict_addresses
        # Modbus TCP is served by simulators.modbus_tcp unless ``lean`` is off; RTU (on a
        # line or over TCP) always goes through pymodbus.
        self.lean = lean and framer == "tcp" and serial_port is None
        self._store = _Store(
            {u: RegisterImage(d, strict_addresses=strict_addresses) for u, d in devices.items()}
        )
        self._server: _TcpServer | _SerialServer | asyncio.AbstractServer | None = None
        self._connections: set[LeanConnection] = set()
        self._started = False
        self._restarting = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._listening = False
        # Counters a user (or /metrics) can read.
        self.requests = 0
        self.errors = 0
        self.bad_frames = 0
        self.busy = 0
        self.dropped = 0
        self.restarts = 0

    @property
    def devices(self) -> Mapping[int, SimDevice]:
        return self._devices

    @property
    def listening(self) -> bool:
        return self._listening

    @property
    def endpoint(self) -> str:
        """Where clients reach this server, e.g. ``tcp://127.0.0.1:5020`` or ``rtu:/dev/ttyS0``."""
        if self.serial_port is not None:
            return f"rtu:{self.serial_port}"
        scheme = "tcp" if self.framer == "tcp" else "rtu-over-tcp"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        """Start listening; returns once clients can connect."""
        if self._started:
            raise RuntimeError(f"Modbus simulator on {self.endpoint} is already running")
        await self._listen()
        self._started = True
        _FaultWatcher.of_running_loop().add(self)

    async def stop(self) -> None:
        """Stop listening, close connections and cancel requests in flight."""
        if self._started:
            await _FaultWatcher.of_running_loop().discard(self)
        self._started = False
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._close()

    async def __aenter__(self) -> ModbusSimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals -------------------------------------------------------------------

    def _resolve_unit(self, unit: int) -> int | None:
        if unit in self._devices:
            return unit
        # A TCP device with one unit answers the "any" ids 0 and 255, as most do.
        if self.serial_port is None and len(self._devices) == 1 and unit in (0, 255):
            return next(iter(self._devices))
        return None

    def _refuses_connections(self) -> bool:
        if self.serial_port is not None:
            return False
        return all(
            d.faults.mode in (FaultMode.DROP, FaultMode.RESTART) for d in self._devices.values()
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= _MAX_PENDING:
            self.busy += 1
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen_lean(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: LeanConnection(self), self.host, self.port, reuse_address=True
            )
        except OSError as exc:
            raise OSError(f"Modbus simulator cannot listen on {self.endpoint}: {exc}") from exc
        if self.port == 0:
            self.port = int(server.sockets[0].getsockname()[1])
        self._server = server
        self._listening = True
        log.debug("modbus simulator listening", extra={"endpoint": self.endpoint})

    def _make_server(self) -> _TcpServer | _SerialServer:
        if self.serial_port is not None:
            return _SerialServer(
                self,
                framer=FramerType.RTU,
                port=self.serial_port,
                baudrate=self.baudrate,
                parity=self.parity,
                stopbits=self.stopbits,
                timeout=1.0,
            )
        framer = FramerType.SOCKET if self.framer == "tcp" else FramerType.RTU
        return _TcpServer(self, framer=framer, address=(self.host, self.port))

    async def _listen(self) -> None:
        if self.lean:
            await self._listen_lean()
            return
        server = self._make_server()
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise OSError(f"Modbus simulator cannot listen on {self.endpoint}") from exc
        except (termios.error, ValueError) as exc:
            # A serial port that refuses the settings (termios.error is no OSError).
            await _quietly_shut(server)
            raise OSError(
                f"Modbus simulator cannot open {self.serial_port} with {self.baudrate} baud, "
                f"parity {self.parity}, {self.stopbits} stop bit(s): {exc}"
            ) from exc
        if self.serial_port is None and self.port == 0:
            sockets = getattr(server.transport, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        self._server = server
        self._listening = True
        log.debug("modbus simulator listening", extra={"endpoint": self.endpoint})

    async def _close(self) -> None:
        server, self._server = self._server, None
        self._listening = False
        if server is None:
            return
        if not isinstance(server, _TcpServer | _SerialServer):
            # The lean listener: asyncio's, or uvloop's (no asyncio.Server subclass).
            server.close()
            for conn in list(self._connections):
                conn.close()
            with contextlib.suppress(asyncio.TimeoutError, OSError):
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)
            return
        listener = server.transport
        await server.shutdown()  # type: ignore[no-untyped-call]
        wait_closed = getattr(listener, "wait_closed", None)
        if wait_closed is not None:
            with contextlib.suppress(asyncio.TimeoutError, OSError):
                await asyncio.wait_for(wait_closed(), timeout=2.0)

    async def _relisten(self) -> None:
        last: OSError | None = None
        for _ in range(_RELISTEN_ATTEMPTS):
            try:
                await self._listen()
                return
            except OSError as exc:
                last = exc
                await asyncio.sleep(_RELISTEN_PAUSE)
        self.errors += 1
        log.error(
            "modbus simulator could not listen again",
            extra={"endpoint": self.endpoint, "error": str(last)},
        )

    def _check_restart(self) -> None:
        """Called by the watcher: begin a restart when a device asks for one."""
        if self._restarting or not self._listening:
            return
        if any(d.faults.mode is FaultMode.RESTART for d in self._devices.values()):
            self._restarting = True
            self._spawn(self._restart())

    async def _restart(self) -> None:
        try:
            restarting = [d for d in self._devices.values() if d.faults.mode is FaultMode.RESTART]
            delay = max((d.faults.delay for d in restarting), default=0.0)
            log.info(
                "modbus simulator restarting",
                extra={"endpoint": self.endpoint, "delay": delay},
            )
            await self._close()
            await asyncio.sleep(delay)
            for d in restarting:
                if d.faults.mode is FaultMode.RESTART:
                    d.faults.clear()
            self.restarts += 1
            await self._relisten()
        finally:
            self._restarting = False


class _FaultWatcher:
    """One task per event loop that notices ``restart`` faults on every running server.

    Faults are plain attributes that tests, the control API and the plant set directly,
    so they are polled; one shared poller over a flat list of every device's fault state
    keeps thousands of simulated devices cheap.
    """

    POLL = 0.05

    def __init__(self) -> None:
        self.servers: set[ModbusSimServer] = set()
        self.task: asyncio.Task[None] | None = None
        self.polls = 0
        self._watched: list[tuple[FaultState, ModbusSimServer]] | None = None

    @classmethod
    def of_running_loop(cls) -> _FaultWatcher:
        loop = asyncio.get_running_loop()
        watcher = _WATCHERS.get(loop)
        if watcher is None:
            watcher = _WATCHERS[loop] = cls()
        return watcher

    def add(self, server: ModbusSimServer) -> None:
        self.servers.add(server)
        self._watched = None
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(
                self._run(), name="modbus-sim-fault-watcher"
            )

    async def discard(self, server: ModbusSimServer) -> None:
        self.servers.discard(server)
        self._watched = None
        task = self.task
        if not self.servers and task is not None:
            self.task = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        # Bounded by the servers' lifetime: cancelled when the last one stops.
        while self.servers:
            await asyncio.sleep(self.POLL)
            self.polls += 1
            if self._watched is None:
                self._watched = [
                    (d.faults, server) for server in self.servers for d in server.devices.values()
                ]
            restart = FaultMode.RESTART
            for faults, server in self._watched:
                if faults.mode is not restart:
                    continue
                try:
                    server._check_restart()
                except Exception:
                    server.errors += 1
                    log.exception("fault check failed", extra={"endpoint": server.endpoint})


_WATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _FaultWatcher] = (
    weakref.WeakKeyDictionary()
)


async def _quietly_shut(server: _TcpServer | _SerialServer) -> None:
    with contextlib.suppress(Exception):
        await cast(Any, server).shutdown()
