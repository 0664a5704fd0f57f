"""In-memory columnar index of the devices, so a ratio over 10⁶ devices is a few numpy ops.

The database stays the source of truth; the index is rebuilt from it at start and kept
up to date by the registry under its lock. Categorical columns are dictionary-encoded
(``Encoder``) so a grouping is one ``np.bincount``. Ratio queries count over an
``IndexView``: a read-only copy of the counting columns taken under the lock in a few
milliseconds, so a query never holds the lock while it counts and never sees half of
a change (a refresh pass applies under the lock, then publishes a new view).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from gateway.registry.codes import industry_division

__all__ = [
    "GROUPINGS",
    "NEVER",
    "DeviceIndex",
    "DeviceMeta",
    "Encoder",
    "EncoderView",
    "Grouping",
    "IndexView",
]

NEVER = -1  # a timestamp column's value for "not yet"

# The dimensions devices are counted by: one encoded column each.
Grouping = Literal["enterprise", "province", "city", "county", "industry", "category", "family"]
GROUPINGS: tuple[Grouping, ...] = get_args(Grouping)

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class Encoder:
    """Maps strings to dense integer codes, in order of first appearance."""

    __slots__ = ("codes", "values")

    def __init__(self) -> None:
        self.values: list[str] = []
        self.codes: dict[str, int] = {}

    def code(self, value: str) -> int:
        c = self.codes.get(value)
        if c is None:
            c = len(self.values)
            self.codes[value] = c
            self.values.append(value)
        return c

    def __len__(self) -> int:
        return len(self.values)


class EncoderView:
    """An encoder's values and codes as they were when a view was taken (read-only)."""

    __slots__ = ("codes", "values")

    def __init__(self, enc: Encoder) -> None:
        self.values: tuple[str, ...] = tuple(enc.values)
        self.codes: dict[str, int] = dict(enc.codes)

    def __len__(self) -> int:
        return len(self.values)


@dataclass(slots=True)
class DeviceMeta:
    """The per-device fields that are not needed for vectorised counting."""

    enterprise: str
    id: str
    name: str
    region: str
    industry: str
    family: str
    category: str
    profile: str | None
    agent: str | None
    status: str
    source: str
    not_in_ledger: bool
    created_ms: int
    first_seen_ms: int | None = None
    reason: str = ""
    kind: str = "equipment"
    site_region: str | None = None


def _encode(enc: Encoder, values: list[str]) -> list[int]:
    """Codes of many values; a dict lookup per value, the encoder only for new ones."""
    codes = enc.codes
    return [codes[v] if v in codes else enc.code(v) for v in values]


def _occurring(values: Sequence[str], rows: npt.NDArray[Any]) -> list[int]:
    """Positions in ``values`` that some row has."""
    found: list[int] = np.flatnonzero(np.bincount(rows, minlength=len(values))).tolist()
    return found


def _by_dictionary(
    values: Sequence[str], rows: npt.NDArray[Any], convert: Callable[[str], int]
) -> I32:
    """Each row's ``convert(values[rows[row]])``, converting each value some row has once.

    A value no row has is neither converted nor taken (its table slot stays 0).
    """
    table = np.zeros(max(1, len(values)), np.int32)
    for j in _occurring(values, rows):
        table[j] = convert(values[j])
    out: I32 = table.take(rows)
    return out


# A grouping's column attribute where the names differ.
_COLUMN_OF = {"enterprise": "ent", "province": "prov"}
_INT_COLUMNS = ("ent", "prov", "city", "county", "region_num", "industry", "category", "family")
_TS_COLUMNS = ("last_good", "last_ts", "offline_since", "saved_good", "saved_ts")
_BOOL_COLUMNS = ("active", "agent_alive", "dev_online", "product")
_ZERO_COLUMNS = (*_INT_COLUMNS, *_BOOL_COLUMNS, "state_seq")
# What a view copies: the columns only ``set_static`` and ``add`` write (copied again
# only when ``static_version`` has moved), and those ingest moves all the time.
_STATIC_VIEW = (*_INT_COLUMNS, "product")
_DYNAMIC_VIEW = ("last_good", "last_ts", "active", "agent_alive", "dev_online")


