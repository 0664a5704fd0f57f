"""The Modbus simulator as a third-party client (pymodbus) sees it: values, faults, writes."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import yaml
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu.mei_message import ReadDeviceInformationResponse

from device_profiles.loader import load_profiles, parse_profile
from device_profiles.schema import Point, Profile, ValueType
from iiot_common.localservers import PtyPair, require
from protocols.modbus.codec import decode, encode
from protocols.modbus.profile import ModbusTable, point_registers
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.modbus_server import ModbusSimServer

SHIPPED_MODBUS = [
    "kiln-rotary-cement",
    "boiler-steam-coal",
    "aircomp-screw",
    "motor-hv-drive",
    "genset-diesel",
    "wind-turbine-2mw",
    "pv-inverter-sunspec",
]

# A small device whose map has a gap (holding 3), packed bits, a string and each table.
_TEST_PROFILE: dict[str, Any] = yaml.safe_load(
    """
id: test-pump
name: Test pump
name_zh: 测试泵
family: other
category: general_power
protocol: modbus
points:
  - {name: flow, type: float32, range: [0, 100], modbus: {table: input, address: 0}}
  - {name: pressure, type: int16, scale: 0.1, range: [0, 25],
     modbus: {table: holding, address: 0}}
  - {name: speed_sp, type: uint16, access: rw, range: [0, 3000],
     modbus: {table: holding, address: 1}}
  - {name: level_sp, type: float32, access: rw, range: [0, 10],
     modbus: {table: holding, address: 4}}
  - {name: running, type: bool, modbus: {table: holding, address: 2, bit: 0}}
  - {name: remote, type: bool, modbus: {table: holding, address: 2, bit: 5}}
  - {name: tag, type: string, modbus: {table: holding, address: 10, length: 4}}
  - {name: start_cmd, type: bool, access: rw, modbus: {table: coil, address: 0}}
  - {name: trip, type: bool, modbus: {table: discrete, address: 0}}
"""
)


class _Clock:
    """A clock the test steps by hand, so simulated time is deterministic."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def profiles() -> Any:
    return load_profiles()


def _device(profile: Profile, device_id: str = "dev", **kwargs: Any) -> SimDevice:
    return SimDevice(profile, device_id=device_id, seed=7, **kwargs)


def _test_profile() -> Profile:
    return parse_profile(_TEST_PROFILE)


def _tcp_client(port: int, *, timeout: float = 2.0, **kwargs: Any) -> AsyncModbusTcpClient:
    return AsyncModbusTcpClient(
        "127.0.0.1", port=port, timeout=timeout, retries=0, reconnect_delay=0, **kwargs
    )


async def _read_registers(
    client: Any, table: ModbusTable, address: int, count: int, unit: int
) -> Any:
    if table is ModbusTable.COIL:
        return await client.read_coils(address, count=count, device_id=unit)
    if table is ModbusTable.DISCRETE:
        return await client.read_discrete_inputs(address, count=count, device_id=unit)
    if table is ModbusTable.INPUT:
        return await client.read_input_registers(address, count=count, device_id=unit)
    return await client.read_holding_registers(address, count=count, device_id=unit)


async def _read_point(client: Any, profile: Profile, point: Point, unit: int = 1) -> Any:
    """Read one point the way any Modbus master would, and decode it with the profile."""
    a = point.modbus
    assert a is not None
    rr = await _read_registers(client, a.table, a.address, point_registers(point), unit)
    assert not rr.isError(), f"{profile.id}: point '{point.name}' answered {rr}"
    regs = [int(b) for b in rr.bits[:1]] if a.table.is_bit_table else list(rr.registers)
    sf = None
    if point.scale_factor_point is not None:
        sfp = profile.point(point.scale_factor_point)
        sf = int(await _read_point(client, profile, sfp, unit))
    return decode(point, regs, profile.modbus, sf_exponent=sf)


