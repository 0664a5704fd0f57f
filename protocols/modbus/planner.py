"""Read planning: a device's points → the fewest Modbus read requests within the limits.

Pure functions, no I/O. Points are grouped per table and sorted by address; neighbours
are merged into one request while the request stays within the per-read limit (125
registers / 2000 bits by the spec, lower when the profile says so) and the gap between
them is small: a bridged gap costs a few bytes, another request costs a round trip.

Many devices refuse, with exception 02 (ILLEGAL DATA ADDRESS), a read that spans
registers they do not map. The driver reports such a refused request back as a
``Span``; planning again with it:

- never bridges a gap inside a refused span;
- when a refused span has no gap at all (the device refuses even contiguous points),
  no two points inside it share a request.

So a block is never planned that contains a refused span, unless that span lies within
one point's own registers (which cannot be split). Greedy left-to-right merging is
optimal here because every constraint is either local to a join of two neighbours or
a limit on the block's length.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from device_profiles.schema import Point, Profile
from protocols.errors import ConfigError
from protocols.modbus.profile import (
    MODBUS_ADDRESS_SPACE,
    ModbusTable,
    modbus_address,
    modbus_settings,
    point_registers,
)

__all__ = [
    "DEFAULT_MAX_BIT_GAP",
    "DEFAULT_MAX_GAP",
    "BlockPoint",
    "ReadBlock",
    "Span",
    "plan_reads",
    "with_scale_factors",
]

DEFAULT_MAX_GAP = 10  # registers bridged between two points (20 bytes < one round trip)
DEFAULT_MAX_BIT_GAP = 160  # bits bridged between two bit points (20 bytes as well)

# Requests go out in a fixed table order so that plans (and logs) are stable.
_TABLE_ORDER = (ModbusTable.COIL, ModbusTable.DISCRETE, ModbusTable.INPUT, ModbusTable.HOLDING)


@dataclass(frozen=True, slots=True)
class Span:
    """A range of one table: ``count`` registers (or bits) from ``start``."""

    table: ModbusTable
    start: int
    count: int

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.start + self.count

    def contains(self, other: Span) -> bool:
        return self.table is other.table and self.start <= other.start and other.end <= self.end


@dataclass(frozen=True, slots=True)
class BlockPoint:
    """A point inside a block: its registers are ``data[offset : offset + count]``."""

    point: Point
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: a table, a start address, a count, and the points it carries."""

    table: ModbusTable
    start: int
    count: int
    points: tuple[BlockPoint, ...]

    @property
    def end(self) -> int:
        return self.start + self.count

    @property
    def span(self) -> Span:
        return Span(self.table, self.start, self.count)

    def slice(self, data: Sequence[int], item: BlockPoint) -> list[int]:
        """The registers (or bits as 0/1) of ``item`` out of this block's response."""
        return [int(x) for x in data[item.offset : item.offset + item.count]]


@dataclass(slots=True)
class _Cell:
    """Points sharing registers (bools packed in one register) travel together."""

    start: int
    end: int
    points: list[Point]


def with_scale_factors(profile: Profile, points: Iterable[Point]) -> list[Point]:
    """``points`` plus the SunSpec scale-factor points they need, without duplicates."""
    out: dict[str, Point] = {}
    for p in points:
        out.setdefault(p.name, p)
        if p.scale_factor_point is not None and p.scale_factor_point not in out:
            try:
                out[p.scale_factor_point] = profile.point(p.scale_factor_point)
            except KeyError:
                raise ConfigError(
                    f"profile '{profile.id}': point '{p.name}': scale factor point "
                    f"'{p.scale_factor_point}' is not a point of the profile"
                ) from None
    return list(out.values())


def _address(p: Point) -> int:
    a = modbus_address(p)
    assert a is not None  # plan_reads refuses points without one
    return a.address


