"""Products (联网产品总量 / 生产产品总量), enterprises on the cloud (上云企业数) and targets,
over the 50-device Hebei ledger plus its makers' products (``hebei_makers``)."""

from __future__ import annotations

import csv
import io
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.api import create_app
from gateway.config import GatewayConfig, OnCloudConfig
from gateway.ratios import (
    GROUPINGS,
    Snapshotter,
    compute_on_cloud,
    compute_ratios,
    enterprise_category_table,
)
from gateway.registry import Registry, TargetsError, parse_ledger, read_targets_file
from gateway.registry.tables import SCHEMA_VERSION
from protocols.mqtt.contract import Birth, BirthDevice
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import ADMIN, PLATFORM, make_config
from tests.gateway.test_registry_fixtures import T0, reference

# Fixtures shared with the other registry/API tests.
registry = _fx.registry
hebei = _fx.hebei
hebei_makers = _fx.hebei_makers

DAY = 86400
YEAR_MS = 365 * DAY * 1000


def _device(reg: Registry, enterprise: str, device: str) -> dict[str, Any]:
    view = reg.get_device(enterprise, device)
    assert view is not None, device
    return view


def _numbers(result: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    return {g["key"]: (g["total"], g["connected"], g["online"]) for g in result["groups"]}


def _on_cloud(result: dict[str, Any]) -> dict[str, tuple[int, int, int | None, float | None]]:
    return {
        g["key"]: (g["registered"], g["on_cloud"], g["target"], g["progress"])
        for g in result["groups"]
    }


# ---------------------------------------------------------------------- products


def test_product_ratios_count_in_the_makers_region(hebei_makers: Registry) -> None:
    r = compute_ratios(hebei_makers, None, window_s=DAY, as_of_ms=T0, kind="product")
    o = r["overall"]
    # 12 products made; cp-00..cp-04 good within 24 h; cp-00..cp-03 fresh and online.
    assert (o["total"], o["connected"], o["online"]) == (12, 5, 4)
    assert (o["ratio"], o["online_ratio"]) == (0.416667, 0.333333)
    assert r["kind"] == "product"
    expected = {
        "enterprise": {"hb-compressor": (8, 5, 4), "hb-machine": (4, 0, 0)},
        # Installed in Shijiazhuang, Tangshan, Dingzhou...: counted where the maker is.
        "city": {"130100": (4, 0, 0), "130300": (8, 5, 4)},
        "county": {"130104": (4, 0, 0), "130302": (8, 5, 4)},
        "province": {"130000": (12, 5, 4)},
        "industry": {"C34": (12, 5, 4)},
        "category": {"general_power": (8, 5, 4), "intelligent": (4, 0, 0)},
        "family": {"air_compressor": (8, 5, 4), "cnc_machine": (4, 0, 0)},
    }
    for group_by, numbers in expected.items():
        result = compute_ratios(hebei_makers, group_by, window_s=DAY, as_of_ms=T0, kind="product")
        assert _numbers(result) == numbers, group_by


def test_product_windows_and_filters(hebei_makers: Registry) -> None:
    connected = [
        compute_ratios(hebei_makers, None, window_s=w, as_of_ms=T0, kind="product")["overall"][
            "connected"
        ]
        for w in (900, DAY, 7 * DAY)
    ]
    assert connected == [4, 5, 6]
    scoped = compute_ratios(
        hebei_makers, None, window_s=DAY, as_of_ms=T0, kind="product", region="1303"
    )["overall"]
    assert (scoped["total"], scoped["connected"]) == (8, 5)
    # The region filter is the maker's region: nothing is made in Tangshan.
    tangshan = compute_ratios(
        hebei_makers, None, window_s=DAY, as_of_ms=T0, kind="product", region="1302"
    )["overall"]
    assert tangshan["total"] == 0


def test_equipment_numbers_are_unchanged_by_products(hebei_makers: Registry) -> None:
    for group_by in (None, *GROUPINGS):
        result = compute_ratios(hebei_makers, group_by, window_s=DAY, as_of_ms=T0)
        want = reference(group_by, window_s=DAY, as_of=T0)
        got = (
            {"all": _numbers({"groups": [result["overall"]]})["all"]}
            if group_by is None
            else (_numbers(result))
        )
        assert got == want, group_by
        assert result["kind"] == "equipment"


def test_products_are_listed_with_their_site(hebei_makers: Registry) -> None:
    total, items = hebei_makers.list_devices(kind="product", limit=100)
    assert total == 12
    cp01 = next(d for d in items if d["id"] == "cp-01")
    assert (cp01["kind"], cp01["region"], cp01["site_region"]) == ("product", "130302", "130203")
    assert hebei_makers.list_devices(kind="equipment")[0] == 50
    assert _device(hebei_makers, "hb-steel", "dev-01")["kind"] == "equipment"


def test_csv_table_carries_both_pairs(hebei_makers: Registry) -> None:
    rows = enterprise_category_table(hebei_makers, window_s=DAY, as_of_ms=T0)
    table = {(r["enterprise"], r["category"]): r for r in rows}
    comp = table[("hb-compressor", "general_power")]
    assert (comp["connected"], comp["total"]) == (0, 0)
    assert (comp["products_connected"], comp["products_total"]) == (5, 8)
    assert table[("hb-machine", "intelligent")]["products_total"] == 4
    assert sum(r["total"] for r in rows) == 50 and sum(r["connected"] for r in rows) == 25
    assert sum(r["products_total"] for r in rows) == 12
    assert sum(r["products_connected"] for r in rows) == 5


def test_snapshots_keep_both_kinds(hebei_makers: Registry) -> None:
    lines: list[str] = []
    snap = Snapshotter(hebei_makers, 3600, lines.extend, groupings=("city",))
    snap.snapshot_once(T0)
    from gateway.ratios import history_series

    rows = hebei_makers.snapshot_rows("city", T0, T0)
    equipment = {s["key"]: s["points"][0]["total"] for s in history_series(rows)}
    products = {s["key"]: s["points"][0] for s in history_series(rows, kind="product")}
    # Qinhuangdao has products only: no equipment series there.
    assert equipment == {"130100": 20, "130200": 10, "130600": 10, "130900": 10}
    assert {k: (p["total"], p["connected"]) for k, p in products.items()} == {
        "130100": (4, 0),
        "130300": (8, 5),
    }
    assert any(ln.startswith("product_connection_ratio,group_by=city,key=130300 ") for ln in lines)
    assert any(ln.startswith("connection_ratio,group_by=overall,key=all ") for ln in lines)
    overall = history_series(hebei_makers.snapshot_rows("overall", T0, T0), kind="product")
    assert overall[0]["points"][0]["total"] == 12


# ---------------------------------------------------------------------- on the cloud


def test_enterprises_on_the_cloud_per_city_with_targets(hebei_makers: Registry) -> None:
    targets = hebei_makers.target_map()
    r = compute_on_cloud(hebei_makers, "city", targets=targets, window_s=DAY, as_of_ms=T0)
    assert r["year"] == 2025 and r["min_connected_devices"] == 1
    # The five enterprises of the ledger each have equipment connected; hb-compressor has
    # only products (5 connected), hb-glass no devices: registered, not on the cloud.
    assert (r["overall"]["registered"], r["overall"]["on_cloud"]) == (7, 5)
    assert r["overall"]["ratio"] == 0.714286
    assert (r["overall"]["target"], r["overall"]["progress"]) == (None, None)
    assert _on_cloud(r) == {
        # Cement, machinery and Xinji glass; the every-year target 4 (2024's 3 is not used).
        "130100": (3, 2, 4, 0.5),
        "130200": (1, 1, None, None),
        "130300": (1, 0, 2, 0.0),
        "130500": (0, 0, 1, 0.0),  # a target, no enterprise registered yet
        "130600": (1, 1, None, None),
        "130900": (1, 1, None, None),
    }
    labels = {g["key"]: g["label"] for g in r["groups"]}
    assert labels["130500"] == "邢台市 Xingtai"


def test_enterprises_on_the_cloud_per_county_province_industry(hebei_makers: Registry) -> None:
    targets = hebei_makers.target_map()

    def by(group_by: str, **kw: Any) -> dict[str, tuple[int, int, int | None, float | None]]:
        return _on_cloud(
            compute_on_cloud(
                hebei_makers, group_by, targets=targets, window_s=DAY, as_of_ms=T0, **kw
            )
        )

    assert by("county") == {
        "130102": (1, 1, None, None),
        "130104": (1, 1, None, None),
        "130181": (1, 0, None, None),
        "130203": (1, 1, None, None),
        "130302": (1, 0, None, None),
        "130682": (1, 1, 1, 1.0),
        "130984": (1, 1, None, None),
    }
    assert by("province") == {"130000": (7, 5, 10, 0.5)}
    assert by("industry") == {
        "C26": (1, 1, None, None),
        "C30": (2, 1, None, None),
        "C31": (1, 1, None, None),
        "C34": (2, 1, None, None),
        "D44": (1, 1, None, None),
    }
    assert by("industry", industry="C3") == {
        "C30": (2, 1, None, None),
        "C31": (1, 1, None, None),
        "C34": (2, 1, None, None),
    }


def test_overall_target_follows_the_region_filter_and_the_year(hebei_makers: Registry) -> None:
    targets = hebei_makers.target_map()

    def overall(as_of: int, region: str) -> tuple[int, int, int | None, float | None]:
        o = compute_on_cloud(
            hebei_makers, None, targets=targets, window_s=DAY, as_of_ms=as_of, region=region
        )["overall"]
        return o["registered"], o["on_cloud"], o["target"], o["progress"]

    assert overall(T0, "13") == (7, 5, 10, 0.5)
    assert overall(T0, "1301") == (3, 2, 4, 0.5)
    assert overall(T0, "130682") == (1, 1, 1, 1.0)
    # A year earlier: the province's every-year target 8 and Shijiazhuang's 2024 target 3
    # (samples after as_of count as connected, as in the device ratio).
    assert overall(T0 - YEAR_MS, "130000") == (7, 5, 8, 0.625)
    assert overall(T0 - YEAR_MS, "1301") == (3, 2, 3, 0.666667)
    cities = compute_on_cloud(
        hebei_makers, "city", targets=targets, window_s=DAY, as_of_ms=T0 - YEAR_MS
    )
    # 2025-only targets do not apply in 2024, so Xingtai (no enterprise) is not listed.
    assert _on_cloud(cities)["130300"] == (1, 0, None, None)
    assert "130500" not in _on_cloud(cities)


def test_threshold_window_and_decommissioning(hebei_makers: Registry) -> None:
    targets = hebei_makers.target_map()

    def on(window_s: int, min_devices: int) -> int:
        r = compute_on_cloud(
            hebei_makers,
            None,
            targets=targets,
            window_s=window_s,
            as_of_ms=T0,
            min_devices=min_devices,
        )
        return int(r["overall"]["on_cloud"])

    # Each ledger enterprise has exactly 5 devices connected within 24 h, 4 within 15 min.
    assert [on(DAY, n) for n in (1, 5, 6)] == [5, 5, 0]
    assert [on(900, n) for n in (4, 5)] == [5, 0]
    # Within 7 days hb-machine has 5 (4, 9, 14, 19, 24) and the others 6.
    assert on(7 * DAY, 6) == 4
    for k in (1, 6, 11, 16, 21):  # hb-steel's connected devices
        hebei_makers.decommission("hb-steel", f"dev-{k:02d}")
    assert on(DAY, 1) == 4


# ---------------------------------------------------------------------- API


@pytest.fixture
def client(hebei_makers: Registry) -> Iterator[TestClient]:
    config = make_config()
    app = create_app(hebei_makers, config, clock=lambda: T0 / 1000)
    with TestClient(app) as c:
        yield c


def test_api_targets_and_on_cloud(client: TestClient) -> None:
    got = client.get("/api/v1/targets", headers=PLATFORM).json()["targets"]
    assert len(got) == 7 and got[0]["region"] == "130000"
    body = {"targets": [{"region": "130000", "year": 2025, "target": 20}]}
    assert client.put("/api/v1/targets", json=body, headers=PLATFORM).status_code == 403
    r = client.put("/api/v1/targets", json=body, headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["targets"] == [
        {
            "region": "130000",
            "region_label": "河北省 Hebei",
            "year": 2025,
            "target": 20,
            "updated_ms": T0,
        }
    ]
    r = client.get(
        "/api/v1/enterprises/on-cloud", params={"group_by": "province"}, headers=PLATFORM
    )
    assert r.status_code == 200
    g = r.json()["groups"][0]
    assert (g["key"], g["registered"], g["on_cloud"], g["target"], g["progress"]) == (
        "130000",
        7,
        5,
        20,
        0.25,
    )
    city = client.get(
        "/api/v1/enterprises/on-cloud",
        params={"group_by": "city", "region": "1301", "as_of": T0},
        headers=PLATFORM,
    ).json()
    assert [(x["key"], x["registered"], x["on_cloud"]) for x in city["groups"]] == [
        ("130100", 3, 2)
    ]
    assert city["groups"][0]["target"] is None  # the PUT replaced every target


def test_api_rejects_bad_targets_and_parameters(client: TestClient) -> None:
    bad = [
        ({"targets": [{"region": "990000", "target": 5}]}, "province code"),
        ({"targets": [{"region": "130000", "target": 0}]}, "greater than or equal to 1"),
        ({"targets": [{"region": "130000", "target": 5, "goal": 1}]}, "Extra inputs"),
        (
            {"targets": [{"region": "130100", "target": 5}, {"region": "130100", "target": 6}]},
            "repeats target 1",
        ),
    ]
    for body, message in bad:
        r = client.put("/api/v1/targets", json=body, headers=ADMIN)
        assert r.status_code == 422, body
        assert message in str(r.json()["detail"]), body
    assert len(client.get("/api/v1/targets", headers=PLATFORM).json()["targets"]) == 7
    r = client.get("/api/v1/enterprises/on-cloud", params={"group_by": "family"}, headers=PLATFORM)
    assert r.status_code == 422
    r = client.get("/api/v1/enterprises/on-cloud", params={"region": "13x"}, headers=PLATFORM)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "region"]
    r = client.get("/api/v1/ratios", params={"kind": "gadget"}, headers=PLATFORM)
    assert r.status_code == 422
    r = client.get("/api/v1/enterprises/on-cloud", params={"as_of": "9" * 15}, headers=PLATFORM)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "as_of"]


