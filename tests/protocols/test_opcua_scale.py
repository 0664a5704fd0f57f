"""OPC UA at plant scale: shared sessions, one profile for many instances, connect timeout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asyncua import Server, ua

from device_profiles.loader import load_profiles
from device_profiles.schema import Profile, ValueType
from edge_agent.config import DeviceConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.poller import DevicePoller
from iiot_common.backoff import Backoff
from protocols import errors
from protocols.driver import Reading, create_driver
from protocols.opcua.config import OpcUaConnection
from protocols.opcua.driver import OpcUaDriver
from protocols.opcua.session import open_sessions
from simulators.device import SimDevice
from simulators.faults import FaultMode
from simulators.opcua_server import OpcUaSimServer
from tests.edge_agent.helpers import wait_for
from tests.opcua_profiles import press_profile

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

_URI = "urn:test:line"

# One machine model: its points relative to the machine's root.
_MODEL = Profile.model_validate(
    {
        "id": "test-line-machine",
        "name": "Line machine",
        "name_zh": "产线设备",
        "family": "other",
        "category": "intelligent",
        "protocol": "opcua",
        "opcua": {"namespace_uri": _URI},
        "points": [
            {"name": "temperature", "type": "float64", "opcua": {"node_suffix": ".Temperature"}},
            {"name": "count", "type": "uint32", "opcua": {"path": "2:Counters/2:Count"}},
        ],
    }
)


def _value(instance: str, point: str, vtype: ValueType) -> Any:
    """What instance ``instance`` holds in ``point``: different for every instance."""
    number = int("".join(c for c in instance if c.isdigit()) or "0")
    if vtype is ValueType.STRING:
        return f"{instance}-{point}"
    if vtype is ValueType.BOOL:
        return number % 2 == 1
    if vtype in (ValueType.FLOAT32, ValueType.FLOAT64):
        return number * 10.0 + 0.5
    return number * 10 + len(point) % 7


async def _add(server: Server, parent: Any, ns: int, nid: str, name: str) -> Any:
    return await parent.add_object(ua.NodeId(nid, ns), ua.QualifiedName(name, ns))


@contextlib.asynccontextmanager
async def _instances_server(
    profile: Profile, roots: list[list[str]]
) -> AsyncIterator[tuple[str, Callable[[], int]]]:
    """A server holding one instance of ``profile`` under each root (browse names, ns 2).

    The root object's NodeId is ``ns=2;s=<its name>``; ``node_suffix`` points are at
    ``ns=2;s=<root name><suffix>`` and ``path`` points under the root.
    """
    assert profile.opcua is not None
    server = Server()
    await server.init()
    server.disable_clock()
    port = _free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/test/"
    server.set_endpoint(endpoint)
    await server.register_namespace("urn:test:other")  # the profile's namespace is not 2
    ns = await server.register_namespace(profile.opcua.namespace_uri)
    made: dict[tuple[str, ...], Any] = {(): server.nodes.objects}
    for root in roots:
        names = [r.split(":", 1)[1] for r in root]
        for depth in range(1, len(names) + 1):
            key = tuple(names[:depth])
            if key not in made:
                made[key] = await _add(server, made[key[:-1]], ns, names[depth - 1], key[-1])
        base, instance = tuple(names), names[-1]
        for p in profile.points:
            a = p.opcua
            assert a is not None
            value = ua.Variant(_value(instance, p.name, p.type), _VARIANTS[p.type])
            if a.node_suffix is not None:
                await made[base].add_variable(
                    ua.NodeId(instance + a.node_suffix, ns), ua.QualifiedName(p.name, ns), value
                )
                continue
            assert a.path is not None
            parts = [e.split(":", 1)[1] for e in a.path.split("/")]
            parent = base
            for part in parts[:-1]:
                key = (*parent, part)
                if key not in made:
                    made[key] = await _add(server, made[parent], ns, "/".join(key), part)
                parent = key
            await made[parent].add_variable(
                ua.NodeId("/".join((*parent, parts[-1])), ns),
                ua.QualifiedName(parts[-1], ns),
                value,
            )
    await server.start()
    try:
        yield endpoint, lambda: ns
    finally:
        await server.stop()


_VARIANTS = {
    ValueType.BOOL: ua.VariantType.Boolean,
    ValueType.UINT16: ua.VariantType.UInt16,
    ValueType.UINT32: ua.VariantType.UInt32,
    ValueType.INT16: ua.VariantType.Int16,
    ValueType.INT32: ua.VariantType.Int32,
    ValueType.INT64: ua.VariantType.Int64,
    ValueType.FLOAT32: ua.VariantType.Float,
    ValueType.FLOAT64: ua.VariantType.Double,
    ValueType.STRING: ua.VariantType.String,
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- one profile, many instances ------------------------------------------------------


async def test_one_profile_reads_each_instance_at_its_root() -> None:
    roots = [["2:Plant", f"2:Dev{n:04d}"] for n in (1, 2, 3)]
    async with _instances_server(_MODEL, roots) as (endpoint, _):
        conns = {
            # A NodeId root, a browse-path root, and a NodeId root in subscribe mode.
            "Dev0001": OpcUaConnection(endpoint=endpoint, root="ns=2;s=Dev0001", timeout=2),
            "Dev0002": OpcUaConnection(endpoint=endpoint, root=["2:Plant", "2:Dev0002"]),
            "Dev0003": OpcUaConnection(
                endpoint=endpoint, root="ns=2;s=Dev0003", mode="subscribe", sampling_interval=0.1
            ),
        }
        drivers = {k: OpcUaDriver(_MODEL, c, name=k.lower()) for k, c in conns.items()}
        try:
            for d in drivers.values():
                await d.connect()
            for instance, d in drivers.items():
                reading = await _settled(d)
                assert reading.errors == {}, instance
                assert reading.values == {
                    "temperature": _value(instance, "temperature", ValueType.FLOAT64),
                    "count": _value(instance, "count", ValueType.UINT32),
                }, instance
            # Three devices, one server, one identity: one session.
            sessions = {id(d.session) for d in drivers.values()}
            assert len(sessions) == 1
        finally:
            for d in drivers.values():
                await d.aclose()
    assert open_sessions() == 0


async def _settled(driver: OpcUaDriver) -> Reading:
    """A reading once subscribe mode has had its first notifications (read mode: at once)."""
    reading = await driver.read(
        _MODEL.points if driver.profile is _MODEL else driver.profile.points
    )
    for _ in range(100):
        if "no_data" not in reading.errors.values():
            break
        await asyncio.sleep(0.05)
        reading = await driver.read(driver.profile.points)
    return reading


async def test_cnc_profile_serves_machines_under_the_machine_tools_folder() -> None:
    cnc = load_profiles()["cnc-machine-tool"]
    roots = [["2:Machines", "2:Mill-1"], ["2:Machines", "2:Mill-2"]]
    async with _instances_server(cnc, roots) as (endpoint, _):
        drivers = [
            OpcUaDriver(cnc, OpcUaConnection(endpoint=endpoint, root=r), name=r[-1][2:].lower())
            for r in roots
        ]
        try:
            for d in drivers:
                await d.connect()
            for r, d in zip(roots, drivers, strict=True):
                reading = await d.read(cnc.points)
                instance = r[-1][2:]
                assert reading.errors == {}
                assert reading.values["serial_number"] == f"{instance}-serial_number"
                assert reading.values["spindle_speed"] == _value(
                    instance, "spindle_speed", ValueType.FLOAT64
                )
        finally:
            for d in drivers:
                await d.aclose()


async def test_relative_profile_without_a_root_is_refused_naming_the_device() -> None:
    with pytest.raises(errors.ConfigError, match=r"device 'dev-9'.*root"):
        OpcUaDriver(_MODEL, OpcUaConnection(endpoint="opc.tcp://127.0.0.1:1"), name="dev-9")


async def test_a_root_the_server_lacks_is_a_config_error_naming_it() -> None:
    async with _instances_server(_MODEL, [["2:Plant", "2:Dev0001"]]) as (endpoint, _):
        d = OpcUaDriver(
            _MODEL, OpcUaConnection(endpoint=endpoint, root=["2:Plant", "2:Dev0042"]), name="d42"
        )
        with pytest.raises(errors.ConfigError, match=r"d42.*Dev0042"):
            await d.connect()
        await d.aclose()


# --- shared sessions ------------------------------------------------------------------

_PRESS = press_profile(
    [
        {"name": "force", "type": "float64", "range": [0, 500],
         "opcua": {"browse_path": "2:Machine/2:Ram/2:Force"}},
        {"name": "strokes", "type": "uint32", "range": [0, 1000],
         "opcua": {"node_id": "ns=2;s=Press.Strokes"}},
    ]
)  # fmt: skip


def _pollers(
    endpoint: str, count: int, interval: float = 0.2, **conn: Any
) -> tuple[list[DevicePoller], list[tuple[str, bool, str]], dict[str, int]]:
    states: list[tuple[str, bool, str]] = []
    samples: dict[str, int] = {}

    def on_sample(device: str, reading: Reading) -> None:
        if reading.values and not reading.errors:
            samples[device] = samples.get(device, 0) + 1

    pollers = []
    for n in range(count):
        cfg = DeviceConfig.model_validate(
            {
                "id": f"press-{n}",
                "profile": _PRESS.id,
                "poll_interval": interval,
                "opcua": {"endpoint": endpoint, "timeout": 1.0, **conn},
            }
        )
        pollers.append(
            DevicePoller(
                cfg,
                _PRESS,
                driver_factory=create_driver,
                on_sample=on_sample,
                on_state=lambda d, on, why: states.append((d, on, why)),
                metrics=AgentMetrics(),
                backoff=Backoff(0.1, 0.3),
                phase=n / count,
            )
        )
    return pollers, states, samples


async def _wait(cond: Callable[[], bool], what: str) -> None:
    await wait_for(cond, within=15.0, what=what)


@contextlib.asynccontextmanager
async def _running(pollers: list[DevicePoller]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    try:
        yield
    finally:
        for p in pollers:
            p.stop()
        await asyncio.gather(*tasks)


@pytest.mark.parametrize("mode", ["read", "subscribe"])
async def test_more_devices_than_the_server_allows_sessions_all_deliver(mode: str) -> None:
    device = SimDevice(_PRESS, device_id="press", seed=3)
    async with OpcUaSimServer(device, port=0, max_sessions=2, update_interval=0.1) as sim:
        extra: dict[str, Any] = {"sampling_interval": 0.1} if mode == "subscribe" else {}
        pollers, states, samples = _pollers(sim.endpoint, 8, mode=mode, **extra)
        async with _running(pollers):
            await _wait(lambda: len([n for n in samples.values() if n >= 3]) == 8, "all deliver")
            assert all(p.health.online for p in pollers)
        refused = [s for s in states if "TooManySessions" in s[2]]
        assert refused == []


async def test_a_lost_session_takes_its_devices_offline_together_and_back() -> None:
    device = SimDevice(_PRESS, device_id="press", seed=3)
    async with OpcUaSimServer(device, port=0, max_sessions=1, update_interval=0.1) as sim:
        pollers, states, samples = _pollers(sim.endpoint, 4)
        async with _running(pollers):
            await _wait(lambda: all(p.health.online for p in pollers), "all online")
            session = pollers[0]._driver.session  # type: ignore[union-attr]
            assert session is not None and session.opened == 1
            device.faults.set(FaultMode.RESTART, delay=1.0)
            await _wait(lambda: all(p.health.online is False for p in pollers), "all offline")
            before = dict(samples)
            await _wait(lambda: all(p.health.online for p in pollers), "all back online")
            await _wait(
                lambda: all(samples[k] > before.get(k, 0) for k in samples), "all deliver again"
            )
            # The four devices came back on one new session (the server allows only one).
            driver = pollers[0]._driver
            assert isinstance(driver, OpcUaDriver) and driver.session is not None
            assert {id(p._driver.session) for p in pollers} == {id(driver.session)}  # type: ignore[union-attr]
        offline = {d for d, on, _ in states if not on}
        assert offline == {p.device.id for p in pollers}


async def test_subscribe_mode_hands_changes_over_as_they_arrive_not_at_the_next_poll() -> None:
    device = SimDevice(_PRESS, device_id="press", seed=3)  # values change every update
    async with OpcUaSimServer(device, port=0, update_interval=0.1) as sim:
        pollers, _, samples = _pollers(
            sim.endpoint, 1, interval=30.0, mode="subscribe", sampling_interval=0.1
        )
        async with _running(pollers):
            # One poll in 30 s, yet a sample every time the subscription brings values.
            await _wait(lambda: samples.get("press-0", 0) >= 5, "five samples")
            assert pollers[0].health.polls <= 2


# --- connect timeout --------------------------------------------------------------------


async def test_slow_session_set_up_connects_within_connect_timeout_not_the_poll_timeout() -> None:
    device = SimDevice(_PRESS, device_id="press", seed=3)
    async with OpcUaSimServer(device, port=0, update_interval=0.1) as sim:
        # Every request answered 0.12 s late: opening the session takes well over the
        # 0.2 s poll timeout, each read well under it.
        device.faults.set(FaultMode.SLOW, delay=0.12)
        pollers, states, samples = _pollers(sim.endpoint, 1, connect_timeout=10)
        async with _running(pollers):
            await _wait(lambda: samples.get("press-0", 0) >= 2, "samples")
        assert states[0][1] is True, states  # online at the first try, no connect_failed
        pollers, states, samples = _pollers(sim.endpoint, 1, connect_timeout=0.3)
        async with _running(pollers):
            await _wait(lambda: bool(states), "a state")
            await asyncio.sleep(0.5)
        assert states[0][1] is False and states[0][2].startswith("connect_failed"), states
        assert samples == {}


async def test_simulator_refuses_sessions_beyond_its_limit() -> None:
    from asyncua import Client

    device = SimDevice(_PRESS, device_id="press", seed=3)
    async with OpcUaSimServer(device, port=0, max_sessions=2) as sim:
        clients = [Client(sim.endpoint, timeout=2) for _ in range(3)]
        try:
            await clients[0].connect()
            await clients[1].connect()
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await clients[2].connect()
            assert refused.value.code == ua.StatusCodes.BadTooManySessions
            await clients[0].disconnect()
            await clients[2].connect()  # a closed session frees its place
        finally:
            for c in clients:
                with contextlib.suppress(Exception):
                    await c.disconnect()


async def test_items_beyond_one_subscription_are_split_and_all_delivered() -> None:
    big = Profile.model_validate(
        {
            **_MODEL.model_dump(exclude={"points"}),
            "points": [
                {"name": f"t{i:04d}", "type": "float64", "opcua": {"node_suffix": f".T{i:04d}"}}
                for i in range(1200)
            ],
        }
    )
    async with _instances_server(big, [["2:Plant", "2:Dev0007"]]) as (endpoint, _):
        conn = OpcUaConnection(
            endpoint=endpoint, root="ns=2;s=Dev0007", mode="subscribe", sampling_interval=0.1
        )
        driver = OpcUaDriver(big, conn, name="big-7")
        try:
            await driver.connect()
            assert driver.session is not None and len(driver.session.subscriptions) == 2
            reading = await _settled(driver)
            for _ in range(100):
                if len(reading.values) == 1200:
                    break
                await asyncio.sleep(0.05)
                reading = await driver.read(big.points)
            assert len(reading.values) == 1200 and reading.errors == {}
            assert set(reading.values.values()) == {_value("Dev0007", "t", ValueType.FLOAT64)}
        finally:
            await driver.aclose()
