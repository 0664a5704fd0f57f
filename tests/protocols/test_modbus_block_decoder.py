"""The driver's precompiled block decoder gives exactly what the codec gives."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_profiles.schema import Profile
from protocols.modbus import codec
from protocols.modbus.driver import _BlockDecoder
from protocols.modbus.planner import plan_reads

_SIZES = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "float32": 2, "float64": 4}
_ORDERS = [("big", "big"), ("little", "little"), ("big", "little"), ("little", "big")]


def _profile(specs: list[tuple[str, int, float, float, int]]) -> Profile:
    points: list[dict[str, Any]] = []
    address = 0
    for i, (type_, order, scale, offset, gap) in enumerate(specs):
        address += gap
        bo, wo = _ORDERS[order]
        points.append(
            {
                "name": f"p{i}",
                "type": type_,
                "scale": scale,
                "offset": offset,
                "modbus": {
                    "table": "holding",
                    "address": address,
                    "byte_order": bo,
                    "word_order": wo,
                },
            }
        )
        address += _SIZES[type_]
    return Profile.model_validate(
        {
            "id": "decoder-check",
            "name": "decoder check",
            "name_zh": "解码检查",
            "family": "other",
            "category": "general_power",
            "protocol": "modbus",
            "points": points,
        }
    )


_spec = st.tuples(
    st.sampled_from(sorted(_SIZES)),
    st.integers(0, 3),
    st.sampled_from([1.0, 0.1, 0.01, 2.5, -1.0]),
    st.sampled_from([0.0, -40.0, 273.15]),
    st.integers(0, 3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(_spec, min_size=1, max_size=12), data=st.data())
def test_block_decoder_matches_the_codec_for_every_type_order_and_scale(
    specs: list[tuple[str, int, float, float, int]], data: st.DataObject
) -> None:
    profile = _profile(specs)
    assert profile.modbus is not None
    for block in plan_reads(profile, profile.points):
        regs = data.draw(
            st.lists(st.integers(0, 0xFFFF), min_size=block.count, max_size=block.count)
        )
        dec = _BlockDecoder(block, profile.modbus, set())
        values: dict[str, codec.Value] = {}
        bad: list[str] = []
        dec.decode(regs, values, bad)
        slow = {bp.point.name for bp in dec.slow}
        for bp in block.points:
            name = bp.point.name
            if name in slow:
                continue
            want = codec.decode(bp.point, block.slice(regs, bp), profile.modbus)
            if isinstance(want, float) and not math.isfinite(want):
                assert name in bad
            else:
                assert values[name] == want and type(values[name]) is type(want), name
        # Big-endian points never need the slow path; the others always take it.
        for bp in block.points:
            a = bp.point.modbus
            assert a is not None
            swapped = a.byte_order == "little" or (a.word_order == "little" and bp.count > 1)
            assert (bp.point.name in slow) == swapped


def test_sixteen_bit_points_over_a_power_of_ten_match_the_codec_for_every_register() -> None:
    # Such points are divided, not scaled and rounded: every register value must agree.
    specs = [(t, 0, scale, 0.0, 0) for t in ("uint16", "int16") for scale in (0.1, 0.01, 1e-3)]
    profile = _profile(specs)
    assert profile.modbus is not None
    (block,) = plan_reads(profile, profile.points)
    dec = _BlockDecoder(block, profile.modbus, set())
    assert not dec.slow
    for reg in range(0x10000):
        regs = [reg] * block.count
        values: dict[str, codec.Value] = {}
        dec.decode(regs, values, [])
        for bp in block.points:
            want = codec.decode(bp.point, [reg], profile.modbus)
            assert values[bp.point.name] == want and type(want) is float, (bp.point.name, reg)