def _cells(points: list[Point]) -> list[_Cell]:
    ordered = sorted(points, key=lambda p: (_address(p), point_registers(p), p.name))
    cells: list[_Cell] = []
    for p in ordered:
        start = _address(p)
        end = start + point_registers(p)
        if cells and start < cells[-1].end:
            cells[-1].end = max(cells[-1].end, end)
            cells[-1].points.append(p)
        else:
            cells.append(_Cell(start, end, [p]))
    return cells


def _covered(cells: list[_Cell], span: Span) -> bool:
    """True when every address of ``span`` belongs to some point (no gap inside)."""
    pos = span.start
    for c in cells:
        if c.end <= pos:
            continue
        if c.start > pos:
            return False
        pos = c.end
        if pos >= span.end:
            return True
    return pos >= span.end


def _join_allowed(a: _Cell, b: _Cell, refused: list[tuple[Span, bool]], max_gap: int) -> bool:
    gap = b.start - a.end
    if gap > max_gap:
        return False
    for span, covered in refused:
        # The join (a's last address through b's first) lies inside the refused span.
        if span.start < b.start and span.end > a.end and (gap > 0 or covered):
            return False
    return True


def _plan_table(
    table: ModbusTable,
    points: list[Point],
    limit: int,
    max_gap: int,
    refused: list[Span],
) -> list[ReadBlock]:
    cells = _cells(points)
    marked = [(s, _covered(cells, s)) for s in refused]
    groups: list[list[_Cell]] = []
    for cell in cells:
        if groups:
            cur = groups[-1]
            fits = cell.end - cur[0].start <= limit
            if fits and _join_allowed(cur[-1], cell, marked, max_gap):
                cur.append(cell)
                continue
        groups.append([cell])
    blocks: list[ReadBlock] = []
    for group in groups:
        start = group[0].start
        end = max(c.end for c in group)
        items = tuple(
            BlockPoint(p, _address(p) - start, point_registers(p)) for c in group for p in c.points
        )
        blocks.append(ReadBlock(table, start, end - start, items))
    return blocks


def plan_reads(
    profile: Profile,
    points: Sequence[Point],
    *,
    max_registers: int = 125,
    max_bits: int = 2000,
    max_gap: int = DEFAULT_MAX_GAP,
    max_bit_gap: int = DEFAULT_MAX_BIT_GAP,
    refused: Collection[Span] | None = None,
) -> list[ReadBlock]:
    """The read requests that fetch ``points`` (and the scale factors they need).

    Every point is in exactly one block; no block exceeds the limits (the lower of the
    arguments and the profile's ``max_registers_per_read``/``max_bits_per_read``).
    """
    settings = modbus_settings(profile)
    reg_limit = min(max_registers, settings.max_registers_per_read)
    bit_limit = min(max_bits, settings.max_bits_per_read)
    if reg_limit < 1 or bit_limit < 1:
        raise ConfigError(f"profile '{profile.id}': read limits must be at least 1")
    by_table: dict[ModbusTable, list[Point]] = {}
    for p in with_scale_factors(profile, points):
        a = modbus_address(p)
        if a is None:
            raise ConfigError(f"profile '{profile.id}': point '{p.name}' has no modbus address")
        limit = bit_limit if a.table.is_bit_table else reg_limit
        if point_registers(p) > limit:
            raise ConfigError(
                f"profile '{profile.id}': point '{p.name}': {point_registers(p)} registers "
                f"exceed the read limit of {limit}"
            )
        if a.address + point_registers(p) > MODBUS_ADDRESS_SPACE:
            raise ConfigError(f"profile '{profile.id}': point '{p.name}': runs past address 65535")
        by_table.setdefault(a.table, []).append(p)
    refused_list = list(refused or ())
    blocks: list[ReadBlock] = []
    for table in _TABLE_ORDER:
        pts = by_table.get(table)
        if not pts:
            continue
        bits = table.is_bit_table
        blocks.extend(
            _plan_table(
                table,
                pts,
                bit_limit if bits else reg_limit,
                max_bit_gap if bits else max_gap,
                [s for s in refused_list if s.table is table],
            )
        )
    return blocks
