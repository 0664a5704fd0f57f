"""The project's protocol exception tree; library errors are mapped at the boundary.

ProtocolError
├── ConnectError          cannot reach or open the device
├── DeviceTimeout         the device did not answer in time
├── DeviceRejected        the device answered with an error (Modbus exception, bad OPC UA status)
│     .code carries the device's code (Modbus exception number, OPC UA status code)
├── DecodeError           the answer could not be turned into a value
└── ConfigError           the request cannot be made as configured (bad address, type)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "DeviceRejected",
    "DeviceTimeout",
    "ProtocolError",
]


class ProtocolError(Exception):
    """Base of every error a driver raises.

    ``detail`` is a short cause (an OPC UA status name, an OS error) that the agent
    shows after the reason in the device's state; empty when the reason says it all.
    """

    reason = "error"

    def __init__(self, message: str = "", *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ConnectError(ProtocolError):
    reason = "connect_failed"


class DeviceTimeout(ProtocolError):
    reason = "timeout"


class DeviceRejected(ProtocolError):
    reason = "device_exception"

    def __init__(self, message: str, code: int | None = None, *, detail: str = "") -> None:
        super().__init__(message, detail=detail)
        self.code = code


class DecodeError(ProtocolError):
    reason = "decode_error"


class ConfigError(ProtocolError):
    reason = "config_error"
