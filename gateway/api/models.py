"""Request and response models of the gateway HTTP API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from gateway.registry.devices import device_view_fields
from iiot_common.identifier import Identifier

__all__ = [
    "AgentOut",
    "CredentialsOut",
    "DeviceDetailOut",
    "DeviceIn",
    "DeviceListOut",
    "DeviceOut",
    "EnterpriseIn",
    "EnterpriseOut",
    "ErrorOut",
    "HealthOut",
    "HistoryOut",
    "HistoryPoint",
    "HistorySeries",
    "KeyIn",
    "KeyOut",
    "LedgerOut",
    "LedgerRowError",
    "LiveOut",
    "OfflineOut",
    "ProvisionIn",
    "RatioGroup",
    "RatiosOut",
    "ReadyOut",
]

Ident = Identifier
PointValue = bool | int | float | str | None


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorOut(BaseModel):
    detail: str


class HealthOut(BaseModel):
    status: Literal["ok"]
    devices: int
    outbox_pending_lines: int | None = Field(
        default=None, description="Lines not yet written to InfluxDB (None: no outbox)."
    )


class LiveOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    reasons: list[str] = Field(description="Why the gateway is not ready; empty when it is.")


class RatioGroup(BaseModel):
    key: str
    label: str
    total: int
    connected: int
    online: int
    ratio: float
    online_ratio: float


class RatiosOut(BaseModel):
    window_s: int
    as_of: int = Field(description="Reference time, Unix ms.")
    group_by: str | None
    groups: list[RatioGroup]
    overall: RatioGroup


class HistoryPoint(BaseModel):
    ts: int
    total: int
    connected: int
    online: int
    ratio: float
    online_ratio: float


class HistorySeries(BaseModel):
    key: str
    label: str
    points: list[HistoryPoint]


class HistoryOut(BaseModel):
    group_by: str
    from_ms: int
    to_ms: int
    step_s: int | None
    series: list[HistorySeries]


class DeviceIn(_In):
    device_id: Ident
    enterprise: Ident
    region: str | None = Field(default=None, description="GB/T 2260 code; default: enterprise's.")
    industry: str | None = Field(default=None, description="GB/T 4754 code; default: enterprise's.")
    family: str | None = None
    category: str | None = None
    name: str | None = Field(default=None, max_length=200)
    agent: Ident | None = None
    profile: Ident | None = None


if TYPE_CHECKING:

    class DeviceOut(BaseModel):
        """A device as the registry shows it (fields: ``device_view_fields()``)."""

else:
    # Built from the registry's device fields so the two cannot drift apart.
    DeviceOut = create_model(
        "DeviceOut", **{name: (tp, ...) for name, tp in device_view_fields().items()}
    )


class DeviceDetailOut(DeviceOut):
    latest_ts: int | None
    latest: dict[str, PointValue]


class DeviceListOut(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[DeviceOut]


class OfflineOut(BaseModel):
    items: list[DeviceOut]


class LedgerRowError(BaseModel):
    line: int
    device_id: str | None
    reason: str


class LedgerOut(BaseModel):
    accepted: int
    created: int
    updated: int
    rejected: int
    errors: list[LedgerRowError]


class EnterpriseIn(_In):
    id: Ident
    name: str = Field(min_length=1, max_length=200)
    region: str = Field(description="GB/T 2260 six-digit code, e.g. 130102.")
    industry: str = Field(description="GB/T 4754 code, e.g. C30.")


class EnterpriseOut(BaseModel):
    id: str
    name: str
    region: str
    region_label: str
    industry: str
    created_ms: int


class KeyIn(_In):
    expires_in_s: int | None = Field(default=None, ge=1, le=366 * 86400)
    max_uses: int | None = Field(default=None, ge=1, le=1_000_000)


class KeyOut(BaseModel):
    key_id: str
    key: str = Field(description="Shown once; only its hash is stored.")
    enterprise: str
    expires_ms: int | None
    max_uses: int | None


class AgentOut(BaseModel):
    id: str
    enterprise: str
    created_ms: int
    last_birth_ms: int | None
    bdseq: int | None
    online: bool


class ProvisionIn(_In):
    key: str = Field(min_length=1, max_length=200)
    agent_id: Ident


class CredentialsOut(BaseModel):
    agent_id: str
    enterprise: str
    username: str
    password: str = Field(description="Shown once; the broker stores only its hash.")
    broker_url: str
    topic_prefix: str