def _in_range(point: Point, value: Any) -> bool:
    if point.range is None or isinstance(value, bool | str):
        return True
    lo, hi = point.range
    slack = (hi - lo) * 1e-4 + 1e-6  # float32 and register quantisation
    return bool(lo - slack <= value <= hi + slack)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """Start ModbusSimServers on free ports; all are stopped after the test."""
    started: list[ModbusSimServer] = []

    async def _start(devices: dict[int, SimDevice], **kwargs: Any) -> ModbusSimServer:
        server = ModbusSimServer(devices, port=kwargs.pop("port", 0), **kwargs)
        await server.start()
        started.append(server)
        return server

    yield _start
    for s in started:
        await s.stop()


@pytest.fixture
async def clients() -> AsyncIterator[list[Any]]:
    """pymodbus clients to close after the test."""
    made: list[Any] = []
    yield made
    for c in made:
        c.close()


async def _connect(clients: list[Any], port: int, **kwargs: Any) -> AsyncModbusTcpClient:
    c = _tcp_client(port, **kwargs)
    clients.append(c)
    assert await c.connect()
    return c


# -- every shipped Modbus profile --------------------------------------------------------


@pytest.mark.parametrize("profile_id", SHIPPED_MODBUS)
async def test_shipped_profile_serves_every_point_within_range(
    profile_id: str, profiles: Any, serve: Any, clients: list[Any]
) -> None:
    profile = profiles[profile_id]
    clock = _Clock()
    device = _device(profile, profile_id, clock=clock)
    server = await serve({1: device})
    client = await _connect(clients, server.port)
    # Start-up, then an hour and a day of simulated operation.
    for t in (0.0, 3600.0, 86400.0):
        clock.now = t
        for point in profile.points:
            value = await _read_point(client, profile, point)
            assert _in_range(point, value), f"{profile_id} t={t}: {point.name}={value!r}"
            if point.type is ValueType.STRING:
                assert isinstance(value, str)
    assert device.requests >= 3 * len(profile.points)


async def test_sunspec_inverter_has_the_standard_markers_in_place(
    profiles: Any, serve: Any, clients: list[Any]
) -> None:
    profile = profiles["pv-inverter-sunspec"]
    server = await serve({1: _device(profile)})
    client = await _connect(clients, server.port)
    base = 40000  # SunSpec base register 40001, zero-based 40000
    rr = await client.read_holding_registers(base, count=4, device_id=1)
    assert not rr.isError()
    assert struct.pack(">HH", *rr.registers[:2]) == b"SunS"
    assert rr.registers[2] == 1  # common model
    common_len = rr.registers[3]
    assert common_len in (65, 66)
    at = base + 2 + 2 + common_len
    rr = await client.read_holding_registers(at, count=2, device_id=1)
    assert not rr.isError()
    assert rr.registers[0] == 103  # three-phase inverter model
    inverter_len = rr.registers[1]
    assert inverter_len == 50
    rr = await client.read_holding_registers(at + 2 + inverter_len, count=2, device_id=1)
    assert not rr.isError()
    assert rr.registers == [0xFFFF, 0]  # end model


# -- transports ---------------------------------------------------------------------------


async def test_rtu_on_a_serial_line_serves_two_units(
    profiles: Any, serve: Any, pty_pair: PtyPair
) -> None:
    kiln = profiles["kiln-rotary-cement"]
    boiler = profiles["boiler-steam-coal"]
    await serve(
        {1: _device(kiln, "kiln-1"), 2: _device(boiler, "boiler-2")},
        framer="rtu",
        serial_port=pty_pair.a,
    )
    client = AsyncModbusSerialClient(
        pty_pair.b, framer=FramerType.RTU, baudrate=19200, timeout=1.0, retries=0
    )
    try:
        assert await client.connect()
        for unit, profile in ((1, kiln), (2, boiler)):
            for point in profile.points[:6]:
                value = await _read_point(client, profile, point, unit=unit)
                assert _in_range(point, value), f"unit {unit}: {point.name}={value!r}"
        # Nobody on the line answers unit 9: the master times out.
        with pytest.raises(ModbusIOException):
            await client.read_input_registers(0, count=1, device_id=9)
    finally:
        client.close()


