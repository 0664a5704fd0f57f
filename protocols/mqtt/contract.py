"""The uplink contract, version 1: topics and JSON payloads between agent and gateway.

Topics, all under ``iiot/v1/{enterprise}/{agent}``:

    .../agent              retained, QoS 1   Birth (will: {"online": false, "bdseq": n})
    .../batch              QoS 1             BatchMessage: {"devices": {device: DataMessage}}
    .../{device}/state     retained, QoS 1   DeviceState
    .../{device}/data      QoS 1             DataMessage: {"seq", "samples": [Sample]}
    .../{device}/cmd       QoS 1             gateway → agent writes (reserved)

The broker's ACL confines an agent to its own prefix; the gateway accepts a device's
data, batch part, state or birth entry only from the agent the device belongs to (the
registry's ``devices.agent``: assigned by the ledger or remote configuration, else the
first agent whose birth names it) and refuses any other's as ``device_not_owned``.

Identifiers match ``[A-Za-z0-9_.-]{1,64}`` (``iiot_common.identifier``); anything else is
refused where it enters. Data messages are written and read by a codec
(``protocols.mqtt.codec``); the models here are the reference it is tested against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from iiot_common.identifier import (
    IDENTIFIER_PATTERN,
    Identifier,
    identifier_error,
    is_identifier,
)

__all__ = [
    "CONTRACT_VERSION",
    "IDENTIFIER_PATTERN",
    "MAX_SEQ",
    "MAX_TS_MS",
    "TOPIC_PREFIX",
    "BatchMessage",
    "Birth",
    "BirthDevice",
    "ContractError",
    "DataMessage",
    "DeviceState",
    "Identifier",
    "Kind",
    "PointValue",
    "Sample",
    "Topic",
    "Will",
    "agent_filter",
    "decode_batch_message",
    "decode_data_message",
    "decode_payload",
    "encode",
    "enterprise_filter",
    "parse_topic",
    "validate_identifier",
]

CONTRACT_VERSION = 1
TOPIC_PREFIX = "iiot/v1"

# Sequence numbers fit a signed 64-bit integer (SQLite, InfluxDB); timestamps are ms up to
# the last instant a signed 64-bit nanosecond timestamp reaches (2262-04-11).
MAX_SEQ = 2**63 - 1
MAX_TS_MS = 9_223_372_036_854

PointValue = bool | int | float | str | None


class ContractError(ValueError):
    """A topic or payload that breaks the contract; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validate_identifier(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a valid identifier, else raise ContractError naming it."""
    if not is_identifier(value):
        raise ContractError("bad_identifier", identifier_error(value, what))
    return value


class Kind(StrEnum):
    AGENT = "agent"
    BATCH = "batch"
    STATE = "state"
    DATA = "data"
    CMD = "cmd"


# Topics of the agent itself, with no device level.
_AGENT_LEVEL = frozenset({Kind.AGENT, Kind.BATCH})


@dataclass(frozen=True, slots=True)
class Topic:
    """A validated contract topic."""

    enterprise: str
    agent: str
    kind: Kind
    device: str | None = None

    def __post_init__(self) -> None:
        validate_identifier(self.enterprise, "enterprise")
        validate_identifier(self.agent, "agent")
        if self.kind in _AGENT_LEVEL:
            if self.device is not None:
                raise ContractError("bad_topic", f"an {self.kind.value} topic has no device")
        else:
            if self.device is None:
                raise ContractError("bad_topic", f"a {self.kind.value} topic needs a device")
            validate_identifier(self.device, "device")

    def __str__(self) -> str:
        base = f"{TOPIC_PREFIX}/{self.enterprise}/{self.agent}"
        if self.kind in _AGENT_LEVEL:
            return f"{base}/{self.kind.value}"
        return f"{base}/{self.device}/{self.kind.value}"

    @classmethod
    def agent_topic(cls, enterprise: str, agent: str) -> Topic:
        return cls(enterprise, agent, Kind.AGENT)

    @classmethod
    def batch_topic(cls, enterprise: str, agent: str) -> Topic:
        return cls(enterprise, agent, Kind.BATCH)

    @classmethod
    def device_topic(cls, enterprise: str, agent: str, device: str, kind: Kind) -> Topic:
        return cls(enterprise, agent, kind, device)


def parse_topic(topic: str) -> Topic:
    """Parse a topic string; raises ContractError('bad_topic' / 'bad_identifier')."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "iiot" or parts[1] != "v1":
        raise ContractError("bad_topic", f"topic {topic!r} is not under {TOPIC_PREFIX}/")
    if len(parts) == 5 and parts[4] in ("agent", "batch"):
        return Topic(parts[2], parts[3], Kind(parts[4]))
    if len(parts) == 6:
        try:
            kind = Kind(parts[5])
        except ValueError:
            raise ContractError(
                "bad_topic", f"topic {topic!r}: unknown kind {parts[5]!r}"
            ) from None
        if kind in _AGENT_LEVEL:
            raise ContractError("bad_topic", f"topic {topic!r}: {kind.value!r} takes no device")
        return Topic(parts[2], parts[3], kind, parts[4])
    raise ContractError("bad_topic", f"topic {topic!r} has the wrong number of levels")


def enterprise_filter(enterprise: str) -> str:
    return f"{TOPIC_PREFIX}/{validate_identifier(enterprise, 'enterprise')}/#"


def agent_filter(enterprise: str, agent: str) -> str:
    return (
        f"{TOPIC_PREFIX}/{validate_identifier(enterprise, 'enterprise')}/"
        f"{validate_identifier(agent, 'agent')}/#"
    )


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BirthDevice(_Msg):
    """One device in a birth.

    ``protocol`` and ``family`` are any identifier, not a closed list: a newer agent may
    name a protocol or family this gateway does not know, and the gateway keeps it as
    unknown instead of refusing the whole birth.
    """

    id: Identifier
    profile: Identifier
    protocol: Identifier
    family: str | None = None
    category: str | None = None


class Birth(_Msg):
    online: Literal[True] = True
    bdseq: int = Field(ge=0, le=MAX_SEQ)
    ts: int = Field(ge=0, le=MAX_TS_MS, description="Unix time, milliseconds.")
    version: str = ""
    devices: list[BirthDevice] = Field(default_factory=list)
    config_version: int | None = Field(
        default=None, ge=0, le=MAX_SEQ, description="Remote configuration version applied."
    )


class Will(_Msg):
    online: Literal[False] = False
    bdseq: int = Field(ge=0, le=MAX_SEQ)


class DeviceState(_Msg):
    online: bool
    ts: int = Field(ge=0, le=MAX_TS_MS)
    reason: str = ""


class Sample(_Msg):
    ts: int = Field(ge=0, le=MAX_TS_MS, description="Unix time of the poll, milliseconds.")
    values: dict[Identifier, PointValue] = Field(default_factory=dict)
    errors: dict[Identifier, str] = Field(default_factory=dict)
    quality: dict[Identifier, str] | None = Field(
        default=None, description="OPC UA status name per point, where not Good."
    )


class DataMessage(_Msg):
    seq: int = Field(
        ge=0, le=MAX_SEQ, description="Per device, +1 per sample; the first sample's seq."
    )
    samples: list[Sample] = Field(min_length=1)

    @model_validator(mode="after")
    def _last_seq_fits(self) -> Self:
        if self.seq + len(self.samples) - 1 > MAX_SEQ:
            raise ValueError(f"seq of the last sample would pass {MAX_SEQ}")
        return self


class BatchMessage(_Msg):
    """Data messages of several devices of one agent in one MQTT message.

    Each device's part is exactly a ``DataMessage`` and is read as if it had come on that
    device's data topic: its own seq numbering, replays and gaps.
    """

    devices: dict[Identifier, DataMessage] = Field(min_length=1)


Payload = Birth | Will | DeviceState | DataMessage | BatchMessage


def encode(payload: BaseModel) -> bytes:
    """Compact JSON bytes of a payload model (None fields omitted)."""
    return payload.model_dump_json(exclude_none=True).encode()


def decode_data_message(payload: bytes) -> DataMessage:
    """Validate a data message with the model; raises ContractError with a reason.

    This is the reference the fast codecs (``protocols.mqtt.codec``) are tested against.
    """
    try:
        return DataMessage.model_validate_json(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refusal(Kind.DATA, exc) from exc


def decode_batch_message(payload: bytes) -> BatchMessage:
    """Validate a batch message with the model; raises ContractError with a reason."""
    try:
        return BatchMessage.model_validate_json(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refusal(Kind.BATCH, exc) from exc


def decode_payload(topic: Topic, payload: bytes) -> Payload:
    """Validate a payload against its topic kind; raises ContractError with a reason."""
    if topic.kind is Kind.DATA:
        return decode_data_message(payload)
    if topic.kind is Kind.BATCH:
        return decode_batch_message(payload)
    try:
        if topic.kind is Kind.STATE:
            return DeviceState.model_validate_json(payload)
        if topic.kind is Kind.AGENT:
            data: Any = json.loads(payload)
            if isinstance(data, dict) and data.get("online") is False:
                return Will.model_validate(data)
            return Birth.model_validate(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refusal(topic.kind, exc) from exc
    raise ContractError("bad_topic", f"no payload is accepted on {topic.kind.value} topics")


def _refusal(kind: Kind, exc: ValueError | UnicodeDecodeError) -> ContractError:
    """The ContractError for a payload the models refused: not_json or bad_payload."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return ContractError("not_json", f"payload is not JSON: {first['msg']}")
        loc = ".".join(str(x) for x in first["loc"])
        return ContractError("bad_payload", f"{kind.value} payload: {loc}: {first['msg']}")
    return ContractError("not_json", f"payload is not JSON: {exc}")
