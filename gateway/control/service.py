"""The gateway side of the control plane: desired configurations, writes, discovery.

Everything that must survive a restart or be seen by another gateway instance is in
the database (``ControlStore``). Several instances may share one subscription, so the
answer to a command may reach an instance other than the one that sent it: whichever
receives it stores it, and the waiting API call polls the database (and is woken at once
when the answer arrives on its own instance).

    ControlError
    ├── ControlInvalid      422: names every problem found
    ├── ControlNotFound     404
    ├── ControlConflict     409: changed meanwhile, or already decided
    └── ControlUnavailable  503: no broker connection to publish on
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError

from device_profiles.loader import ProfileError, parse_profile
from gateway.auth import Caller
from gateway.config import GatewayConfig
from gateway.control.desired import (
    CheckedConfig,
    DesiredConfigError,
    builtin_profiles,
    check_config,
)
from gateway.control.store import ControlStore, StaleVersion
from gateway.registry import Registry, RegistryError
from gateway.registry.ledger import check_row
from protocols.modbus.config import ModbusConnection
from protocols.mqtt.contract import ContractError
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
)
from protocols.mqtt.sparkplug.command import dcmd
from protocols.mqtt.sparkplug.payload import DataType, MessageType, SpTopic, datatype_for

__all__ = [
    "ControlCollector",
    "ControlConflict",
    "ControlError",
    "ControlInvalid",
    "ControlNotFound",
    "ControlService",
    "ControlUnavailable",
    "Publisher",
    "address_key",
]

log = logging.getLogger("iiot.gateway.control")

_POLL = 0.2  # seconds between two database looks while waiting for a write's answer
_REPUBLISH_EVERY = 5.0  # seconds between two looks for configurations not yet published
_GRACE = 1.0  # seconds past a command's expiry that an answer may still be in flight
# Seconds past a scan's expiry that its report is still taken: the agent stops scanning at
# the expiry and gives up 5 s later, and the report may wait out a short reconnection.
_SCAN_GRACE = 30.0
_LOG_EVERY = 60.0  # seconds between two logs of the same refusal from one agent
_HOST_ORIGIN = "sparkplug host"  # the audit's role of a DCMD the gateway did not send
# A write's record an agent's answer may still fill in: waiting, or given up on by the API
# call (no answer in time, or the broker did not acknowledge the command).
_ANSWERABLE = ("pending", WriteStatus.TIMEOUT.value, WriteStatus.FAILED.value)


class ControlError(ValueError):
    """A control-plane request refused; the message says why."""


class ControlInvalid(ControlError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class ControlNotFound(ControlError):
    pass


class ControlConflict(ControlError):
    pass


class ControlUnavailable(ControlError):
    pass


class Publisher(Protocol):
    def __call__(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...


def address_key(address: dict[str, Any]) -> str:
    """A stable id for where a device answers: same line/peer and unit, or same endpoint."""
    ident: Any = address
    if isinstance(address.get("modbus"), dict):
        try:
            m = ModbusConnection.model_validate(address["modbus"])
            ident = f"modbus:{m.line_key}:unit={m.unit}"
        except ValidationError:
            pass
    elif isinstance(address.get("opcua"), dict) and isinstance(
        address["opcua"].get("endpoint"), str
    ):
        ident = f"opcua:{address['opcua']['endpoint']}"
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _decode(model: type[BaseModel], kind: str, payload: bytes) -> Any:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise ContractError("not_json", f"payload is not JSON: {first['msg']}") from exc
        loc = ".".join(str(x) for x in first["loc"])
        raise ContractError("bad_payload", f"{kind} payload: {loc}: {first['msg']}") from exc


def _masked(value: Any) -> Any:
    """``value`` with every ``password`` replaced: the API shows configs to read-only tokens."""
    if isinstance(value, dict):
        return {k: "**********" if k == "password" else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _json(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=True).encode()


class ControlService:
    """Desired configurations, writes and discovery; also the ingest's ``ControlHandler``."""

    def __init__(
        self,
        registry: Registry,
        config: GatewayConfig,
        *,
        publisher: Publisher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.store = ControlStore(registry.engine)
        self.config = config
        self.publisher = publisher
        self._clock = clock
        self._waiters: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], float] = {}  # (source, reason) -> last log

    def start(self, connections: Callable[[], int | None]) -> None:
        """Keep configurations on the broker: all after each (re)connect, else the unpublished.

        ``connections`` counts the broker connections so far, None while disconnected; a
        broker that lost its retained messages (restarted without persistence) gets every
        desired configuration again when the gateway reconnects.
        """
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._keep_published, args=(connections,), name="iiot-control", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _keep_published(self, connections: Callable[[], int | None]) -> None:
        seen: int | None = None
        failing = False
        while True:
            now = connections()
            if now is not None:
                try:
                    self.republish(everything=now != seen)
                    seen = now
                    if failing:
                        log.info("desired configurations published again")
                    failing = False
                except Exception as exc:
                    self.counters["republish_errors"] += 1
                    if not failing:  # once per change, not every pass
                        log.error("cannot republish configurations", extra={"error": repr(exc)})
                    failing = True
            if self._stop.wait(_REPUBLISH_EVERY if now is not None else 0.5):
                return

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _publish(
        self, topic: ControlTopic | SpTopic, payload: bytes, *, retain: bool = False
    ) -> bool:
        if self.publisher is None:
            raise ControlUnavailable("this gateway has no broker connection to publish on")
        ok = self.publisher(str(topic), payload, retain=retain)
        self.counters["published" if ok else "publish_failures"] += 1
        return ok

    def _agent(self, enterprise: str, agent: str) -> bool:
        """Whether the agent is online; ControlNotFound unless it belongs to ``enterprise``."""
        self.registry.flush()  # this instance's births and wills first
        state = self.store.agent_state(agent)
        if state is None or state[0] != enterprise:
            raise ControlNotFound(f"agent {agent!r} of enterprise {enterprise!r} is not known")
        return state[1]

    # -- desired configuration ------------------------------------------------------------

    def put_config(
        self, enterprise: str, agent: str, body: dict[str, Any], caller: Caller
    ) -> dict[str, Any]:
        """Validate, store as the next version, publish retained; returns the config view."""
        self._agent(enterprise, agent)
        # Families the current version ships stay known unless the request redefines them,
        # so its uploaded profiles can be used again without uploading anything.
        given = body.get("families", [])
        keys = {f.get("key") for f in given if isinstance(f, dict)}
        current = self.store.desired(agent)
        kept = [
            f for f in (current["document"].get("families", []) if current else [])
            if f.get("key") not in keys
        ]  # fmt: skip
        try:
            checked = check_config(
                body.get("devices", []),
                body.get("profiles", []),
                self.store.stored_profiles(),
                [*kept, *given],
            )
        except DesiredConfigError as exc:
            self.counters["config_invalid"] += 1
            raise ControlInvalid(exc.problems) from exc
        self.store.save_profiles(checked.uploads, self._now_ms())
        self._commit(enterprise, agent, checked, body.get("discovery"), caller)
        return self.config_view(enterprise, agent)

    def _commit(
        self,
        enterprise: str,
        agent: str,
        checked: CheckedConfig,
        discovery: dict[str, Any] | None,
        caller: Caller,
    ) -> int:
        current = self.store.desired(agent)
        previous = None if current is None else int(current["version"])
        before = {d.get("id") for d in current["document"].get("devices", [])} if current else set()
        doc = DesiredConfig(
            version=(previous or 0) + 1,
            ts=self._now_ms(),
            devices=checked.devices,
            profiles=checked.ship,
            families=checked.families,
            discovery=discovery,
        )
        try:
            self.store.save_desired(
                enterprise,
                agent,
                doc.model_dump(mode="json", exclude_none=True),
                previous=previous,
                by=f"{caller.role.value} {caller.token_label}",
                now_ms=self._now_ms(),
            )
        except StaleVersion:
            raise ControlConflict(
                f"the configuration of agent {agent!r} changed meanwhile; read it and retry"
            ) from None
        self.counters["config_versions"] += 1
        log.info("desired configuration stored", extra={"agent": agent, "version": doc.version})
        # The devices it lists are this agent's unless another has them; those it dropped
        # are free for the agent whose birth names them next (the device moved).
        listed = {str(d["id"]) for d in checked.devices}
        self.registry.config_owners(
            enterprise,
            agent,
            listed,
            {d for d in before if isinstance(d, str)} - listed,
            by=f"{caller.role.value} {caller.token_label}",
        )
        # Without a broker connection here it stays unpublished; an instance that has one
        # publishes it on its next pass (``start``).
        topic = ControlTopic(enterprise, agent, ControlKind.CONFIG)
        if self.publisher is not None and self._publish(topic, _json(doc), retain=True):
            self.store.mark_published(agent, doc.version)
        return doc.version

    def republish(self, *, everything: bool = False) -> int:
        """Publish the configurations not yet acknowledged by the broker (or all of them)."""
        sent = 0
        for enterprise, agent, doc in self.store.unpublished(everything=everything):
            payload = json.dumps(doc, separators=(",", ":")).encode()
            topic = ControlTopic(enterprise, agent, ControlKind.CONFIG)
            if self.publisher is not None and self._publish(topic, payload, retain=True):
                self.store.mark_published(agent, int(doc["version"]))
                sent += 1
        if sent:
            self.counters["republished"] += sent
            log.info("desired configurations published", extra={"count": sent})
        return sent

    def config_view(self, enterprise: str, agent: str) -> dict[str, Any]:
        self._agent(enterprise, agent)
        desired = self.store.desired(agent)
        reported = self.store.reported(agent)
        d = None
        if desired is not None:
            d = {
                "version": desired["version"],
                "updated_ms": desired["updated_ms"],
                "updated_by": desired["updated_by"],
                "published": desired["published"],
                "config": _masked(desired["document"]),
            }
        r = None
        if reported is not None:
            r = {k: reported[k] for k in ("version", "applied", "running_version", "errors")}
            r["ts_ms"] = reported["ts_ms"]
            r["received_ms"] = reported["received_ms"]
        in_sync = d is not None and r is not None and r["running_version"] == d["version"]
        return {
            "enterprise": enterprise,
            "agent": agent,
            "desired": d,
            "reported": r,
            "in_sync": in_sync,
        }

    # -- uplink (ingest thread) -------------------------------------------------------------

    def accept(self, topic: ControlTopic, payload: bytes) -> Callable[[], None]:
        """Validate an agent's control message; the returned call stores it."""
        ent, agent = topic.enterprise, topic.agent
        if topic.kind is ControlKind.REPORTED:
            report: ConfigReport = _decode(ConfigReport, "reported", payload)
            return lambda: self.store.save_report(ent, agent, report, self._now_ms())
        if topic.kind is ControlKind.RESULT:
            result: WriteResult = _decode(WriteResult, "result", payload)
            assert topic.device is not None
            device = topic.device
            return lambda: self._on_result(ent, agent, device, result)
        if topic.kind is ControlKind.DISCOVERED:
            scan: ScanReport = _decode(ScanReport, "discovered", payload)
            # Refused here, so that the ingest counts it by reason and logs it per source.
            refused = self._scan_refusal(self.store.get_scan(scan.scan), ent, agent, scan.scan)
            if refused is not None:
                raise ContractError(*refused)
            return lambda: self._on_scan_report(ent, agent, scan)
        raise ContractError("bad_topic", f"no payload is accepted on {topic.kind.value} topics")

    def _on_result(self, ent: str, agent: str, device: str, result: WriteResult) -> None:
        row = self.store.get_write(result.id)
        if row is None and self._host_write(ent, agent, device, result):
            return
        if row is None or (row["enterprise"], row["device"], row["agent"]) != (ent, device, agent):
            self.counters["results_unknown"] += 1
            log.warning(
                "write result for no write we sent", extra={"agent": agent, "id": result.id}
            )
            return
        if row["status"] not in _ANSWERABLE or (
            (row["status"], row["reason"]) == (result.status.value, result.reason)
        ):
            # The agent answers a repeated request id (a redelivered or replayed command)
            # with its first result: the record already holds what happened.
            self.counters["results_repeated"] += 1
            return
        now = self._now_ms()
        fields: dict[str, Any] = {
            "reason": result.reason,
            "previous": result.previous,
            "value": result.value,
            "now_ms": now,
        }
        if not self.store.finish_write(result.id, result.status.value, **fields):
            # The API call gave up already: keep what really happened, saying it came late.
            self.counters["results_late"] += 1
            fields["reason"] = (result.reason + " " if result.reason else "") + (
                "(answered after the gateway stopped waiting)"
            )
            self.store.finish_write(result.id, result.status.value, only_pending=False, **fields)
        self.counters["results"] += 1
        with self._lock:
            waiter = self._waiters.get(result.id)
        if waiter is not None:
            waiter.set()

    def _host_write(self, ent: str, agent: str, device: str, result: WriteResult) -> bool:
        """Audit a DCMD another Sparkplug host sent, from the agent's answer; False if not one.

        Only an answer naming the point (agents name it on DCMD answers alone), about
        one of the agent's own devices, counts: the gateway never saw the command, so
        the answer is all it knows.
        """
        if result.point is None:
            return False
        # The registry's memory first: a device born moments ago may not be flushed yet.
        view = self.registry.get_device(ent, device)
        if (view["agent"] if view is not None else self.store.agent_of(ent, device)) != agent:
            return False
        now = self._now_ms()
        row = {
            "id": result.id,
            "enterprise": ent,
            "device": device,
            "agent": agent,
            "point": result.point,
            "value": result.requested,
            "status": result.status.value,
            "reason": result.reason[:500],
            "previous": result.previous,
            "read_back": result.value,
            "role": _HOST_ORIGIN,
            "token_label": "",
            "requested_ms": now,
            "expires_ms": now,  # the gateway never waited for it
            "finished_ms": now,
        }
        if not self.store.insert_write(row, once=True):
            # Stored already (a repeated answer, or another instance took the first).
            self.counters["results_repeated"] += 1
            return True
        self.counters["host_writes"] += 1
        log.info(
            "write by another Sparkplug host audited",
            extra={"agent": agent, "device": device, "id": result.id, "status": row["status"]},
        )
        return True

    def _scan_refusal(
        self, row: dict[str, Any] | None, ent: str, agent: str, scan: str
    ) -> tuple[str, str] | None:
        """(reason, message) when a report for ``scan`` from ``ent/agent`` is not wanted.

        Only the agent a scan was asked of may answer it, and only until its final
        report or its expiry (with ``_SCAN_GRACE``): anything else would put equipment
        nobody looked for in front of the admin.
        """
        if row is None:
            return "scan_unknown", f"discovered: scan {scan!r} was never requested"
        if (row["enterprise"], row["agent"]) != (ent, agent):
            return "scan_other_agent", (
                f"discovered: scan {scan!r} was requested of another agent, not {agent!r}"
            )
        if row["finished_ms"] is not None:
            return "scan_finished", f"discovered: scan {scan!r} has had its final report"
        if self._now_ms() > row["expires_ms"] + _SCAN_GRACE * 1000:
            return "scan_finished", f"discovered: scan {scan!r} expired"
        return None

    def _on_scan_report(self, ent: str, agent: str, report: ScanReport) -> None:
        refused: list[tuple[str, str]] = []

        def refusal(row: dict[str, Any] | None) -> str | None:
            found = self._scan_refusal(row, ent, agent, report.scan)
            if found is not None:
                refused.append(found)
            return None if found is None else found[0]

        reason = self.store.scan_reported(
            report.scan, report.errors, done=report.done, now_ms=self._now_ms(), refusal=refusal
        )
        if reason is not None:
            # Passed ``accept`` but another report finished the scan meanwhile.
            self._refused(f"{ent}/{agent}", reason, refused[0][1] if refused else report.scan)
            return
        desired = self.store.desired(agent)
        configured = {
            address_key({k: v for k, v in dev.items() if k in ("modbus", "opcua")})
            for dev in (desired["document"]["devices"] if desired else [])
        }
        now = self._now_ms()
        for p in report.proposals:
            key = address_key(p.address)
            if key in configured:
                self.counters["proposals_configured"] += 1
                continue
            self.store.upsert_proposal(
                {
                    "enterprise": ent,
                    "agent": agent,
                    "address_key": key,
                    "protocol": p.protocol,
                    "address": p.address,
                    "answered": p.answered,
                    "candidates": [c.model_dump() for c in p.candidates],
                    "scan": report.scan,
                    "now_ms": now,
                }
            )
            self.counters["proposals"] += 1

    def _refused(self, source: str, reason: str, detail: str) -> None:
        """Count a refused control message; log it once a minute per source and reason."""
        self.counters[f"refused_{reason}"] += 1
        now = time.monotonic()
        with self._lock:
            last = self._logged.get((source, reason))
            if last is not None and now - last < _LOG_EVERY:
                return
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[(source, reason)] = now
        log.warning(
            "control message refused", extra={"source": source, "reason": reason, "detail": detail}
        )

    # -- writes --------------------------------------------------------------------------

    def write(
        self, enterprise: str, device: str, point: str, value: Any, caller: Caller
    ) -> dict[str, Any]:
        """Send a WriteCommand and wait for its answer (blocking; run it in a thread)."""
        view = self.registry.get_device(enterprise, device)
        agent = view["agent"] if view is not None else self.store.agent_of(enterprise, device)
        if agent is None:
            if view is None:
                raise ControlNotFound(
                    f"device {device!r} of enterprise {enterprise!r} is not known"
                )
        online = agent is not None and self._agent(enterprise, agent)
        now = self._now_ms()
        timeout_ms = int(self.config.control.write_timeout * 1000)
        request_id = secrets.token_hex(8)
        row = {
            "id": request_id,
            "enterprise": enterprise,
            "device": device,
            "agent": agent,
            "point": point,
            "value": value,
            "status": "pending",
            "reason": "",
            "role": caller.role.value,
            "token_label": caller.token_label,
            "requested_ms": now,
            "expires_ms": now + timeout_ms,
        }
        if not online:
            row.update(
                status=WriteStatus.OFFLINE.value,
                finished_ms=now,
                reason="no agent has reported this device"
                if agent is None
                else f"agent {agent!r} is offline",
            )
            self.store.insert_write(row)
            self.counters["writes_offline"] += 1
            return self._write_view(request_id)
        assert agent is not None
        self.store.insert_write(row)
        topic, payload = self._command(
            enterprise, agent, device, view, request_id, point, value, now, now + timeout_ms
        )
        waiter = threading.Event()
        with self._lock:
            self._waiters[request_id] = waiter
        try:
            if not self._publish(topic, payload):
                self.store.finish_write(
                    request_id,
                    WriteStatus.FAILED.value,
                    reason="the broker did not acknowledge the command; it may still reach "
                    "the agent before it expires (a late answer updates this record)",
                    now_ms=self._now_ms(),
                )
                return self._write_view(request_id)
            self._wait(request_id, waiter, now + timeout_ms + int(_GRACE * 1000))
        finally:
            with self._lock:
                self._waiters.pop(request_id, None)
        self.counters["writes"] += 1
        return self._write_view(request_id)

    def _command(
        self,
        enterprise: str,
        agent: str,
        device: str,
        view: dict[str, Any] | None,
        request_id: str,
        point: str,
        value: Any,
        now: int,
        expires: int,
    ) -> tuple[ControlTopic | SpTopic, bytes]:
        """The command's topic and payload: a JSON WriteCommand, or a DCMD to a Sparkplug node.

        The DCMD names the metric with the profile's datatype and carries the request id
        and expiry as metric properties, so the WriteResult matches this audit row.
        """
        if self.store.agent_codec(agent) != "sparkplug":
            cmd = WriteCommand(id=request_id, point=point, value=value, ts=now, expires=expires)
            return ControlTopic(enterprise, agent, ControlKind.CMD, device), _json(cmd)
        profile = view.get("profile") if view is not None else None
        declared = self._declared_datatype(profile, point) if profile else None
        payload = dcmd([(point, declared, value)], ts=now, request_id=request_id, expires=expires)
        self.counters["dcmd"] += 1
        return SpTopic(enterprise, MessageType.DCMD, agent, device), payload

    def _declared_datatype(self, profile_id: str, point: str) -> DataType | None:
        """The datatype ``point`` is born with in profile ``profile_id``; None if unknown."""
        found = {p.id: p for p in builtin_profiles()}.get(profile_id)
        if found is None:
            doc = self.store.stored_profiles().get(profile_id)
            if doc is None:
                return None
            try:
                found = parse_profile(doc, f"stored profile '{profile_id}'")
            except ProfileError:
                return None
        try:
            return datatype_for(found.point(point))
        except KeyError:
            return None

    def _wait(self, request_id: str, waiter: threading.Event, deadline_ms: int) -> None:
        while True:
            row = self.store.get_write(request_id)
            if row is not None and row["status"] != "pending":
                return
            left = (deadline_ms - self._now_ms()) / 1000
            if left <= 0:
                break
            waiter.wait(min(_POLL, left))
        self.store.finish_write(
            request_id,
            WriteStatus.TIMEOUT.value,
            reason="no answer from the agent before the command expired",
            now_ms=self._now_ms(),
        )

    def _write_view(self, request_id: str) -> dict[str, Any]:
        row = self.store.get_write(request_id)
        assert row is not None
        return row

    def list_writes(
        self, enterprise: str | None, device: str | None, limit: int
    ) -> list[dict[str, Any]]:
        return self.store.list_writes(enterprise, device, limit)

    # -- discovery -----------------------------------------------------------------------

    def scan(self, enterprise: str, agent: str) -> dict[str, Any]:
        if not self._agent(enterprise, agent):
            raise ControlConflict(f"agent {agent!r} is offline; it cannot scan now")
        now = self._now_ms()
        expires = now + int(self.config.control.scan_timeout * 1000)
        req = ScanRequest(id=secrets.token_hex(8), ts=now, expires=expires)
        self.store.insert_scan(
            {
                "id": req.id,
                "enterprise": enterprise,
                "agent": agent,
                "requested_ms": now,
                "expires_ms": expires,
            }
        )
        if not self._publish(ControlTopic(enterprise, agent, ControlKind.SCAN), _json(req)):
            raise ControlUnavailable("the scan request could not be published to the broker")
        self.counters["scans"] += 1
        return {"scan": req.id, "agent": agent, "enterprise": enterprise, "expires_ms": expires}

    def list_discovered(
        self, enterprise: str | None, agent: str | None, status: str | None
    ) -> list[dict[str, Any]]:
        return self.store.list_discovered(enterprise, agent, status)

    def profile(self, profile_id: str) -> dict[str, Any]:
        """A shipped or uploaded profile as JSON (an uploaded one may not shadow a shipped one)."""
        shipped = builtin_profiles()
        if profile_id in shipped:
            return shipped[profile_id].model_dump(mode="json", exclude_none=True)
        doc = self.store.stored_profiles().get(profile_id)
        if doc is not None:
            try:
                parsed = parse_profile(doc, f"stored profile '{profile_id}'")
            except ProfileError as exc:
                raise ControlInvalid([str(exc)]) from None
            return parsed.model_dump(mode="json", exclude_none=True)
        raise ControlNotFound(f"profile {profile_id!r} is neither shipped nor uploaded")

    def _proposal(self, proposal_id: int) -> dict[str, Any]:
        found = self.store.get_discovered(proposal_id)
        if found is None:
            raise ControlNotFound(f"discovered entry {proposal_id} does not exist")
        if found["status"] != "new":
            raise ControlConflict(f"discovered entry {proposal_id} is {found['status']} already")
        return found

    def reject(self, proposal_id: int) -> dict[str, Any]:
        self._proposal(proposal_id)
        self.store.set_discovered(proposal_id, "rejected", None)
        found = self.store.get_discovered(proposal_id)
        assert found is not None
        return found

    def approve(self, proposal_id: int, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """Put the device in the ledger and in its agent's desired configuration."""
        p = self._proposal(proposal_id)
        ent, agent, device_id = p["enterprise"], p["agent"], body["device_id"]
        profile = body.get("profile") or (
            p["candidates"][0]["profile"] if p["candidates"] else None
        )
        if profile is None:
            raise ControlInvalid(["profile: no candidate profile answered; give one"])
        # The agent's report says only where the device is: its protocol's connection keys.
        # Everything else in the entry is the admin's (an agent may not pick the id).
        where = {k: v for k, v in p["address"].items() if k == p["protocol"]}
        if not where:
            raise ControlInvalid([f"proposal {proposal_id}: no {p['protocol']} address"])
        entry: dict[str, Any] = {**where, "id": device_id, "profile": profile}
        if body.get("poll_interval") is not None:
            entry["poll_interval"] = body["poll_interval"]
        desired = self.store.desired(agent)
        doc = desired["document"] if desired else {}
        devices = [*doc.get("devices", []), entry]
        try:
            # The families the current version ships keep its uploaded profiles usable.
            checked = check_config(
                devices, [], self.store.stored_profiles(), doc.get("families", [])
            )
        except DesiredConfigError as exc:
            raise ControlInvalid(exc.problems) from exc
        prof = checked.profiles[profile]
        ledger = {
            k: body[k] for k in ("name", "region", "industry", "family", "category") if body.get(k)
        }
        ledger.setdefault("family", prof.family)
        try:
            row = check_row(
                {
                    "device_id": device_id,
                    "enterprise": ent,
                    "agent": agent,
                    "profile": profile,
                    **ledger,
                }
            )
            view, _created = self.registry.register_device(row)
        except (ValueError, RegistryError) as exc:
            raise ControlInvalid([str(exc)]) from exc
        self._commit(ent, agent, checked, doc.get("discovery"), caller)
        self.store.set_discovered(proposal_id, "approved", device_id)
        self.counters["approved"] += 1
        return {"device": view, "config": self.config_view(ent, agent)}


class ControlCollector(Collector):
    """The control plane's counters for /metrics."""

    def __init__(self, service: ControlService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "iiot_control_events",
            "Control-plane events: configurations, writes, results, scans, proposals.",
            labels=["kind"],
        )
        for kind, value in sorted(self.service.counters.items()):
            events.add_metric([kind], value)
        yield events
