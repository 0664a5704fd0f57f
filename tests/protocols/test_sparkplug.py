"""Sparkplug B payloads: generated module, datatypes of every shipped profile, session rules."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_profiles.loader import load_profiles
from device_profiles.schema import INT_BOUNDS, Point, ValueType
from protocols.mqtt.codec import JSON_CODEC
from protocols.mqtt.contract import ContractError
from protocols.mqtt.sparkplug import regen
from protocols.mqtt.sparkplug.codec import SPARKPLUG_CODEC, read_samples
from protocols.mqtt.sparkplug.node import EdgeNode, NodeDevice, is_rebirth_request
from protocols.mqtt.sparkplug.payload import (
    DataType,
    Payload,
    datatype_for,
    fit_datatype,
    get_value,
    parse_payload,
    parse_sp_topic,
    set_value,
)


def test_generated_module_matches_the_committed_proto() -> None:
    assert regen.generate() == regen.MODULE.read_text(), (
        "sparkplug_b_pb2.py is stale: run python -m protocols.mqtt.sparkplug.regen"
    )


_POINTS: list[Point] = [p for prof in load_profiles() for p in prof.points]


def _values_for(point: Point) -> st.SearchStrategy[Any]:
    """Values a driver hands the agent for this point."""
    dt = datatype_for(point)
    if point.type is ValueType.BOOL:
        return st.booleans()
    if point.type is ValueType.STRING:
        return st.text(max_size=40)
    if dt is DataType.DOUBLE:
        return st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**31), 2**31)
    if point.type is ValueType.FLOAT32:
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    lo, hi = INT_BOUNDS[point.type]
    return st.integers(lo, hi)


@pytest.mark.parametrize("point", _POINTS, ids=[f"{p.name}-{p.type.value}" for p in _POINTS])
def test_every_shipped_point_type_maps_to_a_sparkplug_datatype(point: Point) -> None:
    assert datatype_for(point) in DataType


@st.composite
def _point_and_value(draw: st.DrawFn) -> tuple[Point, Any]:
    point = draw(st.sampled_from(_POINTS))
    return point, draw(_values_for(point))


@given(_point_and_value())
@settings(max_examples=400, deadline=None)
def test_values_of_shipped_profiles_survive_the_wire(pv: tuple[Point, Any]) -> None:
    point, value = pv
    declared = datatype_for(point)
    msg = Payload()
    m = msg.metrics.add()
    m.datatype = fit_datatype(declared, value)
    set_value(m, DataType(m.datatype), value)
    back = get_value(parse_payload(msg.SerializeToString()).metrics[0], m.datatype)
    assert back == value and type(back) is type(value)
    if m.datatype != declared:
        # Only a value its profile type cannot hold exactly travels as another type.
        assert (declared, type(value)) in ((DataType.DOUBLE, int), (DataType.FLOAT, float))


@given(st.floats(allow_nan=False))
def test_a_float_too_wide_for_float32_travels_as_double(v: float) -> None:
    try:
        exact = math.isinf(v) or struct.unpack("<f", struct.pack("<f", v))[0] == v
    except OverflowError:
        exact = False
    assert fit_datatype(DataType.FLOAT, v) is (DataType.FLOAT if exact else DataType.DOUBLE)


def test_negative_integers_travel_as_twos_complement() -> None:
    for dt, v in ((DataType.INT16, -5), (DataType.INT32, -(2**31)), (DataType.INT64, -(2**63))):
        msg = Payload()
        m = msg.metrics.add()
        set_value(m, dt, v)
        assert get_value(parse_payload(msg.SerializeToString()).metrics[0], dt) == v


def _node() -> EdgeNode:
    dev = NodeDevice(
        "kiln-1",
        "kiln-rotary-cement",
        "modbus",
        "kiln",
        None,
        (("t", DataType.DOUBLE, "degC"), ("n", DataType.INT16, "")),
    )
    return EdgeNode("ent-1", "agent-1", [dev], version="1")


def test_seq_wraps_after_255_and_restarts_at_each_nbirth() -> None:
    node = _node()
    seqs = [parse_payload(node.nbirth(7)).seq, parse_payload(node.dbirth("kiln-1")).seq]
    body = JSON_CODEC.encode_sample(1, {"t": 1.5}, {})
    seqs += [parse_payload(node.ddata("kiln-1", [body])).seq for _ in range(300)]
    assert seqs == [i % 256 for i in range(302)]
    assert parse_payload(node.nbirth(8)).seq == 0
    death = parse_payload(node.death(8))
    assert not death.HasField("seq") and death.metrics[0].long_value == 8


def test_samples_before_the_birth_are_historical_and_keep_their_timestamps() -> None:
    node = _node()
    node.nbirth(1, ts=10_000)
    old = JSON_CODEC.encode_sample(5_000, {"t": 1.0, "n": -3}, {})
    new = JSON_CODEC.encode_sample(10_500, {"t": 2.0}, {"n": "timeout"}, {"t": "Uncertain"})
    msg = parse_payload(node.ddata("kiln-1", [old, new]))
    aliases = {1: ("t", DataType.DOUBLE), 2: ("n", DataType.INT16)}
    samples = read_samples(msg.metrics, lambda m: aliases[m.alias])
    assert samples == [
        (5_000, {"t": 1.0, "n": -3}, {}, None, True),
        (10_500, {"t": 2.0}, {"n": "timeout"}, {"t": "Uncertain"}, False),
    ]


def test_codec_round_trip_and_rebirth_request() -> None:
    bodies = [JSON_CODEC.encode_sample(1_000 + i, {"a": i, "b": "x"}, {}) for i in range(3)]
    seq, samples = SPARKPLUG_CODEC.decode_data(SPARKPLUG_CODEC.pack(9, bodies))
    assert seq == 9 and [s[1]["a"] for s in samples] == [0, 1, 2]
    from protocols.mqtt.sparkplug.node import rebirth_request

    assert is_rebirth_request(rebirth_request())
    assert not is_rebirth_request(Payload().SerializeToString())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"\xff\xff\xff", "bad_protobuf"), (b"\x12\x05\x08\x01", "bad_protobuf")],
)
def test_malformed_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ContractError) as info:
        SPARKPLUG_CODEC.decode_data(payload)
    assert info.value.reason == reason


def test_wrong_datatype_is_refused() -> None:
    msg = Payload()
    m = msg.metrics.add()
    m.name = "a"
    m.datatype = DataType.BOOLEAN
    m.string_value = "yes"
    with pytest.raises(ContractError) as info:
        SPARKPLUG_CODEC.decode_data(msg.SerializeToString())
    assert info.value.reason == "bad_datatype"


def test_topics() -> None:
    t = parse_sp_topic("spBv1.0/ent-1/DDATA/agent-1/kiln-1")
    assert (t.group, t.type.value, t.node, t.device) == ("ent-1", "DDATA", "agent-1", "kiln-1")
    for bad in ("spBv1.0/ent-1/DDATA/agent-1", "spBv1.0/e/NBIRTH/a/d", "spBv1.0/e/XX/a"):
        with pytest.raises(ContractError):
            parse_sp_topic(bad)
