"""The lean Modbus TCP client, through the driver, against scripted devices on loopback.

Each device here is a small asyncio server that answers reads the way a misbehaving
device or gateway would: in pieces, late, for another unit, with garbage, or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from device_profiles.schema import Profile
from protocols import errors
from protocols.modbus.config import ModbusConnection
from protocols.modbus.driver import ModbusDriver
from protocols.modbus.line import open_lines

# What a scripted device does with one read request: (tid, unit, address, count).
Answer = Callable[[asyncio.StreamWriter, int, int, int, int], Awaitable[None]]


@pytest.fixture(autouse=True)
async def _leaves_nothing_behind() -> AsyncIterator[None]:
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []
    assert open_lines() == 0


def _profile() -> Profile:
    return Profile.model_validate(
        {
            "id": "tcp-test",
            "name": "TCP test device",
            "name_zh": "测试设备",
            "family": "other",
            "category": "general_power",
            "protocol": "modbus",
            "points": [
                {"name": "a", "type": "uint16", "modbus": {"table": "holding", "address": 0}},
                {"name": "b", "type": "uint16", "modbus": {"table": "holding", "address": 1}},
            ],
        }
    )


def _registers(address: int, count: int) -> list[int]:
    return [1000 + address + i for i in range(count)]


def _frame(tid: int, unit: int, pdu: bytes, pid: int = 0) -> bytes:
    return struct.pack(">HHHB", tid, pid, len(pdu) + 1, unit) + pdu


def _read_answer(tid: int, unit: int, address: int, count: int) -> bytes:
    data = struct.pack(f">{count}H", *_registers(address, count))
    return _frame(tid, unit, bytes([3, len(data)]) + data)


@contextlib.asynccontextmanager
async def _device(answer: Answer) -> AsyncIterator[int]:
    """A device on a loopback port answering each read request with ``answer``."""
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                _, address, count = struct.unpack(">BHH", pdu[:5])
                await answer(writer, tid, unit, address, count)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(serve(reader, writer))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def _driver(port: int, **opts: Any) -> ModbusDriver:
    conn = ModbusConnection(host="127.0.0.1", port=port, **{"timeout": 0.5, "retries": 0, **opts})
    return ModbusDriver(_profile(), conn, name="dev-t")


async def test_answers_split_across_segments_or_sharing_one_are_read_whole() -> None:
    async def answer(
        w: asyncio.StreamWriter, tid: int, unit: int, address: int, count: int
    ) -> None:
        frame = _read_answer(tid, unit, address, count)
        if tid % 2:
            for i in range(0, len(frame), 3):  # three bytes at a time
                w.write(frame[i : i + 3])
                await w.drain()
                await asyncio.sleep(0.005)
        else:
            # A repeated answer to the previous request (wrong values) and this one's
            # answer in one segment: the first is skipped, the second read.
            stale = _frame(tid - 1, unit, bytes([3, 4]) + struct.pack(">2H", 7, 7))
            w.write(stale + frame)

    async with _device(answer) as port, _driver(port) as drv:
        for _ in range(4):
            reading = await drv.read(_profile().points)
            assert reading.errors == {}
            assert reading.values == {"a": 1000, "b": 1001}


async def test_a_late_answer_is_never_taken_for_the_next_request() -> None:
    answered = 0

    async def answer(
        w: asyncio.StreamWriter, tid: int, unit: int, address: int, count: int
    ) -> None:
        nonlocal answered
        answered += 1
        if answered == 1:
            await asyncio.sleep(0.4)  # after the driver gave up on it
            # Wrong values, so that taking it for the next answer would show.
            w.write(_frame(tid, unit, bytes([3, 4]) + struct.pack(">2H", 7, 7)))
            return
        w.write(_read_answer(tid, unit, address, count))

    async with _device(answer) as port, _driver(port, timeout=0.2) as drv:
        with pytest.raises(errors.DeviceTimeout, match="dev-t"):
            await drv.read(_profile().points)
        await asyncio.sleep(0.3)  # the late answer arrives while nothing waits
        reading = await drv.read(_profile().points)
        assert reading.values == {"a": 1000, "b": 1001}
        assert drv.stats.timeouts == 1


async def test_an_answer_from_another_unit_is_skipped() -> None:
    async def answer(
        w: asyncio.StreamWriter, tid: int, unit: int, address: int, count: int
    ) -> None:
        w.write(_frame(tid, unit + 1, bytes([3, 4]) + struct.pack(">2H", 9, 9)))
        w.write(_read_answer(tid, unit, address, count))

    async with _device(answer) as port, _driver(port, unit=5) as drv:
        reading = await drv.read(_profile().points)
        assert reading.values == {"a": 1000, "b": 1001}


async def test_an_undecodable_answer_is_a_decode_error_and_the_line_stays_up() -> None:
    calls = 0

    async def answer(
        w: asyncio.StreamWriter, tid: int, unit: int, address: int, count: int
    ) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            w.write(_frame(tid, unit, bytes([3, 200, 0, 1])))  # claims 200 bytes, has 2
        else:
            w.write(_read_answer(tid, unit, address, count))

    async with _device(answer) as port, _driver(port) as drv:
        first = await drv.read(_profile().points)
        assert first.errors == {"a": "decode_error", "b": "decode_error"}
        assert drv.stats.decode_errors == 1
        assert drv.connected
        assert (await drv.read(_profile().points)).values == {"a": 1000, "b": 1001}


async def test_bytes_that_are_no_modbus_frame_are_dropped_and_the_request_times_out() -> None:
    calls = 0

    async def answer(
        w: asyncio.StreamWriter, tid: int, unit: int, address: int, count: int
    ) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            w.write(_frame(tid, unit, bytes([3, 4, 0, 1, 0, 2]), pid=0x4854))  # "HT…"
        else:
            w.write(_read_answer(tid, unit, address, count))

    async with _device(answer) as port, _driver(port, timeout=0.2) as drv:
        with pytest.raises(errors.DeviceTimeout):
            await drv.read(_profile().points)
        assert (await drv.read(_profile().points)).values == {"a": 1000, "b": 1001}


async def test_a_peer_closing_during_a_request_fails_it_at_once() -> None:
    async def answer(
        w: asyncio.StreamWriter, tid: int, unit: int, address: int, count: int
    ) -> None:
        w.close()

    async with _device(answer) as port, _driver(port, timeout=5.0) as drv:
        t0 = time.monotonic()
        with pytest.raises(errors.ConnectError, match="dev-t") as info:
            await drv.read(_profile().points)
        assert time.monotonic() - t0 < 2.0  # not the 5 s timeout
        assert info.value.__cause__ is not None
        assert not drv.connected


_READS = ((0, 40, 1), (65535, 1, 255), (100, 125, 0))  # (address, count, unit)


@pytest.mark.parametrize("table", ["holding", "input"])
async def test_register_reads_send_the_bytes_pymodbus_would(table: str) -> None:
    from pymodbus.framer import FramerSocket
    from pymodbus.pdu import DecodePDU
    from pymodbus.pdu.register_message import (
        ReadHoldingRegistersRequest,
        ReadInputRegistersRequest,
    )

    from protocols.modbus.tcp import TcpClient

    framer = FramerSocket(DecodePDU(False))
    cls = ReadHoldingRegistersRequest if table == "holding" else ReadInputRegistersRequest
    expected = b""
    for tid, (address, count, unit) in enumerate(_READS, 1):
        request = cls(address=address, count=count, dev_id=unit)
        request.transaction_id = tid
        expected += framer.buildFrame(request)
    sent = bytearray()
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(1024):  # a device that never answers
            sent.extend(chunk)
        writer.close()
        ended.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    client = TcpClient("127.0.0.1", server.sockets[0].getsockname()[1], on_connect=lambda up: None)
    try:
        assert await client.connect()
        read = client.read_holding_registers if table == "holding" else client.read_input_registers
        for address, count, unit in _READS:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await read(address, count=count, device_id=unit)
    finally:
        client.close()
        async with asyncio.timeout(5):
            await ended.wait()
        server.close()
        await server.wait_closed()
    assert bytes(sent) == expected
