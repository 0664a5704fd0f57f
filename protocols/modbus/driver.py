"""The Modbus driver: TCP, RTU over a serial line, RTU framed over TCP.

A poll executes the read plan (``protocols.modbus.planner``) and decodes each point with
``protocols.modbus.codec``, so what the agent reads is exactly what a profile declares.

Errors, from the agent's point of view:

- the whole device is unreachable (every request timed out, or the line cannot be
  opened / was closed) → ``DeviceTimeout`` / ``ConnectError`` is raised;
- the device answers one request with a Modbus exception → the points of that request
  go into ``Reading.errors`` as ``modbus_exception_<code>``, the others still read;
- exception 02 on a request carrying several points → the request is split (see the
  planner) and the split is remembered for the device;
- an answer that cannot be decoded (wrong length, NaN) → ``decode_error`` for its points.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import truediv
from typing import Any

from pydantic import ValidationError
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from device_profiles.schema import Point, Profile, ValueType
from iiot_common.deadline import deadline_after
from protocols.driver import DriverBase, Reading, Value, now_ms
from protocols.errors import (
    ConfigError,
    ConnectError,
    DecodeError,
    DeviceRejected,
    DeviceTimeout,
    ProtocolError,
)
from protocols.modbus import codec
from protocols.modbus.config import ModbusConnection
from protocols.modbus.line import Line, acquire_line, release_line
from protocols.modbus.planner import (
    DEFAULT_MAX_GAP,
    BlockPoint,
    ReadBlock,
    Span,
    plan_reads,
)
from protocols.modbus.profile import (
    ByteOrder,
    ModbusTable,
    modbus_address,
    modbus_settings,
    point_registers,
)

__all__ = ["ILLEGAL_DATA_ADDRESS", "ModbusDriver", "ModbusStats"]

ILLEGAL_DATA_ADDRESS = 2
_MAX_SPLIT_DEPTH = 16  # nested splits of one block within one poll
_MAX_CACHED_PLANS = 64  # distinct point sets polled; an agent uses a handful

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModbusStats:
    """Counters of one driver (one device), for the agent's /metrics."""

    requests: int = 0  # requests sent, retries included
    responses: int = 0  # answers received (data or exception)
    timeouts: int = 0
    connect_errors: int = 0
    exceptions: dict[int, int] = field(default_factory=dict)  # Modbus exception code → count
    decode_errors: int = 0
    splits: int = 0  # blocks split after exception 02
    registers_read: int = 0
    bits_read: int = 0
    bytes_read: int = 0  # data bytes in read answers
    polls: int = 0
    writes: int = 0


def _check_write_value(point: Point, value: Value, where: str) -> None:
    """Refuse a value of the wrong kind before anything is sent."""
    if point.type is ValueType.BOOL:
        ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    elif point.type is ValueType.STRING:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ConfigError(f"{where}: cannot write {value!r} to a {point.type.value} point")


# How a fast point's raw value becomes its value.
_PLAIN = 0  # as read (an integer type without scale or offset)
_PLAIN_FLOAT = 1  # as read, when finite
_DIVIDE = 2  # a 16-bit integer over a power of ten (scale 0.1, 0.01, ...), see below
_SCALED = 3  # codec.from_raw's scale, offset and rounding

_SMALL_INTS = (ValueType.INT16, ValueType.UINT16)
_FLOATS = (ValueType.FLOAT32, ValueType.FLOAT64)
# scale → the power of ten it divides by. For every 16-bit integer r,
# r / 10**k == round(r * 1e-k, 10) (what codec.from_raw gives): r * 1e-k is within
# 1e-12 of the decimal r / 10**k, which rounding to 10 places restores, and the division
# of two exact numbers is correctly rounded. One C-level division instead of a multiply,
# a round() and an isfinite() per value.
_DIVISORS = {float(f"1e-{k}"): 10**k for k in range(1, 11)}


def _kind(p: Point) -> tuple[int, float]:
    """How ``p``'s raw value becomes its value, and the number that takes (scale, divisor)."""
    if p.scale == 1.0 and p.offset == 0.0:
        return (_PLAIN_FLOAT, 1.0) if p.type in _FLOATS else (_PLAIN, 1.0)
    divisor = _DIVISORS.get(p.scale)
    if p.type in _SMALL_INTS and p.offset == 0.0 and divisor is not None:
        return _DIVIDE, float(divisor)
    return _SCALED, p.scale


