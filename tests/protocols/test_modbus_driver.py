"""The Modbus driver against the project's Modbus simulator on loopback (TCP, RTU, RTU/TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from device_profiles.loader import load_profiles, parse_profile
from device_profiles.schema import Point, Profile, ValueType
from iiot_common.localservers import PtyPair
from protocols import errors
from protocols.driver import Driver, Reading, create_driver
from protocols.modbus import codec
from protocols.modbus.config import ModbusConnection
from protocols.modbus.driver import ModbusDriver
from protocols.modbus.line import open_lines
from protocols.modbus.planner import plan_reads
from protocols.modbus.profile import ModbusTable, point_registers
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.modbus_server import ModbusSimServer

_SIZES = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "float32": 2, "float64": 4}


@pytest.fixture(autouse=True)
async def _leaves_nothing_behind() -> AsyncIterator[None]:
    """Every test closes its drivers: no open line, no pymodbus task left running."""
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert left == []
    assert open_lines() == 0


def _profile(points: list[dict[str, Any]], pid: str = "test-device", **modbus: Any) -> Profile:
    return Profile.model_validate(
        {
            "id": pid,
            "name": "Test device",
            "name_zh": "测试设备",
            "family": "other",
            "category": "general_power",
            "protocol": "modbus",
            "modbus": modbus,
            "points": points,
        }
    )


def _device(profile: Profile, device_id: str = "dev-1") -> SimDevice:
    # A frozen clock: every poll sees the same values, so reads can be compared exactly.
    return SimDevice(profile, device_id=device_id, seed=3, clock=lambda: 0.0)


@contextlib.asynccontextmanager
async def _serve(devices: dict[int, SimDevice], **kwargs: Any) -> AsyncIterator[ModbusSimServer]:
    server = ModbusSimServer(devices, port=kwargs.pop("port", 0), **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _tcp(server: ModbusSimServer, **kwargs: Any) -> ModbusConnection:
    transport = "tcp" if server.framer == "tcp" else "rtu-over-tcp"
    opts: dict[str, Any] = {"timeout": 0.5, "retries": 0, **kwargs}
    return ModbusConnection(transport=transport, host="127.0.0.1", port=server.port, **opts)


def _assert_matches(profile: Profile, reading: Reading, expected: dict[str, Any]) -> None:
    """The driver's values are the simulator's, to float32 precision."""
    assert reading.errors == {}
    assert set(reading.values) == {p.name for p in profile.points}
    for p in profile.points:
        got, want = reading.values[p.name], expected[p.name]
        if p.type is ValueType.FLOAT32:
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6), p.name
        elif p.type is ValueType.FLOAT64:
            assert got == pytest.approx(want, rel=1e-12), p.name
        elif p.scale != 1.0 or p.offset != 0.0:
            assert got == pytest.approx(want, abs=abs(p.scale)), p.name
        else:
            assert got == want, p.name


def _scattered_profile() -> Profile:
    """60 points over the four tables, gaps small (bridged) and large (not)."""
    rng = random.Random(7)
    gaps = [0, 0, 0, 1, 2, 5, 9, 12, 40, 300]
    points: list[dict[str, Any]] = []
    for table, n in (("holding", 20), ("input", 20), ("coil", 10), ("discrete", 10)):
        address = rng.randrange(0, 50)
        for i in range(n):
            name = f"{table}_{i}"
            if table in ("coil", "discrete"):
                points.append(
                    {"name": name, "type": "bool", "modbus": {"table": table, "address": address}}
                )
                address += 1 + rng.choice([0, 0, 3, 200, 2100])
                continue
            type_ = rng.choice(list(_SIZES))
            point: dict[str, Any] = {
                "name": name,
                "type": type_,
                "modbus": {"table": table, "address": address},
                "range": [-500, 500] if type_.startswith(("int", "float")) else [0, 1000],
            }
            if i % 7 == 3:
                point["scale"] = 0.1
            points.append(point)
            address += _SIZES[type_] + rng.choice(gaps)
    return _profile(points, pid="scattered")


async def test_scattered_points_cost_exactly_the_planned_requests() -> None:
    profile = _scattered_profile()
    assert len(profile.points) == 60
    dev = _device(profile)
    plan = plan_reads(profile, profile.points)
    async with _serve({1: dev}, strict_addresses=False) as server:
        async with ModbusDriver(profile, _tcp(server), name="dev-1") as drv:
            for _ in range(2):
                before = dev.requests
                reading = await drv.read(profile.points)
                assert dev.requests - before == len(plan)
                _assert_matches(profile, reading, dev.values())
            assert drv.stats.requests == drv.stats.responses == 2 * len(plan)
            assert drv.stats.registers_read == 2 * sum(
                b.count for b in plan if not b.table.is_bit_table
            )
    # Fewer requests than points, more than one per table (some gaps are too wide).
    assert 4 < len(plan) < 60


async def test_refused_block_is_split_once_and_the_split_is_remembered() -> None:
    points = [
        {"name": f"p{a}", "type": "uint16", "modbus": {"table": "holding", "address": a}}
        for a in (0, 1, 2, 6, 7, 12)
    ]
    profile = _profile(points)
    dev = _device(profile)
    async with _serve({1: dev}, strict_addresses=True) as server:
        async with ModbusDriver(profile, _tcp(server), name="dev-1") as drv:
            assert len(drv.plan_for(profile.points)) == 1  # gaps of 3 and 4 are bridged
            first = await drv.read(profile.points)
            _assert_matches(profile, first, dev.values())
            split = drv.plan_for(profile.points)
            assert [(b.start, b.count) for b in split] == [(0, 3), (6, 2), (12, 1)]
            assert dev.requests == 1 + len(split)  # the refused read, then the split
            assert drv.stats.exceptions == {2: 1}
            for _ in range(3):
                before = dev.requests
                again = await drv.read(profile.points)
                assert dev.requests - before == len(split)
                _assert_matches(profile, again, dev.values())
            assert drv.stats.exceptions == {2: 1}


async def test_a_refused_single_point_is_reported_not_fatal() -> None:
    # The device itself refuses one register: the other points still read.
    profile = _profile(
        [
            {"name": "good", "type": "uint16", "modbus": {"table": "holding", "address": 0}},
            {"name": "other", "type": "uint16", "modbus": {"table": "holding", "address": 40}},
        ]
    )
    served = _profile(
        [{"name": "good", "type": "uint16", "modbus": {"table": "holding", "address": 0}}]
    )
    dev = _device(served)
    async with _serve({1: dev}) as server:
        async with ModbusDriver(profile, _tcp(server), name="dev-1") as drv:
            reading = await drv.read(profile.points)
    assert reading.errors == {"other": "modbus_exception_2"}
    assert reading.values == {"good": dev.values()["good"]}


def _shipped_modbus_profiles() -> list[Profile]:
    return [p for p in load_profiles() if p.protocol == "modbus"]


@pytest.mark.parametrize("profile", _shipped_modbus_profiles(), ids=lambda p: p.id)
async def test_every_shipped_profile_reads_completely(profile: Profile) -> None:
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        async with ModbusDriver(profile, _tcp(server, timeout=2.0), name="dev-1") as drv:
            reading = await drv.read(profile.points)
            expected = dev.values()
            assert reading.errors == {}
            assert set(reading.values) == {p.name for p in profile.points}
            for p in profile.points:
                value = reading.values[p.name]
                if p.range is not None and isinstance(value, int | float):
                    lo, hi = p.range
                    slack = (hi - lo) * 1e-6 + abs(p.scale)
                    assert lo - slack <= value <= hi + slack, (p.name, value)
                want = expected[p.name]
                if p.type is ValueType.STRING:  # what fits in the registers
                    want = codec.decode(p, codec.encode(p, want, profile.modbus), profile.modbus)
                if isinstance(want, float) or p.scale != 1.0 or p.scale_factor_point:
                    assert value == pytest.approx(want, rel=1e-5, abs=abs(p.scale) * 10), p.name
                else:
                    assert value == want, p.name
            # Scale factors (SunSpec *_SF): value = raw × 10^SF, raw read straight off the wire.
            scaled = [p for p in profile.points if p.scale_factor_point]
            if scaled:
                await _check_scale_factors(server.port, profile, scaled, reading)


async def test_sunspec_scale_factors_are_applied_from_the_same_poll() -> None:
    # SunSpec inverter model 101 layout: W at 40083 with W_SF beside it, Hz with Hz_SF.
    profile = _profile(
        [
            {
                "name": "W",
                "type": "int16",
                "unit": "W",
                "scale_factor_point": "W_SF",
                "range": [0, 3000],
                "modbus": {"table": "holding", "address": 40083},
            },
            {"name": "W_SF", "type": "int16", "modbus": {"table": "holding", "address": 40084}},
            {
                "name": "Hz",
                "type": "uint16",
                "unit": "Hz",
                "scale_factor_point": "Hz_SF",
                "range": [45, 65],
                "modbus": {"table": "holding", "address": 40085},
            },
            {"name": "Hz_SF", "type": "int16", "modbus": {"table": "holding", "address": 40086}},
        ],
        pid="sunspec-like",
    )
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        async with ModbusDriver(profile, _tcp(server), name="pv-1") as drv:
            # Asking for W alone still reads W_SF, in the same request.
            only_w = await drv.read([profile.point("W")])
            assert set(only_w.values) == {"W"}
            assert dev.requests == 1
            reading = await drv.read(profile.points)
            assert reading.errors == {}
            assert reading.values["W_SF"] == dev.values()["W_SF"] != 0
            await _check_scale_factors(
                server.port, profile, [profile.point("W"), profile.point("Hz")], reading
            )
            assert reading.values["W"] == pytest.approx(dev.values()["W"], abs=0.1)


async def _check_scale_factors(
    port: int, profile: Profile, scaled: list[Point], reading: Reading
) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0, reconnect_delay=0)
    await client.connect()
    try:
        for p in scaled:
            assert p.modbus is not None and p.scale_factor_point is not None
            sf_point = profile.point(p.scale_factor_point)
            assert sf_point.modbus is not None and sf_point.modbus.table is ModbusTable.HOLDING
            sf_regs = (
                await client.read_holding_registers(sf_point.modbus.address, count=1)
            ).registers
            sf = codec.decode(sf_point, list(sf_regs), profile.modbus)
            read = (
                client.read_holding_registers
                if p.modbus.table is ModbusTable.HOLDING
                else client.read_input_registers
            )
            regs = (await read(p.modbus.address, count=point_registers(p))).registers
            raw = codec.decode(
                p.model_copy(update={"scale": 1.0, "offset": 0.0}), list(regs), profile.modbus
            )
            assert isinstance(sf, int) and isinstance(raw, int | float)
            want = raw * p.scale * 10.0**sf + p.offset
            assert reading.values[p.name] == pytest.approx(want, rel=1e-9), p.name
    finally:
        client.close()


async def test_rtu_on_a_serial_line_with_two_units_sharing_it(pty_pair: PtyPair) -> None:
    kiln = _scattered_profile()
    small = _profile(
        [
            {"name": "speed", "type": "uint16", "modbus": {"table": "input", "address": 3}},
            {"name": "temp", "type": "float32", "modbus": {"table": "input", "address": 4}},
        ],
        pid="small",
    )
    dev1, dev2 = _device(kiln, "dev-1"), _device(small, "dev-2")
    async with _serve(
        {1: dev1, 2: dev2},
        framer="rtu",
        serial_port=pty_pair.b,
        baudrate=115200,
        strict_addresses=False,
    ):
        base = {"transport": "rtu", "serial_port": pty_pair.a, "baudrate": 115200, "timeout": 1.0}
        d1 = ModbusDriver(kiln, ModbusConnection(**base, unit=1), name="dev-1")
        conn2 = ModbusConnection(**{**base, "timeout": 0.3}, unit=2, retries=0, pause=0.005)
        d2 = ModbusDriver(small, conn2, name="dev-2")
        try:
            for _ in range(2):
                r1, r2 = await asyncio.gather(d1.read(kiln.points), d2.read(small.points))
                _assert_matches(kiln, r1, dev1.values())
                _assert_matches(small, r2, dev2.values())
            assert open_lines() == 1
            # A unit that falls silent is offline; its neighbour on the line is not.
            dev2.faults.set(FaultMode.SILENT)
            ok, silent = await asyncio.gather(
                d1.read(kiln.points), d2.read(small.points), return_exceptions=True
            )
            assert isinstance(silent, errors.DeviceTimeout)
            assert isinstance(ok, Reading)
            _assert_matches(kiln, ok, dev1.values())
            dev2.faults.clear()
            _assert_matches(small, await d2.read(small.points), dev2.values())
        finally:
            await d1.aclose()
            await d2.aclose()
        assert open_lines() == 0


async def test_devices_on_one_line_must_agree_on_its_settings() -> None:
    line = {"transport": "rtu", "serial_port": "/dev/ttyX"}
    a = ModbusDriver(_small(), ModbusConnection(**line, baudrate=9600), name="a")
    b = ModbusDriver(_small(), ModbusConnection(**line, baudrate=19200, unit=2), name="b")
    with pytest.raises(errors.ConnectError):
        await a.connect()  # no such port; the line is still registered for 'a'
    try:
        with pytest.raises(errors.ConfigError, match=r"device 'b'.*baudrate"):
            await b.connect()
    finally:
        await a.aclose()
        await b.aclose()


async def test_rtu_framing_over_tcp() -> None:
    profile = _scattered_profile()
    dev = _device(profile)
    async with _serve({5: dev}, framer="rtu", strict_addresses=False) as server:
        conn = _tcp(server, unit=5)
        assert conn.transport == "rtu-over-tcp"
        async with ModbusDriver(profile, conn, name="dev-1") as drv:
            _assert_matches(profile, await drv.read(profile.points), dev.values())


# --------------------------------------------------------------------------- faults


def _small() -> Profile:
    return _profile(
        [
            {"name": "a", "type": "uint16", "modbus": {"table": "holding", "address": 0}},
            {"name": "b", "type": "float32", "modbus": {"table": "holding", "address": 1}},
            {"name": "c", "type": "bool", "modbus": {"table": "coil", "address": 0}},
            {
                "name": "v",
                "type": "float32",
                "access": "rw",
                "modbus": {"table": "holding", "address": 20},
            },
        ]
    )


def _no_pymodbus_tasks() -> bool:
    names = {t.get_name() for t in asyncio.all_tasks()}
    return not any("reconnect" in n for n in names)


async def test_silent_device_raises_device_timeout() -> None:
    profile = _small()
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        async with ModbusDriver(profile, _tcp(server, timeout=0.2, retries=1), name="dev-1") as drv:
            dev.faults.set(FaultMode.SILENT)
            with pytest.raises(errors.DeviceTimeout, match="dev-1"):
                await drv.read(profile.points)
            assert drv.stats.timeouts == 2  # the request and its retry
            dev.faults.clear()
            reading = await drv.read(profile.points)
            assert reading.errors == {}


async def test_exception_answers_go_into_errors() -> None:
    profile = _small()
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        async with ModbusDriver(profile, _tcp(server), name="dev-1") as drv:
            dev.faults.set(FaultMode.EXCEPTION, code=4)
            reading = await drv.read(profile.points)
            assert reading.values == {}
            assert reading.errors == {p.name: "modbus_exception_4" for p in profile.points}
            assert drv.stats.exceptions == {4: len(drv.plan_for(profile.points))}
            assert drv.refused == frozenset()  # only exception 02 changes the plan


async def test_dropped_connection_raises_connect_error_then_recovers() -> None:
    profile = _small()
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        conn = _tcp(server, timeout=0.3, retries=1)
        async with ModbusDriver(profile, conn, name="dev-1") as drv:
            assert (await drv.read(profile.points)).errors == {}
            dev.faults.set(FaultMode.DROP)
            with pytest.raises(errors.ConnectError, match="dev-1"):
                await drv.read(profile.points)
            assert not drv.connected
            assert _no_pymodbus_tasks()
            dev.faults.clear()
            reading = await drv.read(profile.points)  # a fresh connection
            _assert_matches(profile, reading, dev.values())


async def test_a_connection_lost_mid_request_keeps_the_underlying_error() -> None:
    profile = _small()
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        conn = _tcp(server, timeout=0.3, retries=0)
        async with ModbusDriver(profile, conn, name="dev-1") as drv:
            dev.faults.set(FaultMode.DROP)
            with pytest.raises(errors.ConnectError, match="dev-1") as info:
                await drv.read(profile.points)
            # What pymodbus (or the timeout) reported stays visible in the traceback.
            assert info.value.__cause__ is not None


async def test_nothing_listening_is_a_connect_error() -> None:
    from iiot_common.localservers import free_port

    conn = ModbusConnection(host="127.0.0.1", port=free_port(), timeout=0.5, retries=0)
    drv = ModbusDriver(_small(), conn, name="dev-9")
    with pytest.raises(errors.ConnectError, match="dev-9"):
        await drv.connect()
    with pytest.raises(errors.ConnectError):
        await drv.read(_small().points)
    await drv.aclose()
    await drv.aclose()  # idempotent
    assert _no_pymodbus_tasks()


async def test_nan_from_the_device_is_a_decode_error_not_a_crash() -> None:
    profile = _small()
    dev = _device(profile)
    dev.write("v", math.nan)
    async with _serve({1: dev}) as server:
        async with ModbusDriver(profile, _tcp(server), name="dev-1") as drv:
            reading = await drv.read(profile.points)
    assert reading.errors == {"v": "decode_error"}
    assert set(reading.values) == {"a", "b", "c"}
    assert drv.stats.decode_errors == 1


async def test_create_driver_and_lifecycle_leave_nothing_behind() -> None:
    profile = _small()
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        drv = create_driver(profile, _tcp(server), name="dev-1")
        assert isinstance(drv, ModbusDriver) and isinstance(drv, Driver)
        async with drv:
            await drv.read(profile.points)
            assert open_lines() == 1
        assert open_lines() == 0
        await drv.aclose()
        with pytest.raises(errors.ConnectError):
            await drv.read(profile.points)
    assert _no_pymodbus_tasks()


# --------------------------------------------------------------------------- writes


def _write_profile() -> tuple[Profile, dict[str, Any]]:
    """An rw point of every type in every byte/word order, with the value to write."""
    points: list[dict[str, Any]] = []
    values: dict[str, Any] = {}
    address = 0
    samples = {
        "int16": -12345,
        "uint16": 54321,
        "int32": -123456789,
        "uint32": 3_000_000_000,
        "int64": -(2**62) + 12345,
        "float32": -1234.5,
        "float64": 3.141592653589793,
    }
    orders = [("big", "big"), ("little", "little"), ("big", "little"), ("little", "big")]
    for type_, value in samples.items():
        for bo, wo in orders:
            name = f"{type_}_{bo[0]}{wo[0]}"
            points.append(
                {
                    "name": name,
                    "type": type_,
                    "access": "rw",
                    "modbus": {
                        "table": "holding",
                        "address": address,
                        "byte_order": bo,
                        "word_order": wo,
                    },
                }
            )
            values[name] = value
            address += _SIZES[type_]
    for bo in ("big", "little"):
        name = f"string_{bo}"
        points.append(
            {
                "name": name,
                "type": "string",
                "access": "rw",
                "modbus": {"table": "holding", "address": address, "length": 8, "byte_order": bo},
            }
        )
        values[name] = "SN-2024-ÄB7"
        address += 8
    points.append(
        {
            "name": "scaled",
            "type": "int16",
            "access": "rw",
            "scale": 0.1,
            "offset": -40.0,
            "modbus": {"table": "holding", "address": address},
        }
    )
    values["scaled"] = 23.7
    address += 1
    for bit in (0, 5, 15):
        name = f"flag_{bit}"
        points.append(
            {
                "name": name,
                "type": "bool",
                "access": "rw",
                "modbus": {"table": "holding", "address": address, "bit": bit},
            }
        )
        values[name] = bit != 5
    points.append(
        {"name": "coil", "type": "bool", "access": "rw", "modbus": {"table": "coil", "address": 3}}
    )
    values["coil"] = True
    points.append({"name": "ro", "type": "uint16", "modbus": {"table": "input", "address": 0}})
    return _profile(points, pid="writes"), values


async def test_every_type_and_order_round_trips_through_write_and_read() -> None:
    profile, values = _write_profile()
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        async with ModbusDriver(profile, _tcp(server), name="dev-1") as drv:
            for name, value in values.items():
                await drv.write(profile.point(name), value)
            # A second write of one bit must keep its neighbours (read-modify-write).
            await drv.write(profile.point("flag_5"), True)
            await drv.write(profile.point("flag_5"), False)
            reading = await drv.read(profile.points)
            assert drv.stats.writes == len(values) + 2
    assert reading.errors == {}
    for name, value in values.items():
        got = reading.values[name]
        if name.startswith("float32"):
            assert got == pytest.approx(value, rel=1e-7), name
        elif name == "scaled":
            assert got == pytest.approx(value), name
        else:
            assert got == value, name
        assert dev.values()[name] == pytest.approx(value) if isinstance(value, float) else True


async def test_writing_a_read_only_point_is_refused_before_sending() -> None:
    profile, _ = _write_profile()
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        async with ModbusDriver(profile, _tcp(server), name="dev-1") as drv:
            before = dev.requests
            with pytest.raises(errors.ConfigError, match=r"'ro'.*read-only"):
                await drv.write(profile.point("ro"), 5)
            with pytest.raises(errors.ConfigError, match="int16_bb"):
                await drv.write(profile.point("int16_bb"), 10**9)
            with pytest.raises(errors.ConfigError, match=r"'coil'.*'on'"):
                await drv.write(profile.point("coil"), "on")
            with pytest.raises(errors.ConfigError, match="float64_bb"):
                await drv.write(profile.point("float64_bb"), math.inf)
            assert dev.requests == before


async def _garbage_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A Modbus TCP 'device' that answers every read with one register fewer than asked."""
    try:
        while True:
            head = await reader.readexactly(7)
            tid, _, length, unit = struct.unpack(">HHHB", head)
            pdu = await reader.readexactly(length - 1)
            fc, _, count = struct.unpack(">BHH", pdu[:5])
            data = b"\x00\x07" * (count - 1)
            body = bytes([fc, len(data)]) + data
            writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_a_short_answer_is_a_decode_error_not_a_crash() -> None:
    profile = _small()
    handlers: list[asyncio.Task[None]] = []

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.ensure_future(_garbage_server(reader, writer)))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = ModbusConnection(host="127.0.0.1", port=port, timeout=0.5, retries=0)
    try:
        async with ModbusDriver(profile, conn, name="dev-7") as drv:
            reading = await drv.read([profile.point("a"), profile.point("b")])
            assert reading.values == {}
            assert reading.errors == {"a": "decode_error", "b": "decode_error"}
            assert drv.stats.decode_errors == 1
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.wait_for(asyncio.gather(*handlers), 5)