def test_api_ratios_csv_and_history_by_kind(client: TestClient, hebei_makers: Registry) -> None:
    products = client.get(
        "/api/v1/ratios", params={"kind": "product", "group_by": "city"}, headers=PLATFORM
    ).json()
    assert products["kind"] == "product"
    assert [(g["key"], g["total"], g["connected"]) for g in products["groups"]] == [
        ("130100", 4, 0),
        ("130300", 8, 5),
    ]
    assert client.get("/api/v1/ratios", headers=PLATFORM).json()["overall"]["total"] == 50
    r = client.get("/api/v1/reports/connection.csv", params={"as_of": T0}, headers=PLATFORM)
    rows = list(csv.reader(io.StringIO(r.content.decode("utf-8-sig"))))
    header = rows[0]
    assert header[7:] == [
        "联网设备总量 connected_devices",
        "企业设备总量 total_devices",
        "设备联网率 connection_ratio",
        "联网产品总量 connected_products",
        "生产产品总量 total_products",
        "产品联网率 product_connection_ratio",
    ]
    comp = next(row for row in rows[1:] if row[0] == "hb-compressor")
    assert comp[7:] == ["0", "0", "0.0000", "5", "8", "0.6250"]
    assert sum(int(row[11]) for row in rows[1:]) == 12
    Snapshotter(hebei_makers, 3600, lambda _l: None).snapshot_once(T0)
    hist = client.get(
        "/api/v1/ratios/history",
        params={"group_by": "overall", "kind": "product", "from": T0 - 1, "to": T0},
        headers=PLATFORM,
    ).json()
    assert hist["kind"] == "product"
    assert hist["series"][0]["points"][0]["connected"] == 5


