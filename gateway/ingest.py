"""MQTT ingest: contract checks, line protocol into the outbox, then the broker ack.

paho-mqtt's network thread only queues each message. An ingest thread takes batches
(up to ``batch_max_messages`` or ``batch_wait`` seconds), validates every message,
commits all their samples in one outbox transaction, tells the registry, and only then
acknowledges them to the broker (manual acks, in order). Rejected messages are
acknowledged too, so the broker does not redeliver them forever. The session is
persistent (MQTT 5, clean_start=False, session expiry), so what arrives while the
gateway is down is delivered after it reconnects; a message committed but not yet
acknowledged when the process died is delivered again and dropped as a duplicate.

Each device's sample sequence is followed: a ``seq`` past the next expected one is a gap
(samples the agent dropped), counted on ``/metrics``, told to the registry and logged; a
``seq`` starting over with newer timestamps is an agent with a fresh spool, and replays
are duplicates, neither a gap. Point values are screened before they are written:
non-finite numbers (no line-protocol form), names outside the device's profile and names
beyond ``max_points_per_device`` are dropped and counted by reason; the sample's other
values are written.

A device belongs to one agent of its enterprise (``IngestSink.device_owner``: the one the
ledger or remote configuration assigns, else the first whose birth names it, which this
batch's births claim at once). Another agent's data message, batch part, state or birth
entry for it is refused as ``device_not_owned``, each device part apart, and a line naming
enterprise, device, owner and sender is logged at most once a minute per sender. The
accepted parts of a batch message go to the registry in one ``on_samples_many`` call.

Data messages are decoded by a codec (``protocols.mqtt.codec``, JSON by default). The
connection is kept by the shared reconnection policy (``iiot_common.backoff``): paho
never retries on its own here.
Control-plane answers (``reported``, ``discovered``, ``+/result``) go to the
``ControlHandler`` given at construction; the gateway's own downlink messages are
acknowledged and ignored; ``publish`` sends downlink messages on the same connection.
"""

from __future__ import annotations

import functools
import logging
import queue
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import IngestConfig, MqttConfig
from gateway.influx import format_fields, format_finite_fields, series_prefix
from gateway.metrics import DataPathMetrics
from gateway.outbox import Outbox, OutboxError
from gateway.sink import IngestSink, SampleSummary
from gateway.sparkplug import SparkplugHost
from iiot_common.backoff import Backoff
from protocols.mqtt.codec import JSON_CODEC, Codec, DecodedData, DecodedSample, decode_batch
from protocols.mqtt.contract import (
    MAX_TS_MS,
    TOPIC_PREFIX,
    Birth,
    ContractError,
    DeviceState,
    Kind,
    PointValue,
    Will,
    decode_payload,
    parse_topic,
)
from protocols.mqtt.control import ControlTopic, parse_control_topic
from protocols.mqtt.sparkplug.node import rebirth_request
from protocols.mqtt.sparkplug.payload import NAMESPACE as _SP_NAMESPACE

__all__ = [
    "MEASUREMENT",
    "ControlHandler",
    "Ingest",
    "MessageProcessor",
    "Outcome",
    "ProfilePoints",
]

log = logging.getLogger(__name__)

MEASUREMENT = "telemetry"
SPARKPLUG_PREFIX = f"{_SP_NAMESPACE}/"
_LOG_EVERY = 60.0  # seconds between two logs of the same reject reason from one source

_OUTBOX_ERRORS = (sqlite3.Error, OutboxError)
_NO_PROFILE = "unknown"  # what the registry's device_tags gives for a device without one
_MAX_TRACKED = 1_000_000  # devices whose seq and point names are remembered
_UPLOADED_RECHECK = 30.0  # seconds before an unknown profile id is looked up again

PointsOf = Callable[[str], frozenset[str] | None]


@functools.cache
def _builtin_points() -> dict[str, frozenset[str]]:
    """Point names of the shipped profiles, read once per process."""
    try:
        from device_profiles.loader import load_profiles

        return {p.id: frozenset(pt.name for pt in p.points) for p in load_profiles()}
    except Exception as exc:  # a broken shipped profile must not stop ingest
        log.error(
            "shipped profiles unreadable; point names only capped", extra={"error": repr(exc)}
        )
        return {}


