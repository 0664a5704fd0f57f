"""The registry's value types and errors: enterprises, agents, import results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from gateway.registry.codes import region_label
from gateway.registry.ledger import RowError

__all__ = [
    "STATUSES",
    "Agent",
    "Conflict",
    "Enterprise",
    "ImportResult",
    "NotFound",
    "RegistryError",
    "Status",
]

Status = Literal["registered", "provisioned", "connected", "decommissioned"]
STATUSES: tuple[Status, ...] = get_args(Status)


class RegistryError(ValueError):
    """A request the registry refuses; the message names the enterprise/device/agent."""


class NotFound(RegistryError):
    """The enterprise, agent, device or key named does not exist."""


class Conflict(RegistryError):
    """The id is taken (by another enterprise, or already registered)."""


@dataclass(slots=True)
class Enterprise:
    id: str
    name: str
    region: str
    industry: str
    created_ms: int

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "region": self.region,
            "region_label": region_label(self.region),
            "industry": self.industry,
            "created_ms": self.created_ms,
        }


@dataclass(slots=True)
class Agent:
    id: str
    enterprise: str
    password_hash: str | None
    created_ms: int
    last_birth_ms: int | None = None
    bdseq: int | None = None
    online: bool = False
    codec: str = "json"

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "enterprise": self.enterprise,
            "created_ms": self.created_ms,
            "last_birth_ms": self.last_birth_ms,
            "bdseq": self.bdseq,
            "online": self.online,
            "codec": self.codec,
        }


@dataclass(frozen=True, slots=True)
class ImportResult:
    accepted: int
    created: int
    updated: int
    errors: list[RowError]
