"""The agent's end of the control plane: downlink messages in, answers out.

The publisher subscribes (QoS 1, after every connect) to ``subscriptions`` and hands each
message to ``ControlPlane.on_message`` on the event loop. A message is decoded with the
models of ``protocols.mqtt.control``; one that cannot be is counted by reason
(``iiot_agent_control_bad_messages``), logged once per change of reason, and dropped —
it never ends the agent. Good ones run as tasks: configurations one after the other,
one scan at a time, writes through ``CommandExecutor``. A Sparkplug agent's DCMD metrics
(``on_dcmd``) are writes too, answered on the same ``.../{device}/result`` topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ValidationError

from edge_agent.commands import CommandExecutor
from edge_agent.config import DeviceConfig, LoadedConfig
from protocols.driver import now_ms
from protocols.mqtt.contract import ContractError, encode
from protocols.mqtt.control import (
    ConfigReport,
    ControlKind,
    ControlTopic,
    DesiredConfig,
    ScanReport,
    ScanRequest,
    WriteCommand,
    WriteResult,
    WriteStatus,
    parse_control_topic,
)
from protocols.mqtt.sparkplug.command import DeviceCommand

__all__ = ["MAX_CONTROL_PAYLOAD", "ControlMetrics", "ControlPlane", "exclude_keys", "run_scan"]

log = logging.getLogger("iiot.agent.control")

MAX_CONTROL_PAYLOAD = 4 * 1024 * 1024  # bytes; a desired configuration of a large site fits
_M = TypeVar("_M", bound=BaseModel)

_Publish = Callable[[str, bytes, bool], bool]
_OnResult = Callable[[str, WriteResult], None]  # (point, result) of an executed write


class ControlMetrics:
    """Control-plane counters, on the agent's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "iiot_agent_control_messages", "Control messages handled, by kind and outcome.",
            ["kind", "result"], registry=registry,
        )  # fmt: skip
        self.bad = Counter(
            "iiot_agent_control_bad_messages", "Control messages dropped unread, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.config_version = Gauge(
            "iiot_agent_config_version", "Remote configuration version running (0: local file).",
            registry=registry,
        )  # fmt: skip


def exclude_keys(devices: list[DeviceConfig]) -> set[str]:
    """Where configured devices are, as ``modbus:<line>:<unit>`` / ``opcua:<endpoint>``."""
    out: set[str] = set()
    for dev in devices:
        if dev.modbus is not None:
            out.add(f"modbus:{dev.modbus.line_key}:{dev.modbus.unit}")
        elif dev.opcua is not None:
            out.add(f"opcua:{dev.opcua.endpoint}")
    return out


async def run_scan(request: ScanRequest, loaded: LoadedConfig) -> ScanReport:
    """Scan where ``loaded``'s discovery scope allows, until the request expires."""

    def report(errors: list[str], proposals: list[Any] | None = None) -> ScanReport:
        return ScanReport(scan=request.id, ts=now_ms(), proposals=proposals or [], errors=errors)

    remaining = (request.expires - now_ms()) / 1000
    if remaining <= 0:
        return report(["the scan request expired before it could start"])
    raw = loaded.config.discovery
    if raw is None:
        return report(["this agent has no discovery scope in its configuration"])
    try:
        # Imported here: the discovery module is optional and loads its scanners lazily.
        discovery = importlib.import_module("edge_agent.discovery")
    except ImportError as exc:
        return report([f"discovery is not available on this agent: {exc}"])
    try:
        scope = discovery.DiscoveryScope.model_validate(raw)
    except ValidationError as exc:
        return report([f"discovery: {e['msg']} at {e['loc']}" for e in exc.errors()])
    try:
        async with asyncio.timeout(remaining + 5.0):
            proposals = await discovery.scan(
                scope,
                loaded.profiles,
                exclude=exclude_keys(loaded.config.devices),
                deadline=time.monotonic() + remaining,
            )
    except TimeoutError:
        return report(["the scan did not finish before the request expired"])
    except Exception as exc:  # a scanner bug is reported, never ends the agent
        log.exception("scan failed")
        return report([f"scan failed: {type(exc).__name__}: {exc}"])
    return report([], list(proposals))


