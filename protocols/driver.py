"""The driver interface every protocol implements, and the registry that finds them.

A driver reads a set of a device's points into one ``Reading`` and writes single points.
Whole-device failures raise from ``protocols.errors``; a point the device refuses while
others read fine goes into ``Reading.errors`` instead. Drivers do not retry beyond their
configured per-request retries: reconnection policy lives in the agent.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from device_profiles.schema import Point, Profile

__all__ = ["DRIVERS", "Driver", "DriverBase", "Reading", "Value", "create_driver", "now_ms"]

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


# protocol name -> "module:Class"; imported only when a device uses it.
DRIVERS: dict[str, str] = {
    "modbus": "protocols.modbus.driver:ModbusDriver",
    "opcua": "protocols.opcua.driver:OpcUaDriver",
}


def create_driver(profile: Profile, connection: Any, *, name: str) -> Driver:
    """A driver for ``profile``'s protocol: ``Class(profile, connection, name=name)``."""
    target = DRIVERS.get(profile.protocol)
    if target is None:
        raise KeyError(f"no driver for protocol '{profile.protocol}'")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    driver: Driver = cls(profile, connection, name=name)
    return driver
