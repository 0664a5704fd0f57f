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
    "DeviceMoveIn",
    "DeviceMoveOut",
    "DeviceMovesOut",
    "DeviceOut",
    "DeviceStatesOut",
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
    "OnCloudGroup",
    "OnCloudOut",
    "ProvisionIn",
    "RatioGroup",
    "RatiosOut",
    "ReadyOut",
    "RotationOut",
    "StateChangeOut",
    "TargetIn",
    "TargetOut",
    "TargetsIn",
    "TargetsOut",
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
    quality_connected: int = Field(
        description="Connected and passing the data-quality gate (see the definitions)."
    )
    online: int
    ratio: float
    quality_ratio: float
    online_ratio: float


class RatiosOut(BaseModel):
    window_s: int
    as_of: int = Field(description="Reference time, Unix ms.")
    kind: Literal["equipment", "product"]
    group_by: str | None
    groups: list[RatioGroup]
    overall: RatioGroup


class OnCloudGroup(BaseModel):
    key: str
    label: str
    registered: int = Field(description="Enterprises registered in the group.")
    on_cloud: int = Field(description="Enterprises on the cloud (上云企业数).")
    ratio: float = Field(description="on_cloud / registered.")
    target: int | None = Field(description="The region's target for the year; null: none.")
    progress: float | None = Field(description="on_cloud / target; null without a target.")


class OnCloudOut(BaseModel):
    window_s: int
    as_of: int = Field(description="Reference time, Unix ms.")
    year: int = Field(description="Year of as_of (China Standard Time) the targets are for.")
    min_connected_devices: int
    group_by: str | None
    groups: list[OnCloudGroup]
    overall: OnCloudGroup


class TargetIn(_In):
    region: str = Field(description="GB/T 2260 six-digit code: 130000, 130100 or 130102.")
    year: int | None = Field(default=None, ge=2000, le=2200, description="None: every year.")
    target: int = Field(ge=1, le=10**9, description="Enterprises on the cloud.")


class TargetsIn(_In):
    targets: list[TargetIn] = Field(max_length=100_000)


class TargetOut(BaseModel):
    region: str
    region_label: str
    year: int | None
    target: int
    updated_ms: int | None


class TargetsOut(BaseModel):
    targets: list[TargetOut]


class HistoryPoint(BaseModel):
    ts: int
    total: int
    connected: int
    quality_connected: int | None = Field(
        description="Connected and passing the data-quality gate; null in a snapshot "
        "stored before it was recorded."
    )
    online: int
    ratio: float
    quality_ratio: float | None
    online_ratio: float


class HistorySeries(BaseModel):
    key: str
    label: str
    points: list[HistoryPoint]


class HistoryOut(BaseModel):
    group_by: str
    kind: Literal["equipment", "product"]
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
    kind: Literal["equipment", "product"] | None = Field(
        default=None,
        description="equipment (production equipment, the default) or product (made by the "
        "enterprise; counted in its region wherever installed).",
    )
    site_region: str | None = Field(
        default=None, description="Products only: GB/T 2260 code of where it is installed."
    )


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
    sequence_gaps: int = Field(
        description="Breaks in the device's sample sequence seen since the gateway started."
    )
    missed_samples: int = Field(description="Samples missing in those gaps.")
    last_gap_ms: int | None = Field(description="Timestamp of the sample after the last gap.")


class StateChangeOut(BaseModel):
    ts: int = Field(description="Unix time, milliseconds.")
    online: bool
    reason: str
    source: Literal["agent", "device"] = Field(
        description="agent: the agent's session began or ended; device: the agent's "
        "report about the device."
    )


class DeviceStatesOut(BaseModel):
    enterprise: str
    device: str
    items: list[StateChangeOut] = Field(description="Newest first.")


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
    expires_in_s: int | None = Field(
        default=None,
        ge=1,
        le=366 * 86400,
        description="Validity in seconds; default api.provisioning_key_expiry (7 days).",
    )
    max_uses: int | None = Field(default=None, ge=1, le=1_000_000)
    allow_rotation: bool = Field(
        default=False,
        description="May give an agent id that exists already a new password (locking "
        "out the running agent); every such use is audited.",
    )


class KeyOut(BaseModel):
    key_id: str
    key: str = Field(description="Shown once; only its hash is stored.")
    enterprise: str
    expires_ms: int | None
    max_uses: int | None
    allow_rotation: bool


class DeviceMoveIn(_In):
    agent: Ident | None = Field(
        description="The agent of the device's enterprise it now belongs to; null: the next "
        "agent whose birth names it."
    )


class DeviceMoveOut(BaseModel):
    enterprise: str
    device: str
    from_agent: str | None
    to_agent: str | None
    at_ms: int
    by: str = Field(
        description="'admin <token fingerprint>', the configuration's author, or the "
        "import's source ('ledger', 'manual')."
    )
    via: Literal["api", "config", "ledger", "decommission"]


class DeviceMovesOut(BaseModel):
    items: list[DeviceMoveOut]


class RotationOut(BaseModel):
    agent: str
    enterprise: str
    at_ms: int
    by: str = Field(description="key:<key id>, or the admin token's fingerprint.")
    via: Literal["api", "key"]


class AgentOut(BaseModel):
    id: str
    enterprise: str
    created_ms: int
    last_birth_ms: int | None
    bdseq: int | None
    online: bool
    codec: Literal["json", "sparkplug"] = Field(
        description="Wire format of its last birth; a write to a 'sparkplug' agent is a DCMD."
    )


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
    rotated: bool = Field(
        description="The agent existed: this password replaced its old one, which no longer works."
    )
