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


_INTERVAL = 1.0  # every unit's poll interval
_PROBE_MAX = 3.0  # the dead unit's longest wait between probes
# The dead unit ticks at phase 0; the live units just after it, where a probe that held the
# line for the dead unit's whole timeout (0.8 s) would make every one of them late.
_PHASES = {4: 0.0, 1: 0.25, 2: 0.4, 3: 0.55}


def _cycle(t: float, start: float, phase: float) -> tuple[int, float]:
    """The poll cycle a request at ``t`` belongs to, and how long after its tick it came."""
    k, late = divmod(t - start - phase * _INTERVAL, _INTERVAL)
    return int(k), late


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


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
                    "poll_interval": _INTERVAL,
                    "points": _POINTS,
                    "probe_max": _PROBE_MAX,
                    "modbus": {
                        "transport": "rtu",
                        "serial_port": pty_pair.b,
                        "baudrate": 19200,
                        "unit": u,
                        "timeout": 0.8,
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
            phase=phase,
        )
        for u, phase in _PHASES.items()
    ]
    t0 = time.monotonic()
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    try:
        dead = pollers[0]
        await wait_for(lambda: dead.probing, 15, "the silent unit to be probed on backoff")
        # Whole cycles from the one after the last full timeout: only probes in them.
        first = _cycle(time.monotonic(), t0, 0.0)[0] + 1
        await asyncio.sleep(16 * _INTERVAL)
        revived = time.monotonic()
        last = _cycle(revived, t0, 0.0)[0]  # the cycle under way is left out
        line.add_unit(4)
        await wait_for(lambda: states["unit-4"][-1][1], 30, "unit 4 back online")
        back = states["unit-4"][-1][0] - revived
    finally:
        for p in pollers:
            p.stop()
        await asyncio.gather(*tasks)
        line.stop()
    cycles = range(first, last)
    probed = {k for k in (_cycle(t, t0, 0.0)[0] for t in line.requests.get(4, [])) if k in cycles}
    # How late each live unit's request reached the line, in cycles with and without a probe.
    plain: dict[int, list[float]] = {}
    after_probe: dict[int, list[float]] = {}
    for u in (1, 2, 3):
        for k, late in (_cycle(t, t0, _PHASES[u]) for t in line.requests[u]):
            if k in cycles:
                (after_probe if k in probed else plain).setdefault(u, []).append(late)
    for u in (1, 2, 3):
        polled = len(plain.get(u, [])) + len(after_probe.get(u, []))
        assert polled >= 0.8 * len(cycles), f"unit {u} polled in {polled} of {len(cycles)} cycles"
    assert len(probed) <= 0.6 * len(cycles), f"the dead unit was probed in {len(probed)} cycles"
    # The dead unit's effect: lateness after a probe beyond what the unit's other polls show
    # on this machine at this moment (its baseline, measured alongside).
    effect = [late - _median(plain[u]) for u, lates in after_probe.items() for late in lates]
    noise = max(late for lates in plain.values() for late in lates)
    print(f"{len(cycles)} cycles, {len(probed)} with a probe; live units' lateness: median "
          f"{_median([x for v in plain.values() for x in v]):.3f} s, worst {noise:.3f} s; "
          f"added after a probe: median {_median(effect) if effect else 0.0:.3f} s; back online "
          f"{back:.2f} s after answering")  # fmt: skip
    assert effect, "the dead unit was never probed"
    assert _median(effect) < 0.2, f"a probe made the live units {_median(effect):.3f} s late"
    # Answering again, it is back within the configured longest backoff, a tick and a probe
    # (plus the worst scheduling delay this machine showed the live units meanwhile).
    step = _PROBE_MAX + _INTERVAL + dead.device.probe_limit
    assert back <= step + 0.5 + noise, f"back online {back:.2f} s after answering"
