"""The OPC UA simulator as a third-party client (plain asyncua) sees it, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto import security_policies

from device_profiles.loader import load_profiles
from device_profiles.schema import Point, Profile, ValueType
from protocols.opcua.certs import (
    CLIENT_APPLICATION_URI,
)
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.opcua_server import OpcUaSimServer
from tests.opcua_profiles import SHIPPED, press_profile
from tests.waiting import wait_for

_VTYPES = {
    ValueType.BOOL: ua.VariantType.Boolean,
    ValueType.INT16: ua.VariantType.Int16,
    ValueType.UINT16: ua.VariantType.UInt16,
    ValueType.INT32: ua.VariantType.Int32,
    ValueType.UINT32: ua.VariantType.UInt32,
    ValueType.INT64: ua.VariantType.Int64,
    ValueType.FLOAT32: ua.VariantType.Float,
    ValueType.FLOAT64: ua.VariantType.Double,
    ValueType.STRING: ua.VariantType.String,
}
_NUMERIC = set(ValueType) - {ValueType.BOOL, ValueType.STRING}


MIXED = press_profile(
    [
        {"name": "force", "unit": "kN", "type": "float32", "range": [0, 500],
         "opcua": {"browse_path": "2:Machine/2:Monitoring/2:Ram/2:Force"}},
        {"name": "strokes", "type": "uint32", "range": [0, 1000000],
         "opcua": {"browse_path": "2:Machine/2:Production/2:Strokes"}},
        {"name": "temp", "unit": "degC", "type": "int16", "scale": 0.1, "range": [-20, 120],
         "opcua": {"node_id": "ns=2;i=1001"}},
        {"name": "setpoint", "unit": "kN", "type": "float64", "range": [0, 500], "access": "rw",
         "opcua": {"node_id": "ns=2;s=Press.Setpoint"}},
        {"name": "enabled", "type": "bool", "access": "rw",
         "opcua": {"node_id": "ns=2;s=Press.Enabled"}},
        {"name": "program", "type": "string", "opcua": {"node_id": "ns=2;s=Press.Program"}},
    ]
)  # fmt: skip


@contextlib.asynccontextmanager
async def _serving(profile: Profile, **kwargs: Any) -> AsyncIterator[OpcUaSimServer]:
    sim = OpcUaSimServer(
        SimDevice(profile, device_id="dev-1", seed=3), port=0, update_interval=0.05, **kwargs
    )
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def _client(sim: OpcUaSimServer, request_timeout: float = 2.0) -> AsyncIterator[Client]:
    client = Client(sim.endpoint, timeout=request_timeout)
    await client.connect()
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 2.0)
        client.disconnect_socket()


async def _node(client: Client, profile: Profile, point: Point) -> Any:
    """The point's node as any client finds it: NodeId with the namespace looked up, or browse."""
    assert profile.opcua is not None and point.opcua is not None
    ns = await client.get_namespace_index(profile.opcua.namespace_uri)
    if point.opcua.node_id is not None:
        nid = ua.NodeId.from_string(point.opcua.node_id)
        return client.get_node(ua.NodeId(nid.Identifier, ns, nid.NodeIdType))
    if point.opcua.path is not None:
        # Relative to the device's root object, which the simulator names root_name.
        text = f"2:{profile.opcua.root_name or profile.id}/{point.opcua.path}"
    else:
        assert point.opcua.browse_path is not None
        text = point.opcua.browse_path
    path = [f"{ns}:{part.split(':', 1)[1]}" for part in text.split("/")]
    return await client.nodes.objects.get_child(path)


async def _read_all(client: Client, profile: Profile) -> dict[str, ua.DataValue]:
    out = {}
    for p in profile.points:
        node = await _node(client, profile, p)
        out[p.name] = await node.read_data_value()
    return out