class IndexView:
    """The counting columns of a ``DeviceIndex`` at one moment, read-only.

    Shares nothing that changes with the index except ``keys`` (key → position), which
    only ever gains entries; a position at or past ``n`` is not in the view.
    ``generation`` numbers the views of one registry, in order; ``taken`` is when
    (``time.monotonic()``).
    """

    n: int
    generation: int
    taken: float
    keys: dict[tuple[str, str], int]
    enc: dict[str, EncoderView]
    ent: I32
    prov: I32
    city: I32
    county: I32
    region_num: I32
    industry: I32
    category: I32
    family: I32
    product: Bools
    last_good: I64
    last_ts: I64
    active: Bools
    agent_alive: Bools
    dev_online: Bools

    def __init__(self, index: DeviceIndex, generation: int, previous: IndexView | None) -> None:
        """Copy ``index`` (call under the registry's lock); ``previous``, an earlier view
        of the same index, lends the columns and encoders that have not changed since."""
        n = self.n = index.n
        self.generation = generation
        self.taken = time.monotonic()
        self.keys = index.keys
        self._source = index
        self._static_version = index.static_version
        lend = (
            previous
            if previous is not None
            and previous._source is index
            and previous._static_version == index.static_version
            and previous.n == n
            else None
        )
        for name in _STATIC_VIEW:
            col = getattr(lend, name) if lend is not None else _frozen(getattr(index, name)[:n])
            setattr(self, name, col)
        for name in _DYNAMIC_VIEW:
            setattr(self, name, _frozen(getattr(index, name)[:n]))
        old = previous.enc if previous is not None and previous._source is index else {}
        self.enc = {
            name: old[name] if name in old and len(old[name]) == len(enc) else EncoderView(enc)
            for name, enc in index.enc.items()
        }

    def column(self, group_by: str) -> tuple[I32, EncoderView]:
        """The code column and encoder of a grouping."""
        enc = self.enc[group_by]  # KeyError for anything but a grouping
        col: I32 = getattr(self, _COLUMN_OF.get(group_by, group_by))
        return col, enc


def _frozen(column: npt.NDArray[Any]) -> npt.NDArray[Any]:
    out = column.copy()
    out.flags.writeable = False
    return out


def _derived_code(enc: Encoder, derive: Callable[[str], str]) -> Callable[[str], int]:
    return lambda value: enc.code(derive(value))


def _province(region: str) -> str:
    return region[:2] + "0000"


def _city(region: str) -> str:
    return region[:4] + "00"