async def test_rtu_framing_over_tcp(profiles: Any, serve: Any, clients: list[Any]) -> None:
    profile = profiles["boiler-steam-coal"]
    server = await serve({3: _device(profile)}, framer="rtu")
    client = await _connect(clients, server.port, framer=FramerType.RTU)
    for point in profile.points[:5]:
        assert _in_range(point, await _read_point(client, profile, point, unit=3))


async def test_gateway_port_serves_units_and_refuses_unknown_ones(
    serve: Any, clients: list[Any]
) -> None:
    profile = _test_profile()
    a, b = _device(profile, "a"), _device(profile, "b")
    server = await serve({1: a, 2: b})
    client = await _connect(clients, server.port)
    assert not (await client.read_input_registers(0, count=2, device_id=2)).isError()
    rr = await client.read_input_registers(0, count=2, device_id=7)
    assert rr.isError() and rr.exception_code == 0x0B  # gateway target failed to respond
    assert (a.requests, b.requests) == (0, 1)


# -- register map ---------------------------------------------------------------------


async def test_served_registers_are_the_profile_encoding(serve: Any, clients: list[Any]) -> None:
    profile = _test_profile()
    device = _device(profile)
    device.write("speed_sp", 1450)
    server = await serve({1: device})
    client = await _connect(clients, server.port)
    values = device.values()
    rr = await client.read_holding_registers(0, count=3, device_id=1)
    assert not rr.isError()
    assert rr.registers[0] == encode(profile.point("pressure"), values["pressure"])[0]
    assert rr.registers[1] == 1450
    packed = (1 if values["running"] else 0) | (32 if values["remote"] else 0)
    assert rr.registers[2] == packed
    rr = await client.read_holding_registers(10, count=4, device_id=1)
    # Four registers hold eight bytes of the tag, as the profile declares.
    assert decode(profile.point("tag"), list(rr.registers)) == str(values["tag"])[:8]


async def test_unmapped_addresses_answer_illegal_data_address(
    serve: Any, clients: list[Any]
) -> None:
    profile = _test_profile()
    server = await serve({1: _device(profile)})
    client = await _connect(clients, server.port)
    rr = await client.read_holding_registers(2, count=3, device_id=1)  # holding 3 is a gap
    assert rr.isError() and rr.exception_code == 2
    rr = await client.read_input_registers(500, count=1, device_id=1)
    assert rr.isError() and rr.exception_code == 2
    rr = await client.read_coils(1, count=1, device_id=1)
    assert rr.isError() and rr.exception_code == 2


async def test_lenient_server_reads_gaps_as_zero(serve: Any, clients: list[Any]) -> None:
    profile = _test_profile()
    device = _device(profile)
    device.write("level_sp", 2.5)
    server = await serve({1: device}, strict_addresses=False)
    client = await _connect(clients, server.port)
    rr = await client.read_holding_registers(2, count=4, device_id=1)
    assert not rr.isError()
    assert rr.registers[1] == 0
    assert decode(profile.point("level_sp"), list(rr.registers[2:4])) == 2.5


async def test_unknown_function_and_garbage_do_not_stop_the_server(
    serve: Any, clients: list[Any]
) -> None:
    profile = _test_profile()
    server = await serve({1: _device(profile)})
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.setblocking(False)
        # MBAP header + function 0x41, which no device implements.
        await loop.sock_sendall(sock, bytes([0, 1, 0, 0, 0, 2, 1, 0x41]))
        reply = await asyncio.wait_for(loop.sock_recv(sock, 64), 2)
        assert reply[7] == 0x41 | 0x80 and reply[8] == 1  # ILLEGAL FUNCTION
        await loop.sock_sendall(sock, b"\xde\xad\xbe\xef" * 8)
    client = await _connect(clients, server.port)
    assert not (await client.read_input_registers(0, count=2, device_id=1)).isError()


# -- writes -----------------------------------------------------------------------------


