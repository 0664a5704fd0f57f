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
from collections import deque
from typing import Any

from edge_agent.config import LoadedConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.poller import DevicePoller, DriverFactory
from edge_agent.publisher import Publisher
from edge_agent.spool import Spool
from iiot_common import __version__
from protocols.driver import Reading, create_driver, now_ms
from protocols.mqtt.codec import JSON_CODEC, Codec
from protocols.mqtt.contract import BirthDevice, ContractError, DeviceState

__all__ = ["Agent", "AgentStartError"]

log = logging.getLogger("iiot.agent")

_CHECKPOINT_EVERY = 1.0  # seconds
# Samples and acknowledgements queued within this window share one spool commit; a
# sample is published only after its commit.
_COMMIT_WINDOW = 0.005  # seconds


class AgentStartError(RuntimeError):
    """The agent cannot start: its spool or metrics endpoint cannot be opened."""


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
        self.loaded = loaded
        self.codec = codec
        self.cfg = cfg = loaded.config
        self.metrics = metrics or AgentMetrics()
        try:
            self.spool = Spool(
                cfg.spool_path,
                max_samples=cfg.spool.max_samples,
                max_bytes=cfg.spool.max_bytes,
                durable=cfg.spool.durable,
            )
        except (OSError, sqlite3.Error) as exc:
            raise AgentStartError(f"spool {cfg.spool_path}: {exc}") from exc
        self._dropped_seen = 0
        self._commit_errors_seen = 0
        self._refused: dict[str, str] = {}  # device -> last refusal, logged once per change
        self.lags: deque[float] = deque(maxlen=100_000)
        enabled = [d for d in cfg.devices if d.enabled]
        birth_devices = [
            BirthDevice(
                id=d.id,
                profile=p.id,
                protocol=p.protocol,
                family=p.family,
                category=p.category.value,
            )
            for d in enabled
            for p in [loaded.device_profiles[d.id]]
        ]
        self.publisher: Publisher
        if cfg.mqtt.codec == "sparkplug":
            from edge_agent.sparkplug import SparkplugPublisher

            self.publisher = SparkplugPublisher(
                cfg,
                self.spool,
                self.metrics,
                devices=birth_devices,
                profiles={d.id: loaded.device_profiles[d.id] for d in enabled},
                version=__version__,
            )
            self.codec = self.publisher.codec
        else:
            self.publisher = Publisher(
                cfg,
                self.spool,
                self.metrics,
                devices=birth_devices,
                version=__version__,
                codec=codec,
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
        self._http: tuple[Any, Any] | None = None
        self.metrics_port: int | None = None
        self.samples_spooled = 0
        self._ckpt_task: asyncio.Task[None] | None = None
        self._ckpt_stop = asyncio.Event()

    async def start(self) -> None:
        m = self.cfg.metrics
        if m.port is not None:
            try:
                self._http = self.metrics.serve(m.host, m.port)
            except OSError as exc:
                self.spool.close()
                raise AgentStartError(
                    f"metrics endpoint {m.host}:{m.port}: {exc.strerror or exc}"
                ) from exc
            self.metrics_port = int(self._http[0].server_port)
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
            await self._ckpt_task
            self._ckpt_task = None
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
        log.info("agent stopped", extra={"agent": self.cfg.agent_id, "spooled": self.spool.depth})
        self.spool.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Start, wait for ``stop``, stop."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _checkpoints(self) -> None:
        """Checkpoint the spool's WAL in a worker thread, once a second and at the end."""
        while True:
            stopping = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ckpt_stop.wait(), _CHECKPOINT_EVERY)
                stopping = True
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

    def _on_state(self, device: str, online: bool, reason: str) -> None:
        self.publisher.set_state(device, DeviceState(online=online, ts=now_ms(), reason=reason))

    def _update_spool_metrics(self) -> None:
        dropped = self.spool.dropped - self._dropped_seen
        if dropped:
            self.metrics.spool_dropped.inc(dropped)
            self._dropped_seen = self.spool.dropped
            log.warning(
                "spool full: oldest samples dropped",
                extra={"dropped": dropped, "depth": self.spool.depth},
            )
        failed = self.spool.commit_errors - self._commit_errors_seen
        if failed:
            self.metrics.spool_commit_errors.inc(failed)
            self._commit_errors_seen = self.spool.commit_errors
        self.metrics.spool_depth.set(self.spool.depth)
        self.metrics.spool_bytes.set(self.spool.size_bytes)
