"""A lean Modbus TCP client: pymodbus's requests, framing and decoding over one asyncio protocol.

pymodbus's own client runs every request through its transaction manager: a lock, a
future and a timer of its own, buffer copies and frame dumps for its debug log. The
agent already serialises the requests of a line (``Line.lock``) and bounds each one (the
driver's timeout), so this client keeps only what a request needs: the request PDU and
its encoding from pymodbus (``ModbusClientMixin``, ``FramerSocket``), one write, and the
answer matched by transaction id and unit id, decoded by pymodbus's ``DecodePDU``.

What it answers, as pymodbus's client does:

- a frame whose transaction id or unit id is not the waiting request's (a late answer
  to a request that timed out, another unit's) is skipped;
- the connection lost, or closed, fails the waiting request with ``ConnectionException``;
- a connect that fails returns False.

Unlike pymodbus's client, a PDU that cannot be decoded fails only its request
(``ModbusException``: the stream is still framed by the MBAP length), and bytes that are
no Modbus TCP frame at all (protocol id not 0, length out of range) are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import cast

from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)

__all__ = ["TcpClient"]

_log = logging.getLogger(__name__)

_MBAP = struct.Struct(">HHH")  # transaction id, protocol id, length (unit id onwards)
# A register read: MBAP (transaction id, protocol 0, length 6, unit), code, address, count.
_READ = struct.Struct(">HHHBBHH")
_HEAD = 7  # MBAP header with the unit id
_MAX_LENGTH = 254  # unit id + the largest PDU (253 bytes)
_MAX_TID = 65000  # transaction ids run 1..65000, as pymodbus's do


def _plain_read(address: int, count: int, unit: int) -> bool:
    """A read that pymodbus would frame without complaint (others go through it, to raise)."""
    return 0 <= address <= 0xFFFF and 1 <= count <= 125 and 0 <= unit <= 255


def _registers(data: bytes) -> list[int]:
    """The registers of a read-registers answer (byte count, then data), as pymodbus reads it."""
    size = data[0]
    if size >= len(data):
        raise ModbusIOException(f"byte_count {size} > length of packet {len(data)}")
    return list(struct.unpack_from(f">{size // 2}H", data, 1))


class _HoldingRegisters(ReadHoldingRegistersResponse):
    """pymodbus's answer to a holding-register read, decoded in one ``struct`` call."""

    def decode(self, data: bytes) -> None:
        self.registers = _registers(data)


class _InputRegisters(ReadInputRegistersResponse):
    """pymodbus's answer to an input-register read, decoded in one ``struct`` call."""

    def decode(self, data: bytes) -> None:
        self.registers = _registers(data)


# The answers every poll gets, decoded without the general decoder's lookups and log text.
_FAST: dict[int, type[ModbusPDU]] = {3: _HoldingRegisters, 4: _InputRegisters}
_UNDECODABLE = (ModbusException, ValueError, IndexError, struct.error)


class _Waiting:
    """The request waiting for its answer."""

    __slots__ = ("future", "tid", "unit")

    def __init__(self, future: asyncio.Future[ModbusPDU], tid: int, unit: int) -> None:
        self.future = future
        self.tid = tid
        self.unit = unit


class _Connection(asyncio.Protocol):
    """One TCP connection of a client; once replaced or closed, it no longer speaks for it."""

    def __init__(self, client: TcpClient) -> None:
        self.client: TcpClient | None = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclasses of asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        client, self.client = self.client, None
        if client is not None and client._conn is self:
            client._lost(exc)


