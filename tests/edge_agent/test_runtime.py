"""``iiot agent run``'s process: the event loop it runs on, and its open-file limit."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
import yaml

from device_profiles.loader import load_profiles
from edge_agent.runtime import FILES_PER_AGENT
from iiot_common.localservers import Mosquitto, free_port
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import Subscriber, agent_dict, modbus_device
from tests.waiting import wait_for

_IIOT = [str(Path(sys.executable).parent / "iiot")]


def _limit(soft: int, hard: int) -> Callable[[], None]:
    """For ``preexec_fn``: the child starts with these open-file limits."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def _spawn(
    config: Path, log: BinaryIO, opts: list[str], preexec: Callable[[], None] | None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IIOT_AGENT_LOOP", None)
    return subprocess.Popen(
        [*_IIOT, "agent", "run", "-c", str(config), *opts],
        stderr=log,
        env=env,
        preexec_fn=preexec,
    )


async def _run_until_started(
    tmp_path: Path,
    cfg: dict[str, object],
    opts: list[str],
    preexec: Callable[[], None] | None = None,
    until: Callable[[], bool] | None = None,
) -> str:
    """Run the agent until it has started (and ``until`` holds), SIGTERM it; its log."""
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = _spawn(config, log, opts, preexec)
        try:
            await wait_for(lambda: "agent started" in log_path.read_text(), 30, "agent started")
            if until is not None:
                await wait_for(until, 20, "the agent's work")
            proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: proc.poll() is not None, 20, "the agent to exit")
            assert proc.returncode == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    return log_path.read_text()


@pytest.mark.parametrize(("opts", "loop"), [([], "uvloop"), (["--loop", "asyncio"], "asyncio")])
async def test_the_agent_runs_on_uvloop_unless_told_to_use_asyncio(
    tmp_path: Path, mosquitto: Mosquitto, opts: list[str], loop: str
) -> None:
    profiles = load_profiles()
    sim = ModbusSimServer(
        {1: SimDevice(profiles["kiln-rotary-cement"], device_id="k", seed=1)}, port=0
    )
    await sim.start()
    devices = [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.1)]
    try:
        with Subscriber(mosquitto.port) as sub:
            text = await _run_until_started(
                tmp_path,
                agent_dict(tmp_path, mosquitto.port, devices),
                opts,
                until=lambda: len(sub.samples("kiln-1")) >= 5,
            )
            assert sub.bad == []
    finally:
        await sim.stop()
    assert f"agent runtime loop={loop}" in text
    assert "Traceback" not in text


async def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.fail(f"this test needs a finite hard open-file limit of 512 or more, not {hard}")
    text = await _run_until_started(
        tmp_path, agent_dict(tmp_path, free_port(), []), [], preexec=_limit(256, hard)
    )
    assert f"open_file_limit={hard}" in text
    assert "open-file limit too low" not in text


async def test_a_hard_limit_too_low_for_the_devices_is_said_once(tmp_path: Path) -> None:
    devices = 80
    limit = devices + FILES_PER_AGENT - 10
    cfg = agent_dict(
        tmp_path,
        free_port(),
        [
            modbus_device(f"dev-{i}", "kiln-rotary-cement", free_port(), interval=5.0)
            for i in range(devices)
        ],
    )
    text = await _run_until_started(tmp_path, cfg, [], preexec=_limit(limit, limit))
    warnings = [line for line in text.splitlines() if "open-file limit too low" in line]
    assert len(warnings) == 1, text
    assert f"limit={limit}" in warnings[0]
    assert f"needed={devices + FILES_PER_AGENT}" in warnings[0]
    assert f"devices={devices}" in warnings[0]