class ProfilePoints:
    """Point names by profile id: the shipped profiles, then uploaded ones (if given).

    ``uploaded`` returns the stored profile documents by id (the control plane's); it is
    read again at most every 30 s when an id is not known yet.
    """

    def __init__(self, uploaded: Callable[[], dict[str, dict[str, Any]]] | None = None) -> None:
        self._uploaded = uploaded
        self._points: dict[str, frozenset[str]] | None = None
        self._checked_at = -_UPLOADED_RECHECK
        self._lock = threading.Lock()

    def __call__(self, profile: str) -> frozenset[str] | None:
        with self._lock:
            if self._points is None:
                self._points = dict(_builtin_points())
            found = self._points.get(profile)
            now = time.monotonic()
            if found is None and self._uploaded and now - self._checked_at >= _UPLOADED_RECHECK:
                self._checked_at = now
                self._points.update(self._read_uploaded())
                found = self._points.get(profile)
            return found

    def _read_uploaded(self) -> dict[str, frozenset[str]]:
        assert self._uploaded is not None
        try:
            docs = self._uploaded()
        except Exception as exc:
            log.warning("uploaded profiles unreadable", extra={"error": repr(exc)})
            return {}
        out: dict[str, frozenset[str]] = {}
        for pid, doc in docs.items():
            points = doc.get("points") if isinstance(doc, dict) else None
            if isinstance(points, list):
                names = (p.get("name") for p in points if isinstance(p, dict))
                out[pid] = frozenset(n for n in names if isinstance(n, str))
        return out


class _DevPoints:
    """The point names a device may write, and which drop reasons were logged."""

    __slots__ = ("allowed", "checked_at", "known", "logged", "profile")

    def __init__(self, profile: str, allowed: frozenset[str] | None) -> None:
        self.profile = profile
        self.allowed = allowed
        self.checked_at = time.monotonic()
        self.known: frozenset[str] = frozenset()
        self.logged: frozenset[str] = frozenset()


class ControlHandler(Protocol):
    def accept(self, topic: ControlTopic, payload: bytes) -> Callable[[], None]:
        """Validate an uplink control message (ContractError if bad); return how to apply it."""
        ...


