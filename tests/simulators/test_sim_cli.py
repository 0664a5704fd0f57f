"""``iiot sim run`` and ``iiot sim plant`` as a user runs them: real processes, real clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import serial
from asyncua import Client as OpcUaClient
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from device_profiles.loader import load_profiles
from device_profiles.schema import Profile
from iiot_common.localservers import PtyPair, free_port
from protocols.modbus.profile import ModbusTable, point_registers
from tests.simulators.test_plant import EXAMPLE, free_base_and_port

IIOT = str(Path(sys.executable).with_name("iiot"))


class _Sim:
    """A running ``iiot sim`` process and the endpoints file it wrote."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        self.endpoints_file = tmp_path / "endpoints.json"
        self.out = (tmp_path / "stdout.txt").open("w+b")
        self.err = (tmp_path / "stderr.txt").open("w+b")
        self.proc = subprocess.Popen(
            [IIOT, "sim", *args, "--endpoints-out", str(self.endpoints_file)],
            stdout=self.out,
            stderr=self.err,
        )

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"iiot sim exited {self.proc.returncode}: {self.stderr()}")
            if self.endpoints_file.exists():
                doc: dict[str, Any] = json.loads(self.endpoints_file.read_text())
                return doc
            time.sleep(0.05)
        raise AssertionError(f"iiot sim not ready after {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read().decode(errors="replace")

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def close(self) -> None:
        self.terminate()
        self.out.close()
        self.err.close()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Any]:
    started: list[_Sim] = []

    def _start(*args: str) -> _Sim:
        s = _Sim(list(args), tmp_path)
        started.append(s)
        return s

    yield _start
    for s in started:
        s.close()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IIOT, "sim", *args], capture_output=True, text=True, timeout=60, check=False
    )


async def _read_input(
    port: int, unit: int = 1, *, wait: float = 2.0, profile: Profile | None = None
) -> Any:
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=port, timeout=wait, retries=0, reconnect_delay=0
    )
    try:
        assert await client.connect()
        if profile is None:
            return await client.read_input_registers(0, count=2, device_id=unit)
        # The first register point of the profile (SunSpec maps start at holding 40000).
        point = next(p for p in profile.points if p.modbus and not p.modbus.table.is_bit_table)
        assert point.modbus is not None
        read = (
            client.read_input_registers
            if point.modbus.table is ModbusTable.INPUT
            else client.read_holding_registers
        )
        return await read(point.modbus.address, count=point_registers(point), device_id=unit)
    finally:
        client.close()


async def test_sim_run_serves_devices_and_obeys_the_control_api(sim: Any) -> None:
    port, control = free_base_and_port(3)
    s = sim(
        "run",
        "--profile",
        "kiln-rotary-cement",
        "--count",
        "3",
        "--port",
        str(port),
        "--seed",
        "5",
        "--fault",
        "2:exception",
        "--control-port",
        str(control),
    )
    doc = s.wait_ready()
    ids = ["kiln-rotary-cement-0", "kiln-rotary-cement-1", "kiln-rotary-cement-2"]
    assert sorted(doc["devices"]) == ids
    assert [doc["devices"][i]["port"] for i in ids] == [port, port + 1, port + 2]
    assert not (await _read_input(port)).isError()
    rr = await _read_input(port + 2)
    assert rr.isError() and rr.exception_code == 4
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{control}", timeout=5) as http:
        listed = (await http.get("/devices")).json()
        assert [d["id"] for d in listed] == ids
        assert listed[2]["fault"]["mode"] == "exception"
        r = await http.put(f"/devices/{ids[1]}/fault", json={"mode": "silent"})
        assert r.status_code == 200
        with pytest.raises(ModbusIOException):
            await _read_input(port + 1, wait=0.3)
        assert (await http.delete(f"/devices/{ids[1]}/fault")).status_code == 200
        assert not (await _read_input(port + 1)).isError()
        r = await http.get(f"/devices/{ids[1]}")
        assert r.json()["requests"] == 2
    assert s.terminate() == 0
    assert "kiln-rotary-cement-2" in s.stdout() and "stopped" in s.stdout()


