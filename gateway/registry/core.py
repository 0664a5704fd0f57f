"""The device registry: enterprises, agents, devices, provisioning keys, ratio snapshots.

One object over shared state (``store``), each concern in its own module: the ingest
sink (``sink``), enterprises/agents/keys (``agents``), devices and the ledger
(``devices``), stored ratio snapshots (``snapshots``), targets of enterprises on the
cloud (``targets``), the quality gate's window shared by instances (``shared_quality``).
Ratio masks and arithmetic are
in ``gateway.ratios``.
"""

from __future__ import annotations

from collections.abc import Sequence

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
from gateway.registry.provincial import ProvincialPart
from gateway.registry.shared_quality import SharedQualityPart
from gateway.registry.sink import IngestSinkPart
from gateway.registry.snapshots import SnapshotsPart
from gateway.registry.targets import TargetsPart
from gateway.sink import SampleSummary
from protocols.mqtt.contract import DeviceState, Will

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


class Registry(
    IngestSinkPart,
    AgentsPart,
    DevicesPart,
    SnapshotsPart,
    TargetsPart,
    ProvincialPart,
    SharedQualityPart,
):
    """The registry; also the gateway's ``IngestSink``."""

    def _accepted(self, enterprise: str, device: str, agent: str) -> bool:
        """Whether the sink took a message of ``agent`` for the device (known, and the
        agent's or no agent's); under the registry's lock."""
        idx = self._index
        i = idx.keys.get((enterprise, device))
        if i is None:
            return False
        owner = idx.meta[i].agent
        return not owner or owner == agent

    def on_samples(self, summary: SampleSummary) -> None:
        with self._lock:
            super().on_samples(summary)
            accepted = self._accepted(summary.enterprise, summary.device, summary.agent)
        if accepted:
            self.quality.record(summary)

    def on_samples_many(self, summaries: Sequence[SampleSummary]) -> None:
        with self._lock:
            super().on_samples_many(summaries)
            accepted = [s for s in summaries if self._accepted(s.enterprise, s.device, s.agent)]
        for summary in accepted:
            self.quality.record(summary)

    def on_device_state(self, enterprise: str, agent: str, device: str, state: DeviceState) -> None:
        with self._lock:
            super().on_device_state(enterprise, agent, device, state)
            accepted = self._accepted(enterprise, device, agent)
        if accepted:
            ts = state.ts or self._now_ms()
            self.quality.record_state((enterprise, device), ts, state.online, state.reason[:200])

    def on_will(self, enterprise: str, agent: str, will: Will) -> None:
        super().on_will(enterprise, agent, will)
        now = self._now_ms()
        with self._lock:
            a = self._agents.get(agent)
            if a is None or a.online or a.enterprise != enterprise:
                return  # refused or stale: nothing changed
            idx = self._index
            keys = [(enterprise, idx.meta[i].id) for i in idx.by_agent.get(agent, ())]
        for key in keys:
            self.quality.record_state(key, now, False, "agent offline")