class _Tx(Protocol):
    def first_time(self, dev: str, seq: int, ts: int) -> bool: ...

    def add(self, lines: list[str]) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What one message did: a reject reason, or lines added and a registry call."""

    reject: str | None = None
    detail: str = ""
    source: str = ""
    lines: int = 0
    samples: int = 0
    duplicates: int = 0
    points: int = 0
    point_errors: int = 0
    dropped: dict[str, int] | None = None  # point values left out, by reason
    gaps: int = 0
    missed: int = 0
    gap_detail: str = ""
    device: str = ""
    notify: Callable[[IngestSink], None] | None = field(default=None, repr=False)
    rebirth: str | None = None  # a Sparkplug NCMD topic to send a Rebirth request to
    parts: list[Outcome] | None = None  # a batch message or birth: one outcome per device
    summary: SampleSummary | None = field(default=None, repr=False)
    owner: str = ""  # device_not_owned: the agent the device belongs to


class MessageProcessor:
    """Turns one MQTT message into line protocol and a registry notification; pure."""

    def __init__(
        self,
        sink: IngestSink,
        control: ControlHandler | None = None,
        *,
        codec: Codec = JSON_CODEC,
        max_points_per_device: int = 500,
        profile_points: PointsOf | None = None,
        track_gaps: bool = True,
    ) -> None:
        self.sink = sink
        self.control = control
        self.codec = codec
        self.max_points = max_points_per_device
        self.track_gaps = track_gaps
        self.profile_points: PointsOf = profile_points or ProfilePoints()
        self._prefixes: dict[tuple[str, str, str, str, str], str] = {}
        self.sparkplug = SparkplugHost(self)
        # (last seq, its ts) per device: committed, and this batch's (see commit()).
        self._seqs: dict[str, tuple[int, int]] = {}
        self._seqs_new: dict[str, tuple[int, int]] = {}
        # Devices no agent had that a birth of this batch claimed: (ent, device) -> agent.
        # The registry learns of them only once the batch commits.
        self._claims: dict[tuple[str, str], str] = {}
        self._points: dict[str, _DevPoints] = {}
        # Devices without a profile mostly share the same names: one frozenset for all.
        self._name_sets: dict[frozenset[str], frozenset[str]] = {}

    def commit(self) -> None:
        """The batch's transaction committed: keep the sequence positions it saw."""
        if len(self._seqs) > _MAX_TRACKED:
            self._seqs.clear()
        self._seqs.update(self._seqs_new)
        self._seqs_new.clear()
        self._claims.clear()

    def discard(self) -> None:
        """The batch's transaction rolled back: it will be seen again."""
        self._seqs_new.clear()
        self._claims.clear()

    def not_owner(self, ent: str, agent: str, device: str, source: str) -> Outcome | None:
        """The refusal of ``agent``'s message about a device another agent owns; None if
        the device is ``agent``'s, or no agent's yet."""
        owner = self.sink.device_owner(ent, device) or self._claims.get((ent, device))
        if not owner or owner == agent:
            return None
        return Outcome(
            "device_not_owned",
            f"device {ent}/{device} belongs to agent {owner!r}, not {agent!r}",
            source=source,
            device=device,
            owner=owner,
        )

    def claim(self, ent: str, agent: str, device: str) -> None:
        """A birth of ``agent`` in this batch names a device no agent has yet."""
        if len(self._claims) < _MAX_TRACKED:
            self._claims.setdefault((ent, device), agent)

    def handle(self, tx: _Tx, topic: bytes | str, payload: bytes) -> Outcome:
        """Validate and convert; never raises for anything in ``topic`` or ``payload``."""
        try:
            return self._handle(tx, topic, payload)
        except _OUTBOX_ERRORS:
            raise  # the transaction failed: the whole batch is retried, nothing acked
        except Exception as exc:
            # A registry bug must not wedge the batch forever: reject this message only.
            log.exception("internal error on a message")
            return Outcome("internal_error", repr(exc), source=_source_of(str(topic)[:200]))

    def _handle(self, tx: _Tx, topic: bytes | str, payload: bytes) -> Outcome:
        try:
            text = topic.decode("utf-8") if isinstance(topic, bytes) else topic
        except UnicodeDecodeError:
            return Outcome("bad_topic", "topic is not UTF-8", source=repr(topic[:80]))
        if text.startswith(SPARKPLUG_PREFIX):
            return self.sparkplug.handle(tx, text, payload)
        try:
            ctl = parse_control_topic(text)
        except ContractError as exc:
            return Outcome(exc.reason, str(exc), source=_source_of(text))
        if ctl is not None:
            return self._control(ctl, text, payload)
        try:
            t = parse_topic(text)
        except ContractError as exc:
            return Outcome(exc.reason, str(exc), source=_source_of(text))
        source = f"{t.enterprise}/{t.agent}"
        if t.kind is Kind.CMD:
            return Outcome(source=source)  # the gateway's own commands to agents
        reason = self.sink.check_publisher(t.enterprise, t.agent)
        if reason is not None:
            return Outcome(
                reason, f"{t.agent!r} may not publish under {t.enterprise!r}", source=source
            )
        ent, agent = t.enterprise, t.agent
        if t.kind is Kind.DATA:
            assert t.device is not None
            try:
                seq, samples = self.codec.decode_data(payload)
            except ContractError as exc:
                return Outcome(exc.reason, f"{text}: {exc}", source=source)
            refused = self.not_owner(ent, agent, t.device, source)
            if refused is not None:
                return refused
            return self._data(tx, ent, agent, t.device, seq, samples, source)
        if t.kind is Kind.BATCH:
            try:
                parts = decode_batch(payload)
            except ContractError as exc:
                return Outcome(exc.reason, f"{text}: {exc}", source=source)
            return self._batch([self._part(tx, ent, agent, p, source) for p in parts], source)
        try:
            msg = decode_payload(t, payload)
        except ContractError as exc:
            return Outcome(exc.reason, f"{text}: {exc}", source=source)
        if isinstance(msg, Birth):
            return self._birth(ent, agent, msg, source)
        if isinstance(msg, Will):
            will = msg
            return Outcome(source=source, notify=lambda s: s.on_will(ent, agent, will))
        if isinstance(msg, DeviceState):
            state, dev = msg, t.device
            assert dev is not None
            refused = self.not_owner(ent, agent, dev, source)
            if refused is not None:
                return refused
            return Outcome(
                source=source, notify=lambda s: s.on_device_state(ent, agent, dev, state)
            )
        return Outcome("bad_topic", f"{text}: no payload accepted here", source=source)

    def _birth(self, ent: str, agent: str, birth: Birth, source: str) -> Outcome:
        """An agent's birth without the devices other agents own (each refused apart)."""
        refused: list[Outcome] = []
        kept = []
        for dev in birth.devices:
            no = self.not_owner(ent, agent, dev.id, source)
            if no is None:
                kept.append(dev)
                self.claim(ent, agent, dev.id)
            else:
                refused.append(no)
        if refused:
            birth = birth.model_copy(update={"devices": kept})
        out = Outcome(source=source, notify=lambda s: s.on_birth(ent, agent, birth))
        return Outcome(source=source, parts=[out, *refused]) if refused else out

    @staticmethod
    def _batch(parts: list[Outcome], source: str) -> Outcome:
        """A batch message's outcome: its parts' registry updates go in one call."""
        summaries: list[SampleSummary] = []
        for p in parts:
            if p.summary is not None and p.notify is not None:
                summaries.append(p.summary)
                p.notify = None
        out = Outcome(source=source, parts=parts)
        if summaries:
            out.notify = lambda sink: sink.on_samples_many(summaries)
        return out

    def _part(
        self, tx: _Tx, ent: str, agent: str, part: tuple[str, DecodedData], source: str
    ) -> Outcome:
        """One device's part of a batch, as its own data message would be read.

        An internal error is that part's alone: the lines of the other parts are in the
        transaction already, and their registry updates must go with them.
        """
        device, (seq, samples) = part
        try:
            refused = self.not_owner(ent, agent, device, source)
            if refused is not None:
                return refused
            return self._data(tx, ent, agent, device, seq, samples, source)
        except _OUTBOX_ERRORS:
            raise  # the transaction failed: the whole batch is retried, nothing acked
        except Exception as exc:
            log.exception("internal error on a batch part", extra={"device": device})
            return Outcome("internal_error", f"{device}: {exc!r}", source=source, device=device)

    def _control(self, ctl: ControlTopic, text: str, payload: bytes) -> Outcome:
        source = f"{ctl.enterprise}/{ctl.agent}"
        if ctl.downlink:
            return Outcome(source=source)  # the gateway's own messages to agents
        if self.control is None:
            return Outcome("control_unhandled", f"{text}: no control plane here", source=source)
        reason = self.sink.check_publisher(ctl.enterprise, ctl.agent)
        if reason is not None:
            return Outcome(
                reason, f"{ctl.agent!r} may not publish under {ctl.enterprise!r}", source=source
            )
        try:
            apply = self.control.accept(ctl, payload)
        except ContractError as exc:
            return Outcome(exc.reason, f"{text}: {exc}", source=source)
        return Outcome(source=source, notify=lambda _sink: apply())

    def _prefix(
        self, ent: str, agent: str, device: str, born: tuple[str, str] | None = None
    ) -> tuple[str, str]:
        """The series prefix of a device, and its profile id ("" when not known)."""
        tags = self.sink.device_tags(ent, device) or born
        family, profile = tags if tags is not None else ("", "")
        key = (ent, agent, device, family, profile)
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = series_prefix(
                MEASUREMENT,
                {
                    "enterprise": ent,
                    "agent": agent,
                    "device": device,
                    "family": family,
                    "profile": profile,
                },
            )
            if len(self._prefixes) > 200_000:
                self._prefixes.clear()
            self._prefixes[key] = prefix
        return prefix, profile

    def _data(
        self,
        tx: _Tx,
        ent: str,
        agent: str,
        device: str,
        seq: int,
        samples: list[DecodedSample],
        source: str,
        *,
        by_ts: bool = False,
        born: tuple[str, str] | None = None,
    ) -> Outcome:
        """Lines and a registry summary of a device's samples, replays dropped.

        Samples are keyed by ``seq`` (+1 per sample), or with ``by_ts`` (Sparkplug, which
        numbers messages, not samples) by their timestamp, in a key space of their own.
        ``born`` is the (family, profile) a birth in the same batch gave an unknown device.
        """
        for ts, _, _, _ in samples:
            if ts > MAX_TS_MS:
                return Outcome(
                    "bad_timestamp",
                    f"{ent}/{agent}/{device}: sample ts {ts} is past what InfluxDB stores",
                    source=source,
                )
        prefix, profile = self._prefix(ent, agent, device, born)
        devkey = f"{SPARKPLUG_PREFIX}{ent}/{agent}/{device}" if by_ts else f"{ent}/{agent}/{device}"
        dp = self._dev_points(devkey, profile)
        out = Outcome(source=source, device=device)
        lines: list[str] = []
        latest: dict[str, bool | int | float | str | None] = {}
        first_ts = last_ts = -1
        last_good: int | None = None
        last_gap: int | None = None
        first_time = tx.first_time
        # Sparkplug numbers messages per node, not samples: its gaps are counted per node.
        track = self.track_gaps and not by_ts
        # (-1, -1): no position known, nothing is a gap (also when gaps are not tracked).
        prev_seq, prev_ts = self._seq_state(tx, devkey) if track else (-1, -1)
        for ts, values, errors, _ in samples:
            this_seq = ts if by_ts else seq
            seq += 1
            if not first_time(devkey, this_seq, ts):
                out.duplicates += 1
                continue
            if track and (prev_seq < 0 or this_seq == prev_seq + 1):
                prev_seq, prev_ts = this_seq, ts
            elif track:
                missed = self._gap(out, this_seq, ts, prev_seq, prev_ts)
                # -1: a late sample of an older stretch; written, but not a new position.
                if missed >= 0:
                    prev_seq, prev_ts = this_seq, ts
                    if missed:
                        last_gap = ts
            out.samples += 1
            out.point_errors += len(errors)
            if not values.keys() <= dp.known:  # no new set built, unlike issuperset
                values = self._admit(dp, devkey, values, out)
            fields = format_finite_fields(values, errors if errors else None)
            if fields is None:  # NaN or ±inf: no line-protocol form
                values = self._finite(values, out)
                fields = format_fields(values, errors if errors else None)
            if fields:
                lines.append(f"{prefix}{fields} {ts}")
                out.points += len(values) - (sum(1 for k in errors if k in values) if errors else 0)
                if last_good is None or ts > last_good:
                    last_good = ts
            if first_ts < 0 or ts < first_ts:
                first_ts = ts
            if ts >= last_ts:
                last_ts = ts
                if errors:
                    latest.update((k, v) for k, v in values.items() if k not in errors)
                else:
                    latest.update(values)
        if prev_seq >= 0 and track:
            self._seqs_new[devkey] = (prev_seq, prev_ts)
        if lines:
            tx.add(lines)
            out.lines = len(lines)
        if out.samples:
            summary = SampleSummary(
                ent,
                agent,
                device,
                count=out.samples,
                first_ts=first_ts,
                last_ts=last_ts,
                last_good_ts=last_good,
                latest=latest,
                gaps=out.gaps,
                missed=out.missed,
                last_gap_ts=last_gap,
            )
            out.summary = summary
            out.notify = lambda sink: sink.on_samples(summary)
        return out

    def _seq_state(self, tx: _Tx, devkey: str) -> tuple[int, int]:
        """(last seq, its ts) of a device; (-1, -1) when nothing of it is known."""
        state = self._seqs_new.get(devkey) or self._seqs.get(devkey)
        if state is None:
            # After a restart the outbox still knows the device's latest sample.
            last_seen = getattr(tx, "last_seen", None)
            found = last_seen(devkey) if last_seen is not None else None
            state = found if found is not None else (-1, -1)
            self._seqs_new[devkey] = state
        return state

    @staticmethod
    def _gap(out: Outcome, seq: int, ts: int, prev_seq: int, prev_ts: int) -> int:
        """Samples missing before ``seq`` (0: none); -1 for a late sample of the past."""
        if seq > prev_seq:
            missed = seq - prev_seq - 1
            where = f"seq {prev_seq + 1}..{seq - 1}"
        elif ts > prev_ts:
            # Numbering starts over with newer samples: an agent with a fresh spool.
            missed = seq
            where = f"seq 0..{seq - 1} after the agent started over"
        else:
            return -1
        if missed:
            out.gaps += 1
            out.missed += missed
            out.gap_detail = where
        return missed

    def _admit(
        self, dp: _DevPoints, devkey: str, values: dict[str, PointValue], out: Outcome
    ) -> dict[str, PointValue]:
        """``values`` without names outside the profile or beyond the per-device cap."""
        keep: dict[str, PointValue] = {}
        known = set(dp.known)
        drops: dict[str, int] = {}
        for k, v in values.items():
            if k not in known:
                if dp.allowed is not None and k not in dp.allowed:
                    drops["unknown_point"] = drops.get("unknown_point", 0) + 1
                    continue
                if len(known) >= self.max_points:
                    drops["point_limit"] = drops.get("point_limit", 0) + 1
                    continue
                known.add(k)
            keep[k] = v
        if len(known) != len(dp.known):
            frozen = frozenset(known)
            if dp.allowed is None and len(self._name_sets) < 100_000:
                frozen = self._name_sets.setdefault(frozen, frozen)
            dp.known = frozen
        if drops:
            dropped = out.dropped if out.dropped is not None else {}
            for reason, n in drops.items():
                dropped[reason] = dropped.get(reason, 0) + n
            out.dropped = dropped
            new = drops.keys() - dp.logged
            if new:
                dp.logged = dp.logged | new
                log.warning(
                    "point values dropped",
                    extra={
                        "device": devkey,
                        "profile": dp.profile or None,
                        "reasons": ", ".join(sorted(new)),
                        "names": ", ".join(sorted(values.keys() - keep.keys())[:5]),
                        "max_points_per_device": self.max_points,
                    },
                )
        return keep

    @staticmethod
    def _finite(values: dict[str, PointValue], out: Outcome) -> dict[str, PointValue]:
        keep = {k: v for k, v in values.items() if type(v) is not float or v - v == 0.0}
        dropped = out.dropped if out.dropped is not None else {}
        dropped["non_finite_value"] = dropped.get("non_finite_value", 0) + len(values) - len(keep)
        out.dropped = dropped
        return keep

    def _dev_points(self, devkey: str, profile: str) -> _DevPoints:
        dp = self._points.get(devkey)
        if (
            dp is not None
            and dp.allowed is None
            and dp.profile
            and dp.profile != _NO_PROFILE
            and time.monotonic() - dp.checked_at >= _UPLOADED_RECHECK
        ):
            # A profile uploaded after this device's first message: look again.
            dp.checked_at = time.monotonic()
            if self.profile_points(dp.profile) is not None:
                dp = None
        if dp is None or dp.profile != profile:
            allowed = self.profile_points(profile) if profile and profile != _NO_PROFILE else None
            if dp is not None:  # a new birth changed the profile (first sight is not logged)
                log.info(
                    "device point names checked",
                    extra={
                        "device": devkey,
                        "profile": profile or None,
                        "profile_points": None if allowed is None else len(allowed),
                    },
                )
            if len(self._points) > _MAX_TRACKED:
                self._points.clear()
            dp = self._points[devkey] = _DevPoints(profile, allowed)
        return dp


