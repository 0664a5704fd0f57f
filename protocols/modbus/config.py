"""How to reach a Modbus device: the connection part of an agent's device entry."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ModbusConnection"]


class ModbusConnection(BaseModel):
    """TCP, RTU over a serial line, or RTU framed over TCP; several units may share a line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: Literal["tcp", "rtu", "rtu-over-tcp"] = "tcp"
    host: str | None = Field(default=None, description="For tcp and rtu-over-tcp.")
    port: int = Field(default=502, ge=1, le=65535)
    serial_port: str | None = Field(default=None, description="For rtu, e.g. /dev/ttyUSB0.")
    baudrate: int = Field(default=9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit: int = Field(default=1, ge=0, le=247, description="Unit (slave) id.")
    timeout: float = Field(default=1.0, gt=0, le=60, description="Seconds per request.")
    retries: int = Field(default=1, ge=0, le=10, description="Retries of a failed request.")
    pause: float = Field(
        default=0.0, ge=0, le=10, description="Seconds between requests (slow devices, RS-485)."
    )

    @model_validator(mode="after")
    def _where(self) -> Self:
        if self.transport == "rtu":
            if not self.serial_port:
                raise ValueError("transport rtu needs serial_port")
        elif not self.host:
            raise ValueError(f"transport {self.transport} needs host")
        return self

    @property
    def line_key(self) -> str:
        """Devices with the same key share one connection (one serial line, one TCP peer)."""
        if self.transport == "rtu":
            return f"rtu:{self.serial_port}"
        return f"{self.transport}:{self.host}:{self.port}"
