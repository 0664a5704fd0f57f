"""The driver interface every protocol implements, and the registry that finds them.

A driver reads a set of a device's points into one ``Reading`` and writes single points.
Whole-device failures raise from ``protocols.errors``; a point the device refuses while
others read fine goes into ``Reading.errors`` instead. Drivers do not retry beyond their
configured per-request retries: reconnection policy lives in the agent.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from device_profiles.schema import Point, Profile
from protocols import registry

__all__ = ["Driver", "DriverBase", "Reading", "Value", "create_driver", "now_ms"]

Value = bool | int | float | str


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Reading:
    """One poll of a device: good values, per-point errors, and non-Good qualities."""

    ts: int
    values: dict[str, Value] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    quality: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Driver(Protocol):
    async def connect(self) -> None:
        """Open the connection (raises ConnectError)."""

    async def read(self, points: Sequence[Point]) -> Reading:
        """Read these points of the device."""

    async def write(self, point: Point, value: Value) -> None:
        """Write one rw point (engineering value; scale reversed by the driver)."""

    async def aclose(self) -> None:
        """Close; safe to call twice."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class DriverBase(ABC):
    """What every driver shares: ``async with`` connects and closes."""

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def create_driver(profile: Profile, connection: Any, *, name: str) -> Driver:
    """A driver for ``profile``'s protocol: ``Class(profile, connection, name=name)``.

    The class is the one the protocol's registry entry names, imported on first use.
    """
    cls = registry.load_object(registry.get(profile.protocol).driver)
    driver: Driver = cls(profile, connection, name=name)
    return driver
