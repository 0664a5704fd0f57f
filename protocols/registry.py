"""Protocols by name: what each one adds to profiles, agent configs, the agent and simulators.

A protocol is one folder, ``protocols/<name>/``, whose ``protocol`` module defines
``PROTOCOL``, a :class:`ProtocolSpec`. The spec names, under the protocol's name as the
YAML key:

* ``address`` — the model of a profile point's ``<name>:`` mapping (where the value lives);
* ``settings`` — the model of a profile's ``<name>:`` mapping (profile-wide), if any;
* ``connection`` — the model of an agent device entry's ``<name>:`` mapping;
* ``check_profile`` — checks across a whole profile's points (overlaps, ...);
* ``driver`` — ``"module:Class"``, built as ``Class(profile, connection, name=...)``;
* ``simulator`` — ``"module:attr"`` of a :class:`SimulatorHook`, where one exists.

Built-in protocols are listed here by module path and imported on first use, so a
profile check never imports pymodbus or asyncua. Others call :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    from device_profiles.schema import Profile

__all__ = [
    "ProtocolSpec",
    "SimulatedDevice",
    "SimulatorHook",
    "UnknownProtocol",
    "get",
    "load_object",
    "names",
    "register",
    "unregister",
]


class UnknownProtocol(KeyError):
    """A protocol name nothing is registered under."""


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """Everything the rest of the system needs to know about one protocol."""

    name: str
    address: type[BaseModel]
    connection: type[BaseModel]
    driver: str
    settings: type[BaseModel] | None = None
    # True: a profile that omits its ``<name>:`` mapping gets the settings' defaults.
    settings_default: bool = False
    check_profile: Callable[[Profile], list[str]] | None = None
    simulator: str | None = None


class SimulatedDevice(Protocol):
    """What a simulator hook is told about one served device (a plant entry)."""

    @property
    def id(self) -> str: ...
    @property
    def unit(self) -> int: ...
    @property
    def framer(self) -> str: ...
    @property
    def serial(self) -> str | None: ...
    @property
    def gateway(self) -> str | None: ...


class SimulatorHook(Protocol):
    """How the simulators serve profiles of one protocol.

    ``shares_port``: several devices may answer behind one listener (as unit ids).
    """

    shares_port: bool

    def check_device(self, device: SimulatedDevice) -> list[str]:
        """Plant-entry options this protocol does not support (empty: all fine)."""
        ...

    def listener(self, device: SimulatedDevice) -> tuple[str | None, str]:
        """``(serial line or None, framer)`` the device is served with."""
        ...

    def server(
        self,
        devices: Mapping[int, Any],
        *,
        host: str,
        port: int | None,
        framer: str,
        serial_port: str | None,
        strict_addresses: bool,
        serial_line: Mapping[str, Any] | None = None,
    ) -> Any:
        """A server (``start()``/``stop()``) answering for ``devices`` (unit → SimDevice)."""
        ...

    def url(self, host: str, port: int | None, unit: int, framer: str, serial: str | None) -> str:
        """Where a client reaches the device, as text."""
        ...

    def agent_connection(
        self, host: str, port: int | None, unit: int, framer: str, url: str
    ) -> dict[str, Any]:
        """The ``<name>:`` mapping of an agent device entry that reaches it."""
        ...


# name -> module defining PROTOCOL; imported only when a profile or device uses it.
_MODULES: dict[str, str] = {
    "modbus": "protocols.modbus.protocol",
    "opcua": "protocols.opcua.protocol",
}
_LOADED: dict[str, ProtocolSpec] = {}


def names() -> tuple[str, ...]:
    """Every registered protocol name (the YAML keys they own)."""
    return tuple(_MODULES)


def register(name: str, module: str) -> None:
    """Register the protocol whose ``module`` defines ``PROTOCOL`` under ``name``."""
    if name in _MODULES and _MODULES[name] != module:
        raise ValueError(f"protocol '{name}' is already registered by {_MODULES[name]}")
    _MODULES[name] = module


def unregister(name: str) -> None:
    """Forget a registered protocol (tests, plug-ins being unloaded)."""
    _MODULES.pop(name, None)
    _LOADED.pop(name, None)


def get(name: str) -> ProtocolSpec:
    """The spec of protocol ``name``, importing its module on first use."""
    spec = _LOADED.get(name)
    if spec is not None:
        return spec
    module = _MODULES.get(name)
    if module is None:
        raise UnknownProtocol(f"unknown protocol '{name}' (known: {', '.join(_MODULES)})")
    spec = importlib.import_module(module).PROTOCOL
    if not isinstance(spec, ProtocolSpec) or spec.name != name:
        raise TypeError(f"{module}.PROTOCOL is not the ProtocolSpec of '{name}'")
    _LOADED[name] = spec
    return spec


def load_object(target: str) -> Any:
    """The object a ``"module:attr"`` string names."""
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
