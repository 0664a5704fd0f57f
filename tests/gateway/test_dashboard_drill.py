"""The dashboard's drill-down, exports, reconciliation, grades and device page, rendered
by headless Chromium (with the CJK fonts a person would read them in) against uvicorn.

A click on a bar, a row or a breadcrumb follows a link in the page; each step here
loads the link the previous page shows, as the click would.
"""

from __future__ import annotations

import html
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.registry import Registry
from tests.gateway import test_provincial as _prov
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_dashboard import _chromium, _serve

TOKEN = "platform-secret"

registry = _fx.registry
hebei = _fx.hebei
ledger_cases = _prov.ledger_cases
graded = _prov.graded


@pytest.fixture
def served(hebei: Registry) -> Iterator[str]:
    yield from _serve(hebei)


@pytest.fixture
def served_cases(ledger_cases: Registry) -> Iterator[str]:
    yield from _serve(ledger_cases)


@pytest.fixture
def served_graded(graded: Registry) -> Iterator[str]:
    yield from _serve(graded)


def _good(base: str, query: str) -> dict[str, str]:
    """The API's quality_connected per group, as the page should show it."""
    body = httpx.get(
        f"{base}/api/v1/ratios?{query}", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()
    return {g["key"]: str(g["quality_connected"]) for g in body["groups"]}


def _open(tmp_path: Path, base: str, fragment: str) -> str:
    """The page's DOM after it loaded ``#fragment`` (with the read-only token)."""
    frag = fragment.lstrip("#")
    return _chromium(
        tmp_path, f"{base}/#token={TOKEN}" + (f"&{frag}" if frag else ""), "--dump-dom"
    )


def _part(dom: str, element_id: str, end: str) -> str:
    """What follows the opening tag of the element, up to ``end``."""
    return dom.split(f'id="{element_id}"', 1)[1].split(">", 1)[1].split(end, 1)[0]


def _text(fragment: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", fragment))).strip()


def _rows(dom: str, table_id: str) -> dict[str, list[str]]:
    """The table's body rows by their data-key: each cell's text."""
    body = _part(dom, table_id, "</table>").split("<tbody>", 1)[1]
    found = re.findall(r'<tr data-key="([^"]+)">(.*?)</tr>', body, re.S)
    return {
        key: [_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for key, row in found
    }


def _row_link(dom: str, table_id: str, key: str) -> str:
    body = _part(dom, table_id, "</table>")
    row = body.split(f'data-key="{key}"', 1)[1].split("</tr>", 1)[0]
    href = re.search(r'<a href="([^"]+)"', row)
    assert href is not None, f"row {key} of {table_id} has no link"
    return html.unescape(href.group(1))


def _crumbs(dom: str, nav_id: str = "crumbs") -> list[tuple[str, str]]:
    nav = _part(dom, nav_id, "</nav>")
    return [
        (html.unescape(h), _text(t))
        for h, t in re.findall(r'<a href="([^"]+)"[^>]*>(.*?)</a>', nav)
    ]


def test_drill_down_from_the_province_to_a_device_and_back(served: str, tmp_path: Path) -> None:
    dom = _open(tmp_path, served, "")
    cities = _rows(dom, "drill-table")
    assert list(cities) == ["130100", "130200", "130600", "130900"]
    good = _good(served, "group_by=city")
    assert cities["130100"] == ["石家庄市 Shijiazhuang", "10", good["130100"], "20", "50.0%"]
    # Each bar is a link to the same place as its row.
    chart = _part(dom, "drill-chart", "</svg>")
    bar = re.search(r'<a href="([^"]+)" class="drill"><g class="row" data-key="130100"', chart)
    assert bar is not None and html.unescape(bar.group(1)) == _row_link(
        dom, "drill-table", "130100"
    )

    # The trend of the view is a line through the four hourly snapshots.
    trend = _part(dom, "drill-trend", "</svg>")
    line = re.search(r'<polyline class="connected" points="([^"]+)"', trend)
    assert line is not None and len(line.group(1).split()) == 4

    city = _open(tmp_path, served, _row_link(dom, "drill-table", "130100"))
    assert [t for _h, t in _crumbs(city)] == ["全省 Province", "石家庄市 Shijiazhuang"]
    assert "(city 130100)" in _text(_part(city, "drill-trend-what", "</span>"))
    city_trend = _part(city, "drill-trend", "</svg>")
    lines = re.findall(r'<polyline class="(\w+)" points="([^"]+)"', city_trend)
    # Connected, quality_connected (stored with each snapshot) and online.
    assert [(cls, len(pts.split())) for cls, pts in lines] == [
        ("connected", 4),
        ("quality", 4),
        ("online", 4),
    ]
    # Each line is named beside a sample of it.
    keys = re.findall(r'<polyline class="(\w+) key"', city_trend)
    assert keys == ["connected", "quality", "online"]
    assert all(name in _text(city_trend) for name in ("联网率", "数据达标率", "在线率"))
    counties = _rows(city, "drill-table")
    good = _good(served, "group_by=county&region=1301")
    assert counties == {
        "130102": ["长安区 Chang'an District", "5", good["130102"], "10", "50.0%"],
        "130104": ["桥西区 Qiaoxi District", "5", good["130104"], "10", "50.0%"],
    }
    county = _open(tmp_path, served, _row_link(city, "drill-table", "130102"))
    assert [t for _h, t in _crumbs(county)][-1] == "长安区 Chang'an District"
    good = _good(served, "group_by=enterprise&region=130102")
    assert _rows(county, "drill-table") == {
        "hb-cement": ["冀东水泥 Jidong Cement", "5", good["hb-cement"], "10", "50.0%"]
    }
    ent = _open(tmp_path, served, _row_link(county, "drill-table", "hb-cement"))
    devices = _rows(ent, "drill-table")
    assert sorted(devices) == [f"dev-{k:02d}" for k in range(0, 50, 5)]
    assert devices["dev-45"][2:] == ["离线 offline", "—", "从未上报 never reported"]
    assert devices["dev-00"][2] == "在线 online"

    dev = _open(tmp_path, served, _row_link(ent, "drill-table", "dev-00"))
    facts = {r[0]: r[1] for r in (_rows_plain(dev, "dev-facts"))}
    assert facts["状态 State"] == "在线 online"
    assert facts["最后数据 Last sample"] != "—"
    assert _rows(dev, "dev-latest") == {"temperature": ["temperature", "20"]}
    chart = _part(dev, "dev-charts", "</div>")
    assert 'data-point="temperature"' in chart and "<polyline" in chart
    # Where the chart's messages came from, under it.
    assert _text(_part(dev, "dev-source", "</p>")) == "数据来源 Source: memory"
    found = re.search(r'<a id="dev-csv"[^>]*href="([^"]+)"', dev)
    assert found is not None
    text = httpx.get(
        served + html.unescape(found.group(1)), headers={"Authorization": f"Bearer {TOKEN}"}
    ).text
    assert text.splitlines()[1:] == ["时间 ts_ms,temperature", f"{_fx.T0 - 5000},20.0"]
    crumbs = _crumbs(dev, "dev-crumbs")
    assert [t for _h, t in crumbs] == [
        "全省 Province",
        "石家庄市 Shijiazhuang",
        "长安区 Chang'an District",
        "冀东水泥 Jidong Cement",
        "设备 0",
    ]
    # The province breadcrumb goes back to the top.
    top = _open(tmp_path, served, crumbs[0][0])
    assert list(_rows(top, "drill-table")) == ["130100", "130200", "130600", "130900"]


def _rows_plain(dom: str, table_id: str) -> list[list[str]]:
    body = _part(dom, table_id, "</table>")
    return [
        [_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    ]


def test_a_device_offline_shows_why_and_its_state_history(served: str, tmp_path: Path) -> None:
    # dev-09 belongs to hb-machine, whose agent sent its will while the device was online.
    dom = _open(tmp_path, served, "tab=device&region=130104&ent=hb-machine&dev=dev-09")
    facts = {r[0]: r[1] for r in _rows_plain(dom, "dev-facts")}
    assert facts["状态 State"] == "离线 offline"
    assert facts["离线原因 Reason offline"] == "agent offline"
    states = _rows_plain(dom, "dev-states")[1:]
    assert [s[1:] for s in states] == [["离线 offline", "agent offline"], ["在线 online", "—"]]
    assert "石家庄机械 Shijiazhuang Machinery" in _text(_part(dom, "dev-title", "</h2>"))


def test_filters_survive_the_drill_down_and_the_exports_follow_them(
    served: str, tmp_path: Path
) -> None:
    dom = _open(tmp_path, served, "industry=C30")
    # Only the cement works (Shijiazhuang) is in C30.
    good = _good(served, "group_by=city&industry=C30")
    assert _rows(dom, "drill-table") == {
        "130100": ["石家庄市 Shijiazhuang", "5", good["130100"], "10", "50.0%"]
    }
    assert re.search(r'<option value="C30" selected=""', dom)
    down = _row_link(dom, "drill-table", "130100")
    assert "industry=C30" in down
    city = _open(tmp_path, served, down)
    assert list(_rows(city, "drill-table")) == ["130102"]
    # The export buttons fetch what the view shows, with its filters.
    found = re.search(r'<a id="export-xlsx"[^>]*href="([^"]+)"', city)
    assert found is not None
    href = html.unescape(found.group(1))
    assert href.startswith("/api/v1/reports/ratios.xlsx?")
    assert "region=1301" in href and "industry=C30" in href and "group_by=county" in href
    got = httpx.get(served + href, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert got.status_code == 200
    with zipfile.ZipFile(io.BytesIO(got.content)) as z:
        strings = re.findall(r"<t[^>]*>([^<]*)</t>", z.read("xl/sharedStrings.xml").decode())
    assert "长安区 Chang'an District" in strings and "桥西区 Qiaoxi District" not in strings
    found = re.search(r'<a id="export-csv"[^>]*href="([^"]+)"', city)
    assert found is not None
    csv_href = html.unescape(found.group(1))
    text = httpx.get(served + csv_href, headers={"Authorization": f"Bearer {TOKEN}"}).text
    chang_an = _good(served, "group_by=county&region=1301&industry=C30")["130102"]
    assert f"130102,长安区 Chang'an District,5,{chang_an},2,10,0.5" in text


def test_the_table_sorts_by_ratio(served: str, tmp_path: Path) -> None:
    dom = _open(tmp_path, served, "category=general_power")
    link = re.search(r'<th id="sort-ratio"><a href="([^"]+)"', dom)
    assert link is not None
    sorted_dom = _open(tmp_path, served, html.unescape(link.group(1)))
    rows = _rows(sorted_dom, "drill-table")
    ratios = [float(r[4].rstrip("%")) for r in rows.values()]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) > 1
    assert list(rows) != sorted(rows)  # not simply in code order
    assert "▼" in _text(_part(sorted_dom, "sort-ratio", "</th>"))


def test_the_reconciliation_tab_shows_one_case_of_each_kind(
    served_cases: str, tmp_path: Path
) -> None:
    dom = _open(tmp_path, served_cases, "tab=reconciliation")
    assert 'id="view-reconciliation"' in dom and 'id="view-reconciliation" hidden' not in dom
    assert list(_rows(dom, "rec-not_in_ledger")) == ["extra-7"]
    assert list(_rows(dom, "rec-never_seen")) == ["never-1"]
    stale = _rows(dom, "rec-not_seen_in_window")
    assert list(stale) == ["stale-1"] and stale["stale-1"][0] == "甲厂 Plant A"
    assert _rows_plain(dom, "rec-duplicate_serials")[1:] == [
        ["S-777", "甲厂 Plant A", "dup-1"],
        ["S-777", "乙厂 Plant B", "dup-9"],
    ]
    summary = _text(_part(dom, "rec-summary", "</p>"))
    assert summary.startswith("未入台账 1 · 从未上报 1 · 窗口内未上报 1 · 序列号重复 1")
    assert re.search(r'href="/api/v1/reports/reconciliation\.xlsx\?window=24h"', dom)


def test_the_grades_tab_shows_each_grade_with_its_evidence(
    served_graded: str, tmp_path: Path
) -> None:
    dom = _open(tmp_path, served_graded, "tab=grades")
    rows = _rows(dom, "grades")
    assert {k: r[2] for k, r in rows.items()} == {
        "g-none": "—",
        "g-l1": "L1",
        "g-l1b": "L1",
        "g-l2": "L2",
        "g-l3": "L3",
        "g-l4": "L4",
    }
    assert "缺 missing general_power" in rows["g-l1b"][4]
    assert rows["g-l2"][3] == "2 / 0 / 2"
    assert "L1: 2 家 · L2: 1 家 · L3: 1 家 · L4: 1 家 · 未达 L1 none: 1 家" in dom
