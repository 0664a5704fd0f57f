"""The registry as the ingest's sink: publishers checked, births, wills and samples applied."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import sqlalchemy as sa

from gateway.registry import rows as _rows
from gateway.registry import tables as t
from gateway.registry.codes import CATEGORY_LABELS, FAMILY_CATEGORY, FAMILY_LABELS, UNKNOWN
from gateway.registry.history import StateChange
from gateway.registry.index import DeviceMeta
from gateway.registry.store import RegistryStore
from gateway.sink import SampleSummary
from protocols.mqtt.contract import Birth, DeviceState, Will

__all__ = ["IngestSinkPart"]

log = logging.getLogger("iiot.gateway.registry")

_MISS_CACHE_SIZE = 65536


class IngestSinkPart(RegistryStore):
    """The registry as the gateway's ``IngestSink``: births, wills, states, samples."""

    def check_publisher(self, enterprise: str, agent: str) -> str | None:
        reject = self._publisher_reject(enterprise, agent)
        if reject in ("unknown_enterprise", "unknown_agent") and self._load_publisher(
            enterprise, agent
        ):
            reject = self._publisher_reject(enterprise, agent)
        return reject

    def _publisher_reject(self, enterprise: str, agent: str) -> str | None:
        with self._lock:
            if enterprise not in self._enterprises:
                return "unknown_enterprise"
            a = self._agents.get(agent)
            if a is None:
                return "unknown_agent"
            if a.enterprise != enterprise:
                return "agent_enterprise_mismatch"
            return None

    def _load_publisher(self, enterprise: str, agent: str) -> bool:
        """Load an enterprise and agent that another gateway instance sharing the database
        added; False when they are not there (remembered for ``publisher_miss_ttl``)."""
        key = (enterprise, agent)
        now = time.monotonic()
        with self._lock:
            seen = self._misses.get(key)
            if seen is not None and now - seen < self.publisher_miss_ttl:
                self.counters["publisher_misses_cached"] += 1
                return False
        self.counters["publisher_lookups"] += 1
        try:
            with self._engine.connect() as conn:
                ent = conn.execute(
                    sa.select(t.enterprises).where(t.enterprises.c.id == enterprise)
                ).first()
                agt = conn.execute(sa.select(t.agents).where(t.agents.c.id == agent)).first()
        except sa.exc.SQLAlchemyError:
            self.counters["publisher_lookup_errors"] += 1
            log.exception("publisher lookup failed", extra={"enterprise": enterprise})
            ent = agt = None
        with self._lock:
            if ent is not None and ent.id not in self._enterprises:
                self._enterprises[ent.id] = _rows.enterprise_of(ent)
            if agt is not None and agt.id not in self._agents:
                self._agents[agt.id] = _rows.agent_of(agt)
            if ent is not None and agt is not None:
                self._misses.pop(key, None)
                return True
            if len(self._misses) >= _MISS_CACHE_SIZE:
                self._misses = {
                    k: v for k, v in self._misses.items() if now - v < self.publisher_miss_ttl
                }
                if len(self._misses) >= _MISS_CACHE_SIZE:
                    self._misses.clear()
            self._misses[key] = now
        return False

    def device_tags(self, enterprise: str, device: str) -> tuple[str, str] | None:
        with self._lock:
            i = self._index.keys.get((enterprise, device))
            if i is None:
                return None
            m = self._index.meta[i]
            return m.family, m.profile or UNKNOWN

    def on_birth(self, enterprise: str, agent: str, birth: Birth, *, codec: str = "json") -> None:
        self.counters["births"] += 1
        reject = self.check_publisher(enterprise, agent)
        if reject is not None:
            self.counters[f"rejected_{reject}"] += 1
            return
        now = self._now_ms()
        with self._lock:
            a = self._agents[agent]
            a.online = True
            a.codec = codec
            a.bdseq = birth.bdseq
            a.last_birth_ms = birth.ts or now
            self._dirty_agents.add(agent)
            self._touch_agent_locked(agent)
            ent = self._enterprises[enterprise]
            idx = self._index
            for dev in birth.devices:
                i = idx.keys.get((enterprise, dev.id))
                if i is None:
                    family = dev.family if dev.family in FAMILY_LABELS else "other"
                    category = (
                        dev.category
                        if dev.category in CATEGORY_LABELS
                        else FAMILY_CATEGORY.get(family, UNKNOWN)
                    )
                    meta = DeviceMeta(
                        enterprise,
                        dev.id,
                        "",
                        ent.region,
                        ent.industry,
                        family,
                        category,
                        dev.profile,
                        agent,
                        "provisioned",
                        "agent",
                        True,
                        now,
                    )
                    i = idx.add(meta)
                    self._pending_inserts.add(i)
                    self._touch_locked(i)
                    self.counters["devices_not_in_ledger"] += 1
                else:
                    meta = idx.meta[i]
                    if meta.agent and meta.agent != agent:
                        # Another agent's device: only a move gives it to this one.
                        self.counters["foreign_device_births"] += 1
                        continue
                    meta.profile = dev.profile
                    if meta.family == "other" and dev.family in FAMILY_LABELS:
                        meta.family = dev.family
                        if meta.category == UNKNOWN:
                            meta.category = FAMILY_CATEGORY.get(dev.family, UNKNOWN)
                        idx.set_static(i, meta)
                    if meta.status == "registered":
                        meta.status = "provisioned"
                    idx.set_agent(i, agent, True)
                self._dirty.add(i)
                self._touch_locked(i)
            for i in idx.by_agent.get(agent, ()):
                if not idx.agent_alive[i]:
                    change = StateChange(birth.ts or now, True, "agent online", "agent")
                    self._history.record((enterprise, idx.meta[i].id), change)
                idx.agent_alive[i] = True
                self._dirty.add(i)
                self._touch_locked(i)

    def on_will(self, enterprise: str, agent: str, will: Will) -> None:
        self.counters["wills"] += 1
        now = self._now_ms()
        with self._lock:
            a = self._agents.get(agent)
            if a is None or a.enterprise != enterprise:
                self.counters["rejected_will"] += 1
                return
            if a.bdseq is not None and will.bdseq != a.bdseq:
                # The will of an older session arriving after the agent's new birth.
                self.counters["stale_wills"] += 1
                return
            a.online = False
            self._dirty_agents.add(agent)
            self._touch_agent_locked(agent)
            idx = self._index
            for i in idx.by_agent.get(agent, ()):
                if idx.dev_online[i] and idx.agent_alive[i]:
                    idx.offline_since[i] = now
                    idx.meta[i].reason = "agent offline"
                if idx.agent_alive[i]:
                    change = StateChange(now, False, "agent offline", "agent")
                    self._history.record((enterprise, idx.meta[i].id), change)
                idx.agent_alive[i] = False
                idx.dev_online[i] = False
                self._dirty_report.add(i)
                self._touch_locked(i)

    def on_device_state(self, enterprise: str, agent: str, device: str, state: DeviceState) -> None:
        self.counters["device_states"] += 1
        with self._lock:
            idx = self._index
            i = idx.keys.get((enterprise, device))
            if i is None:
                self.counters["unknown_device"] += 1
                return
            a = self._agents.get(agent)
            owner = idx.meta[i].agent
            if owner and owner != agent:
                self.counters["foreign_device_states"] += 1
                return
            if owner is None:  # a device no agent has yet: the first to report it
                idx.set_agent(i, agent, a is not None and a.online)
                self._dirty.add(i)
            was = bool(idx.dev_online[i])
            if was and not state.online:
                idx.offline_since[i] = state.ts or self._now_ms()
            idx.dev_online[i] = state.online
            idx.meta[i].reason = state.reason[:200]
            change = StateChange(
                state.ts or self._now_ms(), state.online, state.reason[:200], "device"
            )
            self._history.record((enterprise, device), change)
            self._dirty_report.add(i)
            self._touch_locked(i)

    def state_history(self, enterprise: str, device: str, limit: int = 50) -> list[StateChange]:
        """The device's last online/offline changes seen by this instance, newest first."""
        with self._lock:
            return self._history.newest_first((enterprise, device), limit)

    def on_samples_many(self, summaries: Sequence[SampleSummary]) -> None:
        # One hold of the (re-entrant) lock for a whole batch message.
        with self._lock:
            for summary in summaries:
                try:
                    IngestSinkPart.on_samples(self, summary)
                except Exception:
                    # A part that fails fails alone, as a message of its own would.
                    self.counters["sample_errors"] += 1
                    n = self.counters["sample_errors"]
                    if n & (n - 1):  # logged the 1st, 2nd, 4th, 8th ... time: never a flood
                        continue
                    log.exception(
                        "a device's samples could not be taken",
                        extra={"enterprise": summary.enterprise, "device": summary.device},
                    )

    def on_samples(self, summary: SampleSummary) -> None:
        self.counters["sample_messages"] += 1
        key = (summary.enterprise, summary.device)
        with self._lock:
            idx = self._index
            i = idx.keys.get(key)
            if i is None:
                self.counters["unknown_device"] += 1
                return
            owner = idx.meta[i].agent
            if owner and owner != summary.agent:
                self.counters["foreign_samples"] += 1
                return
            self.counters["samples"] += summary.count
            # Timestamps move with every poll; writing each one would be 10⁵ UPDATEs a
            # second at province scale. The database copy may lag by the granularity;
            # status changes and the first sample are written at once, close() writes all.
            changed = moved = False
            if summary.last_ts > idx.last_ts[i]:
                idx.last_ts[i] = summary.last_ts
                moved = summary.last_ts - idx.saved_ts[i] >= self.persist_granularity_ms
            meta = idx.meta[i]
            if summary.last_good_ts is not None and summary.last_good_ts > idx.last_good[i]:
                idx.last_good[i] = summary.last_good_ts
                if meta.status in ("registered", "provisioned"):
                    meta.status = "connected"
                    changed = True
                elif summary.last_good_ts - idx.saved_good[i] >= self.persist_granularity_ms:
                    moved = True
            if meta.first_seen_ms is None or summary.first_ts < meta.first_seen_ms:
                meta.first_seen_ms = summary.first_ts
                moved = True
            if summary.latest:
                old = self._latest.get(key)
                if old is None or summary.last_ts >= old[0]:
                    values = dict(old[1]) if old else {}
                    values.update(summary.latest)
                    self._latest[key] = (summary.last_ts, values)
            if summary.gaps:
                gaps, missed, last_gap = self._gaps.get(key, (0, 0, 0))
                self._gaps[key] = (
                    gaps + summary.gaps,
                    missed + summary.missed,
                    max(last_gap, summary.last_gap_ts or 0),
                )
            if changed:
                self._dirty.add(i)
                self._touch_locked(i)
            elif moved:
                # Only the timestamps: the state columns stay as whoever changed them wrote.
                self._dirty_times.add(i)
