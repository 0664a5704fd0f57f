"""Connection ratios over a 50-device Hebei ledger with 30 devices reporting."""

from __future__ import annotations

import itertools
from typing import TypedDict

import pytest

from gateway.ratios import (
    GROUPINGS,
    compute_ratios,
    line_protocol,
    parse_as_of,
    parse_window,
)
from gateway.registry import Registry
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_registry_fixtures import T0, reference

# Fixtures shared with the other registry/API tests; these run on SQLite and PostgreSQL.
registry_url = _fx.both_registry_urls
registry = _fx.registry
hebei = _fx.hebei


def _numbers(result: dict[str, object]) -> dict[str, tuple[int, int, int]]:
    groups = result["groups"]
    assert isinstance(groups, list)
    return {g["key"]: (g["total"], g["connected"], g["online"]) for g in groups}


def test_overall_numbers_follow_the_definitions(hebei: Registry) -> None:
    r = compute_ratios(hebei, None, window_s=86400, as_of_ms=T0)
    o = r["overall"]
    # 50 in the ledger; 25 had a good sample in the last 24 h; online: fresh (0..9),
    # state online (not 3, 4) and agent alive (not hb-machine's 4 and 9) → 7.
    assert (o["total"], o["connected"], o["online"]) == (50, 25, 7)
    assert o["ratio"] == 0.5
    assert o["online_ratio"] == 0.14
    assert r["as_of"] == T0 and r["window_s"] == 86400


def test_city_rollup_and_labels(hebei: Registry) -> None:
    r = compute_ratios(hebei, "city", window_s=86400, as_of_ms=T0)
    assert [g["key"] for g in r["groups"]] == ["130100", "130200", "130600", "130900"]
    totals = {g["key"]: g["total"] for g in r["groups"]}
    # Shijiazhuang has two enterprises; Dingzhou (130682) rolls up to Baoding by prefix.
    assert totals == {"130100": 20, "130200": 10, "130600": 10, "130900": 10}
    labels = {g["key"]: g["label"] for g in r["groups"]}
    assert labels["130100"] == "石家庄市 Shijiazhuang"
    assert labels["130600"] == "保定市 Baoding"
    county = compute_ratios(hebei, "county", window_s=86400, as_of_ms=T0)
    assert {g["key"]: g["label"] for g in county["groups"]}["130682"] == "定州市 Dingzhou"
    assert {g["key"]: g["label"] for g in county["groups"]}["130984"] == "河间市 Hejian City"


@pytest.mark.parametrize("window", ["15m", "24h", "7d"])
def test_every_grouping_and_window_matches_the_reference(hebei: Registry, window: str) -> None:
    window_s = parse_window(window)
    for group_by in GROUPINGS:
        result = compute_ratios(hebei, group_by, window_s=window_s, as_of_ms=T0)
        assert _numbers(result) == reference(group_by, window_s=window_s, as_of=T0), group_by
        keys = [g["key"] for g in result["groups"]]
        assert keys == sorted(keys)
        overall = reference(None, window_s=window_s, as_of=T0)["all"]
        assert sum(g["total"] for g in result["groups"]) == overall[0]


def test_windows_change_connected_only(hebei: Registry) -> None:
    counts = {
        w: compute_ratios(hebei, None, window_s=parse_window(w), as_of_ms=T0)["overall"]
        for w in ("15m", "24h", "7d")
    }
    assert [counts[w]["connected"] for w in ("15m", "24h", "7d")] == [20, 25, 29]
    assert {counts[w]["total"] for w in counts} == {50}
    assert {counts[w]["online"] for w in counts} == {7}


class _Filter(TypedDict, total=False):
    enterprise: str
    region: str
    industry: str
    category: str


