"""The gateway as a Sparkplug B host: ``spBv1.0/#`` beside ``iiot/v1/#``.

Group id = enterprise, edge node id = agent id, device id = device id. Births register
the agent and its devices (through the same registry sink as the JSON contract), DBIRTH
and DDEATH drive a device's online state, NDEATH (matched on ``bdSeq``; a stale one is
ignored) takes the agent offline, and DDATA lands in the time series with the JSON
path's measurement and tags. ``is_historical`` samples are written but do not tell the
registry the device is online now. DBIRTH, DDATA and DDEATH of a device another edge
node owns are refused (``device_not_owned``). A DDATA whose aliases were never born
makes the gateway ask that node for a Rebirth (NCMD), at most once per
``REBIRTH_INTERVAL``.

Everything here runs on the ingest thread; one instance per ``MessageProcessor``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gateway.registry.codes import FAMILY_LABELS
from iiot_common.identifier import is_identifier
from protocols.mqtt.contract import (
    MAX_TS_MS,
    Birth,
    BirthDevice,
    ContractError,
    DeviceState,
    Will,
)
from protocols.mqtt.sparkplug.codec import read_samples
from protocols.mqtt.sparkplug.node import BDSEQ, REASON_METRIC
from protocols.mqtt.sparkplug.payload import (
    DataType,
    MessageType,
    SpTopic,
    parse_payload,
    parse_sp_topic,
)
from protocols.mqtt.sparkplug.seq import SeqWindow

if TYPE_CHECKING:
    from gateway.ingest import MessageProcessor, Outcome, _Tx
    from gateway.metrics import DataPathMetrics

__all__ = ["REBIRTH_INTERVAL", "SparkplugHost"]

REBIRTH_INTERVAL = 10.0  # seconds between two Rebirth requests to the same node
_MAX_NODES = 100_000
_PROPS = "Properties/"
_STATE = "spBv1.0/STATE/"


@dataclass(slots=True)
class _Node:
    """What the host knows of one edge node's current session."""

    bdseq: int | None = None
    seq: SeqWindow = field(default_factory=SeqWindow)
    # device -> alias -> (name, datatype); device -> name -> datatype
    aliases: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)
    names: dict[str, dict[str, int]] = field(default_factory=dict)
    # device -> (family, profile) its DBIRTH named, for the series tags
    tags: dict[str, tuple[str, str]] = field(default_factory=dict)
    rebirth_asked: float = 0.0