class _BlockDecoder:
    """A block's numeric points decoded with one precompiled ``struct`` call.

    Gives exactly what ``codec.decode`` gives for the points it takes: big-endian
    numeric points without a scale-factor point that no other point uses as its scale
    factor. Every other point of the block (bits, strings, swapped byte or word order,
    SunSpec scale factors) is left to ``codec.decode`` via ``slow``.
    """

    __slots__ = (
        "count",
        "divisors",
        "fast",
        "kinds",
        "names",
        "regs_struct",
        "slow",
        "values_struct",
    )

    def __init__(self, block: ReadBlock, settings: Any, sf_names: set[str]) -> None:
        self.count = block.count
        self.fast: list[tuple[str, int, float, float]] = []  # name, kind, scale, offset
        self.slow: list[BlockPoint] = []
        fmt = ">"
        pos = 0  # bytes of the block consumed by the format so far
        bit_table = block.table.is_bit_table
        for bp in sorted(block.points, key=lambda b: b.offset):
            p = bp.point
            code = codec.STRUCT_CODES.get(p.type)
            a = modbus_address(p)
            byte_order = (a.byte_order if a is not None else None) or settings.byte_order
            word_order = (a.word_order if a is not None else None) or settings.word_order
            start = 2 * bp.offset
            if (
                bit_table
                or code is None
                or p.scale_factor_point is not None
                or p.name in sf_names
                or byte_order is not ByteOrder.BIG
                or (word_order is not ByteOrder.BIG and bp.count > 1)
                or start < pos
                or struct.calcsize(">" + code) != 2 * bp.count
            ):
                self.slow.append(bp)
                continue
            if start > pos:
                fmt += f"{start - pos}x"
            fmt += code
            pos = start + 2 * bp.count
            kind, number = _kind(p)
            self.fast.append((p.name, kind, number, p.offset))
        self.values_struct = struct.Struct(fmt)
        self.regs_struct = struct.Struct(f">{block.count}H")
        self.names = tuple(f[0] for f in self.fast)
        # One kind for the whole block: decoded by one C-level call, no loop.
        kinds = {f[1] for f in self.fast}
        self.kinds = kinds.pop() if len(kinds) == 1 else -1
        self.divisors = tuple(f[2] for f in self.fast)

    def decode(self, regs: list[int], values: dict[str, Value], bad: list[str]) -> None:
        """Decode the fast points of ``regs`` into ``values``; non-finite ones into ``bad``."""
        if not self.fast:
            return
        raw = self.values_struct.unpack_from(self.regs_struct.pack(*regs))
        kinds = self.kinds
        if kinds == _PLAIN:
            values.update(zip(self.names, raw, strict=True))
            return
        if kinds == _DIVIDE:
            values.update(zip(self.names, map(truediv, raw, self.divisors), strict=True))
            return
        isfinite = math.isfinite
        if kinds == _PLAIN_FLOAT and all(map(isfinite, raw)):
            values.update(zip(self.names, raw, strict=True))
            return
        for (name, kind, number, offset), r in zip(self.fast, raw, strict=True):
            if kind == _PLAIN:
                values[name] = r
            elif kind == _DIVIDE:
                values[name] = r / number
            elif kind == _PLAIN_FLOAT:
                if isfinite(r):
                    values[name] = r
                else:
                    bad.append(name)
            else:
                # As codec.from_raw: scale, then offset, then rounding to honest decimals.
                v = r * number + offset
                if isfinite(v):
                    values[name] = round(v, 10)
                else:
                    bad.append(name)


# Plans of devices that refused no span, shared by the devices of one profile and point
# list: thousands of devices of one model then plan (and build block decoders) once, not
# once each at start. Keyed by the profile's identity, kept alive beside its plan.
_PlanKey = tuple[int, tuple[str, ...], int]
_PLANS: dict[_PlanKey, tuple[Profile, list[ReadBlock]]] = {}
# Block decoders by block identity (the block is kept alive beside its decoder).
_DECODERS: dict[int, tuple[ReadBlock, _BlockDecoder]] = {}
_MAX_SHARED = 1024