def test_a_connection_given_as_a_mapping_is_validated_with_the_device_named() -> None:
    drv = ModbusDriver(_small(), {"host": "10.0.0.5", "port": 5020, "unit": 3}, name="dev-3")
    assert drv.connection.port == 5020 and drv.unit == 3
    with pytest.raises(errors.ConfigError, match=r"device 'dev-4'.*baudrate"):
        ModbusDriver(
            _small(), {"transport": "rtu", "serial_port": "/dev/x", "baudrate": 0}, name="dev-4"
        )


async def test_a_pause_longer_than_the_timeout_is_not_a_timeout() -> None:
    # Slow RTU devices need a quiet line between requests; the wait is not the answer's.
    profile = _small()
    dev = _device(profile)
    async with _serve({1: dev}) as server:
        conn = _tcp(server, timeout=0.3, pause=0.35)
        async with ModbusDriver(profile, conn, name="dev-1") as drv:
            assert len(drv.plan_for(profile.points)) > 1
            _assert_matches(profile, await drv.read(profile.points), dev.values())
            assert drv.stats.timeouts == 0


def _crc16(data: bytes) -> bytes:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


async def test_rtu_late_answer_is_never_taken_for_the_next_request() -> None:
    """RTU frames carry no transaction id: after a timeout, a late answer must be dropped."""
    late_once = {"done": False}
    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            tasks.add(me)
        while True:
            try:
                req = await reader.readexactly(8)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            unit, fc, addr, count = struct.unpack(">BBHH", req[:6])
            body = bytes([unit, fc, 2 * count]) + struct.pack(
                f">{count}H", *[1000 + addr + i for i in range(count)]
            )
            frame = body + _crc16(body)
            delay = 0.05
            if addr == 100 and not late_once["done"]:
                late_once["done"] = True
                delay = 0.6  # answered after the driver's timeout

            async def answer(frame: bytes = frame, delay: float = delay) -> None:
                await asyncio.sleep(delay)
                if not writer.is_closing():
                    writer.write(frame)

            t = asyncio.create_task(answer())
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    prof = parse_profile(
        {
            "id": "late-rtu",
            "name": "t",
            "name_zh": "t",
            "family": "other",
            "category": "intelligent",
            "protocol": "modbus",
            "points": [
                {"name": "a", "type": "uint16", "modbus": {"table": "holding", "address": 0}},
                {"name": "b", "type": "uint16", "modbus": {"table": "holding", "address": 100}},
            ],
        }
    )
    conn = ModbusConnection(
        transport="rtu-over-tcp", host="127.0.0.1", port=port, timeout=0.4, retries=0
    )
    drv = ModbusDriver(prof, conn, name="late-1")
    try:
        await drv.connect()
        readings = [await drv.read(prof.points) for _ in range(5)]
    finally:
        await drv.aclose()
        server.close()
        await server.wait_closed()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert readings[0].errors == {"b": "timeout"}
    for r in readings:
        # Every value read is the value of its own register, never the other block's.
        assert r.values.get("a", 1000) == 1000
        assert r.values.get("b", 1100) == 1100
    assert readings[-1].values == {"a": 1000, "b": 1100}
