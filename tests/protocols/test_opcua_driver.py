"""The OPC UA driver against the project's OPC UA simulator on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from device_profiles.loader import load_profiles
from device_profiles.schema import Profile, ValueType
from protocols import errors
from protocols.driver import Driver, Reading, create_driver
from protocols.opcua.config import OpcUaConnection
from protocols.opcua.driver import OpcUaDriver
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.opcua_server import OpcUaSimServer
from tests.opcua_profiles import SHIPPED, press_profile
from tests.waiting import wait_for

_POINTS: list[dict[str, Any]] = [
    {"name": "force", "unit": "kN", "type": "float32", "range": [0, 500],
     "opcua": {"browse_path": "2:Machine/2:Monitoring/2:Ram/2:Force"}},
    {"name": "strokes", "type": "uint32", "range": [0, 1000000],
     "opcua": {"browse_path": "2:Machine/2:Production/2:Strokes"}},
    {"name": "temp", "unit": "degC", "type": "int16", "scale": 0.1, "offset": -5.0,
     "range": [-20, 120], "opcua": {"node_id": "ns=2;i=1001"}},
    {"name": "setpoint", "unit": "kN", "type": "float64", "range": [0, 500], "access": "rw",
     "deadband": 5, "opcua": {"node_id": "ns=2;s=Press.Setpoint"}},
    {"name": "speed_limit", "unit": "mm/s", "type": "uint16", "scale": 0.1, "range": [0, 500],
     "access": "rw", "opcua": {"browse_path": "2:Machine/2:Control/2:SpeedLimit"}},
    {"name": "enabled", "type": "bool", "access": "rw",
     "opcua": {"node_id": "ns=2;s=Press.Enabled"}},
    {"name": "program", "type": "string", "opcua": {"node_id": "ns=2;s=Press.Program"}},
]  # fmt: skip
PRESS = press_profile(_POINTS)


def _frozen(profile: Profile) -> SimDevice:
    """A device whose simulation clock stands still: its values only change when written."""
    return SimDevice(profile, device_id="dev-1", seed=7, clock=lambda: 100.0)


@contextlib.asynccontextmanager
async def _serving(device: SimDevice, **kwargs: Any) -> AsyncIterator[OpcUaSimServer]:
    kwargs.setdefault("update_interval", 0.05)
    sim = OpcUaSimServer(device, port=0, **kwargs)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def _conn(sim: OpcUaSimServer, **kwargs: Any) -> OpcUaConnection:
    kwargs.setdefault("timeout", 1.0)
    return OpcUaConnection(endpoint=sim.endpoint, **kwargs)


def _assert_matches(profile: Profile, reading: Reading, expected: dict[str, Any]) -> None:
    assert reading.errors == {}
    assert reading.quality == {}
    assert set(reading.values) == {p.name for p in profile.points}
    for p in profile.points:
        got, want = reading.values[p.name], expected[p.name]
        if p.type in (ValueType.FLOAT32, ValueType.FLOAT64):
            rel = 1e-6 if p.type is ValueType.FLOAT32 else 1e-12
            assert isinstance(got, float), (p.name, got)
            assert math.isclose(got, want, rel_tol=rel, abs_tol=1e-9), (p.name, got, want)
        elif p.scale != 1.0 or p.offset != 0.0:
            # Integers on the wire: the engineering value is exact to one raw step.
            assert abs(got - want) <= abs(p.scale) / 2 + 1e-9, (p.name, got, want)
        else:
            assert got == want and type(got) is type(want), (p.name, got, want)


@pytest.mark.parametrize("profile_id", SHIPPED)
async def test_reads_every_point_of_shipped_profiles_as_the_device_holds_them(
    profile_id: str,
) -> None:
    profile = load_profiles()[profile_id]
    device = _frozen(profile)
    async with _serving(device) as sim:
        driver = create_driver(profile, _conn(sim), name="dev-1")
        assert isinstance(driver, Driver)
        async with driver:
            reading = await driver.read(profile.points)
        _assert_matches(profile, reading, device.values())
        assert reading.ts > 0


async def test_browse_path_and_node_id_addressing_with_scale() -> None:
    device = _frozen(PRESS)
    async with _serving(device) as sim, OpcUaDriver(PRESS, _conn(sim), name="press-1") as driver:
        reading = await driver.read(PRESS.points)
        _assert_matches(PRESS, reading, device.values())
        # The driver found the same nodes the simulator serves, by path and by NodeId.
        assert driver.node_ids == sim.node_ids
        # A subset is read as asked.
        part = await driver.read([PRESS.point("temp"), PRESS.point("force")])
        assert set(part.values) == {"temp", "force"}


async def test_profile_namespace_is_found_at_another_index() -> None:
    device = _frozen(PRESS)
    extra = ["urn:vendor:a", "urn:vendor:b"]
    async with _serving(device, extra_namespaces=extra) as sim:
        assert sim.namespace_index == 4
        async with OpcUaDriver(PRESS, _conn(sim), name="press-1") as driver:
            assert driver.namespace_index == 4
            reading = await driver.read(PRESS.points)
            _assert_matches(PRESS, reading, device.values())
            await driver.write(PRESS.point("setpoint"), 42.0)
            assert device.values()["setpoint"] == 42.0


async def test_write_round_trip_reverses_scale_and_checks_access() -> None:
    device = _frozen(PRESS)
    async with _serving(device) as sim, OpcUaDriver(PRESS, _conn(sim), name="press-1") as driver:
        await driver.write(PRESS.point("speed_limit"), 123.4)
        await driver.write(PRESS.point("enabled"), True)
        await driver.write(PRESS.point("setpoint"), 250.5)
        assert device.values()["speed_limit"] == pytest.approx(123.4)
        assert device.values()["enabled"] is True
        assert device.values()["setpoint"] == 250.5
        reading = await driver.read(PRESS.points)
        assert reading.values["speed_limit"] == pytest.approx(123.4)
        assert reading.values["enabled"] is True
        assert reading.values["setpoint"] == 250.5
        with pytest.raises(errors.ConfigError, match="'temp' is read-only"):
            await driver.write(PRESS.point("temp"), 20.0)
        with pytest.raises(errors.ConfigError, match="does not fit a uint16"):
            await driver.write(PRESS.point("speed_limit"), 7000.0)
        with pytest.raises(errors.ConfigError, match="expected a bool"):
            await driver.write(PRESS.point("enabled"), "yes")
        assert driver.stats.writes == 3


async def test_bad_status_goes_to_errors_with_its_name() -> None:
    device = _frozen(PRESS)
    async with _serving(device) as sim, OpcUaDriver(PRESS, _conn(sim), name="press-1") as driver:
        device.faults.set(FaultMode.EXCEPTION)

        async def failed() -> bool:
            return bool((await driver.read(PRESS.points)).errors)

        await wait_for(failed, what="BadDeviceFailure")
        reading = await driver.read(PRESS.points)
        assert reading.values == {}
        assert reading.errors == {p.name: "BadDeviceFailure" for p in PRESS.points}
        assert driver.stats.bad_status["BadDeviceFailure"] >= len(PRESS.points)
        device.faults.clear()
        await wait_for(lambda: _is(driver, ok=True), what="good values again")


async def test_uncertain_value_is_kept_with_its_quality() -> None:
    device = _frozen(PRESS)
    # No updates during the test: the value a client wrote stays as written.
    async with _serving(device, update_interval=600) as sim:
        other = Client(sim.endpoint, timeout=2.0)
        await other.connect()
        try:
            uncertain = ua.DataValue(
                ua.Variant(77.5, ua.VariantType.Double),
                StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue),
            )
            await other.get_node(sim.node_ids["setpoint"]).write_value(uncertain)
        finally:
            await other.disconnect()
        async with OpcUaDriver(PRESS, _conn(sim), name="press-1") as driver:
            reading = await driver.read(PRESS.points)
        assert reading.values["setpoint"] == 77.5
        assert reading.quality == {"setpoint": "UncertainLastUsableValue"}
        assert "setpoint" not in reading.errors


async def _is(driver: OpcUaDriver, *, ok: bool) -> bool:
    reading = await driver.read(PRESS.points)
    return (not reading.errors) == ok


async def test_value_of_the_wrong_type_is_a_decode_error_not_a_crash() -> None:
    # The server serves 'program' as a string; a profile that calls it a float is wrong.
    served = press_profile(_POINTS)
    wrong = press_profile(
        [{**p, "type": "float32"} if p["name"] == "program" else p for p in _POINTS]
    )
    device = _frozen(served)
    async with _serving(device) as sim, OpcUaDriver(wrong, _conn(sim), name="press-1") as driver:
        reading = await driver.read(wrong.points)
        assert reading.errors == {"program": "decode_error"}
        assert "temp" in reading.values
        assert driver.stats.decode_errors == 1


async def test_silent_server_times_out_within_the_timeout() -> None:
    device = _frozen(PRESS)
    async with _serving(device) as sim:
        driver = OpcUaDriver(PRESS, _conn(sim, timeout=0.5), name="press-1")
        await driver.connect()
        try:
            device.faults.set(FaultMode.SILENT)
            with pytest.raises(errors.DeviceTimeout, match="press-1"):
                # The outer bound only turns a hang into a failure; the driver's own
                # timeout is what must fire.
                await asyncio.wait_for(driver.read(PRESS.points), 5.0)
            assert driver.stats.timeouts == 1
        finally:
            await asyncio.wait_for(driver.aclose(), 5.0)
        with pytest.raises(errors.DeviceTimeout):
            await asyncio.wait_for(driver.connect(), 5.0)
        await driver.aclose()


async def test_reconnects_after_server_restart_on_a_fresh_connect() -> None:
    device = _frozen(PRESS)
    async with _serving(device) as sim:
        driver = OpcUaDriver(PRESS, _conn(sim, timeout=0.5), name="press-1")
        await driver.connect()
        try:
            await driver.read(PRESS.points)
            device.faults.set(FaultMode.RESTART, delay=0.4)
            with pytest.raises(errors.ConnectError):
                for _ in range(200):  # bounded: the restart ends the session
                    await driver.read(PRESS.points)
                    await asyncio.sleep(0.02)
            # What the agent's reconnect logic does: connect() again until it works.
            for _ in range(100):
                try:
                    await driver.connect()
                    break
                except (errors.ConnectError, errors.DeviceTimeout):
                    await asyncio.sleep(0.05)
            reading = await driver.read(PRESS.points)
            _assert_matches(PRESS, reading, device.values())
            assert sim.restarts == 1
            assert driver.stats.connects == 2
        finally:
            await driver.aclose()


async def test_subscription_delivers_changes_beyond_the_deadband() -> None:
    device = _frozen(PRESS)
    async with _serving(device) as sim:
        conn = _conn(sim, mode="subscribe", sampling_interval=0.05)
        async with OpcUaDriver(PRESS, conn, name="press-1") as driver:
            setpoint = PRESS.point("setpoint")

            async def latest() -> Any:
                return (await driver.read([setpoint])).values.get("setpoint")

            device.write("setpoint", 100.0)
            await wait_for(lambda: _eq(latest(), 100.0), what="setpoint 100")
            all_points = await driver.read(PRESS.points)
            _assert_matches(PRESS, all_points, device.values())
            # 102 is within the 5 kN deadband of 100: not reported.
            device.write("setpoint", 102.0)
            start = sim.updates
            await wait_for(lambda: _eq(_const(sim.updates >= start + 4), True), what="four updates")
            assert await latest() == 100.0
            # 110 is beyond it: reported.
            device.write("setpoint", 110.0)
            await wait_for(lambda: _eq(latest(), 110.0), what="setpoint 110")
            assert driver.stats.notifications >= len(PRESS.points) + 1


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _const(value: Any) -> Any:
    return value


async def test_subscription_reports_no_data_then_bad_status_then_lost_session() -> None:
    device = _frozen(PRESS)
    async with _serving(device) as sim:
        # A long publishing interval: nothing has been published right after connect().
        slow = _conn(sim, mode="subscribe", sampling_interval=30.0)
        async with OpcUaDriver(PRESS, slow, name="press-1") as driver:
            first = await driver.read(PRESS.points)
            assert first.errors == {p.name: "no_data" for p in PRESS.points}
        device.faults.set(FaultMode.EXCEPTION)
        conn = _conn(sim, mode="subscribe", sampling_interval=0.05, timeout=0.5)
        driver = OpcUaDriver(PRESS, conn, name="press-1")
        await driver.connect()
        try:
            bad = {p.name: "BadDeviceFailure" for p in PRESS.points}
            await wait_for(lambda: _eq(_errors(driver), bad), what="bad values")
            device.faults.set(FaultMode.RESTART, delay=0.3)
            with pytest.raises(errors.ConnectError):
                for _ in range(200):  # bounded: the lost session must surface
                    await driver.read(PRESS.points)
                    await asyncio.sleep(0.02)
        finally:
            await driver.aclose()


async def _errors(driver: OpcUaDriver) -> dict[str, str]:
    return (await driver.read(PRESS.points)).errors


async def test_basic256sha256_with_user_password(opcua_certs: dict[str, Path]) -> None:
    device = _frozen(PRESS)
    server = {
        "security": "basic256sha256",
        "certificate": opcua_certs["server_cert"],
        "private_key": opcua_certs["server_key"],
        "users": {"agent": "pa55"},
    }
    secure = {
        "security_policy": "Basic256Sha256",
        "certificate": opcua_certs["client_cert"],
        "private_key": opcua_certs["client_key"],
        "username": "agent",
    }
    async with _serving(device, **server) as sim:
        # Without pinning the server certificate (read from its endpoints) ...
        async with OpcUaDriver(PRESS, _conn(sim, password="pa55", **secure), name="p") as driver:
            _assert_matches(PRESS, await driver.read(PRESS.points), device.values())
        # ... and pinned.
        pinned = _conn(
            sim, password="pa55", server_certificate=opcua_certs["server_cert"], **secure
        )
        async with OpcUaDriver(PRESS, pinned, name="p") as driver:
            await driver.write(PRESS.point("setpoint"), 12.5)
        assert device.values()["setpoint"] == 12.5
        wrong = OpcUaDriver(PRESS, _conn(sim, password="nope", **secure), name="p")
        with pytest.raises(errors.ConnectError, match="session refused"):
            await wrong.connect()
        assert wrong.stats.connect_errors == 1
        await wrong.aclose()
        anonymous = OpcUaDriver(PRESS, _conn(sim), name="p")
        with pytest.raises(errors.ConnectError):
            await anonymous.connect()


async def test_missing_browse_path_or_namespace_is_a_config_error_naming_it() -> None:
    device = _frozen(PRESS)
    ghost = {"name": "ghost", "type": "float64", "opcua": {"browse_path": "2:Machine/2:No/2:Ghost"}}
    extra = press_profile([*_POINTS, ghost])
    other_ns = press_profile(_POINTS, uri="urn:test:other")
    async with _serving(device) as sim:
        driver = OpcUaDriver(extra, _conn(sim), name="press-1")
        with pytest.raises(
            errors.ConfigError,
            match=r"point 'ghost': browse path '2:Machine/2:No/2:Ghost' not found",
        ):
            await driver.connect()
        assert not driver.connected
        driver = OpcUaDriver(other_ns, _conn(sim), name="press-1")
        with pytest.raises(errors.ConfigError, match="no namespace 'urn:test:other'"):
            await driver.connect()


async def test_missing_certificate_file_is_a_config_error(tmp_path: Path) -> None:
    conn = OpcUaConnection(
        endpoint="opc.tcp://127.0.0.1:1/iiot/",
        security_policy="Basic256Sha256",
        certificate=tmp_path / "agent.der",
        private_key=tmp_path / "agent.pem",
    )
    driver = OpcUaDriver(PRESS, conn, name="press-1")
    with pytest.raises(
        errors.ConfigError, match=r"certificate .*agent\.der is not a readable file"
    ):
        await driver.connect()


async def test_unreachable_endpoint_and_unconnected_use() -> None:
    sim_less = OpcUaConnection(endpoint="opc.tcp://127.0.0.1:1/iiot/", timeout=1.0)
    driver = OpcUaDriver(PRESS, sim_less, name="press-1")
    with pytest.raises(errors.ConnectError, match="press-1"):
        await driver.connect()
    with pytest.raises(errors.ConnectError, match="not connected"):
        await driver.read(PRESS.points)
    await driver.aclose()
    await driver.aclose()


async def test_undecodable_value_is_logged_once_not_every_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = press_profile(_POINTS)
    wrong = press_profile(
        [{**p, "type": "float32"} if p["name"] == "program" else p for p in _POINTS]
    )
    device = _frozen(served)
    caplog.set_level(logging.INFO, logger="iiot")
    async with _serving(device) as sim, OpcUaDriver(wrong, _conn(sim), name="press-1") as driver:
        for _ in range(5):
            reading = await driver.read(wrong.points)
            assert reading.errors == {"program": "decode_error"}
    assert driver.stats.decode_errors == 5
    warned = [r for r in caplog.records if r.getMessage() == "opcua value not decoded"]
    assert len(warned) == 1