def _shared_plan(
    profile: Profile, points: Sequence[Point], key: tuple[str, ...], max_gap: int
) -> list[ReadBlock]:
    """The plan of ``points`` of ``profile`` without refused spans, made once per process."""
    k = (id(profile), key, max_gap)
    got = _PLANS.get(k)
    if got is not None and got[0] is profile:
        return got[1]
    plan = plan_reads(profile, points, max_gap=max_gap)
    if len(_PLANS) >= _MAX_SHARED:
        _PLANS.clear()
    _PLANS[k] = (profile, plan)
    return plan


@dataclass(slots=True)
class _PollData:
    """What one poll gathered so far."""

    values: dict[str, Value] = field(default_factory=dict)  # decoded by block decoders
    bad: list[str] = field(default_factory=list)  # decoded to NaN / infinity
    data: dict[str, list[int]] = field(default_factory=dict)  # registers, other points
    errors: dict[str, str] = field(default_factory=dict)
    progress: int = 0  # requests the device answered


class _Read:
    """What a read request asks for, as its errors name it."""

    __slots__ = ("count", "start", "table", "unit")

    def __init__(self, table: ModbusTable, start: int, count: int, unit: int) -> None:
        self.table, self.start, self.count, self.unit = table, start, count, unit

    def __str__(self) -> str:
        return f"read {self.table.value} {self.start}+{self.count} (unit {self.unit})"


