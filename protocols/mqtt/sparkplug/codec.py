"""Sparkplug B beside JSON behind the ``Codec`` seam, and the DDATA reader the gateway uses.

``SPARKPLUG_CODEC.encode_sample`` stores the contract's JSON sample text in the spool (the
spool column is TEXT, and alias, ``seq`` and ``is_historical`` are only known when a
sample is sent); ``pack`` writes a DDATA payload with metric names, for a peer without
births; the agent's publisher sends aliases through ``EdgeNode.ddata`` instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from iiot_common.identifier import is_identifier
from protocols.mqtt.codec import JSON_CODEC, Codec, DecodedData, DecodedSample
from protocols.mqtt.contract import MAX_TS_MS, ContractError, PointValue
from protocols.mqtt.sparkplug.node import EdgeNode
from protocols.mqtt.sparkplug.payload import get_properties, get_value, parse_payload

__all__ = ["SPARKPLUG_CODEC", "HistoricalSample", "SparkplugCodec", "read_samples"]

# (ts, values, errors, quality, is_historical)
HistoricalSample = tuple[int, dict[str, PointValue], dict[str, str], dict[str, str] | None, bool]
# metric -> (point name, datatype it was born with); raises ContractError if unknown.
Resolver = Callable[[Any], tuple[str, int]]


def _by_name(metric: Any) -> tuple[str, int]:
    if not metric.name:
        raise ContractError("unknown_alias", f"metric alias {metric.alias} without a birth")
    return metric.name, metric.datatype


def read_samples(
    metrics: Sequence[Any],
    resolve: Resolver = _by_name,
    dropped: Counter[str] | None = None,
) -> list[HistoricalSample]:
    """Group DDATA metrics into samples by timestamp (and historical flag), oldest first.

    A metric that cannot be read (unknown alias, wrong datatype, bad timestamp) raises
    ContractError, or, given ``dropped``, is counted there by reason and skipped.
    """
    out: dict[tuple[int, bool], HistoricalSample] = {}
    for m in metrics:
        try:
            name, born_dt = resolve(m)
            dt = m.datatype if m.HasField("datatype") else born_dt
            ts = m.timestamp
            if ts > MAX_TS_MS:
                raise ContractError("bad_timestamp", f"metric {name!r}: timestamp {ts} too large")
            if not is_identifier(name):
                raise ContractError("bad_identifier", f"metric name {name[:80]!r}")
            value = get_value(m, dt)
        except ContractError as exc:
            if dropped is None:
                raise
            dropped[exc.reason] += 1
            continue
        key = (ts, bool(m.is_historical))
        sample = out.get(key)
        if sample is None:
            sample = out[key] = (ts, {}, {}, None, key[1])
        props = get_properties(m) if m.HasField("properties") else {}
        error = props.get("error")
        if error is not None:
            sample[2][name] = error
        if value is not None or error is None:
            sample[1][name] = value
        quality = props.get("quality")
        if quality is not None:
            q = sample[3]
            if q is None:
                q = {}
                out[key] = sample = (sample[0], sample[1], sample[2], q, sample[4])
            q[name] = quality
    return [out[k] for k in sorted(out)]


class SparkplugCodec:
    """Sparkplug B DDATA by metric name; spool bodies are contract JSON samples."""

    name = "sparkplug"

    def encode_sample(
        self,
        ts: int,
        values: Mapping[str, Any],
        errors: Mapping[str, str],
        quality: Mapping[str, str] | None = None,
    ) -> str:
        return JSON_CODEC.encode_sample(ts, values, errors, quality)

    def pack(self, seq: int, bodies: Sequence[str]) -> bytes:
        return _NAMED.ddata("", bodies, seq=seq & 0xFF)

    def decode_data(self, payload: bytes) -> DecodedData:
        msg = parse_payload(payload)
        samples: list[DecodedSample] = [
            (ts, values, errors, quality)
            for ts, values, errors, quality, _ in read_samples(msg.metrics)
        ]
        if not samples:
            raise ContractError("bad_payload", "DDATA without metrics")
        return int(msg.seq), samples


# No devices, so every metric goes by name.
_NAMED = EdgeNode("codec", "codec", [])
SPARKPLUG_CODEC: Codec = SparkplugCodec()
