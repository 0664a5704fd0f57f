"""Data-message codecs: the one place a data message is written and read.

A codec has three jobs on the data path:

    agent      encode_sample(ts, values, errors, quality) -> body   (stored in the spool)
    publisher  pack(seq, bodies) -> payload                          (one MQTT data message)
    gateway    decode_data(payload) -> DecodedData                   (for the ingest)

``JSON_CODEC`` (contract v1 JSON, the default) answers the common shape with orjson and
hands anything unusual to the pydantic models of ``protocols.mqtt.contract``, so both
accept and refuse exactly the same messages, with the same reason. A binary codec
(Sparkplug B protobuf) implements the same ``Codec`` protocol beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import orjson
from pydantic import ValidationError

from iiot_common.identifier import IDENTIFIER_RE
from protocols.mqtt.contract import (
    MAX_SEQ,
    MAX_TS_MS,
    ContractError,
    Sample,
    decode_data_message,
    encode,
)

__all__ = ["JSON_CODEC", "Codec", "DecodedData", "DecodedSample", "JsonCodec", "PointValue"]

PointValue = bool | int | float | str | None


class DecodedSample(NamedTuple):
    """One sample of a decoded data message; ``quality`` is None when every point is Good."""

    ts: int
    values: dict[str, PointValue]
    errors: dict[str, str]
    quality: dict[str, str] | None


class DecodedData(NamedTuple):
    """A decoded data message: the first sample's seq and the samples, in seq order."""

    seq: int
    samples: list[DecodedSample]


class Codec(Protocol):
    """Writes and reads the data messages of one wire format."""

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
# orjson reads an integer beyond 64 bits as a float, the model as an int: a float this
# large may have been either, so the model decides.
_BIG = 9.2e18
_KNOWN_MAX = 100_000
# Names already seen to be valid identifiers; point names repeat in every sample.
_known: set[str] = set()


def _names_ok(names: Any) -> bool:
    known = _known
    for k in names:
        if k not in known:
            if type(k) is not str or IDENTIFIER_RE.fullmatch(k) is None:
                return False
            if len(known) < _KNOWN_MAX:
                known.add(k)
    return True


def _strs_ok(d: Any) -> bool:
    for v in d.values():
        if type(v) is not str:
            return False
    return True


def _values_ok(values: Any) -> bool:
    for v in values.values():
        t = type(v)
        if t not in _SCALARS or (t is float and (v >= _BIG or v <= -_BIG)):
            return False
    return True


def _plain_ok(values: Any) -> bool:
    for v in values.values():
        if type(v) not in _SCALARS:
            return False
    return True


def _sample_fields(s: Any) -> DecodedSample | None:
    """The fields of one parsed sample in the common shape; None means "ask the model"."""
    if type(s) is not dict:
        return None
    ts = s.get("ts")
    values = s.get("values", {})
    errors = s.get("errors", {})
    quality = s.get("quality")
    if (
        len(s) != 1 + ("values" in s) + ("errors" in s) + ("quality" in s)
        or type(ts) is not int
        or ts < 0
        or ts > MAX_TS_MS
        or type(values) is not dict
        or type(errors) is not dict
        or not _names_ok(values)
        or not _names_ok(errors)
        or not _values_ok(values)
        or not _strs_ok(errors)
    ):
        return None
    if quality is not None and (
        type(quality) is not dict or not _names_ok(quality) or not _strs_ok(quality)
    ):
        return None
    return DecodedSample(ts, values, errors, quality)


def _fast_decode(payload: bytes) -> DecodedData | None:
    """Decode the common shape of a data message; None means "ask the model".

    Accepts only what ``DataMessage`` accepts with the same meaning (exact JSON types, no
    extra keys), so anything unusual, valid or not, takes the model.
    """
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
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
        fields = _sample_fields(s)
        if fields is None:
            return None
        out.append(fields)
    return DecodedData(seq, out)


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
        if (
            type(ts) is int
            and 0 <= ts <= MAX_TS_MS
            and type(values) is dict
            and type(errors) is dict
            and _names_ok(values)
            and _names_ok(errors)
            and _plain_ok(values)
            and _strs_ok(errors)
            and (
                not quality or (type(quality) is dict and _names_ok(quality) and _strs_ok(quality))
            )
        ):
            body: dict[str, Any] = {"ts": ts, "values": values, "errors": errors}
            if quality:
                body["quality"] = quality
            # An integer beyond 64 bits is too much for orjson; the model writes it.
            with contextlib.suppress(orjson.JSONEncodeError):
                return orjson.dumps(body).decode()
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
        return DecodedData(
            msg.seq,
            [DecodedSample(s.ts, s.values, s.errors, s.quality) for s in msg.samples],
        )


JSON_CODEC: Codec = JsonCodec()