async def test_write_to_rw_points_is_read_back(serve: Any, clients: list[Any]) -> None:
    profile = _test_profile()
    device = _device(profile)
    server = await serve({1: device})
    client = await _connect(clients, server.port)
    assert not (await client.write_register(1, 2200, device_id=1)).isError()
    rr = await client.read_holding_registers(1, count=1, device_id=1)
    assert rr.registers == [2200]
    regs = encode(profile.point("level_sp"), 7.25)
    assert not (await client.write_registers(4, regs, device_id=1)).isError()
    rr = await client.read_holding_registers(4, count=2, device_id=1)
    assert decode(profile.point("level_sp"), list(rr.registers)) == 7.25
    assert not (await client.write_coil(0, True, device_id=1)).isError()
    assert (await client.read_coils(0, count=1, device_id=1)).bits[0] is True
    assert device.values()["speed_sp"] == 2200
    assert device.values()["start_cmd"] is True


async def test_write_to_read_only_unmapped_or_out_of_range_is_refused(
    serve: Any, clients: list[Any]
) -> None:
    profile = _test_profile()
    device = _device(profile)
    server = await serve({1: device})
    client = await _connect(clients, server.port)
    before = device.values()["pressure"]
    rr = await client.write_register(0, 123, device_id=1)  # read-only pressure
    assert rr.isError() and rr.exception_code == 2
    rr = await client.write_register(3, 1, device_id=1)  # unmapped
    assert rr.isError() and rr.exception_code == 2
    rr = await client.write_register(1, 9999, device_id=1)  # above the 0..3000 range
    assert rr.isError() and rr.exception_code == 3
    rr = await client.write_registers(0, [1, 2], device_id=1)  # touches read-only pressure
    assert rr.isError() and rr.exception_code == 2
    assert device.values()["pressure"] == before
    assert device.values()["speed_sp"] != 9999


async def test_shipped_profile_setpoint_write_is_read_back(
    profiles: Any, serve: Any, clients: list[Any]
) -> None:
    profile = profiles["kiln-rotary-cement"]
    server = await serve({1: _device(profile)})
    client = await _connect(clients, server.port)
    point = next(
        p for p in profile.points if p.access == "rw" and p.modbus and p.modbus.table == "holding"
    )
    assert point.modbus is not None and point.range is not None
    target = round((point.range[0] + point.range[1]) / 2)
    regs = encode(point, target, profile.modbus)
    assert not (await client.write_registers(point.modbus.address, regs, device_id=1)).isError()
    assert await _read_point(client, profile, point) == pytest.approx(target, rel=1e-6)


async def _kiln_temp(client: Any, profile: Profile, unit: int) -> float:
    value = await _read_point(client, profile, profile.point("burning_zone_temp"), unit)
    assert isinstance(value, float)
    return value


async def test_kiln_setpoint_written_by_a_client_changes_the_temperature_course(
    profiles: Any, serve: Any, clients: list[Any]
) -> None:
    profile = profiles["kiln-rotary-cement"]
    clock = _Clock()
    # Two identical kilns (same seed): unit 2 keeps its setpoint, unit 1 gets a new one.
    written = SimDevice(profile, device_id="kiln", seed=5, clock=clock)
    twin = SimDevice(profile, device_id="kiln", seed=5, clock=clock)
    server = await serve({1: written, 2: twin})
    client = await _connect(clients, server.port)
    point = profile.point("burning_zone_temp_setpoint")
    assert point.modbus is not None and point.access == "rw"
    for unit in (1, 2):  # both start cold, at the default setpoint
        assert await _read_point(client, profile, point, unit) == pytest.approx(1450.0)
        assert await _kiln_temp(client, profile, unit) < 100
    rr = await client.write_register(point.modbus.address, 12000, device_id=1)  # 1200.0 degC
    assert not rr.isError(), rr
    assert (await client.read_holding_registers(0, count=1, device_id=1)).registers == [12000]
    assert await _read_point(client, profile, point, 1) == pytest.approx(1200.0)
    assert written.writes == 1 and twin.writes == 0
    clock.now = 1800.0  # half an hour: both heating, the written one more slowly
    hot, cooler = await _kiln_temp(client, profile, 2), await _kiln_temp(client, profile, 1)
    assert hot > cooler + 20, (hot, cooler)
    clock.now = 12 * 3600.0  # settled: each at its own setpoint
    hot, cooler = await _kiln_temp(client, profile, 2), await _kiln_temp(client, profile, 1)
    assert hot == pytest.approx(1450.0, abs=30), hot
    assert cooler == pytest.approx(1200.0, abs=30), cooler


