"""The fake protocol's driver: one ``GET`` per point over one TCP connection."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from device_profiles.schema import Point, Profile
from protocols.driver import DriverBase, Reading, Value, now_ms
from protocols.errors import ConfigError, ConnectError, DeviceTimeout
from tests.protocols.fakeproto.protocol import FakeAddress, FakeConnection


class FakeProtoDriver(DriverBase):
    def __init__(self, profile: Profile, connection: FakeConnection, *, name: str) -> None:
        self.profile = profile
        self.connection = connection
        self.name = name
        self._io: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def connect(self) -> None:
        c = self.connection
        try:
            self._io = await asyncio.wait_for(asyncio.open_connection(c.host, c.port), c.timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"device '{self.name}': cannot connect: {exc}") from exc

    async def read(self, points: Sequence[Point]) -> Reading:
        if self._io is None:
            raise ConnectError(f"device '{self.name}': not connected")
        reader, writer = self._io
        reading = Reading(now_ms())
        for p in points:
            a = p.address("fakeproto")
            assert isinstance(a, FakeAddress)
            writer.write(f"GET {a.key}\n".encode())
            try:
                line = await asyncio.wait_for(reader.readline(), self.connection.timeout)
            except TimeoutError as exc:
                raise DeviceTimeout(f"device '{self.name}': no answer") from exc
            text = line.decode().strip()
            if text == "ERR" or not text:
                reading.errors[p.name] = "refused"
            else:
                reading.values[p.name] = float(text) * p.scale + p.offset
        return reading

    async def write(self, point: Point, value: Value) -> None:
        raise ConfigError(f"point '{point.name}': the fake protocol is read-only")

    async def aclose(self) -> None:
        io, self._io = self._io, None
        if io is not None:
            io[1].close()
