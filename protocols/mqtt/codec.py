"""Data-message codecs: the one place a data message is written and read.

A codec has three jobs on the data path:

    agent      encode_sample(ts, values, errors, quality) -> body   (stored in the spool)
    publisher  pack(seq, bodies) -> payload                          (one MQTT data message)
    gateway    decode_data(payload) -> DecodedData                   (for the ingest)

An agent may also put several devices' data messages into one batch message
(``pack_batch`` / ``decode_batch``, JSON only): fewer, larger MQTT messages at thousands
of devices.

``JSON_CODEC`` (contract v1 JSON, the default) answers the common shape with orjson and
hands anything unusual to the pydantic models of ``protocols.mqtt.contract``, so both
accept and refuse exactly the same messages, with the same reason. A binary codec
(Sparkplug B protobuf) implements the same ``Codec`` protocol beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from iiot_common.identifier import IDENTIFIER_RE
from protocols.mqtt.contract import (
    MAX_SEQ,
    MAX_TS_MS,
    ContractError,
    PointValue,
    Sample,
    decode_batch_message,
    decode_data_message,
    encode,
)

__all__ = [
    "BATCH_ENVELOPE_BYTES",
    "JSON_CODEC",
    "BatchPart",
    "Codec",
    "DecodedData",
    "DecodedSample",
    "JsonCodec",
    "batch_part_bytes",
    "decode_batch",
    "pack_batch",
    "payload_bytes",
]


# Plain tuples, not classes: the gateway builds one per sample it receives.
# (ts, values, errors, quality); quality is None when every point is Good.
DecodedSample = tuple[int, dict[str, PointValue], dict[str, str], dict[str, str] | None]
# (seq of the first sample, samples in seq order)
DecodedData = tuple[int, list[DecodedSample]]
# (device, seq of its first sample, its spooled sample bodies): one device's part of a batch
BatchPart = tuple[str, int, Sequence[str]]


class Codec(Protocol):
    """Writes and reads the data messages of one wire format.

    Spool bodies are text (the spool's column is TEXT): a binary codec either stores its
    bytes encoded as text or brings a BLOB column with it.
    """

    name: str

    def encode_sample(
        self,
        ts: int,
        values: Mapping[str, Any],
        errors: Mapping[str, str],
        quality: Mapping[str, str] | None = None,
    ) -> str:
        """One sample's spool body; raises ContractError('bad_sample') if the model refuses."""
        ...

    def pack(self, seq: int, bodies: Sequence[str]) -> bytes:
        """One data message of consecutive spooled samples, the first one numbered ``seq``."""
        ...

    def decode_data(self, payload: bytes) -> DecodedData:
        """Decode and validate a data message; raises ContractError with a reason."""
        ...


_SCALARS = frozenset({float, int, str, bool, type(None)})
_NOT_FLOAT = frozenset({int, str, bool, type(None)})
# orjson reads an integer beyond 64 bits as a float, the model as an int: a float this
# large may have been either, so the model decides.
_BIG = 9.2e18
_KNOWN_MAX = 100_000
# Names already seen to be valid identifiers; point names repeat in every sample, so
# most checks are one C-level superset test.
_known: set[str] = set()
_known_ok = _known.issuperset


def _names_ok(names: Any) -> bool:
    """True when every key of ``names`` is an identifier."""
    if _known_ok(names):
        return True
    for k in names:
        if type(k) is not str or IDENTIFIER_RE.fullmatch(k) is None:
            return False
    if len(_known) < _KNOWN_MAX:
        _known.update(names)
    return True


def _texts_ok(d: Any) -> bool:
    """True when ``d`` maps identifiers to strings (errors, quality)."""
    if not _names_ok(d):
        return False
    for v in d.values():
        if type(v) is not str:
            return False
    return True


def _fast_decode(payload: bytes) -> DecodedData | None:
    """Decode the common shape of a data message; None means "ask the model"."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return _fast_message(doc)


def _fast_batch(payload: bytes) -> list[tuple[str, DecodedData]] | None:
    """Decode the common shape of a batch message; None means "ask the model"."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict or len(doc) != 1:
        return None
    devices = doc.get("devices")
    if type(devices) is not dict or not devices or not _names_ok(devices):
        return None
    out: list[tuple[str, DecodedData]] = []
    for device, message in devices.items():
        data = _fast_message(message)
        if data is None:
            return None
        out.append((device, data))
    return out


def _fast_message(doc: Any) -> DecodedData | None:
    """A parsed data message's samples; None means "ask the model".

    Accepts only what ``DataMessage`` accepts with the same meaning (exact JSON types, no
    extra keys), so anything unusual, valid or not, takes the model. One function with
    its loops inline: this runs for every message the gateway receives.
    """
    if type(doc) is not dict or len(doc) != 2:
        return None
    seq = doc.get("seq")
    samples = doc.get("samples")
    if type(seq) is not int or seq < 0 or type(samples) is not list or not samples:
        return None
    if seq + len(samples) - 1 > MAX_SEQ:
        return None
    out: list[DecodedSample] = []
    for s in samples:
        if type(s) is not dict:
            return None
        ts = s.get("ts")
        values = s.get("values", {})
        errors = s.get("errors", {})
        quality = s.get("quality")
        if (
            type(ts) is not int
            or ts < 0
            or ts > MAX_TS_MS
            or len(s) != 1 + ("values" in s) + ("errors" in s) + ("quality" in s)
            or type(values) is not dict
            or type(errors) is not dict
            or not (_known_ok(values) or _names_ok(values))
        ):
            return None
        for v in values.values():
            t = type(v)
            if t is float:
                if v >= _BIG or v <= -_BIG:
                    return None
            elif t not in _NOT_FLOAT:
                return None
        if errors and not _texts_ok(errors):
            return None
        if quality is not None and (type(quality) is not dict or not _texts_ok(quality)):
            return None
        out.append((ts, values, errors, quality))
    return seq, out


def _plain_sample(ts: Any, values: Any, errors: Any, quality: Any) -> bool:
    """True when orjson writes this sample exactly as the model would."""
    if (
        type(ts) is not int
        or ts < 0
        or ts > MAX_TS_MS
        or type(values) is not dict
        or type(errors) is not dict
        or not (_known_ok(values) or _names_ok(values))
    ):
        return False
    for v in values.values():
        if type(v) not in _SCALARS:
            return False
    if errors and not _texts_ok(errors):
        return False
    return not quality or (type(quality) is dict and _texts_ok(quality))


class JsonCodec:
    """Contract v1 JSON: ``{"seq": n, "samples": [{"ts", "values", "errors", "quality"?}]}``."""

    name = "json"

    def encode_sample(
        self,
        ts: int,
        values: Mapping[str, Any],
        errors: Mapping[str, str],
        quality: Mapping[str, str] | None = None,
    ) -> str:
        """Compact Sample JSON, as ``contract.encode(Sample(...))`` gives it."""
        if _plain_sample(ts, values, errors, quality):
            body: dict[str, Any] = {"ts": ts, "values": values, "errors": errors}
            if quality:
                body["quality"] = quality
            try:
                return orjson.dumps(body).decode()
            except orjson.JSONEncodeError:
                pass  # an integer beyond 64 bits: the model writes it
        try:
            sample = Sample(ts=ts, values=values, errors=errors, quality=quality or None)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise ContractError("bad_sample", f"sample: {loc}: {first['msg']}") from exc
        return encode(sample).decode()

    def pack(self, seq: int, bodies: Sequence[str]) -> bytes:
        # Bodies are compact Sample JSON already: the message is assembled, not re-encoded.
        return ('{"seq":' + str(seq) + ',"samples":[' + ",".join(bodies) + "]}").encode()

    def decode_data(self, payload: bytes) -> DecodedData:
        fast = _fast_decode(payload)
        if fast is not None:
            return fast
        msg = decode_data_message(payload)
        return msg.seq, [(s.ts, s.values, s.errors, s.quality) for s in msg.samples]


JSON_CODEC: Codec = JsonCodec()


# '{"devices":{' and '}}' around a batch's parts.
BATCH_ENVELOPE_BYTES = len('{"devices":{}}')


def batch_part_bytes(device: str, seq: int) -> int:
    """Bytes a device's part of a batch takes besides its bodies and the commas between them."""
    # '"<device>":{"seq":<seq>,"samples":[' ... ']}'; device ids are ASCII identifiers.
    return len(device) + len(str(seq)) + 24


def payload_bytes(body: str) -> int:
    """Bytes ``body`` takes in a payload (UTF-8)."""
    return len(body) if body.isascii() else len(body.encode())


def pack_batch(parts: Sequence[BatchPart]) -> bytes:
    """One batch message of several devices' data (JSON codec bodies, distinct devices).

    Device ids are identifiers (no character JSON escapes) and the bodies compact Sample
    JSON: the message is assembled, not re-encoded.
    """
    return (
        '{"devices":{'
        + ",".join(
            f'"{device}":{{"seq":{seq},"samples":[{",".join(bodies)}]}}'
            for device, seq, bodies in parts
        )
        + "}}"
    ).encode()


def decode_batch(payload: bytes) -> list[tuple[str, DecodedData]]:
    """Decode and validate a batch message; raises ContractError with a reason.

    A batch is accepted or refused whole, as one data message is.
    """
    fast = _fast_batch(payload)
    if fast is not None:
        return fast
    msg = decode_batch_message(payload)
    return [
        (device, (m.seq, [(s.ts, s.values, s.errors, s.quality) for s in m.samples]))
        for device, m in msg.devices.items()
    ]
