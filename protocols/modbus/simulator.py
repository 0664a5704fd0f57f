"""How the simulators serve Modbus profiles: units behind shared listeners, TCP or RTU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocols.registry import SimulatedDevice

__all__ = ["HOOK", "ModbusSimHook"]


class ModbusSimHook:
    """Devices on one port (or serial line) answer as unit ids: a gateway in front of RS-485."""

    shares_port = True

    def check_device(self, device: SimulatedDevice) -> list[str]:
        return []

    def listener(self, device: SimulatedDevice) -> tuple[str | None, str]:
        if device.serial is not None:
            return device.serial, "rtu"
        return None, device.framer

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
        from simulators.modbus_server import ModbusSimServer

        return ModbusSimServer(
            dict(devices),
            host=host,
            port=port or 0,
            framer="tcp" if framer == "tcp" else "rtu",
            serial_port=serial_port,
            strict_addresses=strict_addresses,
            **(serial_line or {}),
        )

    def url(self, host: str, port: int | None, unit: int, framer: str, serial: str | None) -> str:
        if serial is not None:
            return f"rtu:{serial}#unit={unit}"
        scheme = "tcp" if framer == "tcp" else "rtu-over-tcp"
        return f"{scheme}://{host}:{port}#unit={unit}"

    def agent_connection(
        self, host: str, port: int | None, unit: int, framer: str, url: str
    ) -> dict[str, Any]:
        return {
            "transport": "tcp" if framer == "tcp" else "rtu-over-tcp",
            "host": host,
            "port": port,
            "unit": unit or 1,
            "timeout": 1.0,
            "retries": 0,
        }


HOOK = ModbusSimHook()
