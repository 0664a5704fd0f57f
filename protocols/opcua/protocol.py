"""OPC UA as the registry sees it: the models, checks, driver and simulator it brings."""

from __future__ import annotations

from protocols.opcua.config import OpcUaConnection
from protocols.opcua.profile import OpcUaAddress, OpcUaSettings, check_profile
from protocols.registry import ProtocolSpec

__all__ = ["PROTOCOL"]

PROTOCOL = ProtocolSpec(
    name="opcua",
    address=OpcUaAddress,
    connection=OpcUaConnection,
    settings=OpcUaSettings,
    check_profile=check_profile,
    driver="protocols.opcua.driver:OpcUaDriver",
    simulator="protocols.opcua.simulator:HOOK",
)
