"""The edge agent: pollers → spool → MQTT publisher, with self-metrics and the control plane.

Every sample is committed to the spool before anything is published; the publisher sends
from the spool and deletes rows when the broker acknowledges them. Samples and deletions
of the same few milliseconds share one spool commit (``_COMMIT_WINDOW``).

The running device set can change without a restart (``apply_desired``): added devices
start polling, removed ones stop with an offline state (reason ``removed``), changed ones
restart, and unchanged ones keep their poller, schedule and sequence numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from pathlib import Path

from device_profiles.schema import Profile
from edge_agent.commands import CommandExecutor
from edge_agent.config import DeviceConfig, LoadedConfig
from edge_agent.control import ControlMetrics, ControlPlane, run_scan
from edge_agent.lock import DataDirLock, DataDirLocked
from edge_agent.metrics import AgentMetrics, DriverEvents
from edge_agent.metrics_http import MetricsServer
from edge_agent.poller import DevicePoller, DriverFactory
from edge_agent.publisher import Publisher
from edge_agent.remote import RemoteConfigRefused, RemoteConfigStore, build_config
from edge_agent.sparkplug import SparkplugPublisher
from edge_agent.spool import Spool
from iiot_common import __version__
from iiot_common.deadline import LoopLag
from protocols.driver import Reading, create_driver, now_ms
from protocols.mqtt.codec import JSON_CODEC, Codec
from protocols.mqtt.contract import BirthDevice, ContractError, DeviceState
from protocols.mqtt.control import (
    ConfigReport,
    DesiredConfig,
    ScanReport,
    ScanRequest,
    WriteResult,
    WriteStatus,
)
from protocols.mqtt.sparkplug.command import read_dcmd

__all__ = ["Agent", "AgentLockedError", "AgentStartError"]

log = logging.getLogger("iiot.agent")

_CHECKPOINT_EVERY = 1.0  # seconds
# Samples and acknowledgements queued within this window share one spool commit; a
# sample is published only after its commit.
_COMMIT_WINDOW = 0.005  # seconds
_POLLER_STOP_TIMEOUT = 10.0  # seconds
_FULL_QUIET = 10.0  # seconds without a drop before the spool counts as no longer full
# Devices are spread over their interval in slots this long, not each at its own instant:
# every wake-up of the process costs tens of microseconds before any work is done, so
# devices of one slot share one (and their samples one spool commit).
_PHASE_SLOT = 0.05  # seconds
# ... and a slot has at least this many devices: a few devices spread over twenty slots
# would each wake the process, commit and publish alone.
_SLOT_DEVICES = 8


class AgentStartError(RuntimeError):
    """The agent cannot start: its spool or metrics endpoint cannot be opened."""


class AgentLockedError(AgentStartError):
    """Another agent already runs on this data directory (or spool directory)."""


class Agent:
    """Runs every enabled device's poller and the publisher until stopped."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        driver_factory: DriverFactory = create_driver,
        metrics: AgentMetrics | None = None,
        codec: Codec = JSON_CODEC,
    ) -> None:
        self.local = loaded  # the file's configuration, the base of every remote one
        self.codec = codec
        self.cfg = cfg = loaded.config
        self.metrics = metrics or AgentMetrics()
        self._locks = _lock_dirs(cfg.data_dir, cfg.spool_path.parent)
        try:
            self.spool = Spool(
                cfg.spool_path,
                max_samples=cfg.spool.max_samples,
                max_bytes=cfg.spool.max_bytes,
                durable=cfg.spool.durable,
            )
        except (OSError, sqlite3.Error) as exc:
            _release(self._locks)
            raise AgentStartError(f"spool {cfg.spool_path}: {exc}") from exc
        self._dropped_seen = 0
        self._commit_errors_seen = 0
        self._inline_checkpoints_seen = 0
        self._rebirths_seen = 0
        self._dropping_since: int | None = None  # spool.dropped when dropping began
        self._last_drop = 0.0
        self._refused: dict[str, str] = {}  # device -> last refusal, logged once per change
        self.lags: deque[float] = deque(maxlen=100_000)
        self._factory = driver_factory
        self.store = RemoteConfigStore(cfg.data_dir)
        self.desired: DesiredConfig | None = None  # the applied remote configuration
        self.loaded = self._initial_config(loaded)
        enabled = [d for d in self.loaded.config.devices if d.enabled]
        self.publisher: Publisher
        if cfg.mqtt.codec == "sparkplug":
            self.publisher = SparkplugPublisher(
                cfg,
                self.spool,
                self.metrics,
                devices=self._birth_devices(),
                profiles=self._enabled_profiles(),
                version=__version__,
            )
            self.codec = self.publisher.codec
        else:
            self.publisher = Publisher(
                cfg,
                self.spool,
                self.metrics,
                devices=self._birth_devices(),
                version=__version__,
                codec=codec,
            )
        self.publisher.config_version = self.config_version
        phases = _phases(enabled)
        self._pollers: dict[str, DevicePoller] = {
            d.id: self._make_poller(d, phases[d.id]) for d in enabled
        }
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.control_metrics = ControlMetrics(self.metrics.registry)
        self.control_metrics.config_version.set(self.config_version or 0)
        self.commands = CommandExecutor(self._pollers.get)
        self.control = ControlPlane(
            cfg.enterprise,
            cfg.agent_id,
            publish=lambda topic, payload, retain: self.publisher.publish(
                topic, payload, retain=retain
            ),
            apply_config=self.apply_desired,
            scan=self._scan,
            executor=self.commands,
            metrics=self.control_metrics,
        )
        self.publisher.subscriptions = self.control.subscriptions
        self.publisher.on_message = self.control.on_message
        if isinstance(self.publisher, SparkplugPublisher):
            self.publisher.on_dcmd = self._on_dcmd
        self._http: MetricsServer | None = None
        self.metrics_port: int | None = None
        self.samples_spooled = 0
        self._ckpt_task: asyncio.Task[None] | None = None
        self._ckpt_stop = asyncio.Event()
        self._ckpt_now = asyncio.Event()  # the WAL outgrew its share before the next second
        # Pollers' deadlines move by the time the loop loses, so that an agent that is
        # behind does not take its devices for dead (iiot_common.deadline).
        self.loop_lag = LoopLag(self.metrics.loop_lag.set)
        self.metrics.registry.register(
            DriverEvents(lambda: ((i, p.driver_events()) for i, p in list(self._pollers.items())))
        )

    @property
    def pollers(self) -> list[DevicePoller]:
        return list(self._pollers.values())

    @property
    def config_version(self) -> int | None:
        """The remote configuration version running; None: the local file's devices."""
        return self.desired.version if self.desired is not None else None

    def _initial_config(self, local: LoadedConfig) -> LoadedConfig:
        """The stored remote configuration when enabled and still valid, else the file's."""
        if not local.config.remote_config.enabled:
            return local
        stored = self.store.load()
        if stored is None:
            return local
        try:
            built = build_config(local, stored)
        except RemoteConfigRefused as exc:
            log.error(
                "stored remote configuration no longer valid; the local file's devices run",
                extra={"version": stored.version, "errors": exc.errors},
            )
            return local
        self.desired = stored
        log.info("remote configuration restored", extra={"version": stored.version})
        return built

    def _enabled_profiles(self) -> dict[str, Profile]:
        loaded = self.loaded
        return {d.id: loaded.device_profiles[d.id] for d in loaded.config.devices if d.enabled}

    def _birth_devices(self) -> list[BirthDevice]:
        loaded = self.loaded
        return [
            BirthDevice(
                id=d.id,
                profile=p.id,
                protocol=p.protocol,
                family=p.family,
                category=p.category.value,
            )
            for d in loaded.config.devices
            if d.enabled
            for p in [loaded.device_profiles[d.id]]
        ]

    def _make_poller(self, device: DeviceConfig, phase: float) -> DevicePoller:
        return DevicePoller(
            device,
            self.loaded.device_profiles[device.id],
            driver_factory=self._factory,
            on_sample=self._on_sample,
            on_state=self._on_state,
            metrics=self.metrics,
            lags=self.lags,
            phase=phase,
        )

    async def start(self) -> None:
        m = self.cfg.metrics
        if m.port is not None:
            http = MetricsServer(self.metrics.registry, self.metrics.all())
            try:
                await http.start(m.host, m.port)
            except OSError as exc:
                self.spool.close()
                _release(self._locks)
                raise AgentStartError(
                    f"metrics endpoint {m.host}:{m.port}: {exc.strerror or exc}"
                ) from exc
            self._http = http
            self.metrics_port = http.port
        self._update_spool_metrics()
        self.loop_lag.start()
        self.spool.take_over_checkpoints()
        self.spool.start_group_commit(asyncio.get_running_loop(), _COMMIT_WINDOW, self._on_commit)
        await self.publisher.start()
        epoch = time.monotonic()
        for dev_id, poller in self._pollers.items():
            self._tasks[dev_id] = asyncio.create_task(poller.run(epoch), name=f"poll-{dev_id}")
        self._ckpt_task = asyncio.create_task(self._checkpoints(), name="spool-checkpoint")
        log.info(
            "agent started",
            extra={
                "agent": self.cfg.agent_id,
                "devices": len(self._pollers),
                "config_version": self.config_version,
                "spooled": self.spool.depth,
                "metrics_port": self.metrics_port,
            },
        )

    async def stop(self) -> None:
        """Stop pollers, flush the spool (bounded), say offline, disconnect."""
        await self.control.aclose()
        await self._stop_pollers(list(self._pollers))
        self.spool.flush()  # the pollers' last samples, so the publisher can send them
        await self.publisher.stop()
        self.spool.stop_group_commit()
        if self._ckpt_task is not None:
            self._ckpt_stop.set()
            self._ckpt_now.set()
            await self._ckpt_task
            self._ckpt_task = None
        if self._http is not None:
            await self._http.stop()
            self._http = None
        self.loop_lag.stop()
        log.info("agent stopped", extra={"agent": self.cfg.agent_id, "spooled": self.spool.depth})
        self.spool.close()
        _release(self._locks)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, wait for ``stop``, stop."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def apply_desired(self, desired: DesiredConfig) -> ConfigReport:
        """Check ``desired`` in full, then run it without a restart; the report says how it went."""

        def report(applied: bool, errors: dict[str, str] | None = None) -> ConfigReport:
            return ConfigReport(
                version=desired.version,
                applied=applied,
                running_version=self.config_version or 0,
                ts=now_ms(),
                errors=errors or {},
            )

        if self.desired is not None and desired == self.desired:
            return report(True)  # the retained message again, after a reconnect
        try:
            # Off the loop: it reads every shipped profile, as loading the file does.
            new = await asyncio.to_thread(build_config, self.local, desired)
        except RemoteConfigRefused as exc:
            log.warning(
                "remote configuration refused",
                extra={"version": desired.version, "errors": exc.errors},
            )
            return report(False, exc.errors)
        try:
            # Kept before it runs: a crash in between restarts into this version.
            await asyncio.to_thread(self.store.save, desired)
        except OSError as exc:
            log.error("remote configuration cannot be stored", extra={"error": str(exc)})
            return report(False, {"config": f"cannot store it in {self.store.path}: {exc}"})
        changes = await self._reconcile(new)
        self.desired = desired
        self.publisher.set_birth(
            self._birth_devices(), self.config_version, profiles=self._enabled_profiles()
        )
        log.info("remote configuration applied", extra={"version": desired.version, **changes})
        return report(True)

    async def _reconcile(self, new: LoadedConfig) -> dict[str, list[str]]:
        """Make the running pollers match ``new``; unchanged ones are left alone."""
        wanted = {d.id: d for d in new.config.devices if d.enabled}
        removed = [i for i in self._pollers if i not in wanted]
        changed = [
            i
            for i, p in self._pollers.items()
            if i in wanted and (p.device != wanted[i] or p.profile != new.device_profiles[i])
        ]
        added = [i for i in wanted if i not in self._pollers]
        # A changed device's counters go on in its new poller (drivers of one protocol).
        kept = {i: self._pollers[i] for i in changed}
        await self._stop_pollers(removed + changed)
        for dev_id in removed:
            self._on_state(dev_id, False, "removed")
            self.metrics.forget_device(dev_id)
        self.loaded = new
        for dev_id in changed + added:
            poller = self._make_poller(wanted[dev_id], 0.0)
            if dev_id in kept:
                poller.keep_counters(kept[dev_id])
            self._pollers[dev_id] = poller
            self._tasks[dev_id] = asyncio.create_task(poller.run(), name=f"poll-{dev_id}")
        return {"added": added, "removed": removed, "changed": changed}

    async def _stop_pollers(self, ids: list[str]) -> None:
        pollers = [self._pollers.pop(i) for i in ids]
        tasks = [self._tasks.pop(i) for i in ids if i in self._tasks]
        for p in pollers:
            p.stop()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, _POLLER_STOP_TIMEOUT)

    def _on_dcmd(self, device: str, payload: bytes) -> None:
        """A Sparkplug DCMD: each metric a write through the executor, answered twice.

        The answer goes on the JSON result topic (the gateway audits it) and, when a value
        was read back, as a DDATA of that value through the spool (the Sparkplug way).
        """
        pub = self.publisher
        assert isinstance(pub, SparkplugPublisher)
        max_age = int(self.cfg.mqtt.sparkplug.dcmd_max_age * 1000)
        try:
            commands = read_dcmd(
                device, payload, lambda m: pub.node.resolve(device, m), max_age_ms=max_age
            )
        except ContractError as exc:
            self.control.bad("dcmd", exc.reason, f"DCMD to {device}: {exc}")
            return

        def written(point: str, result: WriteResult) -> None:
            if result.value is not None and result.status in (WriteStatus.OK, WriteStatus.MISMATCH):
                self._on_sample(device, Reading(ts=result.ts, values={point: result.value}))

        self.control.on_dcmd(device, commands, written)

    async def _scan(self, request: ScanRequest) -> ScanReport:
        return await run_scan(request, self.loaded)

    async def _checkpoints(self) -> None:
        """Checkpoint the spool's WAL in a worker thread: each second, sooner if it grows."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ckpt_now.wait(), _CHECKPOINT_EVERY)
            self._ckpt_now.clear()
            stopping = self._ckpt_stop.is_set()
            try:
                await asyncio.to_thread(self.spool.checkpoint)
            except Exception:  # a failed checkpoint leaves the WAL longer, nothing worse
                log.warning("spool checkpoint failed", exc_info=True)
            # Also while commits fail (no commit callback then), so /metrics shows it.
            self._update_spool_metrics()
            if stopping:
                return

    def _on_sample(self, device: str, reading: Reading) -> None:
        r = reading
        try:
            body = self.codec.encode_sample(r.ts, r.values, r.errors, r.quality)
        except ContractError as exc:
            # Only a driver bug gets here (profiles validate point names): drop this one
            # sample, count it, keep polling.
            self.metrics.errors.labels(device, exc.reason).inc()
            if self._refused.get(device) != str(exc):
                self._refused[device] = str(exc)
                log.error("sample refused", extra={"device": device, "error": str(exc)})
            return
        self._refused.pop(device, None)
        self.spool.stage(device, r.ts, body)

    def _on_commit(self, devices: list[str], samples: int) -> None:
        """A group commit is done: its samples are spooled and may be published."""
        self.samples_spooled += samples
        for device in devices:
            self.publisher.sample_spooled(device)
        self._update_spool_metrics()
        if self.spool.wal_over_budget:
            self._ckpt_now.set()

    def _on_state(self, device: str, online: bool, reason: str) -> None:
        self.publisher.set_state(device, DeviceState(online=online, ts=now_ms(), reason=reason))

    def _update_spool_metrics(self) -> None:
        dropped = self.spool.dropped - self._dropped_seen
        now = time.monotonic()
        if dropped:
            self.metrics.spool_dropped.inc(dropped)
            self._dropped_seen = self.spool.dropped
            # Once when dropping starts, not on every commit of a full spool.
            if self._dropping_since is None:
                log.warning(
                    "spool full: oldest samples dropped",
                    extra={"dropped": dropped, "depth": self.spool.depth},
                )
                self._dropping_since = self.spool.dropped - dropped
            self._last_drop = now
        elif self._dropping_since is not None and now - self._last_drop > _FULL_QUIET:
            log.info(
                "spool no longer dropping samples",
                extra={"dropped": self.spool.dropped - self._dropping_since},
            )
            self._dropping_since = None
        failed = self.spool.commit_errors - self._commit_errors_seen
        if failed:
            self.metrics.spool_commit_errors.inc(failed)
            self._commit_errors_seen = self.spool.commit_errors
        cut = self.spool.inline_checkpoints - self._inline_checkpoints_seen
        if cut:
            self.metrics.spool_inline_checkpoints.inc(cut)
            self._inline_checkpoints_seen = self.spool.inline_checkpoints
        rebirths = getattr(self.publisher, "rebirths", 0) - self._rebirths_seen
        if rebirths:
            self.metrics.sparkplug_rebirths.inc(rebirths)
            self._rebirths_seen += rebirths
        self.metrics.spool_depth.set(self.spool.depth)
        self.metrics.spool_bytes.set(self.spool.size_bytes)
        self.metrics.spool_disk_bytes.set(self.spool.disk_bytes)


def _phases(devices: list[DeviceConfig]) -> dict[str, float]:
    """Each device's phase (a fraction of its interval).

    Devices sharing a line (one serial line, one TCP peer: ``line_key``) wait for one
    another on it, so they are spread evenly over the interval, as a master polls its
    bus; the others, each on its own connection, go in slots (``_slotted``).
    """
    sharing: dict[str, list[str]] = {}
    for d in devices:
        key = getattr(d.connection, "line_key", None)
        if isinstance(key, str):
            sharing.setdefault(key, []).append(d.id)
    phases: dict[str, float] = {}
    for ids in sharing.values():
        if len(ids) > 1:
            phases.update((dev_id, k / len(ids)) for k, dev_id in enumerate(ids))
    alone = [d for d in devices if d.id not in phases]
    for i, d in enumerate(alone):
        phases[d.id] = _slotted(i / len(alone), d.poll_interval, len(alone))
    return phases


def _slotted(phase: float, interval: float, devices: int) -> float:
    """``phase`` (a fraction of ``interval``) moved back to the start of its slot, of
    slots at least ``_PHASE_SLOT`` long holding at least ``_SLOT_DEVICES`` of ``devices``."""
    slots = min(int(round(interval / _PHASE_SLOT, 6)), max(1, devices // _SLOT_DEVICES))
    if slots < 2:
        return 0.0
    return int(phase * slots) / slots


def _lock_dirs(*dirs: Path) -> list[DataDirLock]:
    """Lock each distinct directory, or raise ``AgentLockedError`` holding none of them."""
    locks: list[DataDirLock] = []
    seen: set[Path] = set()
    try:
        for d in dirs:
            key = d.resolve()
            if key in seen:
                continue
            seen.add(key)
            lock = DataDirLock(d)
            lock.acquire()
            locks.append(lock)
    except DataDirLocked as exc:
        _release(locks)
        raise AgentLockedError(str(exc)) from exc
    except OSError as exc:
        _release(locks)
        raise AgentStartError(f"data directory {d}: {exc}") from exc
    return locks


def _release(locks: list[DataDirLock]) -> None:
    for lock in locks:
        lock.release()
