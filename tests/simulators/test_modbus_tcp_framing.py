"""Modbus TCP framing as a client's socket sees it: split, batched, pipelined and bad frames."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import yaml
from pymodbus.client import AsyncModbusTcpClient

from device_profiles.loader import load_profiles, parse_profile
from device_profiles.schema import Profile
from protocols.modbus.codec import encode
from protocols.modbus.profile import ModbusTable, modbus_address, point_registers
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.modbus_server import ModbusSimServer

_WAIT = 2.0  # seconds a test waits for an answer (or the close) over loopback

_PROFILE: dict[str, Any] = yaml.safe_load(
    """
id: framing-meter
name: Framing meter
name_zh: 帧测试表
family: other
category: general_power
protocol: modbus
points:
  - {name: volts, type: uint16, scale: 0.1, range: [0, 500], modbus: {table: holding, address: 0}}
  - {name: amps, type: uint16, scale: 0.01, range: [0, 100], modbus: {table: holding, address: 1}}
  - {name: energy, type: float32, range: [0, 1.0e6], modbus: {table: input, address: 0}}
  - {name: setpoint, type: uint16, access: rw, range: [0, 1000],
     modbus: {table: holding, address: 2}}
  - {name: enable, type: bool, access: rw, modbus: {table: coil, address: 0}}
  - {name: ready, type: bool, access: rw, modbus: {table: coil, address: 1}}
"""
)


class _Clock:
    """Simulated time that only moves when the test moves it: every read sees one image."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _profile() -> Profile:
    return parse_profile(_PROFILE)


def _device(name: str = "meter", clock: Callable[[], float] | None = None) -> SimDevice:
    return SimDevice(_profile(), device_id=name, seed=3, clock=clock or _Clock())


def _read(tid: int, unit: int, address: int, count: int, fc: int = 3) -> bytes:
    return struct.pack(">HHHBBHH", tid, 0, 6, unit, fc, address, count)


def _registers(device: SimDevice, names: list[str]) -> list[int]:
    values = device.values()
    regs: list[int] = []
    for name in names:
        regs += encode(device.profile.point(name), values[name])
    return regs


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    started: list[ModbusSimServer] = []

    async def _start(devices: dict[int, SimDevice], **kwargs: Any) -> ModbusSimServer:
        server = ModbusSimServer(devices, port=0, **kwargs)
        await server.start()
        started.append(server)
        return server

    yield _start
    for s in started:
        await s.stop()


@pytest.fixture
def sockets() -> Iterator[Callable[[int], socket.socket]]:
    """Plain client sockets (no Nagle delay, so each send is its own segment)."""
    made: list[socket.socket] = []

    def _open(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        made.append(sock)
        return sock

    yield _open
    for sock in made:
        sock.close()


async def _answer(sock: socket.socket) -> tuple[int, int, bytes]:
    """One whole answer: (transaction id, unit id, PDU)."""
    loop = asyncio.get_running_loop()
    head = await _exactly(loop, sock, 7)
    tid, proto, length, unit = struct.unpack(">HHHB", head)
    assert proto == 0
    return tid, unit, await _exactly(loop, sock, length - 1)


async def _exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), _WAIT)
        assert chunk, f"connection closed after {len(data)} of {n} bytes"
        data += chunk
    return data


async def _closed(sock: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset) within ``_WAIT``."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 64), _WAIT) == b""
    except ConnectionResetError:
        return True


def _holding(regs: list[int]) -> bytes:
    return bytes([3, 2 * len(regs)]) + struct.pack(f">{len(regs)}H", *regs)


async def test_a_request_split_over_two_segments_is_answered_once(serve: Any, sockets: Any) -> None:
    device = _device()
    server = await serve({1: device})
    sock = sockets(server.port)
    loop = asyncio.get_running_loop()
    request = _read(0x1234, 1, 0, 2)
    await loop.sock_sendall(sock, request[:5])  # inside the MBAP header
    await asyncio.sleep(0.1)
    await loop.sock_sendall(sock, request[5:])
    assert await _answer(sock) == (0x1234, 1, _holding(_registers(device, ["volts", "amps"])))
    assert device.requests == 1


