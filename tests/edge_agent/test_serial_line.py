"""The agent's pollers on a real serial line (a socat pty pair): open errors, dead units."""

from __future__ import annotations

import asyncio
import logging
import termios
import time
from typing import Any

import pytest
import serial
from modbus_tk import defines as mtk
from modbus_tk import hooks, modbus_rtu

from device_profiles.loader import load_profiles
from edge_agent.config import DeviceConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.poller import DevicePoller
from iiot_common.backoff import Backoff
from iiot_common.localservers import PtyPair
from protocols.driver import create_driver
from tests.waiting import wait_for


def _pty_refuses_parity(tty: str) -> bool:
    """Whether this kernel's pseudo-terminals refuse even parity (Linux ptys do)."""
    port = serial.Serial(tty, timeout=0)
    try:
        attrs = termios.tcgetattr(port.fd)
        attrs[2] |= termios.PARENB
        termios.tcsetattr(port.fd, termios.TCSANOW, attrs)
        return not termios.tcgetattr(port.fd)[2] & termios.PARENB
    except termios.error:
        return True
    finally:
        port.close()


def _rtu_device(dev_id: str, tty: str, unit: int, **modbus: Any) -> DeviceConfig:
    return DeviceConfig.model_validate(
        {
            "id": dev_id,
            "profile": "kiln-rotary-cement",
            "poll_interval": modbus.pop("interval", 0.2),
            "modbus": {
                "transport": "rtu",
                "serial_port": tty,
                "unit": unit,
                "timeout": modbus.pop("timeout", 0.3),
                "retries": 0,
                **modbus,
            },
        }
    )


async def test_line_that_cannot_be_configured_is_connect_failed_once_and_released(
    pty_pair: PtyPair, caplog: pytest.LogCaptureFixture
) -> None:
    if not _pty_refuses_parity(pty_pair.b):
        pytest.skip("this kernel's ptys accept parity: no port here refuses the settings")
    caplog.set_level(logging.INFO, logger="iiot")
    states: list[tuple[bool, str]] = []
    poller = DevicePoller(
        _rtu_device("kiln-1", pty_pair.b, 1, parity="E"),
        load_profiles()["kiln-rotary-cement"],
        driver_factory=create_driver,
        on_sample=lambda d, r: None,
        on_state=lambda d, on, why: states.append((on, why)),
        metrics=AgentMetrics(),
        backoff=Backoff(0.05, 0.1),
    )
    task = asyncio.create_task(poller.run())
    try:
        await wait_for(lambda: poller.health.polls >= 6, 10, "several open attempts")
        # Between attempts nobody holds the port: another program may open it.
        for _ in range(50):
            try:
                serial.Serial(pty_pair.b, exclusive=True, timeout=0).close()
                break
            except serial.SerialException:
                await asyncio.sleep(0.02)
        else:
            pytest.fail("the port stayed locked after the failed opens")
    finally:
        poller.stop()
        await task
    assert len(states) == 1
    online, reason = states[0]
    assert not online
    assert reason.startswith("connect_failed: the port refused 9600 baud, 8 data bits, parity E")
    warned = [r for r in caplog.records if r.getMessage() == "device poll failed"]
    assert len(warned) == 1
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Could not exclusively lock port" not in caplog.text


_POINTS = ["burning_zone_temp", "transition_zone_temp", "inlet_temp"]  # input regs 0..6


class _TkLine:
    """A modbus-tk RTU slave on one end of the pty pair, serving units; records requests."""

    def __init__(self, tty: str, baudrate: int) -> None:
        self.port = serial.Serial(tty, baudrate=baudrate)
        self.server = modbus_rtu.RtuServer(self.port, error_on_missing_slave=False)
        self.requests: dict[int, list[float]] = {}
        hooks.install_hook("modbus_rtu.RtuServer.after_read", self._seen)

    def _seen(self, args: tuple[Any, bytes]) -> None:
        _server, request = args  # every frame read off the line, answered or not
        if request:
            self.requests.setdefault(request[0], []).append(time.monotonic())

    def add_unit(self, unit: int) -> None:
        slave = self.server.add_slave(unit)
        slave.add_block("in", mtk.READ_INPUT_REGISTERS, 0, 16)
        slave.set_values("in", 0, [0x42C8, 0, 0x4316, 0, 0x4348, 0, 250, 0])

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        hooks.uninstall_hook("modbus_rtu.RtuServer.after_read", self._seen)
        self.server.stop()
        self.port.close()


def _lateness(arrivals: list[float], start: float, interval: float) -> list[float]:
    """How long after its scheduled tick each request reached the unit."""
    return [(t - start) % interval for t in arrivals]


async def test_dead_unit_on_a_shared_line_is_probed_on_backoff_without_delaying_others(
    pty_pair: PtyPair,
) -> None:
    line = _TkLine(pty_pair.a, 19200)
    for unit in (1, 2, 3):  # unit 4 is silent: nothing answers for it
        line.add_unit(unit)
    line.start()
    profile = load_profiles()["kiln-rotary-cement"]
    states: dict[str, list[tuple[float, bool, str]]] = {}
    metrics = AgentMetrics()
    pollers = [
        DevicePoller(
            DeviceConfig.model_validate(
                {
                    "id": f"unit-{u}",
                    "profile": "kiln-rotary-cement",
                    "poll_interval": 2.0,
                    "points": _POINTS,
                    "probe_max": 4.0,
                    "modbus": {
                        "transport": "rtu",
                        "serial_port": pty_pair.b,
                        "baudrate": 19200,
                        "unit": u,
                        "timeout": 1.0,
                        "retries": 0,
                    },
                }
            ),
            profile,
            driver_factory=create_driver,
            on_sample=lambda d, r: None,
            on_state=lambda d, on, why: states.setdefault(d, []).append(
                (time.monotonic(), on, why)
            ),
            metrics=metrics,
            phase=i / 4,
        )
        for i, u in enumerate((4, 1, 2, 3))
    ]
    t0 = time.monotonic()
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    try:
        dead = pollers[0]
        await wait_for(lambda: dead.probing, 15, "the silent unit to be probed on backoff")
        steady = time.monotonic()
        await asyncio.sleep(24.0)
        revived = time.monotonic()
        line.add_unit(4)
        step = dead.probe_backoff.maximum + dead.device.poll_interval + dead.device.probe_limit
        await wait_for(lambda: states["unit-4"][-1][1], step + 1.0, "unit 4 back online")
        back = states["unit-4"][-1][0] - revived
    finally:
        for p in pollers:
            p.stop()
        await asyncio.gather(*tasks)
        line.stop()
    probes = [t for t in line.requests.get(4, []) if steady <= t < revived]
    late: list[float] = []
    for p, u in zip(pollers[1:], (1, 2, 3), strict=True):
        arrivals = [t for t in line.requests[u] if steady <= t < revived]
        assert len(arrivals) >= 10, f"unit {u} polled {len(arrivals)} times"
        late += _lateness(arrivals, t0 + p.phase * 2.0, 2.0)
    late.sort()
    p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
    print(f"live units: {len(late)} polls, lateness p50 {late[len(late) // 2]:.3f} s, "
          f"p99 {p99:.3f} s; dead unit: {len(probes)} probes in {revived - steady:.0f} s; "
          f"back online {back:.2f} s after answering")  # fmt: skip
    assert p99 < 0.2, f"live units' poll start p99 {p99:.3f} s late (interval 2 s)"
    assert len(probes) <= (revived - steady) / 2.0, "the dead unit was probed every cycle"
    assert back <= step + 0.5