class ControlPlane:
    """Decodes control messages for one agent and runs their handlers as tasks."""

    def __init__(
        self,
        enterprise: str,
        agent_id: str,
        *,
        publish: _Publish,
        apply_config: Callable[[DesiredConfig], Awaitable[ConfigReport]],
        scan: Callable[[ScanRequest], Awaitable[ScanReport]],
        executor: CommandExecutor,
        metrics: ControlMetrics,
    ) -> None:
        self.enterprise = enterprise
        self.agent_id = agent_id
        self._publish = publish
        self._apply_config = apply_config
        self._scan = scan
        self.executor = executor
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._config_lock = asyncio.Lock()
        self._scanning = False
        self._scan_ids: deque[str] = deque(maxlen=32)  # recent scan ids: a repeat is ignored
        self._last_bad: dict[str, str] = {}
        self._closed = False

    @property
    def subscriptions(self) -> list[str]:
        base = f"iiot/v1/{self.enterprise}/{self.agent_id}"
        return [f"{base}/config", f"{base}/scan", f"{base}/+/cmd"]

    def topic(self, kind: ControlKind, device: str | None = None) -> str:
        return str(ControlTopic(self.enterprise, self.agent_id, kind, device))

    def on_message(self, topic: str, payload: bytes) -> None:
        """A message on a subscribed topic (event loop)."""
        if self._closed:  # the agent is stopping: nothing new starts
            return
        try:
            ct = parse_control_topic(topic)
        except ContractError:
            ct = None
        if ct is None or (ct.enterprise, ct.agent) != (self.enterprise, self.agent_id):
            self._bad("topic", "bad_topic", f"not a control topic of this agent: {topic[:200]}")
            return
        if not ct.downlink:
            self._bad(ct.kind.value, "not_downlink", f"{topic}: not a downlink topic")
            return
        kind = ct.kind.value
        if len(payload) > MAX_CONTROL_PAYLOAD:
            self._bad(kind, "too_large", f"{topic}: {len(payload)} bytes")
            return
        if ct.kind is ControlKind.CONFIG:
            if not payload:  # the gateway cleared its retained desired configuration
                self.metrics.messages.labels(kind, "cleared").inc()
                return
            desired = self._decode(kind, topic, payload, DesiredConfig)
            if desired is not None:
                self._spawn(self._config(desired), f"control-config-{desired.version}")
        elif ct.kind is ControlKind.SCAN:
            request = self._decode(kind, topic, payload, ScanRequest)
            if request is not None:
                self._spawn(self._scan_task(request), f"control-scan-{request.id}")
        else:
            assert ct.device is not None
            cmd = self._decode(kind, topic, payload, WriteCommand)
            if cmd is not None:
                self._spawn(self._write(ct.device, cmd), f"control-cmd-{cmd.id}")

    def on_dcmd(
        self, device: str, commands: Sequence[DeviceCommand], on_result: _OnResult | None = None
    ) -> None:
        """A Sparkplug DCMD's writes (event loop): the same checks, executor and answers."""
        if self._closed:
            return
        for c in commands:
            reason = c.problem
            cmd: WriteCommand | None = None
            if reason is None:
                try:
                    cmd = WriteCommand(
                        id=c.id, point=c.point, value=c.value, ts=c.ts, expires=c.expires
                    )
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(x) for x in first["loc"])
                    reason = f"metric {c.point[:80]!r}: {where}: {first['msg']}"
            if cmd is None:
                self.metrics.messages.labels("dcmd", WriteStatus.REFUSED.value).inc()
                result = WriteResult(
                    id=c.id,
                    status=WriteStatus.REFUSED,
                    reason=reason or "",
                    ts=now_ms(),
                    point=c.point[:64],
                    requested=c.value,
                )
                self._publish(self.topic(ControlKind.RESULT, device), encode(result), False)
                continue
            self._spawn(self._write(device, cmd, "dcmd", on_result), f"control-dcmd-{cmd.id}")

    def bad(self, kind: str, reason: str, detail: str) -> None:
        """Count and log (once per change of reason) a control message dropped unread."""
        self._bad(kind, reason, detail)

    async def aclose(self) -> None:
        """Cancel what is still running (a write waiting for its device, a scan)."""
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # -- internals ------------------------------------------------------------------

    def _decode(self, kind: str, topic: str, payload: bytes, model: type[_M]) -> _M | None:
        try:
            msg = model.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            reason = "bad_json" if first["type"] == "json_invalid" else f"invalid_{kind}"
            where = ".".join(str(x) for x in first["loc"]) or "payload"
            self._bad(kind, reason, f"{topic}: {where}: {first['msg']}")
            return None
        self._last_bad.pop(kind, None)
        return msg

    def _bad(self, kind: str, reason: str, detail: str) -> None:
        self.metrics.bad.labels(reason).inc()
        if self._last_bad.get(kind) != reason:
            self._last_bad[kind] = reason
            log.warning("control message dropped", extra={"reason": reason, "detail": detail})

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "control handler failed", exc_info=task.exception(), extra={"task": task.get_name()}
            )

    async def _config(self, desired: DesiredConfig) -> None:
        async with self._config_lock:
            report = await self._apply_config(desired)
        self.metrics.messages.labels("config", "applied" if report.applied else "refused").inc()
        self.metrics.config_version.set(report.running_version)
        self._publish(self.topic(ControlKind.REPORTED), encode(report), True)

    async def _scan_task(self, request: ScanRequest) -> None:
        # A scan asked for after a configuration scans where that one allows: the lock is
        # fair, so the versions that arrived before this request are applied first.
        async with self._config_lock:
            pass
        if request.id in self._scan_ids:
            # Delivered again (QoS 1 after a reconnect): its one report comes from the first.
            self.metrics.messages.labels("scan", "repeated").inc()
            return
        self._scan_ids.append(request.id)
        if self._scanning:
            report = ScanReport(
                scan=request.id, ts=now_ms(), errors=["another scan is still running"]
            )
            self.metrics.messages.labels("scan", "busy").inc()
        else:
            self._scanning = True
            try:
                report = await self._scan(request)
            finally:
                self._scanning = False
            self.metrics.messages.labels("scan", "error" if report.errors else "ok").inc()
        self._publish(self.topic(ControlKind.DISCOVERED), encode(report), False)

    async def _write(
        self,
        device: str,
        cmd: WriteCommand,
        kind: str = "cmd",
        on_result: _OnResult | None = None,
    ) -> None:
        result, repeated = await self.executor.execute(device, cmd)
        self.metrics.messages.labels(kind, "repeated" if repeated else result.status.value).inc()
        if not repeated:
            log.info(
                "write command answered",
                extra={"device": device, "id": cmd.id, "status": result.status.value},
            )
            if on_result is not None:
                on_result(cmd.point, result)
        if kind == "dcmd":
            # The gateway may not have sent it (another Sparkplug host): say what was asked.
            result = result.model_copy(update={"point": cmd.point, "requested": cmd.value})
        topic = self.topic(ControlKind.RESULT, device)
        self._publish(topic, encode(result), False)
