"""The Modbus TCP serving path of :class:`~simulators.modbus_server.ModbusSimServer`.

An asyncio ``Protocol`` per connection parses MBAP frames itself and answers from each
device's encoded register image (:meth:`RegisterImage.read_bytes`), so a read costs a
header check, a fault check and a slice of bytes. It handles frames split over several
segments, several frames in one segment and pipelined requests, echoes transaction and
unit ids, and answers in the order the requests came (a ``slow`` unit's answers leave
later, without holding up the others).

Function codes 1-6, 15 and 16 are answered here. Anything else (43/14 device
identification, 22, 23, codes no device implements) goes through pymodbus's PDU classes,
the way the pymodbus-based path answers it: what pymodbus cannot decode answers
exception 01 (ILLEGAL FUNCTION).

A frame whose MBAP header is wrong (protocol id not 0, a length outside 2..254) leaves the
byte stream without a frame boundary to resume at, so the connection is closed, as
Modbus TCP devices do; the next connection is served as usual.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.decoders import DecodePDU
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest

from protocols.modbus.profile import ModbusTable
from simulators.faults import FaultMode

if TYPE_CHECKING:
    from simulators.modbus_server import ModbusSimServer, RegisterImage

__all__ = ["LeanConnection"]

log = logging.getLogger(__name__)

_MBAP = struct.Struct(">HHHB")  # transaction id, protocol id, length, unit id
_ADDR_COUNT = struct.Struct(">HH")
_EXCEPTION = struct.Struct(">HHHBBB")
_READ_HEAD = struct.Struct(">HHHBBB")  # MBAP + function code + byte count
_HEADER = 7
_MAX_LENGTH = 254  # unit id + a PDU of at most 253 bytes
_READS = {
    1: ModbusTable.COIL,
    2: ModbusTable.DISCRETE,
    3: ModbusTable.HOLDING,
    4: ModbusTable.INPUT,
}
_MAX_READ = {1: 2000, 2: 2000, 3: 125, 4: 125}  # quantities the specification allows
_DECODER = DecodePDU(is_server=True)


def _exception(tid: int, unit: int, fc: int, code: int) -> bytes:
    return _EXCEPTION.pack(tid, 0, 3, unit, (fc | 0x80) & 0xFF, code)


def _frame(tid: int, unit: int, pdu: bytes) -> bytes:
    return _MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu


def _pack_bits(flags: bytes) -> bytes:
    """One 0/1 byte per coil → the bits of a read-coils answer, least significant first."""
    out = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        if flag:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def _run_now(coro: Coroutine[Any, Any, ModbusPDU]) -> ModbusPDU:
    """Run a pymodbus ``datastore_update`` whose datastore never waits, without a task."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(ModbusPDU, done.value)
    coro.close()
    raise RuntimeError("the register datastore suspended a request")