def test_api_threshold_from_config_and_stated_in_the_docs(hebei_makers: Registry) -> None:
    config = GatewayConfig(api=make_config().api, on_cloud=OnCloudConfig(min_connected_devices=6))
    app = create_app(hebei_makers, config, clock=lambda: T0 / 1000)
    with TestClient(app) as c:
        r = c.get("/api/v1/enterprises/on-cloud", headers=PLATFORM).json()
        assert (r["min_connected_devices"], r["overall"]["on_cloud"]) == (6, 0)
        doc = c.get("/openapi.json").json()
    assert "at least 6 devices of production equipment connected" in doc["info"]["description"]
    assert "联网产品总量 / 生产产品总量" in doc["info"]["description"]
    assert "**on_cloud**" in doc["paths"]["/api/v1/enterprises/on-cloud"]["get"]["description"]


def test_api_registers_a_product_and_refuses_a_foreign_region(client: TestClient) -> None:
    dev = {"device_id": "cp-99", "enterprise": "hb-compressor", "family": "air_compressor"}
    r = client.post(
        "/api/v1/devices",
        json={**dev, "kind": "product", "site_region": "130203"},
        headers=ADMIN,
    )
    assert r.status_code == 201
    assert (r.json()["kind"], r.json()["region"], r.json()["site_region"]) == (
        "product",
        "130302",
        "130203",
    )
    r = client.post(
        "/api/v1/devices", json={**dev, "kind": "product", "region": "130203"}, headers=ADMIN
    )
    assert r.status_code == 422 and "maker's region" in r.json()["detail"][0]["msg"]
    assert r.json()["detail"][0]["loc"] == ["body", "region"]
    r = client.post("/api/v1/devices", json={**dev, "site_region": "130203"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "site_region"]


# ---------------------------------------------------------------------- ledger, births


def test_ledger_kind_and_site_region_checks() -> None:
    body = (
        b"device_id,enterprise,family,kind,site_region\n"
        b"p-1,hb-compressor,air_compressor,product,130203\n"
        b"p-2,hb-compressor,air_compressor,,\n"
        b"p-3,hb-compressor,air_compressor,gadget,\n"
        b"p-4,hb-compressor,air_compressor,equipment,130203\n"
        b"p-5,hb-compressor,air_compressor,product,99\n"
    )
    rows, errors = parse_ledger(body, "text/csv")
    assert [(r.device_id, r.kind, r.site_region) for _line, r in rows] == [
        ("p-1", "product", "130203"),
        ("p-2", "equipment", None),
    ]
    assert [(e.line, e.reason) for e in errors] == [
        (4, "kind 'gadget' must be one of equipment, product"),
        (5, "site_region is for products; equipment is counted where it is (region)"),
        (6, "site_region '99' must be a six-digit GB/T 2260 code such as 130102"),
    ]


def test_unknown_devices_in_a_birth_are_equipment(hebei_makers: Registry) -> None:
    agent = _fx.agent_of("hb-compressor")
    hebei_makers.on_birth(
        "hb-compressor",
        agent,
        Birth(bdseq=2, ts=T0, devices=[BirthDevice(id="cp-new", profile="p", protocol="modbus")]),
    )
    dev = hebei_makers.get_device("hb-compressor", "cp-new")
    assert dev is not None and (dev["kind"], dev["not_in_ledger"]) == ("equipment", True)
    # The ledger then says what it is.
    rows, _ = parse_ledger(
        b'[{"device_id": "cp-new", "enterprise": "hb-compressor", "family": "air_compressor",'
        b' "kind": "product"}]',
        "application/json",
    )
    assert hebei_makers.import_devices(rows).updated == 1
    hebei_makers.flush()
    assert _device(hebei_makers, "hb-compressor", "cp-new")["kind"] == "product"


def test_kinds_and_targets_survive_a_restart(hebei_makers: Registry) -> None:
    hebei_makers.close()
    again = Registry(hebei_makers.url, clock=lambda: T0 / 1000)
    try:
        assert again.list_devices(kind="product")[0] == 12
        assert _device(again, "hb-compressor", "cp-01")["site_region"] == "130203"
        assert again.target_map() == {(region, year or 0): n for region, year, n in _fx.TARGETS}
    finally:
        again.close()


def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    reg = Registry(url, clock=lambda: T0 / 1000)
    reg.add_enterprise("hb-steel", "Steel", "130203", "C31")
    rows, _ = parse_ledger(b"device_id,enterprise,family\nd-1,hb-steel,boiler\n", "text/csv")
    reg.import_devices(rows)
    reg.close()
    # Take the database back to schema version 1, as an older release left it.
    with sqlite3.connect(tmp_path / "old.db") as db:
        for table, col in [
            ("devices", "kind"),
            ("devices", "site_region"),
            ("ratio_snapshots", "products_total"),
            ("ratio_snapshots", "products_connected"),
            ("ratio_snapshots", "products_online"),
        ]:
            db.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
        db.execute("DROP TABLE targets")
        db.execute("DELETE FROM schema_version WHERE version > 1")
    reg = Registry(url, clock=lambda: T0 / 1000)
    try:
        assert _device(reg, "hb-steel", "d-1")["kind"] == "equipment"
        from gateway.registry import Target

        reg.replace_targets([Target("130200", None, 3)])
        assert reg.target_map() == {("130200", 0): 3}
    finally:
        reg.close()
    with sqlite3.connect(tmp_path / "old.db") as db:
        assert db.execute("SELECT max(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)


# ---------------------------------------------------------------------- targets file


def test_targets_files_yaml_and_csv(tmp_path: Path) -> None:
    yml = tmp_path / "targets.yaml"
    yml.write_text(
        "targets:\n  - {region: 130000, year: 2025, target: 100000}\n"
        "  - {region: '130100', target: 9000}\n",
        encoding="utf-8",
    )
    got = [(x.region, x.year, x.target) for x in read_targets_file(yml)]
    assert got == [("130000", 2025, 100000), ("130100", None, 9000)]
    table = tmp_path / "targets.csv"
    table.write_text("region,year,target\n130000,2025,100000\n130682,,300\n", encoding="utf-8")
    got = [(x.region, x.year, x.target) for x in read_targets_file(table)]
    assert got == [("130000", 2025, 100000), ("130682", None, 300)]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.yaml", "- {region: 130000, target: -1}\n", "target 1: target -1 must be"),
        ("t.yaml", "- {region: 130000, target: 5, year: 1990}\n", "year 1990 must be"),
        ("t.yaml", "- {region: 130000, target: 5, goal: 1}\n", "unknown field 'goal'"),
        ("t.yaml", "region: 130000\n", "expected a list of targets"),
        ("t.csv", "region,target\n130000,5\n130000,6\n", "target 2: region 130000 year any"),
        ("t.csv", "region,year\n130000,2025\n", "header must name region, target"),
        ("t.csv", "region,target\n1300,5\n", "target 1: region '1300' must be a six-digit"),
    ],
)
def test_targets_file_errors_name_the_file_and_entry(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TargetsError) as err:
        read_targets_file(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_gateway_refuses_to_start_with_a_bad_targets_file(tmp_path: Path) -> None:
    targets = tmp_path / "targets.csv"
    targets.write_text("region,target\n130000,many\n", encoding="utf-8")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\non_cloud:\n  targets_file: {targets}\n",
        encoding="utf-8",
    )
    iiot = str(Path(sys.executable).parent / "iiot")
    res = subprocess.run(
        [iiot, "gateway", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert f"on_cloud.targets_file: {targets}: target 1: target 'many'" in res.stderr
