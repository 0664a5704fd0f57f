"""The JSON codec's fast paths agree with the contract models on every message.

Whatever the codec accepts, the models accept with the same content (exact types); what
the models refuse, the codec refuses with the same reason and message.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocols.mqtt.codec import (
    BATCH_ENVELOPE_BYTES,
    JSON_CODEC,
    DecodedData,
    DecodedSample,
    batch_part_bytes,
    decode_batch,
    pack_batch,
    payload_bytes,
)
from protocols.mqtt.contract import (
    MAX_SEQ,
    MAX_TS_MS,
    ContractError,
    DataMessage,
    Sample,
    decode_batch_message,
    decode_data_message,
    encode,
)

_Result = tuple[str, Any]


def _typed(x: Any) -> Any:
    """A structure that compares types too (1, 1.0 and True differ); NaN equals NaN."""
    if isinstance(x, dict):
        return {k: _typed(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_typed(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return ("float", "nan")
    return (type(x).__name__, x)


def _decoded(d: DecodedData) -> Any:
    seq, samples = d
    return _typed([seq, [list(s) for s in samples]])


def _model_decode(payload: bytes) -> _Result:
    try:
        msg = decode_data_message(payload)
    except ContractError as exc:
        return ("refused", (exc.reason, str(exc)))
    samples: list[DecodedSample] = [(s.ts, s.values, s.errors, s.quality) for s in msg.samples]
    return ("accepted", _decoded((msg.seq, samples)))


def _codec_decode(payload: bytes) -> _Result:
    try:
        return ("accepted", _decoded(JSON_CODEC.decode_data(payload)))
    except ContractError as exc:
        return ("refused", (exc.reason, str(exc)))


# -- strategies -------------------------------------------------------------------------

_good_name = st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z")
_name = _good_name | st.sampled_from(["", "a b", "x" * 65, "é", "a/b", "t", "n"])
_int = st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]
)
_float = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e16, 1e19, 1.8446744073709552e19, -9.3e18, 0.1, -0.0, 5e-324, 1e308]
)
_scalar = st.none() | st.booleans() | _int | _float | st.text(max_size=8)
_odd = st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2), st.integers())
_ts = (
    st.integers(min_value=0, max_value=MAX_TS_MS)
    | st.sampled_from([-1, MAX_TS_MS + 1, 2**64, 1.0, 1.5, "1", True, None])
    | _int
)
_sample = st.fixed_dictionaries(
    {"ts": _ts},
    optional={
        "values": st.dictionaries(_name, _scalar | _odd, max_size=4) | _odd,
        "errors": st.dictionaries(_name, st.text(max_size=6) | _scalar, max_size=2),
        "quality": st.none() | st.dictionaries(_name, st.text(max_size=6) | _scalar, max_size=2),
        "extra": st.integers(),
    },
)
_seq = st.integers(min_value=0, max_value=10**6) | st.sampled_from(
    [-1, MAX_SEQ, MAX_SEQ - 1, MAX_SEQ + 1, 2**64, 1.0, "1", True]
)
_message = st.fixed_dictionaries(
    {"seq": _seq, "samples": st.lists(_sample, max_size=3) | _odd},
    optional={"extra": st.integers()},
)
_payload = (
    _message.map(lambda d: json.dumps(d).encode())
    | _message.map(lambda d: json.dumps(d, indent=1).encode())
    | st.binary(max_size=40)
    | st.sampled_from([b"", b"null", b"[]", b'{"seq":1,"seq":2,"samples":[{"ts":1}]}'])
)


# -- decoding ---------------------------------------------------------------------------


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_payload)
@example(payload=b'{"seq":1,"samples":[{"ts":1,"values":{"x":123456789012345678901234567890}}]}')
@example(payload=b'{"seq":1,"samples":[{"ts":1,"values":{"x":-18446744073709551617}}]}')
@example(payload=b'{"seq":1,"samples":[{"ts":1,"values":{"x":NaN}}]}')
@example(payload=b'{"seq":1,"samples":[{"ts":1,"values":{"x":1e400}}]}')
@example(payload=b'{"seq":1,"samples":[{"ts":1,"values":{"a\\u0000":1}}]}')
@example(payload=b'{"seq":1,"samples":[{"ts":1,"values":{"x":"\\ud800"}}]}')
def test_decoder_agrees_with_the_model(payload: bytes) -> None:
    assert _codec_decode(payload) == _model_decode(payload)


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(min_value=0, max_value=MAX_SEQ - 10),
    samples=st.lists(
        st.fixed_dictionaries(
            {
                "ts": st.integers(min_value=0, max_value=MAX_TS_MS),
                "values": st.dictionaries(_good_name, _scalar, max_size=4),
            },
            optional={"errors": st.dictionaries(_good_name, st.text(max_size=6), max_size=2)},
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_valid_messages_take_the_fast_path(seq: int, samples: list[dict[str, Any]]) -> None:
    """The common shape never needs the model (what keeps the ingest fast)."""
    from protocols.mqtt.codec import _fast_decode

    payload = json.dumps({"seq": seq, "samples": samples}).encode()
    fast = _fast_decode(payload)
    big = any(
        isinstance(v, int | float) and not isinstance(v, bool) and abs(v) >= 9.2e18
        for s in samples
        for v in s["values"].values()
    )
    assert fast is not None or big
    if fast is not None:
        assert ("accepted", _decoded(fast)) == _model_decode(payload)


def _model_batch(payload: bytes) -> _Result:
    try:
        msg = decode_batch_message(payload)
    except ContractError as exc:
        return ("refused", (exc.reason, str(exc)))
    return (
        "accepted",
        [
            [d, _decoded((m.seq, [(s.ts, s.values, s.errors, s.quality) for s in m.samples]))]
            for d, m in msg.devices.items()
        ],
    )


def _codec_batch(payload: bytes) -> _Result:
    try:
        return ("accepted", [[d, _decoded(data)] for d, data in decode_batch(payload)])
    except ContractError as exc:
        return ("refused", (exc.reason, str(exc)))


_batch = st.fixed_dictionaries(
    {"devices": st.dictionaries(_name, _message | _odd, max_size=3) | _odd},
    optional={"extra": st.integers()},
)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_batch.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=40))
@example(payload=b'{"devices":{}}')
@example(payload=b'{"devices":{"d1":{"seq":1,"samples":[{"ts":1}]},"a b":{"seq":1}}}')
@example(payload=b'{"devices":{"d1":{"seq":1,"samples":[{"ts":1,"values":{"x":NaN}}]}}}')
def test_batch_decoder_agrees_with_the_model(payload: bytes) -> None:
    assert _codec_batch(payload) == _model_batch(payload)


def test_a_packed_batch_reads_back_per_device() -> None:
    a = JSON_CODEC.encode_sample(1000, {"t": 1.5}, {})
    b = JSON_CODEC.encode_sample(2000, {"t": 2.5}, {"p": "timeout"})
    payload = pack_batch([("kiln-1", 7, [a, b]), ("motor-1", 1, [a])])
    assert _codec_batch(payload) == _model_batch(payload)
    got = dict(decode_batch(payload))
    assert got["kiln-1"] == (
        7,
        [(1000, {"t": 1.5}, {}, None), (2000, {"t": 2.5}, {"p": "timeout"}, None)],
    )
    assert got["motor-1"] == (1, [(1000, {"t": 1.5}, {}, None)])


def test_a_batch_is_as_long_as_its_parts_say() -> None:
    a = JSON_CODEC.encode_sample(1000, {"t": 1.5}, {})
    b = JSON_CODEC.encode_sample(2000, {"t": 2.5}, {"p": "température hors plage"})
    parts = [("kiln-1", 7, [a, b]), ("motor-1", 123456789, [a]), ("x", 0, [b])]
    expected = BATCH_ENVELOPE_BYTES + sum(
        batch_part_bytes(d, seq) + sum(payload_bytes(x) for x in bodies) + len(bodies) - 1
        for d, seq, bodies in parts
    ) + len(parts) - 1  # fmt: skip
    assert len(pack_batch(parts)) == expected


# -- encoding ---------------------------------------------------------------------------


def _model_encode(
    ts: Any, values: Any, errors: Any, quality: Any
) -> tuple[str, str] | tuple[str, None]:
    try:
        sample = Sample(ts=ts, values=values, errors=errors, quality=quality or None)
    except ValueError:
        return ("refused", None)
    return ("accepted", encode(sample).decode())


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ts=_ts,
    values=st.dictionaries(_name, _scalar, max_size=4),
    errors=st.dictionaries(_name, st.text(max_size=6), max_size=2),
    quality=st.none() | st.dictionaries(_name, st.text(max_size=6), max_size=2),
)
@example(ts=1, values={"x": float("nan"), "y": float("inf")}, errors={}, quality=None)
@example(ts=1, values={"x": 2**64}, errors={}, quality=None)
def test_encoder_agrees_with_the_model(ts: Any, values: Any, errors: Any, quality: Any) -> None:
    expected = _model_encode(ts, values, errors, quality)
    try:
        got: tuple[str, str | None] = (
            "accepted",
            JSON_CODEC.encode_sample(ts, values, errors, quality),
        )
    except ContractError as exc:
        assert exc.reason == "bad_sample"
        got = ("refused", None)
    assert got == expected
    if got[1] is not None:
        # What the agent spools, the publisher packs and the gateway reads back.
        packed = JSON_CODEC.pack(7, [got[1], got[1]])
        model = DataMessage.model_validate_json(packed)
        assert model.seq == 7 and len(model.samples) == 2
        assert _codec_decode(packed) == _model_decode(packed)


def test_a_refused_sample_names_the_point() -> None:
    with pytest.raises(ContractError, match=r"values\.a b") as info:
        JSON_CODEC.encode_sample(1, {"a b": 1.0}, {})
    assert info.value.reason == "bad_sample"
