"""Modbus as the registry sees it: the models, checks, driver and simulator it brings."""

from __future__ import annotations

from protocols.modbus.config import ModbusConnection
from protocols.modbus.profile import ModbusAddress, ModbusSettings, check_profile
from protocols.registry import ProtocolSpec

__all__ = ["PROTOCOL"]

PROTOCOL = ProtocolSpec(
    name="modbus",
    address=ModbusAddress,
    connection=ModbusConnection,
    settings=ModbusSettings,
    settings_default=True,
    check_profile=check_profile,
    driver="protocols.modbus.driver:ModbusDriver",
    simulator="protocols.modbus.simulator:HOOK",
)
