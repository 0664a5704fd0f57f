"""What MQTT ingest tells the registry: the interface between the two halves.

Ingest calls these from its MQTT thread for every accepted message; implementations
must be thread-safe and cheap (batch their database writes). Ingest asks
``device_owner`` before it accepts a device's data, birth or state from an agent, and
refuses them from any other agent than the owner; the registry refuses them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from protocols.mqtt.contract import Birth, DeviceState, Will

__all__ = ["IngestSink", "SampleSummary"]


class SampleSummary:
    """The part of a data message the registry needs: freshness and latest values."""

    __slots__ = (
        "agent",
        "count",
        "device",
        "enterprise",
        "first_ts",
        "gaps",
        "last_gap_ts",
        "last_good_ts",
        "last_ts",
        "latest",
        "missed",
    )

    def __init__(
        self,
        enterprise: str,
        agent: str,
        device: str,
        *,
        count: int,
        first_ts: int,
        last_ts: int,
        last_good_ts: int | None,
        latest: dict[str, bool | int | float | str | None],
        gaps: int = 0,
        missed: int = 0,
        last_gap_ts: int | None = None,
    ) -> None:
        self.enterprise = enterprise
        self.agent = agent
        self.device = device
        self.count = count
        self.first_ts = first_ts
        self.last_ts = last_ts
        # ts of the newest sample with at least one good value: what "connected" counts.
        self.last_good_ts = last_good_ts
        self.latest = latest
        # Sequence gaps seen in this message: how many, samples missing, ts after the last.
        self.gaps = gaps
        self.missed = missed
        self.last_gap_ts = last_gap_ts


class IngestSink(Protocol):
    def check_publisher(self, enterprise: str, agent: str) -> str | None:
        """None if this agent may publish under this enterprise, else a reject reason
        (``unknown_enterprise``, ``unknown_agent``, ``agent_enterprise_mismatch``)."""

    def device_tags(self, enterprise: str, device: str) -> tuple[str, str] | None:
        """(family, profile) of a known device, for the time-series tags; None if unknown."""

    def device_owner(self, enterprise: str, device: str) -> str | None:
        """The agent a device belongs to; None when unknown or no agent has it yet."""

    def on_birth(self, enterprise: str, agent: str, birth: Birth, *, codec: str = "json") -> None:
        """An agent's birth; ``codec`` is the wire format it spoke ('json', 'sparkplug')."""

    def on_will(self, enterprise: str, agent: str, will: Will) -> None: ...

    def on_device_state(
        self, enterprise: str, agent: str, device: str, state: DeviceState
    ) -> None: ...

    def on_samples(self, summary: SampleSummary) -> None: ...

    def on_samples_many(self, summaries: Sequence[SampleSummary]) -> None:
        """The devices' summaries of one batch message, in one call."""