class TcpClient(ModbusClientMixin[Awaitable[ModbusPDU]]):
    """One Modbus TCP peer; one request at a time (the line's lock sees to that)."""

    def __init__(self, host: str, port: int, *, on_connect: Callable[[bool], None]) -> None:
        # ModbusClientMixin.__init__ does nothing (and is untyped): not called.
        self.host = host
        self.port = port
        self._on_connect = on_connect
        self._framer = FramerSocket(DecodePDU(False))
        self._decoder = self._framer.decoder
        self._conn: _Connection | None = None
        self._buffer = b""
        self._tid = 0
        self._waiting: _Waiting | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def connect(self) -> bool:
        """Open the connection (the caller bounds the time); False when it cannot be opened."""
        if self._conn is not None:
            return True
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await loop.create_connection(
                lambda: _Connection(self), self.host, self.port
            )
        except OSError as exc:
            _log.debug("modbus tcp connect failed", extra={"peer": self._peer, "error": str(exc)})
            return False
        if conn.client is None:
            return False  # lost before we got it
        # uvloop may call connection_made only after create_connection has returned.
        conn.transport = transport
        self._conn = conn
        self._buffer = b""
        self._on_connect(True)
        return True

    def close(self) -> None:
        """Close the connection; a request still waiting fails. Safe to call twice."""
        conn = self._conn
        if conn is None:
            return
        conn.client = None
        if conn.transport is not None:
            conn.transport.close()
        self._lost(None)

    def execute(self, no_response_expected: bool, request: ModbusPDU) -> Awaitable[ModbusPDU]:
        """Send ``request``; the answer (an ``ExceptionResponse`` for a Modbus exception)."""
        return self._execute(no_response_expected, request)

    def read_holding_registers(
        self,
        address: int,
        *,
        count: int = 1,
        device_id: int = 1,
        no_response_expected: bool = False,
    ) -> Awaitable[ModbusPDU]:
        """Read holding registers (code 0x03), as pymodbus's client does."""
        if no_response_expected or not _plain_read(address, count, device_id):
            return super().read_holding_registers(
                address, count=count, device_id=device_id, no_response_expected=no_response_expected
            )
        return self._read(3, address, count, device_id)

    def read_input_registers(
        self,
        address: int,
        *,
        count: int = 1,
        device_id: int = 1,
        no_response_expected: bool = False,
    ) -> Awaitable[ModbusPDU]:
        """Read input registers (code 0x04), as pymodbus's client does."""
        if no_response_expected or not _plain_read(address, count, device_id):
            return super().read_input_registers(
                address, count=count, device_id=device_id, no_response_expected=no_response_expected
            )
        return self._read(4, address, count, device_id)

    async def _read(self, code: int, address: int, count: int, unit: int) -> ModbusPDU:
        """A register read framed in one ``struct`` call: the bytes pymodbus would send."""
        transport = self._transport()
        self._tid = tid = self._tid % _MAX_TID + 1
        return await self._exchange(
            transport, _READ.pack(tid, 0, 6, unit, code, address, count), unit
        )

    async def _execute(self, no_response_expected: bool, request: ModbusPDU) -> ModbusPDU:
        transport = self._transport()
        if no_response_expected:
            raise ValueError("every request of this client waits for its answer")
        self._tid = self._tid % _MAX_TID + 1
        request.transaction_id = self._tid
        return await self._exchange(transport, self._framer.buildFrame(request), request.dev_id)

    def _transport(self) -> asyncio.Transport:
        conn = self._conn
        transport = conn.transport if conn is not None else None
        if transport is None:
            raise ConnectionException(f"{self._peer}: not connected")
        if self._waiting is not None:
            raise ConnectionException(f"{self._peer}: a request is already waiting")
        return transport

    async def _exchange(self, transport: asyncio.Transport, frame: bytes, unit: int) -> ModbusPDU:
        """Send ``frame`` (transaction ``self._tid``) and wait for its answer."""
        future: asyncio.Future[ModbusPDU] = asyncio.get_running_loop().create_future()
        self._waiting = _Waiting(future, self._tid, unit)
        transport.write(frame)
        try:
            return await future
        finally:
            self._waiting = None

    # ----------------------------------------------------------------- from the connection

    def _received(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        size = len(buf)
        pos = 0
        while size - pos > _HEAD:
            tid, pid, length = _MBAP.unpack_from(buf, pos)
            if pid != 0 or not 2 <= length <= _MAX_LENGTH:
                _log.debug("not a modbus tcp frame: dropped", extra={"peer": self._peer})
                pos = size
                break
            end = pos + 6 + length
            if end > size:
                break
            self._answer(tid, buf[pos + 6], buf[pos + _HEAD : end])
            pos = end
        self._buffer = buf[pos:] if pos < size else b""

    # ----------------------------------------------------------------- internals

    @property
    def _peer(self) -> str:
        return f"{self.host}:{self.port}"

    def _answer(self, tid: int, unit: int, pdu: bytes) -> None:
        waiting = self._waiting
        # A transaction id of 0 is taken as an echo-less device's answer, as pymodbus does.
        if (
            waiting is None
            or waiting.future.done()
            or (tid and tid != waiting.tid)
            or (waiting.unit and unit != waiting.unit)
        ):
            _log.debug("modbus tcp answer for no waiting request: skipped", extra={"tid": tid})
            return
        fast = _FAST.get(pdu[0])
        response: ModbusPDU | None
        if fast is not None:
            response = fast()
            try:
                response.decode(pdu[1:])
            except _UNDECODABLE:
                response = None
        else:
            response = self._decoder.decode(pdu)
        if response is None:
            waiting.future.set_exception(ModbusException(f"{self._peer}: undecodable answer"))
            return
        response.dev_id = unit
        response.transaction_id = tid
        waiting.future.set_result(response)

    def _lost(self, exc: Exception | None) -> None:
        self._conn = None
        self._buffer = b""
        waiting = self._waiting
        if waiting is not None and not waiting.future.done():
            reason = f": {exc}" if exc is not None else ""
            waiting.future.set_exception(
                ConnectionException(f"{self._peer}: connection closed{reason}")
            )
        self._on_connect(False)