@pytest.mark.parametrize("profile_id", SHIPPED)
async def test_shipped_profile_every_point_readable_typed_and_in_range(profile_id: str) -> None:
    profile = load_profiles()[profile_id]
    async with _serving(profile) as sim, _client(sim) as client:
        assert profile.opcua is not None
        assert await client.get_namespace_index(profile.opcua.namespace_uri) == 2
        values = await _read_all(client, profile)
        for p in profile.points:
            dv = values[p.name]
            assert dv.StatusCode.is_good(), p.name
            assert dv.Value.VariantType == _VTYPES[p.type], p.name
            if p.range is not None and p.type in _NUMERIC:
                eng = dv.Value.Value * p.scale + p.offset
                lo, hi = p.range
                assert lo - 1e-6 <= eng <= hi + 1e-6, (p.name, eng, p.range)


async def test_tree_follows_profile_addresses_exactly() -> None:
    async with _serving(MIXED) as sim, _client(sim) as client:
        # NodeId points keep exactly their NodeId (namespace 2 is the profile's).
        temp = client.get_node("ns=2;i=1001")
        assert (await temp.read_browse_name()).Name == "temp"
        # Browse paths are real folders/objects under Objects.
        force = await client.nodes.objects.get_child(
            ["2:Machine", "2:Monitoring", "2:Ram", "2:Force"]
        )
        assert (await force.read_data_type_as_variant_type()) == ua.VariantType.Float
        units = await force.get_child(["0:EngineeringUnits"])
        assert (await units.read_value()).DisplayName.Text == "kN"
        # Scaled points serve the raw value; EURange describes the raw value too.
        raw = await temp.read_value()
        assert isinstance(raw, int)
        eu = await (await temp.get_child(["0:EURange"])).read_value()
        assert (eu.Low, eu.High) == (-200.0, 1200.0)
        assert sim.node_ids["temp"] == ua.NodeId(1001, 2)


async def test_values_change_over_time() -> None:
    profile = load_profiles()["boiler-steam-gas-opcua"]
    numeric = [p for p in profile.points if p.type in _NUMERIC and p.access == "r" and not p.enum]
    async with _serving(profile) as sim, _client(sim) as client:
        first = {p.name: (await _read_all(client, profile))[p.name].Value.Value for p in numeric}
        start = sim.updates

        async def changed() -> bool:
            if sim.updates < start + 3:
                return False
            now = await _read_all(client, profile)
            return any(now[p.name].Value.Value != first[p.name] for p in numeric)

        await wait_for(changed, what="a value to change")


