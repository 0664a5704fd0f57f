"""Subscribe mode delivers every value the server queues, in order, through the poller."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asyncua import Server, ua

from device_profiles.schema import Profile
from edge_agent.config import DeviceConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.poller import DevicePoller
from iiot_common.backoff import Backoff
from protocols.driver import Reading, create_driver
from protocols.opcua.config import OpcUaConnection
from protocols.opcua.driver import OpcUaDriver
from tests.waiting import wait_for

pytestmark = pytest.mark.usefixtures("no_leftover_tasks")

_URI = "urn:test:queue"
_PROFILE = Profile.model_validate(
    {
        "id": "test-queue-machine",
        "name": "Queue machine",
        "name_zh": "队列设备",
        "family": "other",
        "category": "intelligent",
        "protocol": "opcua",
        "opcua": {"namespace_uri": _URI},
        "points": [
            {"name": "a", "type": "float64", "opcua": {"node_id": "ns=2;s=M.A"}},
            {"name": "b", "type": "int32", "opcua": {"node_id": "ns=2;s=M.B"}},
        ],
    }
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _server() -> AsyncIterator[tuple[str, Any, Any]]:
    """A server with the two points; its variables, to write bursts of values."""
    server = Server()
    await server.init()
    server.disable_clock()
    endpoint = f"opc.tcp://127.0.0.1:{_free_port()}/queue/"
    server.set_endpoint(endpoint)
    ns = await server.register_namespace(_URI)
    assert ns == 2
    objects = server.nodes.objects
    double, int32 = ua.Variant(0.0, ua.VariantType.Double), ua.Variant(0, ua.VariantType.Int32)
    a = await objects.add_variable(ua.NodeId("M.A", ns), "A", double)
    b = await objects.add_variable(ua.NodeId("M.B", ns), "B", int32)
    await server.start()
    try:
        yield endpoint, a, b
    finally:
        await server.stop()


async def _burst(a: Any, b: Any, count: int) -> None:
    """``count`` new values of both points, faster than the publishing interval."""
    for i in range(1, count + 1):
        await a.write_value(ua.Variant(float(i), ua.VariantType.Double))
        await b.write_value(ua.Variant(10 * i, ua.VariantType.Int32))
        await asyncio.sleep(0.03)


async def test_values_queued_between_two_publishes_are_each_handed_over_in_order() -> None:
    async with _server() as (endpoint, a, b):
        # Sampling 50 ms, publishing 1 s: the default queue keeps 21 values per point.
        conn = OpcUaConnection(
            endpoint=endpoint, mode="subscribe", sampling_interval=0.05, publishing_interval=1.0
        )
        assert conn.queue == 21
        got: list[Reading] = []
        async with OpcUaDriver(_PROFILE, conn, name="m-1") as driver:

            def take() -> None:
                reading = driver.read_changes(_PROFILE.points)
                if reading.values:
                    got.append(reading)

            def arrived() -> None:
                # As the poller does: one batch per turn, told again while any remain.
                asyncio.get_running_loop().call_soon(take)

            driver.on_data = arrived
            await wait_for(lambda: bool(got), what="the first values")
            got.clear()
            await _burst(a, b, 6)
            await wait_for(lambda: len(got) >= 6, within=10.0, what="six batches")
        assert [r.values for r in got] == [{"a": float(i), "b": 10 * i} for i in range(1, 7)]
        stamps = [r.ts for r in got]
        assert stamps == sorted(set(stamps)), "each batch later than the one before"
        # Spaced as the server sampled them (about 30 ms apart), not all at hand-over.
        assert stamps[-1] - stamps[0] >= 100
        assert driver.stats.overflows == 0 and driver.stats.dropped_batches == 0


async def test_the_poller_hands_every_queued_value_over_as_its_own_sample() -> None:
    async with _server() as (endpoint, a, b):
        samples: list[Reading] = []
        cfg = DeviceConfig.model_validate(
            {
                "id": "m-1",
                "profile": _PROFILE.id,
                "poll_interval": 30.0,  # a heartbeat only: samples come with the data
                "opcua": {"endpoint": endpoint, "mode": "subscribe",
                          "sampling_interval": 0.05, "publishing_interval": 0.5},
            }
        )  # fmt: skip
        poller = DevicePoller(
            cfg,
            _PROFILE,
            driver_factory=create_driver,
            on_sample=lambda _device, reading: samples.append(reading),
            on_state=lambda *_: None,
            metrics=AgentMetrics(),
            backoff=Backoff(0.1, 0.3),
        )
        task = asyncio.create_task(poller.run())
        try:
            await wait_for(lambda: any(s.values for s in samples), what="the first sample")
            await asyncio.sleep(0.6)  # the first heartbeat and its values are out
            samples.clear()
            await _burst(a, b, 5)
            await wait_for(lambda: len(samples) >= 5, within=10.0, what="five samples")
        finally:
            poller.stop()
            await task
        assert [s.values["a"] for s in samples] == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert [s.values["b"] for s in samples] == [10, 20, 30, 40, 50]


async def test_devices_connecting_together_fill_one_subscription() -> None:
    async with _server() as (endpoint, _a, _b):
        conn = OpcUaConnection(endpoint=endpoint, mode="subscribe", sampling_interval=0.1)
        drivers = [OpcUaDriver(_PROFILE, conn, name=f"m-{n}") for n in range(30)]
        try:
            await asyncio.gather(*(d.connect() for d in drivers))
            session = drivers[0].session
            assert session is not None and {id(d.session) for d in drivers} == {id(session)}
            # 60 items fit one subscription: not one per device racing to create it.
            assert len(session.subscriptions) == 1
            assert session.subscriptions[0].items == 60
            await wait_for(
                lambda: all(len(d._changes.latest) == 2 for d in drivers), what="every value"
            )
        finally:
            await asyncio.gather(*(d.aclose() for d in drivers))
