"""The edge agent: pollers → spool → MQTT publisher, with self-metrics.

Every sample is committed to the spool before anything is published; the publisher sends
from the spool and deletes rows when the broker acknowledges them. Samples and deletions
of the same few milliseconds share one spool commit (``_COMMIT_WINDOW``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from edge_agent.config import LoadedConfig
from edge_agent.lock import DataDirLock, DataDirLocked
from edge_agent.metrics import AgentMetrics
from edge_agent.metrics_http import MetricsServer
from edge_agent.poller import DevicePoller, DriverFactory
from edge_agent.publisher import Publisher
from edge_agent.spool import Spool
from iiot_common import __version__
from protocols.driver import Reading, create_driver, now_ms
from protocols.mqtt.contract import BirthDevice, DeviceState, Sample, encode

__all__ = ["Agent", "AgentLockedError", "AgentStartError", "encode_sample"]

log = logging.getLogger("iiot.agent")

_CHECKPOINT_EVERY = 1.0  # seconds
# Samples and acknowledgements queued within this window share one spool commit; a
# sample is published only after its commit.
_COMMIT_WINDOW = 0.005  # seconds
_PLAIN = (float, int, str, bool)
_FULL_QUIET = 10.0  # seconds without a drop before the spool counts as no longer full


def encode_sample(reading: Reading) -> str:
    """The compact Sample JSON of a reading, as ``contract.encode(Sample(...))`` gives it.

    Plain values (point names are validated identifiers from the profiles) go straight
    to orjson; anything else goes through the contract model, which checks it.
    """
    values = reading.values
    if all(type(v) in _PLAIN for v in values.values()):
        body: dict[str, Any] = {"ts": reading.ts, "values": values, "errors": reading.errors}
        if reading.quality:
            body["quality"] = reading.quality
        return orjson.dumps(body).decode()
    sample = Sample(
        ts=reading.ts,
        values=values,
        errors=reading.errors,
        quality=reading.quality or None,
    )
    return encode(sample).decode()


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
    ) -> None:
        self.loaded = loaded
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
        self._dropping_since: int | None = None  # spool.dropped when dropping began
        self._last_drop = 0.0
        self.lags: deque[float] = deque(maxlen=100_000)
        enabled = [d for d in cfg.devices if d.enabled]
        birth_devices = [
            BirthDevice(
                id=d.id,
                profile=p.id,
                protocol=p.protocol,
                family=p.family.value,
                category=p.category.value,
            )
            for d in enabled
            for p in [loaded.device_profiles[d.id]]
        ]
        self.publisher = Publisher(
            cfg, self.spool, self.metrics, devices=birth_devices, version=__version__
        )
        self.pollers = [
            DevicePoller(
                d,
                loaded.device_profiles[d.id],
                driver_factory=driver_factory,
                on_sample=self._on_sample,
                on_state=self._on_state,
                metrics=self.metrics,
                lags=self.lags,
                phase=i / len(enabled),
            )
            for i, d in enumerate(enabled)
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._http: MetricsServer | None = None
        self.metrics_port: int | None = None
        self.samples_spooled = 0
        self._ckpt_task: asyncio.Task[None] | None = None
        self._ckpt_stop = asyncio.Event()
        self._ckpt_now = asyncio.Event()  # the WAL outgrew its share before the next second

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
        self.spool.take_over_checkpoints()
        self.spool.start_group_commit(asyncio.get_running_loop(), _COMMIT_WINDOW, self._on_commit)
        await self.publisher.start()
        self._tasks = [
            asyncio.create_task(p.run(), name=f"poll-{p.device.id}") for p in self.pollers
        ]
        self._ckpt_task = asyncio.create_task(self._checkpoints(), name="spool-checkpoint")
        log.info(
            "agent started",
            extra={
                "agent": self.cfg.agent_id,
                "devices": len(self.pollers),
                "spooled": self.spool.depth,
                "metrics_port": self.metrics_port,
            },
        )

    async def stop(self) -> None:
        """Stop pollers, flush the spool (bounded), say offline, disconnect."""
        for p in self.pollers:
            p.stop()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 10.0)
        self._tasks = []
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
            if stopping:
                return

    def _on_sample(self, device: str, reading: Reading) -> None:
        self.spool.stage(device, reading.ts, encode_sample(reading))

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
        self.metrics.spool_depth.set(self.spool.depth)
        self.metrics.spool_bytes.set(self.spool.size_bytes)
        self.metrics.spool_disk_bytes.set(self.spool.disk_bytes)


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