async def test_a_third_party_master_mbpoll_writes_a_setpoint(
    profiles: Any, serve: Any, clients: list[Any]
) -> None:
    mbpoll = require("mbpoll", "mbpoll")
    profile = profiles["kiln-rotary-cement"]
    device = _device(profile)
    server = await serve({1: device})
    # -0: PDU addressing; -t 4: holding registers; -1: once.
    base = [mbpoll, "-m", "tcp", "-p", str(server.port), "-a", "1", "-0", "-1", "-o", "2"]
    proc = await asyncio.create_subprocess_exec(
        *base, "-t", "4", "-r", "0", "127.0.0.1", "11000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    assert device.values()["burning_zone_temp_setpoint"] == pytest.approx(1100.0)
    client = await _connect(clients, server.port)
    assert (await client.read_holding_registers(0, count=1, device_id=1)).registers == [11000]
    # A read-only register refuses mbpoll's write with exception 02, and keeps its value.
    proc = await asyncio.create_subprocess_exec(
        *base, "-t", "4", "-r", "5", "127.0.0.1", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0 and "Illegal data address" in out.decode(), out.decode()
    assert device.writes == 1


async def test_read_device_identification_names_the_profile(
    profiles: Any, serve: Any, clients: list[Any]
) -> None:
    profile = profiles["boiler-steam-coal"]
    server = await serve({4: _device(profile, "boiler-4")})
    client = await _connect(clients, server.port)
    basic = await client.read_device_information(read_code=1, object_id=0, device_id=4)
    assert isinstance(basic, ReadDeviceInformationResponse), basic
    assert basic.information == {0: b"Generic", 1: b"boiler-steam-coal", 2: b"1.0"}
    regular = await client.read_device_information(read_code=2, object_id=0, device_id=4)
    assert isinstance(regular, ReadDeviceInformationResponse), regular
    assert regular.information[4] == profile.name.encode()
    assert regular.information[5] == b"boiler-steam-coal"
    assert regular.information[6] == b"boiler-4"
    one = await client.read_device_information(read_code=4, object_id=4, device_id=4)
    assert isinstance(one, ReadDeviceInformationResponse), one
    assert one.information == {4: profile.name.encode()}
    missing = await client.read_device_information(read_code=4, object_id=3, device_id=4)
    assert missing.isError() and missing.exception_code == 2
    nobody = await client.read_device_information(read_code=1, object_id=0, device_id=9)
    assert nobody.isError() and nobody.exception_code == 0x0B


# -- faults ---------------------------------------------------------------------------


async def test_silent_device_times_out_and_clearing_restores_service(
    serve: Any, clients: list[Any]
) -> None:
    device = _device(_test_profile())
    server = await serve({1: device})
    client = await _connect(clients, server.port, timeout=0.3)
    device.faults.set(FaultMode.SILENT)
    with pytest.raises(ModbusIOException):
        await client.read_input_registers(0, count=2, device_id=1)
    assert client.connected  # no answer, but the connection stays up
    device.faults.clear()
    assert not (await client.read_input_registers(0, count=2, device_id=1)).isError()
    assert device.requests == 2


async def test_exception_fault_answers_the_configured_code(serve: Any, clients: list[Any]) -> None:
    device = _device(_test_profile())
    server = await serve({1: device})
    client = await _connect(clients, server.port)
    device.faults.set(FaultMode.EXCEPTION)
    rr = await client.read_input_registers(0, count=2, device_id=1)
    assert rr.isError() and rr.exception_code == 4  # SERVER DEVICE FAILURE
    device.faults.set(FaultMode.EXCEPTION, code=6)
    rr = await client.write_register(1, 10, device_id=1)
    assert rr.isError() and rr.exception_code == 6  # SERVER DEVICE BUSY
    assert device.values()["speed_sp"] != 10


async def test_drop_fault_closes_the_connection(serve: Any, clients: list[Any]) -> None:
    device = _device(_test_profile())
    server = await serve({1: device})
    client = await _connect(clients, server.port, timeout=0.5)
    device.faults.set(FaultMode.DROP)
    with pytest.raises((ModbusIOException, ConnectionException)):
        await client.read_input_registers(0, count=2, device_id=1)
    with pytest.raises(ConnectionException):
        await client.read_input_registers(0, count=2, device_id=1)
    assert not client.connected
    # New connections are closed as soon as they are made.
    fresh = _tcp_client(server.port, timeout=0.5)
    clients.append(fresh)
    await fresh.connect()
    with pytest.raises((ModbusIOException, ConnectionException)):
        await fresh.read_input_registers(0, count=2, device_id=1)
    device.faults.clear()
    again = await _connect(clients, server.port)
    assert not (await again.read_input_registers(0, count=2, device_id=1)).isError()


async def test_slow_device_needs_a_longer_timeout(serve: Any, clients: list[Any]) -> None:
    device = _device(_test_profile())
    device.faults.set(FaultMode.SLOW, delay=0.6)
    server = await serve({1: device})
    impatient = await _connect(clients, server.port, timeout=0.1)
    with pytest.raises(ModbusIOException):
        await impatient.read_input_registers(0, count=2, device_id=1)
    patient = await _connect(clients, server.port, timeout=3.0)
    rr = await patient.read_input_registers(0, count=2, device_id=1)
    assert not rr.isError()


async def test_out_of_range_fault_serves_values_beyond_the_range(
    profiles: Any, serve: Any, clients: list[Any]
) -> None:
    profile = profiles["boiler-steam-coal"]
    device = _device(profile)
    server = await serve({1: device})
    client = await _connect(clients, server.port)
    point = next(p for p in profile.points if p.range is not None and p.type is not ValueType.BOOL)
    assert _in_range(point, await _read_point(client, profile, point))
    device.faults.set(FaultMode.OUT_OF_RANGE)
    assert not _in_range(point, await _read_point(client, profile, point))
    device.faults.clear()
    assert _in_range(point, await _read_point(client, profile, point))


async def test_restart_refuses_connections_then_serves_again(
    serve: Any, clients: list[Any]
) -> None:
    device = _device(_test_profile())
    server = await serve({1: device})
    client = await _connect(clients, server.port, timeout=0.5)
    device.faults.set(FaultMode.RESTART, delay=1.0)
    await asyncio.sleep(0.3)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    assert not client.connected  # the restart cut the open connection
    deadline = asyncio.get_running_loop().time() + 5
    # The server offers no event for "listening again"; poll its flag.
    while not server.listening and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    again = await _connect(clients, server.port)
    assert not (await again.read_input_registers(0, count=2, device_id=1)).isError()
    assert device.faults.mode is FaultMode.NONE
    assert server.restarts == 1


async def test_a_faulted_device_does_not_disturb_its_neighbours(
    serve: Any, clients: list[Any]
) -> None:
    profile = _test_profile()
    slow, fine, silent, other = (_device(profile, n) for n in ("slow", "fine", "silent", "other"))
    slow.faults.set(FaultMode.SLOW, delay=1.5)
    silent.faults.set(FaultMode.SILENT)
    gateway = await serve({1: slow, 2: fine})
    lone = await serve({1: silent})
    elsewhere = await serve({1: other})
    slow_client = await _connect(clients, gateway.port, timeout=5.0)
    fine_client = await _connect(clients, gateway.port, timeout=1.0)
    pending = asyncio.ensure_future(slow_client.read_input_registers(0, count=2, device_id=1))
    await asyncio.sleep(0.1)
    # While unit 1 takes its time, unit 2 behind the same port answers at once.
    assert not (await fine_client.read_input_registers(0, count=2, device_id=2)).isError()
    silent_client = await _connect(clients, lone.port, timeout=0.2)
    with pytest.raises(ModbusIOException):
        await silent_client.read_input_registers(0, count=2, device_id=1)
    other_client = await _connect(clients, elsewhere.port, timeout=0.5)
    assert not (await other_client.read_input_registers(0, count=2, device_id=1)).isError()
    assert not (await pending).isError()


async def test_stop_leaves_nothing_listening(serve: Any) -> None:
    server = ModbusSimServer({1: _device(_test_profile())}, port=0)
    await server.start()
    port = server.port
    await server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
