"""The device registry: every device an enterprise owns, its onboarding and online state."""

from gateway.registry.core import Registry
from gateway.registry.ledger import DeviceInput, LedgerError, RowError, parse_ledger
from gateway.registry.model import (
    Agent,
    Conflict,
    Enterprise,
    ImportResult,
    NotFound,
    RegistryError,
)
from gateway.registry.targets import Target, TargetsError, read_targets_file

__all__ = [
    "Agent",
    "Conflict",
    "DeviceInput",
    "Enterprise",
    "ImportResult",
    "LedgerError",
    "NotFound",
    "Registry",
    "RegistryError",
    "RowError",
    "Target",
    "TargetsError",
    "parse_ledger",
    "read_targets_file",
]
