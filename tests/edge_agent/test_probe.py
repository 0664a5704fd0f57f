"""``probe`` names the right profile for simulated devices of shipped Modbus profiles."""

from __future__ import annotations

import asyncio
import sys

import pytest

from device_profiles.loader import load_profiles
from edge_agent.probe import probe_device
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer

_PROBED = ["kiln-rotary-cement", "boiler-steam-coal", "pv-inverter-sunspec", "genset-diesel"]


@pytest.mark.parametrize("profile_id", _PROBED)
async def test_probe_identifies_the_simulated_model(profile_id: str) -> None:
    profiles = load_profiles()
    prof = profiles[profile_id]
    unit = prof.modbus.default_unit if prof.modbus else 1
    sim = ModbusSimServer({unit: SimDevice(prof, device_id="x", seed=4)}, port=0)
    await sim.start()
    try:
        results = await probe_device(
            list(profiles), host="127.0.0.1", port=sim.port, request_timeout=0.5
        )
    finally:
        await sim.stop()
    fits = [r.profile.id for r in results if r.fits]
    assert fits and fits[0] == profile_id, [(r.profile.id, r.score, r.error) for r in results]


async def test_probe_command_prints_the_best_fit_and_exits_1_without_one() -> None:
    profiles = load_profiles()
    sim = ModbusSimServer(
        {1: SimDevice(profiles["kiln-rotary-cement"], device_id="k", seed=1)}, port=0
    )
    await sim.start()
    code = "import typer; from edge_agent.probe import probe; typer.run(probe)"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, "--host", "127.0.0.1", "--port", str(sim.port),
            "--unit", "1", "--timeout", "0.3",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "best fit: kiln-rotary-cement" in out.decode()
        # A unit id nobody answers: nothing fits.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, "--host", "127.0.0.1", "--port", str(sim.port),
            "--unit", "9", "--timeout", "0.2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 1, out.decode() + err.decode()
        assert "no known profile fits" in out.decode()
    finally:
        await sim.stop()