class SparkplugHost:
    """Turns Sparkplug B messages into outbox lines and registry notifications."""

    def __init__(self, processor: MessageProcessor) -> None:
        self.processor = processor
        self.sink = processor.sink
        self._nodes: dict[tuple[str, str], _Node] = {}
        self.seq_gaps: Counter[str] = Counter()  # "group/node" -> gaps seen
        self.dropped_metrics: Counter[str] = Counter()  # reason -> metrics skipped
        self.clock = time.monotonic
        self.metrics: DataPathMetrics | None = None  # set by the ingest that owns this
        self.count_seq_gaps = True

    def handle(self, tx: _Tx, text: str, payload: bytes) -> Outcome:
        from gateway.ingest import Outcome

        if text.startswith(_STATE):
            return Outcome(source=text[:80])  # a host application's own online state
        try:
            t = parse_sp_topic(text)
        except ContractError as exc:
            return Outcome(exc.reason, str(exc), source=text[:80])
        source = f"{t.group}/{t.node}"
        if t.type in (MessageType.NCMD, MessageType.DCMD):
            return Outcome(source=source)  # commands to nodes, ours among them
        reason = self.sink.check_publisher(t.group, t.node)
        if reason is not None:
            return Outcome(reason, f"{t.node!r} may not publish under {t.group!r}", source=source)
        try:
            msg = parse_payload(payload)
            return self._message(tx, t, msg, source, payload)
        except ContractError as exc:
            return Outcome(exc.reason, f"{text}: {exc}", source=source)

    def _node(self, t: SpTopic) -> _Node:
        key = (t.group, t.node)
        node = self._nodes.get(key)
        if node is None:
            if len(self._nodes) >= _MAX_NODES:
                self._nodes.clear()  # bounded; nodes are asked to rebirth as needed
            node = self._nodes[key] = _Node()
        return node

    def _message(self, tx: _Tx, t: SpTopic, msg: Any, source: str, raw: bytes) -> Outcome:
        from gateway.ingest import Outcome

        node = self._node(t)
        kind = t.type
        ent, agent = t.group, t.node
        if kind is MessageType.NDEATH:
            bdseq = _bdseq(msg)
            if node.bdseq is not None and bdseq != node.bdseq:
                return Outcome(
                    "stale_ndeath", f"{source}: bdSeq {bdseq} of an older session", source=source
                )
            # Aliases are kept: DDATA spooled by the node may still be on its way to us.
            self._count_gaps(t, node.seq.end())
            will = Will(bdseq=bdseq)
            return Outcome(source=source, notify=lambda s: s.on_will(ent, agent, will))
        out = Outcome(source=source)
        if kind is MessageType.NBIRTH:
            node.bdseq = _bdseq(msg)
            self._count_gaps(t, node.seq.start(int(msg.seq)))
            node.aliases.clear()
            node.names.clear()
            node.tags.clear()
            _save_birth(tx, t, raw)
            birth = Birth(
                bdseq=node.bdseq,
                ts=_ts(msg.timestamp),
                version=_string_metric(msg, "Properties/Version")[:100],
            )
            out.notify = lambda s: s.on_birth(ent, agent, birth, codec="sparkplug")
            return out
        self._check_seq(t, node, msg)
        if node.bdseq is None:
            self._ask_rebirth(t, node, out)
            if kind is not MessageType.DDATA:
                out.reject, out.detail = "no_birth", f"{source}: {kind.value} before NBIRTH"
                return out
        if t.device is not None:  # DBIRTH, DDATA, DDEATH: only from the device's agent
            refused = self.processor.not_owner(ent, agent, t.device, source)
            if refused is not None:
                refused.rebirth = out.rebirth
                return refused
        if kind is MessageType.DBIRTH:
            assert t.device is not None
            _save_birth(tx, t, raw)
            self.processor.claim(ent, agent, t.device)
            return self._dbirth(t, node, msg, out)
        if kind is MessageType.DDEATH:
            dev = t.device
            assert dev is not None
            state = DeviceState(
                online=False,
                ts=_ts(msg.timestamp),
                reason=_string_metric(msg, REASON_METRIC)[:200] or "DDEATH",
            )
            out.notify = lambda s: s.on_device_state(ent, agent, dev, state)
            return out
        if kind is MessageType.DDATA:
            assert t.device is not None
            return self._ddata(tx, t, node, msg, out)
        return out  # NDATA: node metrics are not stored

    def restore(self, births: list[tuple[str, str, bytes]]) -> None:
        """Rebuild what the kept births say (a restarted gateway); bad rows are skipped."""
        for key, device, body in births:
            group, _, name = key.partition("/")
            try:
                t = SpTopic(
                    group,
                    MessageType.DBIRTH if device else MessageType.NBIRTH,
                    name,
                    device or None,
                )
                msg = parse_payload(body)
                node = self._node(t)
                if device:
                    self._learn_device(t, node, msg)
                else:
                    node.bdseq = _bdseq(msg)
            except ContractError:
                continue

    def _check_seq(self, t: SpTopic, node: _Node, msg: Any) -> None:
        if self.count_seq_gaps and msg.HasField("seq"):
            self._count_gaps(t, node.seq.see(int(msg.seq)))

    def _count_gaps(self, t: SpTopic, gaps: int) -> None:
        # Each instance of a shared group sees only part of a node's messages.
        if gaps and self.count_seq_gaps:
            key = f"{t.group}/{t.node}"
            self.seq_gaps[key] += gaps
            if self.metrics is not None:
                self.metrics.sparkplug_seq_gaps.labels(key).inc(gaps)

    def _learn_device(self, t: SpTopic, node: _Node, msg: Any) -> BirthDevice:
        """Take a DBIRTH's aliases, datatypes and tags; the device's birth entry."""
        dev = t.device
        assert dev is not None
        ent = t.group
        aliases: dict[int, tuple[str, int]] = {}
        names: dict[str, int] = {}
        props: dict[str, str] = {}
        for m in msg.metrics:
            if m.name.startswith(_PROPS):
                if m.WhichOneof("value") == "string_value":
                    props[m.name[len(_PROPS) :]] = m.string_value
                continue
            if not m.name:
                self.dropped_metrics["unnamed_birth_metric"] += 1
                continue
            names[m.name] = m.datatype
            if m.HasField("alias"):
                aliases[m.alias] = (m.name, m.datatype)
        node.aliases[dev] = aliases
        node.names[dev] = names
        known = self.sink.device_tags(ent, dev)
        profile = props.get("profile") or (known[1] if known else "unknown")
        try:
            bdev = BirthDevice(
                id=dev,
                profile=profile if is_identifier(profile) else "unknown",
                protocol=props.get("protocol", "sparkplug"),
                family=props.get("family"),
                category=props.get("category"),
            )
        except ValidationError:
            bdev = BirthDevice(id=dev, profile="unknown", protocol="sparkplug")
        # The registry learns a new device only once this batch commits; data of the same
        # batch is tagged as the registry will tag it, so a device keeps one series.
        family = bdev.family if bdev.family in FAMILY_LABELS else "other"
        node.tags[dev] = known or (family, bdev.profile)
        return bdev

    def _dbirth(self, t: SpTopic, node: _Node, msg: Any, out: Outcome) -> Outcome:
        dev = t.device
        assert dev is not None
        ent, agent = t.group, t.node
        bdev = self._learn_device(t, node, msg)
        birth = Birth(bdseq=node.bdseq or 0, ts=_ts(msg.timestamp), devices=[bdev])
        state = DeviceState(online=True, ts=_ts(msg.timestamp))

        def notify(s: Any) -> None:
            s.on_birth(ent, agent, birth, codec="sparkplug")
            s.on_device_state(ent, agent, dev, state)

        out.notify = notify
        return out

    def _resolver(self, t: SpTopic, node: _Node) -> Any:
        dev = t.device or ""
        aliases = node.aliases.get(dev, {})
        names = node.names.get(dev, {})

        def resolve(m: Any) -> tuple[str, int]:
            if m.HasField("alias"):
                found = aliases.get(m.alias)
                if found is not None:
                    return found
            if m.name:
                return m.name, names.get(m.name, m.datatype or DataType.UNKNOWN)
            raise ContractError("unknown_alias", f"alias {m.alias} was never born")

        return resolve

    def _ddata(self, tx: _Tx, t: SpTopic, node: _Node, msg: Any, out: Outcome) -> Outcome:
        dev = t.device
        assert dev is not None
        dropped: Counter[str] = Counter()
        samples = read_samples(msg.metrics, self._resolver(t, node), dropped)
        if dropped:
            self.dropped_metrics.update(dropped)
            if self.metrics is not None:
                for reason, n in dropped.items():
                    self.metrics.sparkplug_dropped_metrics.labels(reason).inc(n)
            if dropped["unknown_alias"]:
                self._ask_rebirth(t, node, out)
        if not samples:
            out.reject = next(iter(dropped), "bad_payload")
            out.detail = f"{out.source}/{dev}: no usable metric in DDATA"
            return out
        live = [(ts, v, e, q) for ts, v, e, q, hist in samples if not hist]
        old = [(ts, v, e, q) for ts, v, e, q, hist in samples if hist]
        rebirth = out.rebirth
        born = node.tags.get(dev)
        result = out
        proc = self.processor
        if old:
            # Written, but the registry is not told: history does not make a device online.
            result = proc._data(tx, t.group, t.node, dev, 0, old, out.source, by_ts=True, born=born)
            result.notify = None
        if live:
            live_out = proc._data(
                tx, t.group, t.node, dev, 0, live, out.source, by_ts=True, born=born
            )
            if old:
                for f in ("lines", "samples", "duplicates", "points", "point_errors"):
                    setattr(live_out, f, getattr(live_out, f) + getattr(result, f))
            result = live_out
        result.rebirth = rebirth
        return result

    def _ask_rebirth(self, t: SpTopic, node: _Node, out: Outcome) -> None:
        now = self.clock()
        if now - node.rebirth_asked < REBIRTH_INTERVAL and node.rebirth_asked:
            return
        node.rebirth_asked = now
        out.rebirth = str(SpTopic(t.group, MessageType.NCMD, t.node))


def _save_birth(tx: Any, t: SpTopic, raw: bytes) -> None:
    # Transactions without durable state (benchmarks, unit tests) keep births in memory.
    save = getattr(tx, "save_birth", None)
    if save is not None:
        save(f"{t.group}/{t.node}", t.device or "", raw)


def _bdseq(msg: Any) -> int:
    for m in msg.metrics:
        if m.name == BDSEQ:
            which = m.WhichOneof("value")
            if which in ("long_value", "int_value"):
                return int(getattr(m, which)) & 0xFF
    raise ContractError("bad_payload", "no bdSeq metric")


def _string_metric(msg: Any, name: str) -> str:
    for m in msg.metrics:
        if m.name == name and m.WhichOneof("value") == "string_value":
            return str(m.string_value)
    return ""


def _ts(ts: int) -> int:
    return ts if 0 <= ts <= MAX_TS_MS else 0
