"""The control plane, version 1: what flows down from the gateway to an agent, and the answers.

Topics, all under ``iiot/v1/{enterprise}/{agent}`` beside the uplink contract:

    .../config             gateway → agent   retained, QoS 1   DesiredConfig
    .../reported           agent → gateway   retained, QoS 1   ConfigReport
    .../scan               gateway → agent   QoS 1             ScanRequest
    .../discovered         agent → gateway   QoS 1             ScanReport
    .../{device}/cmd       gateway → agent   QoS 1             WriteCommand
    .../{device}/result    agent → gateway   QoS 1             WriteResult

The broker's ACL lets an agent publish only the uplink topics (``agent``, ``batch``, ``+/state``,
``+/data``, ``reported``, ``discovered``, ``+/result``) and read only its own ``config``,
``scan`` and ``+/cmd``; only the gateway publishes the downlink ones. Commands are never
retained, spooled or replayed: an agent refuses one past its ``expires`` and answers a
repeated ``id`` from memory without writing again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from protocols.mqtt.contract import (
    MAX_TS_MS,
    TOPIC_PREFIX,
    ContractError,
    Identifier,
    validate_identifier,
)

__all__ = [
    "CONTROL_DEVICE_KINDS",
    "CONTROL_KINDS",
    "Candidate",
    "ConfigReport",
    "ControlKind",
    "ControlTopic",
    "DesiredConfig",
    "Proposal",
    "ScanReport",
    "ScanRequest",
    "WriteCommand",
    "WriteResult",
    "WriteStatus",
    "parse_control_topic",
]

_Ident = Identifier
_Ts = Annotated[int, Field(ge=0, le=MAX_TS_MS, description="Unix time, milliseconds.")]


class ControlKind(StrEnum):
    CONFIG = "config"
    REPORTED = "reported"
    SCAN = "scan"
    DISCOVERED = "discovered"
    CMD = "cmd"
    RESULT = "result"


# Agent-level kinds sit right under the agent; device-level kinds under a device.
CONTROL_KINDS = frozenset(
    {ControlKind.CONFIG, ControlKind.REPORTED, ControlKind.SCAN, ControlKind.DISCOVERED}
)
CONTROL_DEVICE_KINDS = frozenset({ControlKind.CMD, ControlKind.RESULT})
DOWNLINK = frozenset({ControlKind.CONFIG, ControlKind.SCAN, ControlKind.CMD})


@dataclass(frozen=True, slots=True)
class ControlTopic:
    """A validated control-plane topic."""

    enterprise: str
    agent: str
    kind: ControlKind
    device: str | None = None

    def __post_init__(self) -> None:
        validate_identifier(self.enterprise, "enterprise")
        validate_identifier(self.agent, "agent")
        if self.kind in CONTROL_DEVICE_KINDS:
            if self.device is None:
                raise ContractError("bad_topic", f"a {self.kind.value} topic needs a device")
            validate_identifier(self.device, "device")
        elif self.device is not None:
            raise ContractError("bad_topic", f"a {self.kind.value} topic has no device")

    @property
    def downlink(self) -> bool:
        return self.kind in DOWNLINK

    def __str__(self) -> str:
        base = f"{TOPIC_PREFIX}/{self.enterprise}/{self.agent}"
        if self.device is None:
            return f"{base}/{self.kind.value}"
        return f"{base}/{self.device}/{self.kind.value}"


def parse_control_topic(topic: str) -> ControlTopic | None:
    """The control topic ``topic`` names, or None when it is not a control-plane topic."""
    parts = topic.split("/")
    if len(parts) not in (5, 6) or parts[0] != "iiot" or parts[1] != "v1":
        return None
    try:
        kind = ControlKind(parts[-1])
    except ValueError:
        return None
    if len(parts) == 5 and kind in CONTROL_KINDS:
        return ControlTopic(parts[2], parts[3], kind)
    if len(parts) == 6 and kind in CONTROL_DEVICE_KINDS:
        return ControlTopic(parts[2], parts[3], kind, parts[4])
    return None


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DesiredConfig(_Msg):
    """An agent's desired configuration, as the gateway keeps it."""

    version: int = Field(ge=1, description="Increases with every change the gateway accepts.")
    ts: _Ts
    devices: list[dict[str, Any]] = Field(
        default_factory=list, description="Device entries, with the same keys as agent.yaml's."
    )
    profiles: list[dict[str, Any]] = Field(
        default_factory=list, description="Profiles the devices use that the agent may lack."
    )
    families: list[dict[str, Any]] = Field(
        default_factory=list, description="Families those profiles name that the agent may lack."
    )
    discovery: dict[str, Any] | None = Field(
        default=None, description="Where a scan may look, with agent.yaml's discovery keys."
    )


class ConfigReport(_Msg):
    """The agent's answer to a desired configuration."""

    version: int = Field(ge=0, description="The version this report is about.")
    applied: bool = Field(description="True when that version now runs.")
    running_version: int = Field(ge=0, description="The version running now (0: local file).")
    ts: _Ts
    errors: dict[str, str] = Field(
        default_factory=dict, description="Why a version was refused, by device id or 'config'."
    )


class WriteStatus(StrEnum):
    OK = "ok"  # written and read back
    REFUSED = "refused"  # not writable, wrong type, out of range, unknown device or point
    EXPIRED = "expired"  # arrived after its expiry; never written
    FAILED = "failed"  # the device refused or did not answer the write
    MISMATCH = "mismatch"  # written, but the read-back differs
    TIMEOUT = "timeout"  # no answer from the agent in time (gateway side)
    OFFLINE = "offline"  # the agent is offline; never sent (gateway side)


class WriteCommand(_Msg):
    """Write one point of one device."""

    id: _Ident = Field(description="Request id; a repeated id is answered, not written again.")
    point: _Ident
    value: bool | int | float | str
    ts: _Ts
    expires: _Ts = Field(description="The agent refuses the command after this time.")


class WriteResult(_Msg):
    """The agent's answer to a WriteCommand."""

    id: _Ident
    status: WriteStatus
    reason: str = ""
    previous: bool | int | float | str | None = Field(
        default=None, description="The engineering value read before the write."
    )
    value: bool | int | float | str | None = Field(
        default=None, description="The engineering value read back after the write."
    )
    ts: _Ts
    # Only on answers to a Sparkplug DCMD, which another host may have sent: the gateway
    # audits such a write from the answer alone.
    point: str | None = Field(
        default=None, max_length=64, description="The point (or DCMD metric) asked to write."
    )
    requested: bool | int | float | str | None = Field(
        default=None, description="The value the DCMD asked for."
    )


class ScanRequest(_Msg):
    """Ask the agent to scan where its configuration allows."""

    id: _Ident
    ts: _Ts
    expires: _Ts


class Candidate(_Msg):
    profile: _Ident
    score: float = Field(ge=0, le=1)


class Proposal(_Msg):
    """Equipment that answered a scan and is not configured on the agent yet."""

    protocol: _Ident
    address: dict[str, Any] = Field(
        description="The connection keys of an agent.yaml device entry, e.g. {'modbus': {...}}."
    )
    answered: dict[str, Any] = Field(
        default_factory=dict,
        description="What answered: SunSpec models, device identification, endpoint, types.",
    )
    candidates: list[Candidate] = Field(default_factory=list, description="Best first.")


class ScanReport(_Msg):
    scan: _Ident
    ts: _Ts
    done: bool = True
    proposals: list[Proposal] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