class LeanConnection(asyncio.Protocol):
    """One Modbus TCP client connection to a :class:`ModbusSimServer`."""

    def __init__(self, sim: ModbusSimServer) -> None:
        self._sim = sim
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sim = self._sim
        if sim._refuses_connections():
            sim.dropped += 1
            transport.close()
            return
        self.transport = cast(asyncio.Transport, transport)
        sim._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._sim._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        pos, size = 0, len(data)
        out: list[bytes] = []
        while size - pos >= _HEADER:
            tid, proto, length, unit = _MBAP.unpack_from(data, pos)
            if proto != 0 or not 2 <= length <= _MAX_LENGTH:
                self._bad_frame(out)
                return
            end = pos + 6 + length
            if end > size:
                break
            reply = self._answer(tid, unit, data[pos + _HEADER : end])
            if self.transport is None:
                return  # a ``drop`` fault closed the connection
            if reply is not None:
                out.append(reply)
            pos = end
        if pos < size:
            self._buf += data[pos:]
        if out:
            self._write(b"".join(out) if len(out) > 1 else out[0])

    # -- internals --------------------------------------------------------------------

    def close(self) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()
        self._sim._connections.discard(self)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _bad_frame(self, answered: list[bytes]) -> None:
        self._sim.bad_frames += 1
        if answered:
            self._write(b"".join(answered))  # what came before the bad header is answered
        self.close()

    def _answer(self, tid: int, unit: int, pdu: bytes) -> bytes | None:
        """The answer to one request (None: no answer now), after the unit's fault."""
        sim = self._sim
        resolved = sim._resolve_unit(unit)
        fc = pdu[0]
        if resolved is None:
            return _exception(tid, unit, fc, ExcCodes.GATEWAY_NO_RESPONSE)
        device = sim.devices[resolved]
        device.requests += 1
        sim.requests += 1
        faults = device.faults
        mode = faults.mode
        if mode is FaultMode.NONE or mode is FaultMode.OUT_OF_RANGE:
            return self._serve(tid, unit, resolved, pdu)
        if mode is FaultMode.SILENT:
            return None
        if mode is FaultMode.DROP or mode is FaultMode.RESTART:
            sim.dropped += 1
            self.close()
            return None
        if mode is FaultMode.EXCEPTION:
            return _exception(tid, unit, fc, faults.exception_code)
        sim._spawn(self._later(faults.delay, tid, unit, resolved, pdu))  # slow
        return None

    async def _later(self, delay: float, tid: int, unit: int, resolved: int, pdu: bytes) -> None:
        await asyncio.sleep(delay)
        reply = self._serve(tid, unit, resolved, pdu)
        if reply is not None:
            self._write(reply)

    def _serve(self, tid: int, unit: int, resolved: int, pdu: bytes) -> bytes | None:
        sim = self._sim
        image = sim._store.images[resolved]
        fc = pdu[0]
        try:
            table = _READS.get(fc)
            if table is not None:
                return self._read(tid, unit, image, table, pdu)
            if fc in (5, 6, 15, 16):
                return self._write_request(tid, unit, image, pdu)
            return self._by_pymodbus(tid, unit, resolved, pdu)
        except Exception:
            sim.errors += 1
            log.exception(
                "request failed", extra={"device": image.device.device_id, "function": fc}
            )
            return _exception(tid, unit, fc, ExcCodes.DEVICE_FAILURE)

    @staticmethod
    def _read(tid: int, unit: int, image: RegisterImage, table: ModbusTable, pdu: bytes) -> bytes:
        fc = pdu[0]
        if len(pdu) != 5:
            return _exception(tid, unit, fc, ExcCodes.ILLEGAL_VALUE)
        address, count = _ADDR_COUNT.unpack_from(pdu, 1)
        if not 1 <= count <= _MAX_READ[fc]:
            return _exception(tid, unit, fc, ExcCodes.ILLEGAL_VALUE)
        data = image.read_bytes(table, address, count)
        if isinstance(data, int):
            return _exception(tid, unit, fc, data)
        if fc <= 2:
            data = _pack_bits(data)
        return _READ_HEAD.pack(tid, 0, len(data) + 3, unit, fc, len(data)) + data

    @staticmethod
    def _write_request(tid: int, unit: int, image: RegisterImage, pdu: bytes) -> bytes:
        """Function 5, 6, 15 or 16: apply it; the answer echoes the address (and count)."""
        fc = pdu[0]
        bad = _exception(tid, unit, fc, ExcCodes.ILLEGAL_VALUE)
        if len(pdu) < 5:
            return bad
        address, word = _ADDR_COUNT.unpack_from(pdu, 1)
        if fc == 5 or fc == 6:
            if len(pdu) != 5:
                return bad
            if fc == 5:
                if word not in (0xFF00, 0x0000):
                    return bad
                rc = image.write(ModbusTable.COIL, address, [1 if word else 0])
            else:
                rc = image.write(ModbusTable.HOLDING, address, [word])
            return _exception(tid, unit, fc, rc) if rc else _frame(tid, unit, pdu)
        count = word
        if len(pdu) < 6 or len(pdu) != 6 + pdu[5]:
            return bad
        if fc == 16:
            if not 1 <= count <= 123 or pdu[5] != 2 * count:
                return bad
            values = list(struct.unpack_from(f">{count}H", pdu, 6))
            rc = image.write(ModbusTable.HOLDING, address, values)
        else:
            if not 1 <= count <= 1968 or pdu[5] != (count + 7) // 8:
                return bad
            values = [(pdu[6 + (i >> 3)] >> (i & 7)) & 1 for i in range(count)]
            rc = image.write(ModbusTable.COIL, address, values)
        return _exception(tid, unit, fc, rc) if rc else _frame(tid, unit, pdu[:5])

    def _by_pymodbus(self, tid: int, unit: int, resolved: int, pdu: bytes) -> bytes:
        """Requests the lean path does not parse, decoded and answered by pymodbus's PDUs."""
        from simulators.modbus_server import _FC_TABLE, _identification

        sim = self._sim
        fc = pdu[0]
        request = _DECODER.decode(pdu)
        response: ModbusPDU
        if isinstance(request, ReadDeviceInformationRequest):
            response = _identification(sim.devices[resolved], request)
        elif request is None or fc not in _FC_TABLE:
            return _exception(tid, unit, fc, ExcCodes.ILLEGAL_FUNCTION)
        else:
            response = _run_now(request.datastore_update(cast(Any, sim._store), resolved))
        if isinstance(response, ExceptionResponse):
            return _exception(tid, unit, fc, response.exception_code)
        return _frame(tid, unit, bytes([response.function_code]) + response.encode())
