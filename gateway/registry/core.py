"""The device registry: enterprises, agents, devices, provisioning keys, ratio snapshots.

One object over shared state (``store``), each concern in its own module: the ingest
sink (``sink``), enterprises/agents/keys (``agents``), devices and the ledger
(``devices``), stored ratio snapshots (``snapshots``), targets of enterprises on the
cloud (``targets``). Ratio masks and arithmetic are
in ``gateway.ratios``.
"""

from __future__ import annotations

from gateway.registry.agents import AgentsPart
from gateway.registry.devices import STATUSES, DevicesPart
from gateway.registry.model import (
    Agent,
    Conflict,
    Enterprise,
    ImportResult,
    NotFound,
    RegistryError,
)
from gateway.registry.sink import IngestSinkPart
from gateway.registry.snapshots import SnapshotsPart
from gateway.registry.targets import TargetsPart

__all__ = [
    "STATUSES",
    "Agent",
    "Conflict",
    "Enterprise",
    "ImportResult",
    "NotFound",
    "Registry",
    "RegistryError",
]


class Registry(IngestSinkPart, AgentsPart, DevicesPart, SnapshotsPart, TargetsPart):
    """The registry; also the gateway's ``IngestSink``."""
