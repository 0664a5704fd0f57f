"""How the simulators serve OPC UA profiles: one server, on a port of its own, per device."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from protocols.registry import SimulatedDevice

__all__ = ["HOOK", "OpcUaSimHook"]


class OpcUaSimHook:
    """Each device is its own OPC UA server; Modbus-only plant options are refused."""

    shares_port = False

    def check_device(self, device: SimulatedDevice) -> list[str]:
        problems = []
        if device.serial or device.framer != "tcp":
            problems.append("serial/framer apply to Modbus devices only")
        if device.gateway is not None:
            problems.append("gateway applies to Modbus devices only")
        return problems

    def listener(self, device: SimulatedDevice) -> tuple[str | None, str]:
        return None, "opcua"

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
        try:
            # Imported on first use: asyncua is heavy, and optional in a trimmed install.
            module = importlib.import_module("simulators.opcua_server")
        except ModuleNotFoundError as exc:
            if exc.name != "simulators.opcua_server":
                raise
            raise RuntimeError(
                "the OPC UA simulator (simulators/opcua_server.py) is not available "
                "in this installation; OPC UA profiles cannot be served"
            ) from exc
        (device,) = devices.values()
        return module.OpcUaSimServer(device, host=host, port=port)

    def url(self, host: str, port: int | None, unit: int, framer: str, serial: str | None) -> str:
        return f"opc.tcp://{host}:{port}"

    def agent_connection(
        self, host: str, port: int | None, unit: int, framer: str, url: str
    ) -> dict[str, Any]:
        return {"endpoint": url, "timeout": 2.0}


HOOK = OpcUaSimHook()