async def test_two_requests_in_one_segment_are_answered_in_order(serve: Any, sockets: Any) -> None:
    a, b = _device("a"), _device("b")
    server = await serve({1: a, 2: b})
    sock = sockets(server.port)
    loop = asyncio.get_running_loop()
    # Two whole requests for two units and the head of a third in one segment.
    three = _read(7, 2, 1, 1) + _read(8, 1, 0, 1) + _read(9, 1, 1, 1)
    await loop.sock_sendall(sock, three[:-3])
    assert await _answer(sock) == (7, 2, _holding(_registers(b, ["amps"])))
    assert await _answer(sock) == (8, 1, _holding(_registers(a, ["volts"])))
    await loop.sock_sendall(sock, three[-3:])
    assert await _answer(sock) == (9, 1, _holding(_registers(a, ["amps"])))
    assert (a.requests, b.requests) == (2, 1)


async def test_pipelined_requests_a_slow_unit_does_not_hold_up_the_next(
    serve: Any, sockets: Any
) -> None:
    slow, quick = _device("slow"), _device("quick")
    slow.faults.set(FaultMode.SLOW, delay=0.5)
    server = await serve({1: slow, 2: quick})
    sock = sockets(server.port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, _read(1, 1, 0, 1) + _read(2, 2, 0, 1) + _read(3, 2, 1, 1))
    started = loop.time()
    assert (await _answer(sock))[:2] == (2, 2)
    assert (await _answer(sock))[:2] == (3, 2)
    assert loop.time() - started < 0.4
    assert await _answer(sock) == (1, 1, _holding(_registers(slow, ["volts"])))
    assert loop.time() - started >= 0.45


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">HHHB", 1, 1, 6, 1),  # protocol id 1: not Modbus
        struct.pack(">HHHB", 1, 0, 1, 1),  # length 1: not even a function code
        struct.pack(">HHHB", 1, 0, 300, 1),  # longer than any Modbus frame
    ],
    ids=["protocol-id", "too-short", "too-long"],
)
async def test_a_bad_mbap_header_closes_that_connection_only(
    header: bytes, serve: Any, sockets: Any
) -> None:
    device = _device()
    server = await serve({1: device})
    bad, good = sockets(server.port), sockets(server.port)
    loop = asyncio.get_running_loop()
    # The request before the bad header is answered, then the connection goes.
    await loop.sock_sendall(bad, _read(5, 1, 0, 1) + header + bytes([3, 0, 0, 0, 1]))
    assert (await _answer(bad))[:2] == (5, 1)
    assert await _closed(bad)
    assert server.bad_frames == 1
    await loop.sock_sendall(good, _read(6, 1, 0, 1))
    assert await _answer(good) == (6, 1, _holding(_registers(device, ["volts"])))


async def test_unknown_function_code_answers_exception_01_and_the_next_request_works(
    serve: Any, sockets: Any
) -> None:
    server = await serve({1: _device()})
    sock = sockets(server.port)
    loop = asyncio.get_running_loop()
    unknown = struct.pack(">HHHBB", 40, 0, 4, 1, 0x64) + b"\x00\x00"
    await loop.sock_sendall(sock, unknown + _read(41, 1, 0, 1, fc=4))
    assert await _answer(sock) == (40, 1, bytes([0x64 | 0x80, 0x01]))
    tid, unit, pdu = await _answer(sock)
    assert (tid, unit, pdu[:2]) == (41, 1, bytes([4, 2]))  # input register 0: two bytes


async def test_bad_quantity_answers_exception_03(serve: Any, sockets: Any) -> None:
    server = await serve({1: _device()})
    sock = sockets(server.port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, _read(9, 1, 0, 0) + _read(10, 1, 0, 126))
    assert await _answer(sock) == (9, 1, bytes([0x83, 0x03]))
    assert await _answer(sock) == (10, 1, bytes([0x83, 0x03]))