def test_filters_match_the_reference(hebei: Registry) -> None:
    filters: list[_Filter] = [
        {"enterprise": "hb-steel"},
        {"region": "13"},
        {"region": "1301"},
        {"region": "130100"},
        {"region": "130682"},
        {"industry": "C"},
        {"industry": "D44"},
        {"category": "new_energy"},
        {"enterprise": "hb-cement", "category": "high_energy_process"},
    ]
    for f, group_by in itertools.product(filters, ("city", "category", None)):
        result = compute_ratios(hebei, group_by, window_s=86400, as_of_ms=T0, **f)
        expected = reference(group_by, window_s=86400, as_of=T0, **f)
        if group_by is None:
            o = result["overall"]
            assert {"all": (o["total"], o["connected"], o["online"])} == expected, f
        else:
            assert _numbers(result) == expected, (f, group_by)


def test_unknown_filter_value_gives_empty_scope(hebei: Registry) -> None:
    r = compute_ratios(hebei, "city", window_s=86400, as_of_ms=T0, enterprise="nobody")
    assert r["groups"] == [] and r["overall"]["total"] == 0 and r["overall"]["ratio"] == 0.0


def test_a_silent_device_leaves_connected_when_its_window_passes(hebei: Registry) -> None:
    # Devices 10..19 last reported at T0-60 s: still connected 1 ms before the day is over.
    day = 86400_000
    before = compute_ratios(hebei, None, window_s=86400, as_of_ms=T0 - 60_000 + day - 1)
    after = compute_ratios(hebei, None, window_s=86400, as_of_ms=T0 - 60_000 + day)
    # At that time only devices 0..9 (T0-5 s) and 10..19 count; 10..19 drop out.
    assert before["overall"]["connected"] == 20
    assert after["overall"]["connected"] == 10
    assert before["overall"]["total"] == after["overall"]["total"] == 50


def test_same_data_and_as_of_give_the_same_answer(hebei: Registry) -> None:
    a = compute_ratios(hebei, "county", window_s=3600, as_of_ms=T0 + 1234)
    b = compute_ratios(hebei, "county", window_s=3600, as_of_ms=T0 + 1234)
    assert a == b


def test_decommissioned_devices_leave_the_total(hebei: Registry) -> None:
    hebei.decommission("hb-cement", "dev-45")  # never reported
    hebei.decommission("hb-steel", "dev-01")  # reporting and online
    r = compute_ratios(hebei, "enterprise", window_s=86400, as_of_ms=T0)
    assert (r["overall"]["total"], r["overall"]["connected"], r["overall"]["online"]) == (
        48,
        24,
        6,
    )
    expected = reference("enterprise", window_s=86400, as_of=T0, decommissioned=frozenset({1, 45}))
    assert _numbers(r) == expected
    device = hebei.get_device("hb-steel", "dev-01")
    assert device is not None and device["status"] == "decommissioned"


def test_online_and_connected_differ_as_defined(hebei: Registry) -> None:
    r = compute_ratios(hebei, "enterprise", window_s=86400, as_of_ms=T0)
    machine = next(g for g in r["groups"] if g["key"] == "hb-machine")
    # hb-machine's devices reported within the day, but its agent is gone: not online.
    assert machine["connected"] > 0 and machine["online"] == 0
    # 40 s later nothing is fresh enough (3 poll intervals = 30 s) to be online.
    later = compute_ratios(hebei, None, window_s=86400, as_of_ms=T0 + 40_000)
    assert later["overall"]["online"] == 0 and later["overall"]["connected"] == 25


def test_window_and_time_parsing() -> None:
    assert parse_window("15m") == 900 and parse_window("7d") == 604800
    for bad in ("", "24", "0h", "1y", "-1h", "400d", "1.5h"):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)
    assert parse_as_of("1750000000000") == 1_750_000_000_000
    assert parse_as_of("2025-06-15T15:06:40Z") == 1_750_000_000_000
    assert parse_as_of("2025-06-15T23:06:40+08:00") == 1_750_000_000_000
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_as_of("yesterday")


def test_line_protocol_point() -> None:
    g = {
        "key": "130100",
        "total": 20,
        "connected": 10,
        "online": 3,
        "ratio": 0.5,
        "online_ratio": 0.15,
    }
    assert line_protocol("city", g, 1000) == (
        "connection_ratio,group_by=city,key=130100 "
        "total=20i,connected=10i,online=3i,ratio=0.5,online_ratio=0.15 1000"
    )
