"""The Sparkplug B session rules of one edge node, in one small state machine.

- NDEATH is the MQTT will of every session and carries that session's ``bdSeq``; the
  NBIRTH of the session carries the same ``bdSeq``, ``seq`` 0, ``Node Control/Rebirth``
  and the node's metrics.
- ``seq`` runs 0–255 and wraps, over NBIRTH, DBIRTH, NDATA, DDATA and DDEATH.
- DBIRTH names every point of a device with its alias, datatype and units; DDATA then
  sends aliases (with each datatype, as Tahu reads it). A Rebirth request (NCMD) is
  answered with NBIRTH and every DBIRTH.
- Samples taken before the current NBIRTH (spooled while offline) go out flagged
  ``is_historical`` with their own timestamps.

Spool bodies are the contract's JSON sample text: alias, seq and ``is_historical`` depend
on the session a sample is finally sent in, so the protobuf is built at send time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from protocols.driver import now_ms
from protocols.mqtt.contract import PointValue
from protocols.mqtt.sparkplug.payload import (
    DataType,
    MessageType,
    Payload,
    SpTopic,
    fit_datatype,
    parse_payload,
    set_property,
    set_value,
)

__all__ = [
    "BDSEQ",
    "DEVICE_PROPERTIES",
    "ERROR_PROPERTY",
    "QUALITY_PROPERTY",
    "REASON_METRIC",
    "REBIRTH",
    "UNIT_PROPERTY",
    "EdgeNode",
    "NodeDevice",
    "is_rebirth_request",
    "rebirth_request",
]

BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
UNIT_PROPERTY = "engUnit"
ERROR_PROPERTY = "error"
QUALITY_PROPERTY = "quality"
REASON_METRIC = "Properties/Reason"
# DBIRTH metrics that describe the device rather than measure it (String, no alias).
DEVICE_PROPERTIES = ("profile", "protocol", "family", "category")
_PROP_PREFIX = "Properties/"


@dataclass(frozen=True, slots=True)
class NodeDevice:
    """A device of the edge node and its points: (name, datatype, unit)."""

    id: str
    profile: str
    protocol: str
    family: str | None
    category: str | None
    points: tuple[tuple[str, DataType, str], ...]


class EdgeNode:
    """Builds the payloads of one edge node and keeps its ``seq``, ``bdSeq`` and aliases."""

    def __init__(
        self, group: str, node: str, devices: Sequence[NodeDevice], *, version: str = ""
    ) -> None:
        self.group = group
        self.node = node
        self.version = version
        self.devices = {d.id: d for d in devices}
        self.bdseq = 0
        self.born_at = 0  # ms of the current NBIRTH: older samples are historical
        self._seq = 0
        self._alias: dict[str, dict[str, tuple[int, DataType]]] = {}
        self._by_alias: dict[str, dict[int, tuple[str, DataType]]] = {}
        self._last_alias = 0
        for d in devices:
            self._number(d)
        self._latest: dict[str, dict[str, tuple[PointValue, int]]] = {}
        self._topics: dict[tuple[MessageType, str | None], str] = {}

    def _number(self, d: NodeDevice) -> None:
        """Give ``d``'s points aliases never used before in this node."""
        per: dict[str, tuple[int, DataType]] = {}
        for name, dt, _ in d.points:
            self._last_alias += 1
            per[name] = (self._last_alias, dt)
        self._alias[d.id] = per
        self._by_alias[d.id] = {a: (n, dt) for n, (a, dt) in per.items()}

    def set_devices(self, devices: Sequence[NodeDevice]) -> tuple[list[str], list[str]]:
        """Replace the device set: (added or changed ids to DBIRTH, removed ids to DDEATH).

        Unchanged devices keep their aliases, so a host's DDATA reading is undisturbed;
        added and changed ones get fresh aliases.
        """
        new = {d.id: d for d in devices}
        gone = [i for i in self.devices if i not in new]
        born = [i for i, d in new.items() if self.devices.get(i) != d]
        for i in gone:
            self._alias.pop(i, None)
            self._by_alias.pop(i, None)
            self._latest.pop(i, None)
        for i in born:
            self._number(new[i])
        self.devices = new
        return born, gone

    def resolve(self, device: str, metric: Any) -> tuple[str, DataType] | None:
        """(point, born datatype) of a metric a host sent by alias or by name; None if unknown."""
        if metric.HasField("alias"):
            found = self._by_alias.get(device, {}).get(metric.alias)
            if found is not None:
                return found
        if metric.name:
            known = self._alias.get(device, {}).get(metric.name)
            if known is not None:
                return metric.name, known[1]
        return None

    def topic(self, kind: MessageType, device: str | None = None) -> str:
        key = (kind, device)
        t = self._topics.get(key)
        if t is None:
            t = self._topics[key] = str(SpTopic(self.group, kind, self.node, device))
        return t

    def _next_seq(self) -> int:
        s = self._seq
        self._seq = (s + 1) & 0xFF
        return s

    @staticmethod
    def _metric(msg: Any, name: str, dt: DataType, value: PointValue, ts: int) -> Any:
        m = msg.metrics.add()
        m.name = name
        m.timestamp = ts
        m.datatype = dt
        set_value(m, dt, value)
        return m

    def death(self, bdseq: int) -> bytes:
        """NDEATH: the will of the session numbered ``bdseq`` (no ``seq``)."""
        msg = Payload()
        msg.timestamp = now_ms()
        self._metric(msg, BDSEQ, DataType.UINT64, bdseq & 0xFF, msg.timestamp)
        return bytes(msg.SerializeToString())

    def nbirth(self, bdseq: int, ts: int | None = None, *, new_session: bool = True) -> bytes:
        """NBIRTH of a new session, or a rebirth in the same one: ``seq`` starts at 0."""
        ts = now_ms() if ts is None else ts
        self.bdseq = bdseq & 0xFF
        if new_session:
            # What was sampled before this birth was spooled while offline: historical.
            self.born_at = ts
        self._seq = 0
        msg = Payload()
        msg.timestamp = ts
        msg.seq = self._next_seq()
        self._metric(msg, BDSEQ, DataType.UINT64, self.bdseq, ts)
        self._metric(msg, REBIRTH, DataType.BOOLEAN, False, ts)
        self._metric(msg, "Properties/Version", DataType.STRING, self.version, ts)
        self._metric(msg, "Properties/Devices", DataType.UINT32, len(self.devices), ts)
        return bytes(msg.SerializeToString())

    def dbirth(self, device: str, ts: int | None = None) -> bytes:
        """DBIRTH: every point as a metric with alias, datatype, units and last value."""
        ts = now_ms() if ts is None else ts
        d = self.devices[device]
        msg = Payload()
        msg.timestamp = ts
        msg.seq = self._next_seq()
        for key in DEVICE_PROPERTIES:
            value = getattr(d, key)
            if value is not None:
                self._metric(msg, _PROP_PREFIX + key, DataType.STRING, value, ts)
        latest = self._latest.get(device, {})
        aliases = self._alias[device]
        for name, dt, unit in d.points:
            value, vts = latest.get(name, (None, ts))
            m = self._metric(msg, name, fit_datatype(dt, value), value, vts)
            m.datatype = dt  # the birth declares the profile's datatype
            if value is not None and fit_datatype(dt, value) is not dt:
                # A value the declared type cannot hold exactly is not repeated here.
                m.ClearField("value")
                m.is_null = True
            m.alias = aliases[name][0]
            if unit:
                set_property(m, UNIT_PROPERTY, unit)
        return bytes(msg.SerializeToString())

    def ddeath(self, device: str, reason: str, ts: int | None = None) -> bytes:
        """DDEATH, with why the device went offline."""
        ts = now_ms() if ts is None else ts
        msg = Payload()
        msg.timestamp = ts
        msg.seq = self._next_seq()
        self._metric(msg, REASON_METRIC, DataType.STRING, reason[:200], ts)
        return bytes(msg.SerializeToString())

    def ddata(self, device: str, bodies: Sequence[str], *, seq: int | None = None) -> bytes:
        """DDATA of spooled samples (contract JSON), by alias, older ones historical.

        ``seq`` numbers a message outside the session (the session's next one if None).
        """
        msg = Payload()
        msg.timestamp = now_ms()
        msg.seq = self._next_seq() if seq is None else seq
        aliases = self._alias.get(device, {})
        latest = self._latest.setdefault(device, {})
        born = self.born_at
        for body in bodies:
            s = orjson.loads(body)
            ts: int = s["ts"]
            historical = ts < born
            values: Mapping[str, PointValue] = s.get("values", {})
            errors: Mapping[str, str] = s.get("errors", {})
            quality: Mapping[str, str] = s.get("quality") or {}
            for name in {**values, **errors}:
                value = values.get(name)
                known = aliases.get(name)
                m = msg.metrics.add()
                if known is None:
                    m.name = name  # not in the profile: by name, as the spec allows
                    declared = DataType.UNKNOWN
                else:
                    m.alias = known[0]
                    declared = known[1]
                m.timestamp = ts
                dt = fit_datatype(declared, value) if value is not None else declared
                # Always sent, though the birth has it: Tahu's decoders read a value only
                # through the datatype on the metric itself (2 bytes a point).
                m.datatype = dt if dt is not DataType.UNKNOWN else DataType.STRING
                if historical:
                    m.is_historical = True
                set_value(m, dt, value)
                if name in errors:
                    set_property(m, ERROR_PROPERTY, errors[name])
                if name in quality:
                    set_property(m, QUALITY_PROPERTY, quality[name])
                if not historical and name not in errors:
                    latest[name] = (value, ts)
        return bytes(msg.SerializeToString())


def rebirth_request(ts: int | None = None) -> bytes:
    """An NCMD payload asking an edge node for NBIRTH and every DBIRTH."""
    msg = Payload()
    msg.timestamp = now_ms() if ts is None else ts
    m = msg.metrics.add()
    m.name = REBIRTH
    m.datatype = DataType.BOOLEAN
    m.boolean_value = True
    return bytes(msg.SerializeToString())


def is_rebirth_request(payload: bytes) -> bool:
    """True when an NCMD payload sets ``Node Control/Rebirth`` to true."""
    msg = parse_payload(payload)
    return any(m.name == REBIRTH and m.boolean_value for m in msg.metrics)