async def test_sim_run_units_serves_a_gateway_on_one_port(sim: Any) -> None:
    port = free_port()
    s = sim("run", "--profile", "boiler-steam-coal", "--count", "2", "--port", str(port), "--units")
    doc = s.wait_ready()
    units = {d["unit"] for d in doc["devices"].values()}
    assert units == {1, 2} and {d["port"] for d in doc["devices"].values()} == {port}
    assert not (await _read_input(port, 1)).isError()
    assert not (await _read_input(port, 2)).isError()
    rr = await _read_input(port, 3)
    assert rr.isError() and rr.exception_code == 0x0B
    assert s.terminate() == 0


async def test_sim_run_serial_line_serves_rtu_units(sim: Any, pty_pair: PtyPair) -> None:
    s = sim("run", "--profile", "motor-hv-drive", "--count", "2", "--serial", pty_pair.a)
    doc = s.wait_ready()
    assert {d["serial_port"] for d in doc["devices"].values()} == {pty_pair.a}
    client = AsyncModbusSerialClient(pty_pair.b, baudrate=19200, timeout=1.0, retries=0)
    try:
        assert await client.connect()
        for unit in (1, 2):
            rr = await client.read_input_registers(0, count=2, device_id=unit)
            assert not rr.isError()
    finally:
        client.close()
    assert s.terminate() == 0


