"""The gateway process: registry, outbox, writer, ingest, ratio snapshots and the HTTP API.

``Gateway`` runs everything in the calling process on threads (uvicorn on its own
event loop), so the CLI, the demo and the tests drive the same object::

    gw = Gateway(config)
    gw.start()
    ...
    gw.stop()
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.config import GatewayConfig
from gateway.health import BrokerWatch, Readiness
from gateway.influx import InfluxWriter
from gateway.ingest import Ingest, ProfilePoints
from gateway.metrics import DataPathMetrics
from gateway.outbox import Outbox
from gateway.sink import IngestSink

if TYPE_CHECKING:
    import uvicorn

__all__ = ["Gateway", "GatewayStartError"]

log = logging.getLogger(__name__)


class GatewayStartError(RuntimeError):
    """A part of the gateway could not start; the message names which and why."""


class _ReloadCollector(Collector):
    """The start-up broker file writes and reloads (retries included) for /metrics."""

    def __init__(self, provisioner: Any) -> None:
        self.provisioner = provisioner

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "iiot_gateway_broker_files",
            "Broker auth file writes and reloads by the gateway, by kind.",
            labels=["kind"],
        )
        for kind in ("file_writes", "file_errors", "reloads", "reload_errors", "reload_retries"):
            family.add_metric([kind], self.provisioner.counters[kind])
        yield family


class Gateway:
    """One gateway instance; ``start()`` returns once it is serving, ``stop()`` is clean."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        sink: IngestSink | None = None,
        serve_api: bool = True,
        connect_timeout: float = 10.0,
    ) -> None:
        self.config = config
        self.collector = CollectorRegistry()
        self.metrics = DataPathMetrics(self.collector)
        self.registry: Any = None
        self.sink: IngestSink | None = sink
        self._own_registry = sink is None
        self.serve_api = serve_api
        self.connect_timeout = connect_timeout
        self.outbox: Outbox | None = None
        self.writer: InfluxWriter | None = None
        self.ingest: Ingest | None = None
        self.snapshotter: Any = None
        self.broker_watch = BrokerWatch()
        self.readiness = Readiness(config.health, broker=self.broker_watch)
        self.provisioner: Any = None
        self.control: Any = None
        self._server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GatewayStartError(f"data_dir {cfg.data_dir}: {exc.strerror or exc}") from exc
        try:
            self._start_parts()
        except BaseException:
            self.stop()
            raise
        self._started = True
        log.info(
            "gateway running",
            extra={
                "api": f"http://{cfg.api.host}:{self.api_port}" if self.serve_api else "off",
                "mqtt": cfg.mqtt.url,
                "influx": cfg.influx.url or "none (outbox is the store)",
                "data_dir": str(cfg.data_dir),
            },
        )

    def _start_parts(self) -> None:
        cfg = self.config
        if self.serve_api and not self._own_registry:
            raise GatewayStartError("api: serves the registry; use serve_api=False with a sink")
        targets = self._read_targets()
        self.outbox = Outbox(
            cfg.outbox_path,
            max_lines=cfg.outbox.max_lines,
            max_age=cfg.outbox.max_age,
            dedup_window=cfg.ingest.dedup_window,
            synchronous=cfg.outbox.synchronous,
            chunk_lines=cfg.influx.batch_lines,
            metrics=self.metrics,
        )
        if self.sink is None:
            from gateway.registry import Registry

            group = cfg.mqtt.shared_group
            self.registry = Registry(
                cfg.registry_url,
                default_poll_interval=cfg.default_poll_interval,
                refresh_interval=cfg.registry.refresh_for(group),
                persist_granularity=cfg.registry.granularity_for(group),
                quality_share_interval=cfg.registry.quality_share_interval,
                share_quality=group is not None,
            )
            self.sink = self.registry
            if targets is not None:
                self.registry.replace_targets(targets)
                log.info(
                    "targets loaded",
                    extra={"file": str(cfg.on_cloud.targets_file), "targets": len(targets)},
                )
        if cfg.influx.url:
            self.writer = InfluxWriter(self.outbox, cfg.influx, metrics=self.metrics)
            self.writer.start()
        if self.registry is not None:
            from gateway.ratios import Snapshotter

            self.snapshotter = Snapshotter(
                self.registry,
                cfg.snapshot_interval,
                self.outbox.append,
                evidence_days=cfg.provincial.evidence_retention_days,
                evidence_daily_days=cfg.provincial.evidence_daily_retention_days,
            )
            self.snapshotter.start()
        if self.registry is not None and cfg.broker_auth.password_file is not None:
            from gateway.provisioning import Provisioner, ProvisioningError

            # The broker must know the gateway's own user before ingest connects with it.
            # A broker that is not up yet reads the files when it starts; a failed reload
            # is retried in the background.
            self.provisioner = Provisioner(self.registry, cfg)
            self.collector.register(_ReloadCollector(self.provisioner))
            try:
                self.provisioner.sync()
            except ProvisioningError as exc:
                raise GatewayStartError(f"broker_auth: {exc}") from exc
        if self.registry is not None:
            from gateway.control import ControlService

            self.control = ControlService(self.registry, cfg)
        self.ingest = Ingest(
            cfg.mqtt,
            self.outbox,
            self.sink,
            config=cfg.ingest,
            metrics=self.metrics,
            control=self.control,
            profile_points=ProfilePoints(
                self.control.store.stored_profiles if self.control is not None else None
            ),
        )
        # Readiness hears the broker's answers (a refusal's reason) on the ingest's client.
        self.broker_watch.attach(self.ingest._client)
        self.readiness.writer = self.writer
        self.readiness.outbox = self.outbox
        self.ingest.start(connect_timeout=self.connect_timeout)
        if self.control is not None:
            from gateway.control.service import ControlCollector

            self.control.publisher = self.ingest.publish
            self.control.start(lambda: None if self.ingest is None else self.ingest.connections)
            self.collector.register(ControlCollector(self.control))
        # The API comes up last: an open API port means ingest is subscribed.
        if self.serve_api:
            self._start_api()

    def _read_targets(self) -> list[Any] | None:
        """The targets file's targets (None without one); checked before anything starts."""
        path = self.config.on_cloud.targets_file
        if path is None or not self._own_registry:
            return None
        from gateway.registry import TargetsError, read_targets_file

        try:
            return read_targets_file(path)
        except TargetsError as exc:
            raise GatewayStartError(f"on_cloud.targets_file: {exc}") from exc

    def _start_api(self) -> None:
        import uvicorn

        from gateway.api import create_app

        cfg = self.config
        app = create_app(
            self.registry,
            cfg,
            outbox=self.outbox,
            metrics=self.collector,
            readiness=self.readiness,
            sync_broker=False,
            control=self.control,
        )
        family = socket.AF_INET6 if ":" in cfg.api.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.api.host, cfg.api.port))
        except OSError as exc:
            sock.close()
            raise GatewayStartError(
                f"api: cannot listen on {cfg.api.host}:{cfg.api.port}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        )
        self._server = server
        self._server_thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="iiot-api", daemon=True
        )
        self._server_thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not self._server_thread.is_alive() or time.monotonic() > deadline:
                raise GatewayStartError("api: the HTTP server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop acking, flush the outbox, drain the writer (bounded), close everything."""
        cfg = self.config
        if self.control is not None:
            self.control.stop()
        if self.ingest is not None:
            self.ingest.stop()
            self.ingest = None
        self.control = None
        if self.snapshotter is not None:
            with contextlib.suppress(Exception):
                self.snapshotter.stop()
            self.snapshotter = None
        if self.provisioner is not None:
            self.provisioner.close()
            self.provisioner = None
        if self.writer is not None:
            self.writer.stop(cfg.outbox.drain_timeout)
            self.writer = None
        if self._server is not None:
            self._server.should_exit = True
            if self._server_thread is not None:
                self._server_thread.join(10)
            self._server = None
            self._server_thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.registry is not None and self._own_registry:
            for step in ("flush", "close"):
                try:
                    getattr(self.registry, step)()
                except Exception:
                    log.exception("registry %s failed at shutdown", step)
            self.registry = None
            self.sink = None
        if self.outbox is not None:
            pending = self.outbox.pending_lines
            self.outbox.close()
            self.outbox = None
            if pending and cfg.influx.url:
                log.info("lines kept in the outbox for the next start", extra={"lines": pending})
        if self._started:
            log.info("gateway stopped")
        self._started = False

    # -- introspection -----------------------------------------------------------------

    @property
    def api_port(self) -> int:
        """The port the API listens on (useful with ``api.port: 0``)."""
        if self._sock is None:
            raise RuntimeError("the API is not running")
        return int(self._sock.getsockname()[1])

    @property
    def api_url(self) -> str:
        """The API's base URL on this host."""
        host = self.config.api.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.api_port}"

    @property
    def mqtt_connected(self) -> bool:
        return self.ingest is not None and self.ingest.connected

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
