"""The read planner: fewest requests within the Modbus limits, and the exception-02 split."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_profiles.schema import Point, Profile
from protocols.modbus.planner import ReadBlock, Span, plan_reads
from protocols.modbus.profile import ModbusTable, point_registers

_REGISTER_TYPES = ["int16", "uint16", "int32", "uint32", "int64", "float32", "float64"]
_SIZES = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "float32": 2, "float64": 4}


def _profile(points: list[dict[str, Any]], **modbus: Any) -> Profile:
    return Profile.model_validate(
        {
            "id": "test-device",
            "name": "Test device",
            "name_zh": "测试设备",
            "family": "other",
            "category": "general_power",
            "protocol": "modbus",
            "modbus": modbus,
            "points": points,
        }
    )


def _reg(name: str, address: int, type_: str = "uint16", table: str = "holding") -> dict[str, Any]:
    return {"name": name, "type": type_, "modbus": {"table": table, "address": address}}


def _bit(name: str, address: int, table: str = "coil") -> dict[str, Any]:
    return {"name": name, "type": "bool", "modbus": {"table": table, "address": address}}


def _names(block: ReadBlock) -> list[str]:
    return [bp.point.name for bp in block.points]


def _shape(blocks: list[ReadBlock]) -> list[tuple[str, int, int]]:
    return [(b.table.value, b.start, b.count) for b in blocks]


def test_contiguous_points_of_one_table_are_one_request() -> None:
    prof = _profile([_reg(f"r{i}", 100 + 2 * i, "float32") for i in range(10)])
    blocks = plan_reads(prof, prof.points)
    assert _shape(blocks) == [("holding", 100, 20)]
    assert [bp.offset for bp in blocks[0].points] == list(range(0, 20, 2))


def test_small_gaps_are_bridged_and_large_gaps_split() -> None:
    prof = _profile([_reg("a", 0), _reg("b", 11), _reg("c", 23)])
    # a..b leaves a gap of 10 registers (bridged), b..c a gap of 11 (not bridged).
    assert _shape(plan_reads(prof, prof.points, max_gap=10)) == [
        ("holding", 0, 12),
        ("holding", 23, 1),
    ]
    assert len(plan_reads(prof, prof.points, max_gap=0)) == 3
    assert len(plan_reads(prof, prof.points, max_gap=11)) == 1


def test_tables_are_never_mixed_and_come_in_a_fixed_order() -> None:
    prof = _profile(
        [
            _reg("h", 0),
            _reg("i", 0, table="input"),
            _bit("c", 0),
            _bit("d", 0, table="discrete"),
        ]
    )
    assert _shape(plan_reads(prof, prof.points)) == [
        ("coil", 0, 1),
        ("discrete", 0, 1),
        ("input", 0, 1),
        ("holding", 0, 1),
    ]


def test_register_limit_of_the_spec_and_of_the_profile() -> None:
    points = [_reg(f"r{i}", i) for i in range(130)]
    prof = _profile(points)
    assert _shape(plan_reads(prof, prof.points)) == [("holding", 0, 125), ("holding", 125, 5)]
    slow = _profile(points, max_registers_per_read=60)
    assert _shape(plan_reads(slow, slow.points)) == [
        ("holding", 0, 60),
        ("holding", 60, 60),
        ("holding", 120, 10),
    ]


def test_a_multi_register_value_is_never_cut_by_the_limit() -> None:
    prof = _profile([_reg(f"f{i}", 4 * i, "float64") for i in range(40)])
    blocks = plan_reads(prof, prof.points)
    # 125 is not a multiple of 4: the first request stops at 124.
    assert _shape(blocks) == [("holding", 0, 124), ("holding", 124, 36)]


def test_bit_limit_is_2000_per_read() -> None:
    prof = _profile([_bit(f"c{i}", i) for i in range(2100)])
    assert _shape(plan_reads(prof, prof.points)) == [("coil", 0, 2000), ("coil", 2000, 100)]


def test_bools_packed_in_one_register_are_one_read() -> None:
    pts = [
        {"name": f"b{i}", "type": "bool", "modbus": {"table": "input", "address": 7, "bit": i}}
        for i in range(16)
    ]
    prof = _profile(pts)
    blocks = plan_reads(prof, prof.points)
    assert _shape(blocks) == [("input", 7, 1)]
    assert sorted(_names(blocks[0])) == sorted(f"b{i}" for i in range(16))


def test_the_scale_factor_a_point_needs_is_read_with_it() -> None:
    prof = _profile(
        [
            {**_reg("W", 83, "int16"), "scale_factor_point": "W_SF"},
            _reg("Hz", 85),
            _reg("W_SF", 84, "int16"),
        ]
    )
    blocks = plan_reads(prof, [prof.point("W")])
    assert _shape(blocks) == [("holding", 83, 2)]
    assert sorted(_names(blocks[0])) == ["W", "W_SF"]


def test_slice_gives_each_point_its_registers() -> None:
    prof = _profile([_reg("a", 10), _reg("b", 12, "uint32")])
    (block,) = plan_reads(prof, prof.points)
    data = [1, 2, 3, 4]
    assert block.slice(data, block.points[0]) == [1]
    assert block.slice(data, block.points[1]) == [3, 4]


def test_refused_gap_is_not_bridged_again() -> None:
    prof = _profile([_reg("a", 0), _reg("b", 1), _reg("c", 5), _reg("d", 6)])
    (whole,) = plan_reads(prof, prof.points)
    split = plan_reads(prof, prof.points, refused={whole.span})
    assert _shape(split) == [("holding", 0, 2), ("holding", 5, 2)]


def test_refused_contiguous_run_falls_back_to_one_request_per_point() -> None:
    prof = _profile([_reg("a", 0), _reg("b", 1, "float32"), _reg("c", 3)])
    (whole,) = plan_reads(prof, prof.points)
    split = plan_reads(prof, prof.points, refused={whole.span})
    assert _shape(split) == [("holding", 0, 1), ("holding", 1, 2), ("holding", 3, 1)]


def test_refused_span_only_affects_its_own_table() -> None:
    prof = _profile(
        [_reg("a", 0), _reg("b", 5), _reg("c", 0, table="input"), _reg("d", 5, table="input")]
    )
    refused = {Span(ModbusTable.HOLDING, 0, 6)}
    assert _shape(plan_reads(prof, prof.points, refused=refused)) == [
        ("input", 0, 6),
        ("holding", 0, 1),
        ("holding", 5, 1),
    ]


def test_points_at_the_top_of_the_address_space() -> None:
    prof = _profile([_reg("a", 65530, "float64"), _reg("b", 65534, "float32")])
    assert _shape(plan_reads(prof, prof.points)) == [("holding", 65530, 6)]


# --------------------------------------------------------------------- properties


@st.composite
def _profiles(draw: st.DrawFn) -> tuple[Profile, list[Span], int, int, int]:
    """A profile with scattered points (gaps small and large, shared-bit registers)."""
    points: list[dict[str, Any]] = []
    next_free: dict[str, int] = {}
    n = draw(st.integers(1, 40))
    for i in range(n):
        table = draw(st.sampled_from(["coil", "discrete", "input", "holding"]))
        if table not in next_free:
            next_free[table] = draw(st.sampled_from([0, 100, 65000, 65520]))
        gap = draw(st.one_of(st.integers(0, 3), st.integers(0, 40), st.integers(0, 400)))
        address = next_free[table] + gap
        if table in ("coil", "discrete"):
            size = 1
            point: dict[str, Any] = _bit(f"p{i}", address, table)
        elif draw(st.integers(0, 5)) == 0:
            # Several bools packed in one register.
            bits = draw(st.integers(1, 4))
            if address >= 65536:
                continue
            for b in range(bits):
                points.append(
                    {
                        "name": f"p{i}_{b}",
                        "type": "bool",
                        "modbus": {"table": table, "address": address, "bit": b},
                    }
                )
            next_free[table] = address + 1
            continue
        else:
            type_ = draw(st.sampled_from(_REGISTER_TYPES))
            size = _SIZES[type_]
            point = _reg(f"p{i}", address, type_, table)
        if address + size > 65536:
            continue
        points.append(point)
        next_free[table] = address + size
    if not points:
        points.append(_reg("only", 0))
    max_regs = draw(st.sampled_from([4, 10, 125]))
    max_bits = draw(st.sampled_from([8, 100, 2000]))
    prof = _profile(points, max_registers_per_read=max_regs, max_bits_per_read=max_bits)
    refused = draw(
        st.lists(
            st.builds(
                Span,
                st.sampled_from(list(ModbusTable)),
                st.integers(0, 65535),
                st.integers(1, 200),
            ).filter(lambda s: s.end <= 65536),
            max_size=6,
        )
    )
    max_gap = draw(st.sampled_from([0, 1, 10, 50]))
    return prof, refused, max_regs, max_bits, max_gap


def _registers(p: Point) -> tuple[int, int]:
    assert p.modbus is not None
    return p.modbus.address, p.modbus.address + point_registers(p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_profiles())
def test_plan_properties(case: tuple[Profile, list[Span], int, int, int]) -> None:
    prof, refused, max_regs, max_bits, max_gap = case
    blocks = plan_reads(prof, prof.points, max_gap=max_gap, refused=set(refused))

    # Every point is carried by exactly one block, at its own address.
    carried = [bp.point.name for b in blocks for bp in b.points]
    assert sorted(carried) == sorted(p.name for p in prof.points)
    for b in blocks:
        for bp in b.points:
            assert bp.point.modbus is not None and bp.point.modbus.table is b.table
            assert b.start + bp.offset == bp.point.modbus.address
            assert bp.offset + bp.count <= b.count

    # Within the limits and the address space.
    for b in blocks:
        limit = max_bits if b.table.is_bit_table else max_regs
        assert 1 <= b.count <= limit
        assert 0 <= b.start and b.end <= 65536

    # A block never contains a refused span, unless the span is inside one point.
    for b in blocks:
        for s in refused:
            if b.span.contains(s):
                assert any(
                    lo <= s.start and s.end <= hi
                    for lo, hi in (_registers(bp.point) for bp in b.points)
                ), (b.span, s)

    assert len(blocks) <= len(prof.points)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 400),
    type_=st.sampled_from(_REGISTER_TYPES),
    start=st.integers(0, 60000),
    limit=st.integers(4, 125),
)
def test_contiguous_points_take_the_minimum_number_of_requests(
    n: int, type_: str, start: int, limit: int
) -> None:
    size = _SIZES[type_]
    n = min(n, (65536 - start) // size)
    prof = _profile(
        [_reg(f"p{i}", start + i * size, type_) for i in range(n)], max_registers_per_read=limit
    )
    per_read = limit // size
    assert len(plan_reads(prof, prof.points)) == -(-n // per_read)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 3000), limit=st.integers(1, 2000))
def test_contiguous_bits_take_the_minimum_number_of_requests(n: int, limit: int) -> None:
    prof = _profile([_bit(f"c{i}", i) for i in range(n)], max_bits_per_read=limit)
    assert len(plan_reads(prof, prof.points)) == -(-n // limit)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_profiles())
def test_splitting_after_refusals_converges_to_a_plan_the_device_accepts(
    case: tuple[Profile, list[Span], int, int, int],
) -> None:
    """A device that refuses any read touching an unmapped address (strict addresses)."""
    prof, _, _, _, max_gap = case
    mapped = {
        (p.modbus.table, reg)
        for p in prof.points
        if p.modbus is not None
        for reg in range(*_registers(p))
    }

    def refuses(b: ReadBlock) -> bool:
        return any((b.table, reg) not in mapped for reg in range(b.start, b.end))

    refused: set[Span] = set()
    for _ in range(len(prof.points) + 1):
        blocks = plan_reads(prof, prof.points, max_gap=max_gap, refused=refused)
        bad = {b.span for b in blocks if refuses(b)}
        if not bad:
            break
        assert not bad <= refused, "a refused span was planned again"
        refused |= bad
    else:
        raise AssertionError("the split did not converge")
    # Only the refused reads were split: no more requests than without bridging gaps.
    assert len(blocks) <= len(plan_reads(prof, prof.points, max_gap=0, max_bit_gap=0))
