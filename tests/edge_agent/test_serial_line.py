"""The agent's pollers on a real serial line (a socat pty pair): open errors, dead units."""

from __future__ import annotations

import asyncio
import logging
import termios
from typing import Any

import pytest
import serial

from device_profiles.loader import load_profiles
from edge_agent.config import DeviceConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.poller import DevicePoller
from iiot_common.backoff import Backoff
from protocols.driver import create_driver
from tests.edge_agent.helpers import wait_for
from tests.servers import PtyPair


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