async def test_write_to_rw_point_reaches_device_and_reads_back() -> None:
    async with _serving(MIXED) as sim, _client(sim) as client:
        setpoint = client.get_node("ns=2;s=Press.Setpoint")
        await setpoint.write_value(ua.DataValue(ua.Variant(321.5, ua.VariantType.Double)))
        enabled = client.get_node("ns=2;s=Press.Enabled")
        await enabled.write_value(ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
        assert sim.device.values()["setpoint"] == 321.5
        assert sim.device.values()["enabled"] is True
        start = sim.updates
        await wait_for(lambda: _ready(sim.updates >= start + 2), what="two updates")
        assert await setpoint.read_value() == 321.5  # updates keep the written value
        # Read-only points and wrong types are refused, as by a real server.
        with pytest.raises(ua.UaStatusCodeError):
            await client.get_node("ns=2;s=Press.Program").write_value(
                ua.DataValue(ua.Variant("X", ua.VariantType.String))
            )
        with pytest.raises(ua.uaerrors.BadTypeMismatch):
            await setpoint.write_value(ua.DataValue(ua.Variant(1, ua.VariantType.Int32)))
        assert sim.device.values()["setpoint"] == 321.5


async def test_boiler_pressure_follows_a_setpoint_written_by_a_client() -> None:
    profile = load_profiles()["boiler-steam-gas-opcua"]
    now = [0.0]
    device = SimDevice(profile, device_id="gas-1", seed=9, clock=lambda: now[0])
    twin = SimDevice(profile, device_id="gas-1", seed=9, clock=lambda: now[0])
    twin.values()  # both start at time 0 (the server reads its device as it starts)
    sim = OpcUaSimServer(device, port=0, update_interval=0.05)
    await sim.start()
    try:
        async with _client(sim) as client:
            setpoint = await _node(client, profile, profile.point("steam_pressure_setpoint"))
            pressure = await _node(client, profile, profile.point("steam_pressure"))
            default = await setpoint.read_value()
            assert default == pytest.approx(1.04)
            await setpoint.write_value(ua.DataValue(ua.Variant(0.6, ua.VariantType.Double)))
            assert await setpoint.read_value() == 0.6
            assert device.writes == 1 and sim.client_writes == 1

            async def at(t: float) -> tuple[float, float]:
                now[0] = t
                start = sim.updates
                await wait_for(lambda: _ready(sim.updates >= start + 2), what="two updates")
                return float(await pressure.read_value()), float(twin.values()["steam_pressure"])

            written, untouched = await at(2 * 3600.0)
            assert written == pytest.approx(0.6, abs=0.06), written
            assert untouched == pytest.approx(default, abs=0.1), untouched
            # Back to the old setpoint: the pressure climbs back to it.
            await setpoint.write_value(ua.DataValue(ua.Variant(default, ua.VariantType.Double)))
            written, untouched = await at(4 * 3600.0)
            assert written == pytest.approx(default, abs=0.1), written
    finally:
        await sim.stop()


async def _ready(value: bool) -> bool:
    return value


async def test_namespace_can_sit_at_another_index() -> None:
    async with _serving(MIXED, extra_namespaces=["urn:vendor:a", "urn:vendor:b"]) as sim:
        async with _client(sim) as client:
            assert await client.get_namespace_index("urn:test:press") == 4
            assert sim.namespace_index == 4
            node = client.get_node("ns=4;i=1001")
            assert (await node.read_browse_name()).Name == "temp"
            path = ["4:Machine", "4:Production", "4:Strokes"]
            strokes = await client.nodes.objects.get_child(path)
            assert isinstance(await strokes.read_value(), int)


async def test_exception_fault_gives_bad_device_failure_then_recovers() -> None:
    async with _serving(MIXED) as sim, _client(sim) as client:
        node = client.get_node("ns=2;i=1001")
        sim.device.faults.set(FaultMode.EXCEPTION)

        async def bad() -> bool:
            dv = await node.read_data_value(raise_on_bad_status=False)
            return bool(dv.StatusCode.value == ua.StatusCodes.BadDeviceFailure)

        await wait_for(bad, what="BadDeviceFailure")
        with pytest.raises(ua.uaerrors.BadDeviceFailure):
            await node.read_value()
        sim.device.faults.clear()

        async def good() -> bool:
            dv = await node.read_data_value(raise_on_bad_status=False)
            return bool(dv.StatusCode.is_good())

        await wait_for(good, what="Good status again")


async def test_silent_fault_keeps_tcp_but_requests_time_out() -> None:
    async with _serving(MIXED) as sim, _client(sim, request_timeout=0.5) as client:
        node = client.get_node("ns=2;i=1001")
        await node.read_value()
        sim.device.faults.set(FaultMode.SILENT)
        with pytest.raises(TimeoutError):
            await node.read_value()
        assert sim.ignored >= 1
        # A hung server still accepts TCP connections but never completes the handshake.
        _, writer = await asyncio.open_connection(sim.host, sim.port)
        writer.close()
        await writer.wait_closed()
        with pytest.raises(TimeoutError):
            async with _client(sim, request_timeout=0.5):
                pass


async def test_slow_fault_answers_late() -> None:
    async with _serving(MIXED) as sim, _client(sim, request_timeout=0.3) as client:
        node = client.get_node("ns=2;i=1001")
        sim.device.faults.set(FaultMode.SLOW, delay=0.6)
        with pytest.raises(TimeoutError):
            await node.read_value()
    async with _serving(MIXED) as sim, _client(sim, request_timeout=3.0) as client:
        sim.device.faults.set(FaultMode.SLOW, delay=0.2)
        assert isinstance(await client.get_node("ns=2;i=1001").read_value(), int)


async def test_drop_fault_closes_connections() -> None:
    async with _serving(MIXED) as sim:
        async with _client(sim, request_timeout=1.0) as client:
            node = client.get_node("ns=2;i=1001")
            await node.read_value()
            sim.device.faults.set(FaultMode.DROP)
            with pytest.raises((ConnectionError, ua.UaError, TimeoutError)):
                for _ in range(50):  # bounded: the next request or update drops us
                    await node.read_value()
                    await asyncio.sleep(0.02)
        with pytest.raises((ConnectionError, OSError, ua.UaError, TimeoutError)):
            async with _client(sim, request_timeout=1.0):
                pass
        assert sim.dropped >= 2
        sim.device.faults.clear()
        async with _client(sim, request_timeout=1.0) as client:
            assert isinstance(await client.get_node("ns=2;i=1001").read_value(), int)


async def test_restart_fault_goes_away_and_comes_back_with_same_nodes() -> None:
    async with _serving(MIXED, extra_namespaces=["urn:vendor:a"]) as sim:
        async with _client(sim, request_timeout=1.0) as client:
            node = client.get_node("ns=3;i=1001")
            await node.read_value()
            sim.device.faults.set(FaultMode.RESTART, delay=0.5)
            with pytest.raises((ConnectionError, ua.UaError, TimeoutError)):
                for _ in range(100):  # bounded: the restart closes our connection
                    await node.read_value()
                    await asyncio.sleep(0.02)

        async def refused() -> bool:
            try:
                _, writer = await asyncio.open_connection(sim.host, sim.port)
            except OSError:
                return True
            writer.close()
            await writer.wait_closed()
            return False

        await wait_for(refused, what="the listener to go away")
        await wait_for(lambda: _ready(sim.restarts == 1), what="the server to come back")
        assert sim.device.faults.mode is FaultMode.NONE
        async with _client(sim, request_timeout=1.0) as client:
            assert await client.get_namespace_index("urn:test:press") == 3
            assert (await client.get_node("ns=3;i=1001").read_browse_name()).Name == "temp"
            path = ["3:Machine", "3:Monitoring", "3:Ram", "3:Force"]
            assert isinstance(
                await (await client.nodes.objects.get_child(path)).read_value(), float
            )


async def test_out_of_range_fault_serves_values_beyond_range() -> None:
    async with _serving(MIXED) as sim, _client(sim) as client:
        sim.device.faults.set(FaultMode.OUT_OF_RANGE)
        node = await client.nodes.objects.get_child(
            ["2:Machine", "2:Monitoring", "2:Ram", "2:Force"]
        )

        async def beyond() -> bool:
            return bool(await node.read_value() > 500)

        await wait_for(beyond, what="an out-of-range force")
        # Scaled points are out of range in engineering units (raw 1521.0 degC here).
        assert await client.get_node("ns=2;i=1001").read_value() * 0.1 > 120


async def test_basic256sha256_with_user_password(opcua_certs: dict[str, Path]) -> None:
    kwargs: dict[str, Any] = {
        "security": "basic256sha256",
        "certificate": opcua_certs["server_cert"],
        "private_key": opcua_certs["server_key"],
        "users": {"operator": "s3cret"},
    }
    async with _serving(MIXED, **kwargs) as sim:

        async def connect(user: str | None, password: str | None, secure: bool = True) -> Client:
            client = Client(sim.endpoint, timeout=2.0)
            client.application_uri = CLIENT_APPLICATION_URI
            if secure:
                await client.set_security(
                    security_policies.SecurityPolicyBasic256Sha256,
                    certificate=str(opcua_certs["client_cert"]),
                    private_key=str(opcua_certs["client_key"]),
                    server_certificate=str(opcua_certs["server_cert"]),
                    mode=ua.MessageSecurityMode.SignAndEncrypt,
                )
            if user is not None and password is not None:
                client.set_user(user)
                client.set_password(password)
            await client.connect()
            return client

        client = await connect("operator", "s3cret")
        try:
            assert isinstance(await client.get_node("ns=2;i=1001").read_value(), int)
        finally:
            await client.disconnect()
        for user, password in (("operator", "wrong"), ("nobody", "s3cret"), (None, None)):
            with pytest.raises(ua.UaStatusCodeError):
                await connect(user, password)
        with pytest.raises((ua.UaError, ConnectionError, TimeoutError)):
            await connect("operator", "s3cret", secure=False)


def test_constructor_refuses_a_modbus_profile() -> None:
    modbus = next(p for p in load_profiles() if p.protocol == "modbus")
    with pytest.raises(ValueError, match="not an OPC UA profile"):
        OpcUaSimServer(SimDevice(modbus, device_id="m1"))