class DeviceIndex:
    """Columns by device position; ``keys`` maps (enterprise, device) to the position."""

    def __init__(self, capacity: int = 1024) -> None:
        self.n = 0
        self.keys: dict[tuple[str, str], int] = {}
        self.meta: list[DeviceMeta] = []
        self.enc: dict[str, Encoder] = {name: Encoder() for name in GROUPINGS}
        self._cap = max(16, capacity)
        self.ent: I32 = np.zeros(self._cap, np.int32)
        self.prov: I32 = np.zeros(self._cap, np.int32)
        self.city: I32 = np.zeros(self._cap, np.int32)
        self.county: I32 = np.zeros(self._cap, np.int32)
        self.region_num: I32 = np.zeros(self._cap, np.int32)
        self.industry: I32 = np.zeros(self._cap, np.int32)
        self.category: I32 = np.zeros(self._cap, np.int32)
        self.family: I32 = np.zeros(self._cap, np.int32)
        self.last_good: I64 = np.full(self._cap, NEVER, np.int64)
        self.last_ts: I64 = np.full(self._cap, NEVER, np.int64)
        self.offline_since: I64 = np.full(self._cap, NEVER, np.int64)
        # What the database holds of last_good/last_ts, to write them only when they
        # have moved far enough (see Registry.persist_granularity_ms).
        self.saved_good: I64 = np.full(self._cap, NEVER, np.int64)
        self.saved_ts: I64 = np.full(self._cap, NEVER, np.int64)
        self.active: Bools = np.zeros(self._cap, np.bool_)
        self.agent_alive: Bools = np.zeros(self._cap, np.bool_)
        self.dev_online: Bools = np.zeros(self._cap, np.bool_)
        # True for a product an enterprise made (kind 'product'), False for its equipment.
        self.product: Bools = np.zeros(self._cap, np.bool_)
        # The registry's change number of the device's last state change made here (0:
        # none), so a refresh can tell whether what it read is older than that.
        self.state_seq: I64 = np.zeros(self._cap, np.int64)
        # Agent id -> positions of its devices, to flip agent_alive on birth/will.
        self.by_agent: dict[str, set[int]] = {}
        # Moves whenever a column of _STATIC_VIEW changes, so views copy them only then.
        self.static_version = 0

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = self._cap
        while cap < need:
            cap *= 2
        for name in _ZERO_COLUMNS:
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)
        for name in _TS_COLUMNS:
            old = getattr(self, name)
            new = np.full(cap, NEVER, np.int64)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)
        self._cap = cap

    def set_static(self, i: int, meta: DeviceMeta) -> None:
        """(Re)write the categorical columns of position ``i`` from its metadata."""
        r = meta.region
        e = self.enc
        codes = (
            e["enterprise"].code(meta.enterprise),
            e["province"].code(r[:2] + "0000"),
            e["city"].code(r[:4] + "00"),
            e["county"].code(r),
            int(r),
            e["industry"].code(industry_division(meta.industry)),
            e["category"].code(meta.category),
            e["family"].code(meta.family),
            meta.kind == "product",
        )
        self.active[i] = meta.status != "decommissioned"
        # Most calls rewrite what is there already (a refreshed row, a repeated birth):
        # leave the version alone then, so the next view need not copy these columns.
        if codes != tuple(getattr(self, name)[i] for name in _STATIC_VIEW):
            for name, code in zip(_STATIC_VIEW, codes, strict=True):
                getattr(self, name)[i] = code
            self.static_version += 1

    def add(self, meta: DeviceMeta) -> int:
        i = self.n
        self._grow(i + 1)
        self.n = i + 1
        self.keys[(meta.enterprise, meta.id)] = i
        self.meta.append(meta)
        self.set_static(i, meta)
        self.static_version += 1
        if meta.agent:
            self.by_agent.setdefault(meta.agent, set()).add(i)
        return i

    def add_many(self, metas: list[DeviceMeta]) -> int:
        """Append many devices at once; returns the position of the first."""
        start, k = self.n, len(metas)
        self._grow(start + k)
        sl = slice(start, start + k)
        e = self.enc
        self.ent[sl] = _encode(e["enterprise"], [m.enterprise for m in metas])
        regions = [m.region for m in metas]
        self.prov[sl] = _encode(e["province"], [r[:2] + "0000" for r in regions])
        self.city[sl] = _encode(e["city"], [r[:4] + "00" for r in regions])
        self.county[sl] = _encode(e["county"], regions)
        self.region_num[sl] = np.array(regions, dtype=np.int32) if regions else []
        divisions = [industry_division(m.industry) for m in metas]
        self.industry[sl] = _encode(e["industry"], divisions)
        self.category[sl] = _encode(e["category"], [m.category for m in metas])
        self.family[sl] = _encode(e["family"], [m.family for m in metas])
        self.active[sl] = [m.status != "decommissioned" for m in metas]
        self.product[sl] = [m.kind == "product" for m in metas]
        for j, m in enumerate(metas, start=start):
            self.keys[(m.enterprise, m.id)] = j
            if m.agent:
                self.by_agent.setdefault(m.agent, set()).add(j)
        self.meta.extend(metas)
        self.n = start + k
        self.static_version += 1
        return start

    def add_columns(
        self,
        columns: Mapping[str, tuple[Sequence[str], npt.NDArray[Any]]],
        *,
        product: Bools,
        active: Bools,
    ) -> None:
        """Fill an empty index from dictionary-encoded columns, for counting only.

        ``columns`` maps enterprise, region, industry, category and family to a
        dictionary and each row's code in it. The counting columns and encoders end as
        ``add_many`` of the same rows leaves them (a value's code may differ, what it
        decodes to does not); ``keys``, ``meta`` and ``by_agent`` stay empty, as no
        device here has an id or agent to look up.
        """
        if self.n:
            raise ValueError("add_columns fills an empty index only")
        n = len(product)
        for name, (_values, rows) in columns.items():
            if len(rows) != n:
                raise ValueError(f"column {name} has {len(rows)} rows, not {n}")
        if len(active) != n:
            raise ValueError(f"active has {len(active)} rows, not {n}")
        self._grow(n)
        e = self.enc
        regions, region_rows = columns["region"]
        encoded = (
            ("ent", e["enterprise"], *columns["enterprise"], None),
            ("prov", e["province"], regions, region_rows, _province),
            ("city", e["city"], regions, region_rows, _city),
            ("county", e["county"], regions, region_rows, None),
            ("industry", e["industry"], *columns["industry"], industry_division),
            ("category", e["category"], *columns["category"], None),
            ("family", e["family"], *columns["family"], None),
        )
        for attr, enc, values, rows, derive in encoded:
            # A value no device has stays out of the encoder, as add_many leaves it.
            code = enc.code if derive is None else _derived_code(enc, derive)
            getattr(self, attr)[:n] = _by_dictionary(values, np.asarray(rows, np.intp), code)
        self.region_num[:n] = _by_dictionary(regions, np.asarray(region_rows, np.intp), int)
        self.active[:n] = active
        self.product[:n] = product
        self.n = n
        self.static_version += 1

    def set_agent(self, i: int, agent: str | None, alive: bool) -> None:
        old = self.meta[i].agent
        if old == agent:
            return
        if old:
            self.by_agent.get(old, set()).discard(i)
        self.meta[i].agent = agent
        if agent:
            self.by_agent.setdefault(agent, set()).add(i)
        self.agent_alive[i] = alive and agent is not None

    def column(self, group_by: str) -> tuple[I32, Encoder]:
        """The code column and encoder of a grouping."""
        enc = self.enc[group_by]  # KeyError for anything but a grouping
        col: I32 = getattr(self, _COLUMN_OF.get(group_by, group_by))
        return col[: self.n], enc
