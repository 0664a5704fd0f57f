"""A 50-device Hebei ledger and a reporting pattern, shared by registry/ratio/API tests.

Five enterprises in four cities (Dingzhou rolls up to Baoding by code prefix). Devices
0..29 report through their enterprise's agent at known times relative to ``T0``:

- 0..9    good sample at T0-5 s (fresh), 10..19 at T0-60 s, 20..24 at T0-2 h,
  25..28 at T0-30 h, 29 only errors at T0-5 s (never a good value);
- device states: online for 0..29 except 3 and 4 (offline);
- agent of ``hb-machine`` (devices k % 5 == 4) sent its will: offline.

``hebei_makers`` adds, on top of that and leaving its 50 devices as they are: products
(kind ``product``) and targets of enterprises on the cloud:

- ``hb-compressor`` (Qinhuangdao, C34; no production equipment in the ledger) made
  compressors cp-00..cp-07, installed at customers' sites (``site_region``); its own
  agent reports them: cp-00..cp-03 good at T0-5 s (online), cp-04 at T0-2 h, cp-05 at
  T0-30 h; cp-06, cp-07 never;
- ``hb-machine`` made CNC machines mp-00..mp-03, none of them connected;
- ``hb-glass`` (Xinji 130181, which rolls up to Shijiazhuang by prefix) has no devices;
- targets: ``TARGETS`` (T0 is in 2025, China Standard Time).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.registry import Registry, parse_ledger
from gateway.registry.codes import FAMILY_CATEGORY
from gateway.sink import SampleSummary
from iiot_common.localservers import PostgreSQL
from protocols.mqtt.contract import Birth, BirthDevice, DeviceState, Will

T0 = 1_750_000_000_000
POLL_S = 10.0

ENTERPRISES = [
    # id, name, region (county), industry
    ("hb-cement", "冀东水泥 Jidong Cement", "130102", "C30"),
    ("hb-steel", "唐山钢铁 Tangshan Steel", "130203", "C31"),
    ("hb-power", "定州电厂 Dingzhou Power", "130682", "D44"),
    ("hb-chem", "沧州化工 Cangzhou Chemicals", "130984", "C26"),
    ("hb-machine", "石家庄机械 Shijiazhuang Machinery", "130104", "C34"),
]
FAMILIES = [
    "kiln",
    "boiler",
    "air_compressor",
    "motor",
    "pv_inverter",
    "wind_turbine",
    "cnc_machine",
    "diesel_genset",
]


def device_rows() -> list[dict[str, Any]]:
    rows = []
    for k in range(50):
        ent, _name, region, industry = ENTERPRISES[k % 5]
        family = FAMILIES[k % 8]
        rows.append(
            {
                "k": k,
                "device_id": f"dev-{k:02d}",
                "enterprise": ent,
                "region": region,
                "industry": industry,
                "family": family,
                "category": FAMILY_CATEGORY[family],
                "name": f"设备 {k}",
            }
        )
    return rows


def ledger_csv() -> bytes:
    lines = ["device_id,enterprise,region,industry,family,category,name"]
    for r in device_rows():
        lines.append(
            ",".join(
                r[c]
                for c in ("device_id", "enterprise", "region", "industry", "family", "category")
            )
            + f",{r['name']}"
        )
    return ("\n".join(lines) + "\n").encode()


def good_ts(k: int) -> int | None:
    if k < 10:
        return T0 - 5_000
    if k < 20:
        return T0 - 60_000
    if k < 25:
        return T0 - 2 * 3600_000
    if k < 29:
        return T0 - 30 * 3600_000
    return None


def last_ts(k: int) -> int | None:
    return T0 - 5_000 if k == 29 else good_ts(k)


def agent_of(ent: str) -> str:
    return f"agent-{ent}"


def populate(reg: Registry) -> None:
    for ent, name, region, industry in ENTERPRISES:
        reg.add_enterprise(ent, name, region, industry)
        reg.add_agent(ent, agent_of(ent), None)
    rows, errors = parse_ledger(ledger_csv(), "text/csv")
    assert errors == []
    result = reg.import_devices(rows)
    assert (result.accepted, result.created) == (50, 50)
    by_ent: dict[str, list[dict[str, Any]]] = {}
    for r in device_rows():
        if r["k"] < 30:
            by_ent.setdefault(r["enterprise"], []).append(r)
    for ent, rows_ in by_ent.items():
        reg.on_birth(
            ent,
            agent_of(ent),
            Birth(
                bdseq=1,
                ts=T0 - 40 * 3600_000,
                devices=[
                    BirthDevice(id=r["device_id"], profile="generic", protocol="modbus")
                    for r in rows_
                ],
            ),
        )
    for r in device_rows():
        k = r["k"]
        if k >= 30:
            continue
        ent = r["enterprise"]
        reg.on_device_state(
            ent,
            agent_of(ent),
            r["device_id"],
            DeviceState(online=k not in (3, 4), ts=T0 - 40 * 3600_000, reason=""),
        )
        lt = last_ts(k)
        assert lt is not None
        reg.on_samples(
            SampleSummary(
                ent,
                agent_of(ent),
                r["device_id"],
                count=1,
                first_ts=lt,
                last_ts=lt,
                last_good_ts=good_ts(k),
                latest={"temperature": 20.0 + k} if good_ts(k) else {},
            )
        )
    reg.on_will("hb-machine", agent_of("hb-machine"), Will(bdseq=1))


MAKERS = [
    ("hb-compressor", "秦皇岛压缩机 Qinhuangdao Compressors", "130302", "C34"),
    ("hb-glass", "辛集玻璃 Xinji Glass", "130181", "C30"),
]
# device id, maker, family, site_region, good sample (ms before T0; None: never)
PRODUCTS: list[tuple[str, str, str, str | None, int | None]] = [
    ("cp-00", "hb-compressor", "air_compressor", "130102", 5_000),
    ("cp-01", "hb-compressor", "air_compressor", "130203", 5_000),
    ("cp-02", "hb-compressor", "air_compressor", "130682", 5_000),
    ("cp-03", "hb-compressor", "air_compressor", "130302", 5_000),
    ("cp-04", "hb-compressor", "air_compressor", "130984", 2 * 3600_000),
    ("cp-05", "hb-compressor", "air_compressor", "130203", 30 * 3600_000),
    ("cp-06", "hb-compressor", "air_compressor", None, None),
    ("cp-07", "hb-compressor", "air_compressor", "130102", None),
    ("mp-00", "hb-machine", "cnc_machine", "130984", None),
    ("mp-01", "hb-machine", "cnc_machine", None, None),
    ("mp-02", "hb-machine", "cnc_machine", "130302", None),
    ("mp-03", "hb-machine", "cnc_machine", None, None),
]
# region, year (None: every year), target of enterprises on the cloud
TARGETS: list[tuple[str, int | None, int]] = [
    ("130000", 2025, 10),
    ("130000", None, 8),
    ("130100", None, 4),
    ("130100", 2024, 3),
    ("130300", 2025, 2),
    ("130500", 2025, 1),
    ("130682", 2025, 1),
]


def products_json() -> bytes:
    """The products as a JSON ledger (kind and site_region columns)."""
    rows = []
    for dev, maker, family, site, _ago in PRODUCTS:
        row: dict[str, Any] = {"device_id": dev, "enterprise": maker, "family": family}
        row["kind"] = "product"
        if site is not None:
            row["site_region"] = site
        rows.append(row)
    return json.dumps(rows).encode()


def populate_makers(reg: Registry) -> None:
    """Add ``MAKERS``, ``PRODUCTS`` (and their reports) and ``TARGETS`` to ``hebei``."""
    from gateway.registry import Target

    for ent, name, region, industry in MAKERS:
        reg.add_enterprise(ent, name, region, industry)
    reg.add_agent("hb-compressor", agent_of("hb-compressor"), None)
    rows, errors = parse_ledger(products_json(), "application/json")
    assert errors == []
    assert reg.import_devices(rows).created == len(PRODUCTS)
    reporting = [p for p in PRODUCTS if p[4] is not None]
    agent = agent_of("hb-compressor")
    reg.on_birth(
        "hb-compressor",
        agent,
        Birth(
            bdseq=1,
            ts=T0 - 40 * 3600_000,
            devices=[BirthDevice(id=p[0], profile="generic", protocol="modbus") for p in reporting],
        ),
    )
    for dev, maker, _family, _site, ago in reporting:
        assert ago is not None
        reg.on_device_state(maker, agent, dev, DeviceState(online=True, ts=T0 - 40 * 3600_000))
        reg.on_samples(
            SampleSummary(
                maker,
                agent,
                dev,
                count=1,
                first_ts=T0 - ago,
                last_ts=T0 - ago,
                last_good_ts=T0 - ago,
                latest={"pressure": 7.5},
            )
        )
    reg.replace_targets([Target(region, year, n) for region, year, n in TARGETS])


def reference(
    group_by: str | None,
    *,
    window_s: int,
    as_of: int,
    decommissioned: frozenset[int] = frozenset(),
    enterprise: str | None = None,
    region: str | None = None,
    industry: str | None = None,
    category: str | None = None,
) -> dict[str, tuple[int, int, int]]:
    """Plain-Python reading of the definitions: key -> (total, connected, online)."""
    out: dict[str, list[int]] = {}
    for r in device_rows():
        k = r["k"]
        if k in decommissioned:
            continue
        if enterprise and r["enterprise"] != enterprise:
            continue
        if region and not r["region"].startswith(
            region.rstrip("0") if len(region) == 6 else region
        ):
            continue
        if industry and not r["industry"].startswith(industry):
            continue
        if category and r["category"] != category:
            continue
        g, lt = good_ts(k), last_ts(k)
        connected = g is not None and g > as_of - window_s * 1000
        alive = k < 30 and r["enterprise"] != "hb-machine"
        online = alive and k not in (3, 4) and lt is not None and lt >= as_of - 3 * POLL_S * 1000
        key = {
            None: "all",
            "enterprise": r["enterprise"],
            "province": r["region"][:2] + "0000",
            "city": r["region"][:4] + "00",
            "county": r["region"],
            "industry": r["industry"][:3],
            "category": r["category"],
            "family": r["family"],
        }[group_by]
        acc = out.setdefault(key, [0, 0, 0])
        acc[0] += 1
        acc[1] += int(connected)
        acc[2] += int(online)
    return {key: (v[0], v[1], v[2]) for key, v in out.items()}


@pytest.fixture(name="registry_url", params=["sqlite", "postgresql"])
def both_registry_urls(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry's database, once SQLite and once an empty database on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server: PostgreSQL = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    reg = Registry(
        registry_url,
        default_poll_interval=POLL_S,
        clock=lambda: T0 / 1000,
    )
    reg.start()
    yield reg
    reg.close()


@pytest.fixture
def hebei(registry: Registry) -> Registry:
    populate(registry)
    return registry


@pytest.fixture
def hebei_makers(hebei: Registry) -> Registry:
    populate_makers(hebei)
    return hebei