async def test_the_any_unit_ids_of_a_lone_device_are_echoed(serve: Any, sockets: Any) -> None:
    device = _device()
    server = await serve({1: device})
    sock = sockets(server.port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, _read(1, 0, 0, 1) + _read(2, 255, 0, 1))
    expected = _holding(_registers(device, ["volts"]))
    assert await _answer(sock) == (1, 0, expected)
    assert await _answer(sock) == (2, 255, expected)


async def test_write_multiple_coils_is_read_back(serve: Any) -> None:
    device = _device()
    server = await serve({1: device})
    client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
    try:
        assert await client.connect()
        assert not (await client.write_coils(0, [True, True], device_id=1)).isError()
        assert (await client.read_coils(0, count=2, device_id=1)).bits[:2] == [True, True]
        assert not (await client.write_coils(0, [False, True], device_id=1)).isError()
        assert (await client.read_coils(0, count=2, device_id=1)).bits[:2] == [False, True]
        rr = await client.write_coils(1, [True, True], device_id=1)  # coil 2 is not mapped
        assert rr.isError() and rr.exception_code == 2
    finally:
        client.close()
    assert device.values()["enable"] is False and device.values()["ready"] is True


def _blocks(profile: Profile) -> list[tuple[ModbusTable, int, int]]:
    """Every point's own registers, as a client reads a map point by point."""
    out = []
    for p in profile.points:
        a = modbus_address(p)
        assert a is not None
        out.append((a.table, a.address, point_registers(p)))
    return out


async def _read_block(client: Any, table: ModbusTable, address: int, count: int) -> Any:
    if table is ModbusTable.COIL:
        rr = await client.read_coils(address, count=count, device_id=1)
    elif table is ModbusTable.DISCRETE:
        rr = await client.read_discrete_inputs(address, count=count, device_id=1)
    elif table is ModbusTable.INPUT:
        rr = await client.read_input_registers(address, count=count, device_id=1)
    else:
        rr = await client.read_holding_registers(address, count=count, device_id=1)
    assert not rr.isError(), (table, address, rr)
    return rr.bits[:count] if table.is_bit_table else rr.registers


@pytest.mark.parametrize("fault", [FaultMode.NONE, FaultMode.OUT_OF_RANGE])
async def test_the_lean_and_pymodbus_paths_serve_the_same_registers(
    fault: FaultMode, serve: Any
) -> None:
    """Every shipped Modbus profile, read point by point from both paths at the same time."""
    clock = _Clock()
    profiles = [p for p in load_profiles() if p.protocol == "modbus"]
    pairs = []
    for profile in profiles:
        twins = [SimDevice(profile, device_id="x", seed=9, clock=clock) for _ in range(2)]
        for d in twins:
            d.faults.set(fault)
        lean = await serve({1: twins[0]})
        old = await serve({1: twins[1]}, lean=False)
        assert lean.lean and not old.lean
        pairs.append((profile, lean, old))
    for t in (0.0, 7200.0):
        clock.now = t
        for profile, lean, old in pairs:
            clients = [
                AsyncModbusTcpClient("127.0.0.1", port=s.port, timeout=2, retries=0)
                for s in (lean, old)
            ]
            try:
                for c in clients:
                    assert await c.connect()
                for block in _blocks(profile):
                    got, want = [await _read_block(c, *block) for c in clients]
                    assert got == want, f"{profile.id} t={t}: {block}"
            finally:
                for c in clients:
                    c.close()


def test_serves_and_stops_on_uvloop() -> None:
    """The bench's simulators run on uvloop, whose listener is no asyncio.Server."""
    import uvloop

    async def scenario() -> int:
        device = _device()
        server = ModbusSimServer({1: device}, port=0)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_read(77, 1, 0, 1))
        head = await asyncio.wait_for(reader.readexactly(9), _WAIT)
        writer.close()
        await server.stop()
        assert head[:2] == b"\x00\x4d" and head[7] == 3
        return server.port

    port = uvloop.run(scenario())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
