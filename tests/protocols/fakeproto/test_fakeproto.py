"""A protocol added from this folder alone: profile, agent config and a real poll through it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from device_profiles import ProfileError, parse_profile
from edge_agent.config import AgentConfigError, load_config
from edge_agent.metrics import AgentMetrics
from edge_agent.poller import DevicePoller
from iiot_common.backoff import Backoff
from protocols import registry
from protocols.driver import Reading, create_driver

HERE = Path(__file__).parent
VALUES = {"force": "1234", "strokes": "42"}


@pytest.fixture(autouse=True)
def _fakeproto() -> Iterator[None]:
    registry.register("fakeproto", "tests.protocols.fakeproto.protocol")
    yield
    registry.unregister("fakeproto")


@pytest.fixture
async def device() -> AsyncIterator[int]:
    """A device speaking the fake protocol on a free loopback port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            key = line.decode().removeprefix("GET ").strip()
            writer.write(f"{VALUES.get(key, 'ERR')}\n".encode())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_a_poll_through_the_fake_protocol_delivers_a_sample(
    device: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKEPROTO_PORT", str(device))
    monkeypatch.setenv("FAKEPROTO_DATA", str(tmp_path))
    loaded = load_config(HERE / "agent.yaml")
    (dev,) = loaded.config.devices
    assert dev.protocol == "fakeproto"
    samples: list[Reading] = []
    arrived = asyncio.Event()

    def on_sample(device_id: str, reading: Reading) -> None:
        samples.append(reading)
        arrived.set()

    poller = DevicePoller(
        dev,
        loaded.device_profiles[dev.id],
        driver_factory=create_driver,
        on_sample=on_sample,
        on_state=lambda d, on, why: None,
        metrics=AgentMetrics(),
        backoff=Backoff(0.05, 0.1),
    )
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(10):
            await arrived.wait()
    finally:
        poller.stop()
        await task
    assert samples[0].values == {"force": pytest.approx(123.4), "strokes": 42.0}
    assert poller.health.online is True


def test_its_address_errors_name_the_file_and_point() -> None:
    data = {
        "id": "press-bad",
        "name": "Bad press",
        "name_zh": "坏压机",
        "family": "other",
        "category": "intelligent",
        "protocol": "fakeproto",
        "points": [
            {"name": "force", "type": "float32", "fakeproto": {"key": "force"}},
            {"name": "force2", "type": "float32", "fakeproto": {"key": "force"}},
            {"name": "speed", "type": "float32", "fakeproto": {"key": "Speed!"}},
        ],
    }
    with pytest.raises(ProfileError) as info:
        parse_profile(data, "press-bad.yaml")
    text = str(info.value)
    assert "press-bad.yaml: point 'speed': fakeproto.key: String should match" in text
    data["points"] = data["points"][:2]
    with pytest.raises(ProfileError, match="point 'force2': key 'force' is also point 'force'"):
        parse_profile(data, "press-bad.yaml")


def test_a_device_entry_is_checked_by_its_connection_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKEPROTO_PORT", "0")
    monkeypatch.setenv("FAKEPROTO_DATA", str(tmp_path))
    with pytest.raises(AgentConfigError, match=r"device 'press-1': fakeproto\.port"):
        load_config(HERE / "agent.yaml")


def test_without_registration_the_key_is_unknown() -> None:
    registry.unregister("fakeproto")
    with pytest.raises(ProfileError, match="protocol: Input should be a registered protocol"):
        parse_profile(
            {
                "id": "press-x",
                "name": "X",
                "name_zh": "X",
                "family": "other",
                "category": "intelligent",
                "protocol": "fakeproto",
                "points": [{"name": "force", "type": "float32", "fakeproto": {"key": "f"}}],
            }
        )