def _line_settings(tty: str) -> tuple[int, str, int]:
    """(baud rate, parity, stop bits) the serial line is configured with right now."""
    fd = os.open(tty, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        _i, _o, cflag, _l, _ispeed, ospeed, _cc = termios.tcgetattr(fd)
    finally:
        os.close(fd)
    bauds = {termios.B9600: 9600, termios.B19200: 19200, termios.B38400: 38400}
    parity = "N"
    if cflag & termios.PARENB:
        parity = "O" if cflag & termios.PARODD else "E"
    return bauds.get(ospeed, -1), parity, 2 if cflag & termios.CSTOPB else 1


@pytest.mark.parametrize(("baud", "parity", "stopbits"), [(9600, "N", 1), (38400, "N", 2)])
async def test_sim_run_serial_line_settings_are_options(
    sim: Any, pty_pair: PtyPair, baud: int, parity: str, stopbits: int
) -> None:
    s = sim(
        "run", "--profile", "motor-hv-drive", "--count", "2", "--serial", pty_pair.a,
        "--baudrate", str(baud), "--parity", parity, "--stopbits", str(stopbits),
    )  # fmt: skip
    s.wait_ready()
    # A pty carries bytes whatever its settings, so check that the simulator set them.
    assert _line_settings(pty_pair.a) == (baud, parity, stopbits)
    client = AsyncModbusSerialClient(
        pty_pair.b, baudrate=baud, parity=parity, stopbits=stopbits, timeout=1.0, retries=0
    )
    try:
        assert await client.connect()
        assert _line_settings(pty_pair.b) == (baud, parity, stopbits)
        for unit in (1, 2):
            rr = await client.read_input_registers(0, count=2, device_id=unit)
            assert not rr.isError()
    finally:
        client.close()
    assert s.terminate() == 0


def _pty_takes_parity(tty: str) -> bool:
    """Whether this kernel's pseudo-terminals accept even parity (many refuse it)."""
    try:
        port = serial.Serial(tty, parity="E", timeout=0)
    except (termios.error, serial.SerialException):
        return False
    try:
        port.timeout = 0.1  # reapplies the settings: the refusal may come only now
    except termios.error:
        return False
    finally:
        port.close()
    return True


async def test_sim_run_serial_parity_is_applied_or_refused_plainly(
    sim: Any, pty_pair: PtyPair
) -> None:
    if _pty_takes_parity(pty_pair.a):
        s = sim("run", "--profile", "motor-hv-drive", "--serial", pty_pair.a, "--parity", "E")
        s.wait_ready()
        assert _line_settings(pty_pair.a) == (19200, "E", 1)
        client = AsyncModbusSerialClient(pty_pair.b, parity="E", timeout=1.0, retries=0)
        try:
            assert await client.connect()
            rr = await client.read_input_registers(0, count=2, device_id=1)
            assert not rr.isError()
        finally:
            client.close()
        assert s.terminate() == 0
        return
    proc = await asyncio.to_thread(
        subprocess.run,
        [IIOT, "sim", "run", "--profile", "motor-hv-drive", "--serial", pty_pair.a,
         "--parity", "E"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"cannot open {pty_pair.a} with 19200 baud, parity E" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sim_run_rejects_an_unknown_parity(tmp_path: Path) -> None:
    proc = subprocess.run(
        [IIOT, "sim", "run", "--profile", "motor-hv-drive", "--serial", str(tmp_path / "tty"),
         "--parity", "X"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "parity" in proc.stderr and "Traceback" not in proc.stderr


async def test_sim_plant_serves_the_example_site(sim: Any) -> None:
    profiles = load_profiles()
    base, control = free_base_and_port(20)
    s = sim(
        "plant",
        "--config",
        str(EXAMPLE),
        "--base-port",
        str(base),
        "--control-port",
        str(control),
    )
    doc = s.wait_ready(timeout=60)
    devices = doc["devices"]
    off = {e["device"] for e in doc["ledger"] if not e["on"]}
    assert off and off.isdisjoint(devices)
    assert len(doc["ledger"]) == len(devices) + len(off)
    modbus = [d for d in devices.values() if d["protocol"] == "modbus"]
    for d in modbus:
        rr = await _read_input(d["port"], d["unit"], profile=profiles[d["profile"]])
        assert not rr.isError(), f"{d['device']}: {rr}"
    opcua = [d for d in devices.values() if d["protocol"] == "opcua"]
    assert opcua
    for d in opcua:
        async with OpcUaClient(d["url"], timeout=5) as client:
            objects = await client.nodes.objects.get_children()
            assert len(objects) > 1  # the device's own objects beside the Server object
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{control}", timeout=5) as http:
        listed = {d["id"] for d in (await http.get("/devices")).json()}
        assert listed == set(devices)
    table = s.stdout()
    for name in ("sjz-kiln-1", "ts-boiler-gas-1", "opc.tcp://"):
        assert name in table
    assert "zjk-wt-03" in table  # listed as ledger-only
    assert "served but in no agent configuration: zjk-genset-2" in table
    assert s.terminate() == 0


def test_bad_plant_file_exits_2_naming_file_and_device(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "enterprises:\n"
        "  - {id: e1, name: W, region: '130102', industry: C30,\n"
        "     devices: [{id: k1, profile: kiln-rotary-cement, wheels: 4}]}\n"
    )
    r = _run("plant", "--config", str(bad))
    assert r.returncode == 2
    assert str(bad) in r.stderr and "device 'k1'" in r.stderr and "wheels" in r.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--profile", "no-such"], "unknown profile 'no-such'"),
        (["--profile", "kiln-rotary-cement", "--fault", "0:melting"], "unknown mode 'melting'"),
        (["--profile", "kiln-rotary-cement", "--fault", "5:silent"], "no device 5"),
        (["--profile", "kiln-rotary-cement", "--fault", "0:slow:soon"], "'soon' is not a delay"),
    ],
)
def test_bad_sim_run_options_exit_2_with_the_reason(args: list[str], expected: str) -> None:
    r = _run("run", "--port", str(free_port()), *args)
    assert r.returncode == 2
    assert expected in r.stderr


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _run("run", "--profile", "kiln-rotary-cement", "--port", str(port))
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr
