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

    def on_samples(self, summary: SampleSummary) -> None:
        super().on_samples(summary)
        with self._lock:
            known = (summary.enterprise, summary.device) in self._index.keys
        if known:
            self.quality.record(summary)

    def on_samples_many(self, summaries: Sequence[SampleSummary]) -> None:
        super().on_samples_many(summaries)
        with self._lock:
            keys = self._index.keys
            known = [s for s in summaries if (s.enterprise, s.device) in keys]
        for summary in known:
            self.quality.record(summary)

    def on_device_state(self, enterprise: str, agent: str, device: str, state: DeviceState) -> None:
        super().on_device_state(enterprise, agent, device, state)
        with self._lock:
            known = (enterprise, device) in self._index.keys
        if known:
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