class _PollFailed(Exception):
    """A request failed because the device is unreachable; stop the poll."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(str(error))
        self.error = error


class ModbusDriver(DriverBase):
    """Reads and writes one Modbus device (one unit id) through its (shared) line."""

    def __init__(
        self,
        profile: Profile,
        connection: ModbusConnection | Mapping[str, Any],
        *,
        name: str,
        max_gap: int = DEFAULT_MAX_GAP,
    ) -> None:
        if profile.protocol != "modbus":
            raise ConfigError(f"device '{name}': profile '{profile.id}' is not a Modbus profile")
        if not isinstance(connection, ModbusConnection):
            try:
                connection = ModbusConnection.model_validate(connection)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(x) for x in e['loc']) or 'connection'}: {e['msg']}"
                    for e in exc.errors()
                )
                raise ConfigError(f"device '{name}': modbus connection: {problems}") from exc
        self.profile = profile
        self.connection = connection
        self.name = name
        self.settings = modbus_settings(profile)
        # An explicit unit in the device entry wins over the profile's default.
        self.unit = (
            connection.unit if "unit" in connection.model_fields_set else self.settings.default_unit
        )
        self.max_gap = max_gap
        self.stats = ModbusStats()
        self._line: Line | None = None
        self._closed = False
        self._refused: set[Span] = set()
        self._plans: dict[tuple[str, ...], list[ReadBlock]] = {}
        self._sf_names = {
            p.scale_factor_point for p in profile.points if p.scale_factor_point is not None
        }
        self._last_points: Sequence[Point] | None = None
        self._last_key: tuple[str, ...] = ()
        self._last_names: tuple[str, ...] = ()
        self._write_lock = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle

    @property
    def refused(self) -> frozenset[Span]:
        """Spans this device refused with exception 02 (the planner avoids them)."""
        return frozenset(self._refused)

    @property
    def connected(self) -> bool:
        return self._line is not None and self._line.connected

    def _acquire(self) -> Line:
        if self._closed:
            raise ConnectError(f"device '{self.name}': driver is closed")
        if self._line is None:
            self._line = acquire_line(self.connection, self.name)
        return self._line

    async def connect(self) -> None:
        """Open the (shared) line now; reads and writes also open it when needed."""
        line = self._acquire()
        async with line.lock:
            try:
                await line.ensure_connected(self.connection.timeout, self.name)
            except ConnectError:
                self.stats.connect_errors += 1
                raise

    async def aclose(self) -> None:
        """Leave the line (the last device on it closes it). Safe to call twice."""
        self._closed = True
        line, self._line = self._line, None
        if line is not None:
            release_line(line, self.name)

    # ----------------------------------------------------------------- requests

    async def _request(self, what: str | _Read, call: Any) -> Any:
        """One request with the device's timeout and retries; returns the response PDU.

        Raises DeviceTimeout, ConnectError, DeviceRejected (an exception response, with
        its code), or DecodeError (an answer pymodbus could not make sense of).
        """
        line = self._acquire()
        conn = self.connection
        last: ProtocolError | None = None
        for _attempt in range(conn.retries + 1):
            async with line.lock:
                if not line.connected:
                    try:
                        await line.ensure_connected(conn.timeout, self.name)
                    except ConnectError as exc:
                        self.stats.connect_errors += 1
                        last = exc
                        continue
                if conn.pause > 0:
                    await line.wait_pause(conn.pause)
                self.stats.requests += 1
                try:
                    async with deadline_after(conn.timeout):
                        response = await line.run(call)
                except TimeoutError as exc:
                    if not line.connected:
                        self.stats.connect_errors += 1
                        last = ConnectError(f"device '{self.name}': connection lost during {what}")
                        last.__cause__ = exc
                    else:
                        self.stats.timeouts += 1
                        last = DeviceTimeout(
                            f"device '{self.name}': no answer to {what} within {conn.timeout}s"
                        )
                        if conn.transport != "tcp":
                            # RTU frames carry no transaction id: a late answer would be
                            # taken for the next request's. Reopening the line drops it.
                            line.close()
                    continue
                except (ConnectionException, ModbusIOException, OSError) as exc:
                    if not line.connected or isinstance(exc, ConnectionException | OSError):
                        self.stats.connect_errors += 1
                        last = ConnectError(f"device '{self.name}': {what}: {exc}")
                    else:
                        self.stats.timeouts += 1
                        last = DeviceTimeout(f"device '{self.name}': {what}: {exc}")
                    # Raised after the last retry: keep pymodbus's error as the cause.
                    last.__cause__ = exc
                    continue
                except ModbusException as exc:
                    raise DecodeError(f"device '{self.name}': {what}: {exc}") from exc
            self.stats.responses += 1
            if response.isError():
                code = int(getattr(response, "exception_code", 0) or 0)
                self.stats.exceptions[code] = self.stats.exceptions.get(code, 0) + 1
                raise DeviceRejected(f"device '{self.name}': {what}: Modbus exception {code}", code)
            return response
        assert last is not None
        raise last

    async def _read_span(self, table: ModbusTable, start: int, count: int) -> list[int]:
        """``count`` registers (bits as 0/1) from ``start``; DecodeError on a short answer."""
        unit = self.unit
        what = _Read(table, start, count, unit)  # spelled out only in an error

        async def call(client: Any) -> Any:
            if table is ModbusTable.HOLDING:
                return await client.read_holding_registers(start, count=count, device_id=unit)
            if table is ModbusTable.INPUT:
                return await client.read_input_registers(start, count=count, device_id=unit)
            if table is ModbusTable.COIL:
                return await client.read_coils(start, count=count, device_id=unit)
            return await client.read_discrete_inputs(start, count=count, device_id=unit)

        response = await self._request(what, call)
        if table.is_bit_table:
            bits = list(getattr(response, "bits", None) or [])
            # Bits come padded to a whole byte; anything shorter than asked is garbage.
            if len(bits) < count:
                raise DecodeError(f"device '{self.name}': {what}: answer has {len(bits)} bits")
            self.stats.bits_read += count
            self.stats.bytes_read += (count + 7) // 8
            return [1 if b else 0 for b in bits[:count]]
        regs = getattr(response, "registers", None) or []
        if len(regs) != count:
            raise DecodeError(f"device '{self.name}': {what}: answer has {len(regs)} registers")
        self.stats.registers_read += count
        self.stats.bytes_read += 2 * count
        # pymodbus's decoders (and TcpClient's) give ints of 0..65535 from ">H" already.
        return regs if type(regs) is list else list(regs)

    # ----------------------------------------------------------------- reading

    def _names(self, points: Sequence[Point]) -> tuple[str, ...]:
        """The names of ``points``, in order (remembered for the list polled last)."""
        if points is self._last_points and len(points) == len(self._last_names):
            return self._last_names
        return tuple(p.name for p in points)

    def plan_for(self, points: Sequence[Point]) -> list[ReadBlock]:
        """The requests a poll of ``points`` makes now (cached until a span is refused)."""
        if points is self._last_points and len(points) == len(self._last_key):
            key = self._last_key  # the poller passes the same list every poll
        else:
            key = tuple(sorted(p.name for p in points))
            self._last_points, self._last_key = points, key
            self._last_names = tuple(p.name for p in points)
        plan = self._plans.get(key)
        if plan is None:
            if self._refused:
                plan = plan_reads(self.profile, points, max_gap=self.max_gap, refused=self._refused)
            else:
                plan = _shared_plan(self.profile, points, key, self.max_gap)
            if len(self._plans) >= _MAX_CACHED_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _decoder(self, block: ReadBlock) -> _BlockDecoder:
        # Shared by every driver polling the same block (a shared plan's): built once.
        got = _DECODERS.get(id(block))
        if got is not None and got[0] is block:
            return got[1]
        if len(_DECODERS) >= _MAX_SHARED:
            _DECODERS.clear()
        dec = _BlockDecoder(block, self.settings, self._sf_names)
        _DECODERS[id(block)] = (block, dec)
        return dec

    def _split(self, block: ReadBlock) -> list[ReadBlock] | None:
        """Re-plan a block refused with exception 02; None when it cannot be split."""
        self._refused.add(block.span)
        self._plans.clear()
        sub = plan_reads(
            self.profile,
            [bp.point for bp in block.points],
            max_gap=self.max_gap,
            refused=self._refused,
        )
        if len(sub) < 2:
            return None
        self.stats.splits += 1
        _log.info(
            "device refused a read, splitting it",
            extra={
                "device": self.name,
                "table": block.table.value,
                "start": block.start,
                "count": block.count,
                "into": len(sub),
            },
        )
        return sub

    async def _read_block(
        self,
        block: ReadBlock,
        out: _PollData,
        depth: int = 0,
    ) -> None:
        """Read and decode one block into ``out``; refusals go to ``out.errors``."""
        try:
            regs = await self._read_span(block.table, block.start, block.count)
        except DeviceRejected as exc:
            out.progress += 1
            if (
                exc.code == ILLEGAL_DATA_ADDRESS
                and len(block.points) > 1
                and depth < (_MAX_SPLIT_DEPTH)
            ):
                sub = self._split(block)
                if sub is not None:
                    for b in sub:
                        await self._read_block(b, out, depth + 1)
                    return
            for bp in block.points:
                out.errors[bp.point.name] = f"modbus_exception_{exc.code}"
            return
        except DecodeError:
            out.progress += 1
            self.stats.decode_errors += 1
            for bp in block.points:
                out.errors[bp.point.name] = "decode_error"
            return
        except (DeviceTimeout, ConnectError) as exc:
            raise _PollFailed(exc) from exc
        out.progress += 1
        dec = self._decoder(block)
        dec.decode(regs, out.values, out.bad)
        for bp in dec.slow:
            out.data[bp.point.name] = block.slice(regs, bp)

    async def read(self, points: Sequence[Point]) -> Reading:
        """Read ``points``: one Reading with values and per-point errors."""
        reading = Reading(ts=now_ms())
        self.stats.polls += 1
        plan = self.plan_for(points)
        out = _PollData()
        errors = out.errors
        for i, block in enumerate(plan):
            try:
                await self._read_block(block, out)
            except _PollFailed as failed:
                if out.progress == 0:
                    raise failed.error from failed.error.__cause__
                # The device answered earlier in this poll: report the rest as missing
                # rather than wait out a timeout per remaining request.
                for b in plan[i:]:
                    for bp in b.points:
                        errors.setdefault(bp.point.name, failed.error.reason)
                break
        reading.ts = now_ms()
        fast = out.values
        if not errors and not out.bad and not out.data and tuple(fast) == self._names(points):
            # Every point decoded by a block decoder, in the points' order: the usual poll.
            reading.values = fast
            return reading
        bad = set(out.bad)
        values = reading.values
        for p in points:
            name = p.name
            if name in errors:
                reading.errors[name] = errors[name]
                continue
            if name in fast:
                values[name] = fast[name]
                continue
            if name in bad:
                self.stats.decode_errors += 1
                reading.errors[name] = "decode_error"
                continue
            value, error = self._decode(p, out.data, errors)
            if error is not None:
                reading.errors[name] = error
            elif value is not None:
                values[name] = value
        return reading

    def _decode(
        self, p: Point, data: dict[str, list[int]], errors: dict[str, str]
    ) -> tuple[Value | None, str | None]:
        regs = data.get(p.name)
        if regs is None:
            return None, "decode_error"
        sf: int | None = None
        if p.scale_factor_point is not None:
            sf_name = p.scale_factor_point
            if sf_name in errors:
                return None, errors[sf_name]
            sf_regs = data.get(sf_name)
            if sf_regs is None:
                return None, "decode_error"
            sf_raw = self._decode_raw(self.profile.point(sf_name), sf_regs)
            # SunSpec marks an unimplemented scale factor with 0x8000.
            if not isinstance(sf_raw, int) or isinstance(sf_raw, bool) or not -20 <= sf_raw <= 20:
                self.stats.decode_errors += 1
                return None, "decode_error"
            sf = sf_raw
        try:
            value = codec.decode(p, regs, self.settings, sf_exponent=sf)
        except (ValueError, struct.error, IndexError, OverflowError, UnicodeError):
            self.stats.decode_errors += 1
            return None, "decode_error"
        if isinstance(value, float) and not math.isfinite(value):
            self.stats.decode_errors += 1
            return None, "decode_error"
        return value, None

    def _decode_raw(self, p: Point, regs: list[int]) -> Value | None:
        try:
            return codec.decode(
                p.model_copy(update={"scale": 1.0, "offset": 0.0}), regs, self.settings
            )
        except (ValueError, struct.error, IndexError):
            return None

    # ----------------------------------------------------------------- writing

    async def write(self, point: Point, value: Value) -> None:
        """Write one ``rw`` point (engineering value; scale reversed by the codec)."""
        a = modbus_address(point)
        where = f"device '{self.name}': point '{point.name}'"
        if a is None:
            raise ConfigError(f"{where}: has no modbus address")
        if point.access != "rw" or not a.table.writable:
            raise ConfigError(f"{where}: is read-only")
        _check_write_value(point, value, where)
        unit = self.unit
        async with self._write_lock:
            sf: int | None = None
            if point.scale_factor_point is not None:
                sf_point = self.profile.point(point.scale_factor_point)
                sf_a = modbus_address(sf_point)
                assert sf_a is not None
                regs = await self._read_span(sf_a.table, sf_a.address, point_registers(sf_point))
                raw = self._decode_raw(sf_point, regs)
                if not isinstance(raw, int) or not -20 <= raw <= 20:
                    raise DecodeError(f"{where}: scale factor '{sf_point.name}' is {raw!r}")
                sf = raw
            if a.table is ModbusTable.COIL:
                bit = bool(value)
                await self._request(
                    f"write coil {a.address}",
                    lambda c: c.write_coil(a.address, bit, device_id=unit),
                )
            elif point.type is ValueType.BOOL and a.bit is not None:
                # A bit inside a holding register: read, change that bit, write back.
                (current,) = await self._read_span(ModbusTable.HOLDING, a.address, 1)
                mask = 1 << a.bit
                new = (current | mask) if value else (current & ~mask & 0xFFFF)
                await self._request(
                    f"write holding {a.address} bit {a.bit}",
                    lambda c: c.write_register(a.address, new, device_id=unit),
                )
            else:
                try:
                    regs = codec.encode(point, value, self.settings, sf_exponent=sf)
                except (ValueError, TypeError, OverflowError) as exc:
                    raise ConfigError(f"{where}: cannot write {value!r}: {exc}") from exc
                if len(regs) == 1:
                    reg = regs[0]
                    await self._request(
                        f"write holding {a.address}",
                        lambda c: c.write_register(a.address, reg, device_id=unit),
                    )
                else:
                    await self._request(
                        f"write holding {a.address}+{len(regs)}",
                        lambda c: c.write_registers(a.address, regs, device_id=unit),
                    )
            self.stats.writes += 1