def _flat(outcomes: list[Outcome]) -> Iterator[Outcome]:
    """Each message's outcome; a batch's or birth's per device, then its own registry call."""
    for o in outcomes:
        if o.parts is None:
            yield o
        else:
            yield from o.parts
            if o.notify is not None:
                yield o


def _source_of(topic: str) -> str:
    parts = topic.split("/", 4)
    if len(parts) >= 4 and parts[0] == "iiot":
        return f"{parts[2][:64]}/{parts[3][:64]}"
    return topic[:80]


@dataclass(slots=True)
class _Queued:
    gen: int
    mid: int
    qos: int
    topic: bytes
    payload: bytes


class Ingest:
    """The MQTT subscriber and ingest thread; start(), stop()."""

    def __init__(
        self,
        mqtt_config: MqttConfig,
        outbox: Outbox,
        sink: IngestSink,
        *,
        config: IngestConfig | None = None,
        metrics: DataPathMetrics | None = None,
        control: ControlHandler | None = None,
        profile_points: PointsOf | None = None,
    ) -> None:
        self.mqtt_config = mqtt_config
        self.config = config or IngestConfig()
        self.outbox = outbox
        self.sink = sink
        self.metrics = metrics or outbox.metrics
        self.processor = MessageProcessor(
            sink,
            control,
            max_points_per_device=self.config.max_points_per_device,
            profile_points=profile_points,
            # Under a shared subscription each instance gets only some of a device's
            # messages: every other instance's share would look like a gap.
            track_gaps=mqtt_config.shared_group is None,
        )
        self.processor.sparkplug.metrics = self.metrics
        # Each instance of a shared group sees only part of a node's messages.
        self.processor.sparkplug.count_seq_gaps = mqtt_config.shared_group is None
        self.processor.sparkplug.restore(outbox.sparkplug_births())
        self._queue: queue.SimpleQueue[_Queued] = queue.SimpleQueue()
        self._gen = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The connection: one supervisor thread connects under the shared backoff policy;
        # paho's own thread runs each connection and ends with it (no paho retries).
        self.backoff = Backoff(mqtt_config.reconnect_min, mqtt_config.reconnect_max)
        self._net: threading.Thread | None = None
        self._net_stop = threading.Event()
        self._session_over = threading.Event()
        self._auth_failed = False
        self._last_error = ""
        self._last_logged: dict[tuple[str, str], float] = {}
        self._gaps_unlogged: dict[tuple[str, str], tuple[int, int]] = {}
        self._unlogged: dict[tuple[str, str], int] = {}  # rejects since their last log
        self._client = self._make_client()

    @property
    def topic_filters(self) -> list[str]:
        """The contract's topics and Sparkplug B's, shared when a group is configured.

        In a shared group every instance still receives every Sparkplug birth and death
        (they are few): each one needs the aliases to read the DDATA it is handed.
        """
        group = self.mqtt_config.shared_group
        if not group:
            return [f"{TOPIC_PREFIX}/#", f"{SPARKPLUG_PREFIX}#"]
        sp = SPARKPLUG_PREFIX
        return [
            f"$share/{group}/{TOPIC_PREFIX}/#",
            *(f"{sp}+/{kind}/+" for kind in ("NBIRTH", "NDEATH")),
            *(f"{sp}+/{kind}/+/+" for kind in ("DBIRTH", "DDEATH")),
            f"$share/{group}/{sp}+/DDATA/+/+",
            f"$share/{group}/{sp}+/NDATA/+",
        ]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connections(self) -> int | None:
        """How many times the broker connection was made; None while disconnected."""
        return self._gen if self._connected.is_set() else None

    def _make_client(self) -> mqtt.Client:
        cfg = self.mqtt_config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311,
            # MQTT 3.1.1 keeps the session through clean_session; MQTT 5 through
            # clean_start=False and the session expiry given at connect.
            clean_session=None if cfg.protocol == "5" else False,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        if cfg.username is not None:
            client.username_pw_set(
                cfg.username, cfg.password.get_secret_value() if cfg.password else None
            )
        if urlsplit(cfg.url).scheme == "mqtts":
            client.tls_set(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self, connect_timeout: float = 10.0) -> None:
        """Connect and run; waits up to ``connect_timeout`` for the subscription to hold."""
        cfg = self.mqtt_config
        url = urlsplit(cfg.url)
        port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        v5: dict[str, Any] = {}
        if cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.config.session_expiry
            props.ReceiveMaximum = self.config.receive_maximum
            v5 = {"clean_start": False, "properties": props}
        self._stop.clear()
        self._net_stop.clear()
        self._thread = threading.Thread(target=self._run, name="iiot-ingest", daemon=True)
        self._thread.start()
        host = url.hostname or "127.0.0.1"
        self._net = threading.Thread(
            target=self._supervise, args=(host, port, v5), name="iiot-ingest-mqtt", daemon=True
        )
        self._net.start()
        if not self._subscribed.wait(connect_timeout):
            log.warning(
                "broker not reachable yet; retrying in the background",
                extra={"url": cfg.url},
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand (commit and ack), then disconnect; the rest stays unacked."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._net_stop.set()
        self._client.disconnect()
        self._session_over.set()
        if self._net is not None:
            self._net.join(timeout)
            self._net = None
        self._connected.clear()
        self.metrics.mqtt_connected.set(0)

    def _supervise(self, host: str, port: int, v5: dict[str, Any]) -> None:
        """Connect, run the connection in paho's thread until it ends, back off, repeat."""
        client = self._client
        keepalive = self.mqtt_config.keepalive
        while not self._net_stop.is_set():
            self.backoff.connecting()
            self._session_over.clear()
            self._auth_failed = False
            try:
                client.connect(host, port, keepalive=keepalive, **v5)
            except (OSError, ValueError) as exc:  # refused, unreachable, TLS, bad host
                self._connect_failed(f"{type(exc).__name__}: {exc}")
            else:
                client.loop_start()
                if self._net_stop.is_set():
                    client.disconnect()  # stop() came while connecting
                self._session_over.wait()
                # Lets paho's thread send what is queued (a DISCONNECT), then ends it.
                client.loop_stop()
            if self._net_stop.is_set():
                return
            delay = self.backoff.next_delay(auth_failed=self._auth_failed)
            log.debug("mqtt reconnect scheduled", extra={"in_s": round(delay, 2)})
            self._net_stop.wait(delay)

    def _connect_failed(self, error: str) -> None:
        # Logged once per distinct error, not once per attempt (an outage retries often).
        if error != self._last_error:
            self._last_error = error
            log.warning(
                "cannot connect to broker; retrying",
                extra={"url": self.mqtt_config.url, "error": error},
            )

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 5.0
    ) -> bool:
        """Publish at QoS 1; True once the broker has acknowledged it within ``timeout``.

        While disconnected nothing is queued (False at once): paho would send a queued
        message after reconnecting, and a caller told False must be able to rely on that.
        """
        if not self._connected.is_set():
            return False
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return False
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError, OSError):
            return False  # not connected, or the outgoing queue is full
        return info.is_published()

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            # 4/5 (3.1.1) and 0x86/0x87 (5): bad credentials / not authorised.
            self._auth_failed = int(getattr(reason, "value", 0) or 0) in (4, 5, 0x86, 0x87)
            self._connect_failed(f"refused: {reason}")
            return
        self.backoff.succeeded()
        self._last_error = ""
        # Messages queued under an earlier connection carry mids of that connection;
        # they must not be acked on this one. The broker redelivers them.
        self._gen += 1
        self._subscribed.clear()
        client.subscribe([(f, 1) for f in self.topic_filters])
        self._connected.set()
        self.metrics.mqtt_connects.inc()
        self.metrics.mqtt_connected.set(1)
        log.info(
            "connected to broker",
            extra={"url": self.mqtt_config.url, "subscription": self.topic_filters},
        )

    def _on_subscribe(
        self, _c: mqtt.Client, _ud: Any, _mid: int, reasons: list[Any], _props: Any
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error(
                "broker refused the subscription",
                extra={"filter": self.topic_filters, "reason": ", ".join(failed)},
            )
            return
        self._subscribed.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        self.metrics.mqtt_connected.set(0)
        self.backoff.lost()
        self._session_over.set()
        if was_connected and not self._stop.is_set():
            log.warning(
                "disconnected from broker",
                extra={"url": self.mqtt_config.url, "reason": str(reason)},
            )

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(_Queued(self._gen, msg.mid, msg.qos, msg._topic, bytes(msg.payload)))

    # -- ingest thread ---------------------------------------------------------------------

    def _run(self) -> None:
        cfg = self.config
        get = self._queue.get
        while not self._stop.is_set():
            try:
                first = get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + cfg.batch_wait
            while len(batch) < cfg.batch_max_messages:
                left = deadline - time.monotonic()
                try:
                    batch.append(get(timeout=left) if left > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            self.metrics.queue_depth.set(self._queue.qsize())
            self._commit_with_retry(batch)

    def _commit_with_retry(self, batch: list[_Queued]) -> None:
        # The broker redelivers unacked messages only after a reconnect, so a batch that
        # cannot be committed (disk full, database locked) is retried until it can be or
        # the gateway stops; nothing is acknowledged meanwhile, so nothing is lost.
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                self._process(batch)
                return
            except Exception as exc:
                self.metrics.ingest_errors.inc()
                if attempt == 1 or delay >= 5.0:
                    log.error(
                        "ingest batch failed; not acknowledged, retrying",
                        extra={"messages": len(batch), "attempt": attempt, "error": repr(exc)},
                    )
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, 5.0)

    def _process(self, batch: list[_Queued]) -> None:
        handle = self.processor.handle
        outcomes: list[Outcome] = []
        try:
            with self.outbox.transaction() as tx:
                for m in batch:
                    outcomes.append(handle(tx, m.topic, m.payload))
        except BaseException:
            self.processor.discard()
            raise
        self.processor.commit()
        met = self.metrics
        met.received.inc(len(batch))
        met.batches.inc()
        met.batch_size.observe(len(batch))
        samples = duplicates = points = point_errors = 0
        for o in _flat(outcomes):
            if o.rebirth is not None:
                self._request_rebirth(o.rebirth)
            if o.reject is not None:
                self._count_reject(o)
                continue
            samples += o.samples
            duplicates += o.duplicates
            points += o.points
            point_errors += o.point_errors
            if o.dropped:
                for reason, n in o.dropped.items():
                    met.dropped_values.labels(reason=reason).inc(n)
            if o.gaps:
                self._count_gap(o)
            if o.notify is not None:
                try:
                    o.notify(self.sink)
                except Exception as exc:
                    met.sink_errors.inc()
                    log.error(
                        "registry failed on a message",
                        extra={"source": o.source, "error": repr(exc)},
                    )
        met.samples.inc(samples)
        if duplicates:
            met.duplicates.inc(duplicates)
        met.points.inc(points)
        if point_errors:
            met.point_errors.inc(point_errors)
        gen = self._gen
        ack = self._client.ack
        acked = 0
        for q in batch:
            if q.qos > 0 and q.gen == gen:
                ack(q.mid, q.qos)
                acked += 1
        met.acked.inc(acked)

    def _request_rebirth(self, topic: str) -> None:
        """Ask a Sparkplug edge node for its births (NCMD ``Node Control/Rebirth``)."""
        self.metrics.sparkplug_rebirths.inc()
        self._client.publish(topic, rebirth_request(), qos=0)
        log.info("sparkplug rebirth requested", extra={"topic": topic})

    def _count_gap(self, o: Outcome) -> None:
        met = self.metrics
        met.sequence_gaps.inc(o.gaps)
        met.missed_samples.inc(o.missed)
        # One line per gap, but a device dropping all the time is summed per minute.
        key = (o.source, f"sequence_gap:{o.device}")
        pending = self._gaps_unlogged.get(key, (0, 0))
        gaps, missed = pending[0] + o.gaps, pending[1] + o.missed
        now = time.monotonic()
        last = self._last_logged.get(key)
        if last is None or now - last >= _LOG_EVERY:
            if len(self._last_logged) > 10_000:
                self._last_logged.clear()
                self._gaps_unlogged.clear()
            self._last_logged[key] = now
            self._gaps_unlogged.pop(key, None)
            log.warning(
                "sequence gap: samples missing",
                extra={
                    "source": o.source,
                    "device": o.device,
                    "gaps": gaps,
                    "missed": missed,
                    "last": o.gap_detail,
                },
            )
        else:
            self._gaps_unlogged[key] = (gaps, missed)

    def _count_reject(self, o: Outcome) -> None:
        reason = o.reject or "unknown"
        self.metrics.rejected.labels(reason=reason).inc()
        key = (o.source, reason)
        now = time.monotonic()
        last = self._last_logged.get(key)
        unlogged = self._unlogged.get(key, 0) + 1
        if last is None or now - last >= _LOG_EVERY:
            if len(self._last_logged) > 10_000:
                self._last_logged.clear()
                self._unlogged.clear()
            self._last_logged[key] = now
            self._unlogged.pop(key, None)
            if reason == "device_not_owned":
                self._log_not_owned(o, unlogged)
                return
            log.warning(
                "message rejected", extra={"source": o.source, "reason": reason, "detail": o.detail}
            )
        else:
            self._unlogged[key] = unlogged

    @staticmethod
    def _log_not_owned(o: Outcome, refused: int) -> None:
        ent, _, sender = o.source.partition("/")
        log.warning(
            "device data refused: another agent owns the device",
            extra={
                "enterprise": ent,
                "device": o.device,
                "owner": o.owner,
                "sender": sender,
                # Refusals of this sender since its last such line (this one included).
                "refused": refused,
            },
        )
