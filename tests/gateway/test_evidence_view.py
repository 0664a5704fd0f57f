"""Verification counts a stored report's evidence from its columns: the same rows, group
by group, as an index built device by device from the same evidence."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

import gateway.provincial as provincial
from gateway.evidence import DICT_COLUMNS, Evidence, decode, encode, from_columns
from gateway.provincial import evidence_states, recount
from gateway.ratios import GROUPINGS
from gateway.registry.codes import FAMILY_CATEGORY
from gateway.registry.index import NEVER, DeviceIndex, DeviceMeta, IndexView

AS_OF = 1_750_000_000_000
WINDOW_S = 86400
# Counties of three provinces, several cities each; Beijing's and Guangdong's too.
REGIONS = [
    "130102",
    "130104",
    "130203",
    "130205",
    "130302",
    "131002",
    "110101",
    "110105",
    "440305",
    "440106",
]
# Several codes per division, so the division's group gathers devices of different codes.
INDUSTRIES = ["C26", "C2611", "C2614", "C30", "C3011", "C38", "C3831", "D44", "D4411"]
FAMILIES = sorted(FAMILY_CATEGORY)


def _evidence(n: int, seed: int, *, quality: bool, spare: bool = True) -> Evidence:
    """Random evidence of ``n`` devices; ``spare``: dictionaries also hold values no
    device has, as an index's encoders do after a device was regrouped."""
    rng = random.Random(seed)
    ents = [f"ent-{e:03d}" for e in range(max(1, n // 7))]
    ent_rows = np.array([rng.randrange(len(ents)) for _ in range(n)], np.int64)
    fam_rows = np.array([rng.randrange(len(FAMILIES)) for _ in range(n)], np.int64)

    def column(values: list[str], rows: Any) -> tuple[list[str], Any]:
        # Duplicates and unused values, in no order: what from_columns accepts.
        extra = ["spare-" + values[0]] if spare else []
        return [*values, *extra, *values[:2]], rows

    kind = [rng.random() for _ in range(n)]
    # Connected (a recent good sample), silent for days, or never reported at all.
    last_good = np.array(
        [
            AS_OF - rng.randrange(-2_000, 3_600_000)
            if k < 0.5
            else NEVER
            if k < 0.75
            else AS_OF - rng.randrange(2 * 86_400_000, 30 * 86_400_000)
            for k in kind
        ],
        np.int64,
    )
    connected = last_good > AS_OF - WINDOW_S * 1000
    return from_columns(
        as_of_ms=AS_OF,
        window_s=WINDOW_S,
        groupings=GROUPINGS,
        devices=[f"dev-{i:05d}" for i in range(n)],
        columns={
            "enterprise": column(ents, ent_rows),
            "region": column(
                REGIONS, np.array([rng.randrange(len(REGIONS)) for _ in range(n)], np.int64)
            ),
            "industry": column(
                INDUSTRIES, np.array([rng.randrange(len(INDUSTRIES)) for _ in range(n)], np.int64)
            ),
            "category": column([FAMILY_CATEGORY[f] for f in FAMILIES], fam_rows),
            "family": column(FAMILIES, fam_rows),
        },
        product=np.array([rng.random() < 0.2 for _ in range(n)], np.bool_),
        decommissioned=np.array([rng.random() < 0.1 for _ in range(n)], np.bool_),
        online=connected & np.array([rng.random() < 0.8 for _ in range(n)], np.bool_),
        last_good=last_good,
        quality=connected & np.array([rng.random() < 0.6 for _ in range(n)], np.bool_)
        if quality
        else None,
    )


def _metas(ev: Evidence) -> list[DeviceMeta]:
    """The evidence's devices one by one, as verification first built its index."""
    cols = {name: ev.column(name) for name in DICT_COLUMNS}
    return [
        DeviceMeta(
            enterprise=cols["enterprise"][i],
            id=dev,
            name="",
            region=cols["region"][i],
            industry=cols["industry"][i],
            family=cols["family"][i],
            category=cols["category"][i],
            profile=None,
            agent=None,
            status="decommissioned" if ev.decommissioned[i] else "registered",
            source="evidence",
            not_in_ledger=False,
            created_ms=0,
            kind="product" if ev.product[i] else "equipment",
        )
        for i, dev in enumerate(ev.devices)
    ]


def _device_view(ev: Evidence) -> IndexView:
    """The oracle: the index ``add_many`` builds from one DeviceMeta per device."""
    index = DeviceIndex(capacity=ev.n)
    index.add_many(_metas(ev))
    return evidence_states(index, ev)


def _decoded(index: DeviceIndex) -> dict[str, list[str]]:
    """Each grouping's value per device, whatever codes the encoders gave them."""
    return {g: [index.enc[g].values[c] for c in index.column(g)[0].tolist()] for g in GROUPINGS}


@pytest.mark.parametrize(("n", "seed"), [(0, 1), (1, 2), (40, 3), (700, 4), (3000, 5)])
@pytest.mark.parametrize("quality", [True, False], ids=["quality", "no-quality"])
def test_recount_from_columns_gives_the_rows_of_the_device_by_device_index(
    n: int, seed: int, quality: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = decode(encode(_evidence(n, seed, quality=quality)))  # as verification reads it
    names = {"ent-000": "First Steel", "ent-001": "Second Cement"}
    rows = recount(ev, names)
    monkeypatch.setattr(provincial, "_evidence_view", _device_view)
    expected = recount(ev, names)
    assert rows == expected
    overall = next(r for r in rows if r["group_by"] == "overall")
    if n >= 700:
        # The evidence exercised every case: equipment and products, in and out of the
        # window, online and not, decommissioned devices left out of every count.
        assert 0 < overall["connected"] < overall["total"] < n
        assert 0 < overall["products_online"] < overall["products_connected"]
        assert 0 < overall["online"] < overall["connected"]
        grouped = {r["group_by"] for r in rows}
        assert grouped == {"overall", *GROUPINGS}
        assert len([r for r in rows if r["group_by"] == "province"]) == 3
        assert len([r for r in rows if r["group_by"] == "industry"]) == 4
        assert any(r["label"] == "First Steel" for r in rows if r["group_by"] == "enterprise")
        if quality:
            assert 0 < overall["quality_connected"] < overall["connected"]
    if not quality:
        assert overall["quality_connected"] is None


@pytest.mark.parametrize("spare", [True, False])
def test_add_columns_leaves_the_counting_columns_as_add_many_does(spare: bool) -> None:
    ev = _evidence(500, 11, quality=True, spare=spare)
    by_device = DeviceIndex()
    by_device.add_many(_metas(ev))
    by_column = DeviceIndex()
    by_column.add_columns(
        {name: (ev.values[name], ev.codes[name]) for name in DICT_COLUMNS},
        product=ev.product,
        active=~ev.decommissioned,
    )
    n = ev.n
    assert by_column.n == by_device.n == n
    assert _decoded(by_column) == _decoded(by_device)
    # Only the values some device has: a spare dictionary value adds no empty group.
    for g in GROUPINGS:
        assert sorted(by_column.enc[g].values) == sorted(by_device.enc[g].values), g
        assert "spare" not in " ".join(by_column.enc[g].values)
    for name in ("region_num", "active", "product"):
        assert getattr(by_column, name)[:n].tolist() == getattr(by_device, name)[:n].tolist()
    assert by_column.static_version > 0


def test_add_columns_refuses_rows_that_do_not_line_up() -> None:
    ev = _evidence(20, 12, quality=False)
    columns = {name: (ev.values[name], ev.codes[name]) for name in DICT_COLUMNS}
    short = dict(columns, family=(ev.values["family"], ev.codes["family"][:-1]))
    with pytest.raises(ValueError, match="column family has 19 rows, not 20"):
        DeviceIndex().add_columns(short, product=ev.product, active=~ev.decommissioned)
    index = DeviceIndex()
    index.add_columns(columns, product=ev.product, active=~ev.decommissioned)
    with pytest.raises(ValueError, match="empty index only"):
        index.add_columns(columns, product=ev.product, active=~ev.decommissioned)
