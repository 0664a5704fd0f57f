"""Reconciliation, the data-quality gate, graded evaluation, report verification and the
exports, through the API over a real registry (SQLite, or PostgreSQL where configured)."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.api import create_app
from gateway.control.store import ControlStore
from gateway.provincial import RubricError, default_rubric, load_rubric
from gateway.quality import PointValue, QualityWindow
from gateway.ratios import Snapshotter
from gateway.registry import Registry, parse_ledger
from gateway.sink import SampleSummary
from protocols.mqtt.contract import Birth, BirthDevice
from protocols.mqtt.control import ConfigReport
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import PLATFORM, make_config
from tests.gateway.test_registry_fixtures import T0

HOUR = 3600_000
MINUTE = 60_000

registry = _fx.registry
hebei = _fx.hebei


def _client(reg: Registry) -> TestClient:
    return TestClient(create_app(reg, make_config(), clock=lambda: T0 / 1000))


def _import(reg: Registry, text: str) -> None:
    rows, errors = parse_ledger(text.encode(), "text/csv")
    assert errors == []
    result = reg.import_devices(rows)
    assert result.errors == []


def _report(reg: Registry, ent: str, dev: str, ts: int, values: dict[str, PointValue]) -> None:
    reg.on_samples(
        SampleSummary(
            ent,
            f"agent-{ent}",
            dev,
            count=1,
            first_ts=ts,
            last_ts=ts,
            last_good_ts=ts,
            latest=values,
        )
    )


# -- reconciliation ---------------------------------------------------------------------


@pytest.fixture
def ledger_cases(registry: Registry) -> Registry:
    """One case of each kind, and devices that are fine."""
    registry.add_enterprise("e-a", "甲厂 Plant A", "130102", "C30")
    registry.add_enterprise("e-b", "乙厂 Plant B", "130203", "C31")
    registry.add_agent("e-a", "agent-e-a", None)
    _import(
        registry,
        "device_id,enterprise,family,serial\n"
        "ok-1,e-a,kiln,S-100\n"  # fine: reports now, its own serial
        "dup-1,e-a,boiler,S-777\n"  # the same serial as dup-9 of e-b
        "dup-9,e-b,boiler,S-777\n"
        "never-1,e-a,motor,\n"  # in the ledger, never seen
        "stale-1,e-a,motor,S-200\n"  # seen 30 h ago
        "gone-1,e-a,motor,\n",  # decommissioned, never seen: not a finding
    )
    registry.decommission("e-a", "gone-1")
    registry.on_birth(
        "e-a",
        "agent-e-a",
        Birth(
            bdseq=1,
            ts=T0 - HOUR,
            devices=[
                BirthDevice(id=d, profile="generic", protocol="modbus")
                for d in ("ok-1", "dup-1", "stale-1", "extra-7")
            ],
        ),
    )
    _report(registry, "e-a", "ok-1", T0 - MINUTE, {"t": 1.0})
    _report(registry, "e-a", "dup-1", T0 - MINUTE, {"t": 1.0})
    _report(registry, "e-a", "extra-7", T0 - MINUTE, {"t": 1.0})
    _report(registry, "e-a", "stale-1", T0 - 30 * HOUR, {"t": 1.0})
    _report(registry, "e-b", "dup-9", T0 - MINUTE, {"t": 1.0})
    return registry


def test_reconciliation_lists_one_case_of_each_kind(ledger_cases: Registry) -> None:
    with _client(ledger_cases) as client:
        body = client.get("/api/v1/reconciliation?window=24h", headers=PLATFORM).json()
        ids = {k: [d["device_id"] for d in body[k]] for k in ("not_in_ledger", "never_seen")}
        assert ids == {"not_in_ledger": ["extra-7"], "never_seen": ["never-1"]}
        assert [d["device_id"] for d in body["not_seen_in_window"]] == ["stale-1"]
        assert body["not_seen_in_window"][0]["last_seen_ms"] == T0 - 30 * HOUR
        assert body["duplicate_serials"] == [
            {
                "serial": "S-777",
                "claims": [
                    {"enterprise": "e-a", "enterprise_name": "甲厂 Plant A", "device_id": "dup-1"},
                    {"enterprise": "e-b", "enterprise_name": "乙厂 Plant B", "device_id": "dup-9"},
                ],
            }
        ]
        # With a window of 2 days the device seen 30 h ago is no longer a finding.
        wider = client.get("/api/v1/reconciliation?window=2d", headers=PLATFORM).json()
        assert wider["counts"]["not_seen_in_window"] == 0
        text = client.get("/api/v1/reports/reconciliation.csv", headers=PLATFORM).text
        rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
        assert rows[1][0] == "问题 issue"
        issues = sorted((r[0].split(" ")[0], r[3]) for r in rows[2:])
        assert issues == [
            ("从未上报", "never-1"),
            ("序列号重复", "dup-1"),
            ("序列号重复", "dup-9"),
            ("未入台账", "extra-7"),
            ("窗口内未上报", "stale-1"),
        ]


def test_a_serial_removed_from_the_ledger_is_no_longer_claimed(ledger_cases: Registry) -> None:
    _import(ledger_cases, "device_id,enterprise,family,serial\ndup-9,e-b,boiler,\n")
    with _client(ledger_cases) as client:
        body = client.get("/api/v1/reconciliation", headers=PLATFORM).json()
    assert body["duplicate_serials"] == []


def test_a_bad_serial_names_the_row() -> None:
    _rows, errors = parse_ledger(
        b"device_id,enterprise,family,serial\nx-1,e-a,kiln," + b"9" * 65 + b"\n", "text/csv"
    )
    assert [(e.line, e.reason) for e in errors] == [(2, "serial is longer than 64 characters")]


# -- the quality gate and the grades ----------------------------------------------------


def _feed(reg: Registry, ent: str, dev: str, *, every_min: int, frozen: bool = False) -> None:
    """An hour of messages at ``every_min`` minutes; values vary unless ``frozen``."""
    for m in range(0, 60, every_min):
        ts = T0 - HOUR + (m + 1) * MINUTE - 1000
        _report(reg, ent, dev, ts, {"v": 1.0 if frozen else float(m)})


@pytest.fixture
def graded(registry: Registry) -> Registry:
    """Enterprises with known grades. Polls every 60 s; the gateway watched the last hour,
    so 60 samples are expected and the gate (0.8) needs 48."""
    registry.set_quality(QualityWindow(poll_interval_s=60, clock=lambda: (T0 - HOUR) / 1000))
    ents = {"g-none": "130102", "g-l1": "130102", "g-l1b": "130104", "g-l2": "130203"}
    ents |= {"g-l3": "130203", "g-l4": "130682"}
    for ent, region in ents.items():
        registry.add_enterprise(ent, f"企业 {ent}", region, "C30")
        registry.add_agent(ent, f"agent-{ent}", None)
    lines = ["device_id,enterprise,family"]
    layout = {
        "g-none": ["kiln", "motor"],
        "g-l1": ["kiln", "kiln", "kiln", "motor"],
        "g-l1b": ["kiln"] * 4 + ["motor"],
        "g-l2": ["kiln", "motor"],
        "g-l3": ["kiln", "motor"],
        "g-l4": ["kiln", "motor"],
    }
    for ent, fams in layout.items():
        lines += [f"{ent}-{i},{ent},{fam}" for i, fam in enumerate(fams)]
    _import(registry, "\n".join(lines) + "\n")
    # g-l1: 1 of 4 connected (ratio 0.25).
    _feed(registry, "g-l1", "g-l1-0", every_min=1)
    # g-l1b: 4 of 5 connected and at the gate (0.8), but its motor is not: no L2, so no L3.
    for i in range(4):
        _feed(registry, "g-l1b", f"g-l1b-{i}", every_min=1)
    # g-l2: both connected, one sparse (6 of 60) and one frozen: neither passes the gate.
    _feed(registry, "g-l2", "g-l2-0", every_min=10)
    _feed(registry, "g-l2", "g-l2-1", every_min=1, frozen=True)
    # g-l3 and g-l4: both devices complete and varying; g-l4 also had a config applied.
    for ent in ("g-l3", "g-l4"):
        for i in range(2):
            _feed(registry, ent, f"{ent}-{i}", every_min=1)
    report = ConfigReport(version=2, applied=True, running_version=2, ts=T0 - HOUR)
    ControlStore(registry.engine).save_report("g-l4", "agent-g-l4", report, T0 - HOUR)
    return registry


def test_the_quality_gate_leaves_out_sparse_and_frozen_devices(graded: Registry) -> None:
    with _client(graded) as client:
        body = client.get("/api/v1/ratios?enterprise=g-l2", headers=PLATFORM).json()
        assert body["overall"]["connected"] == 2
        assert body["overall"]["quality_connected"] == 0
        good = client.get("/api/v1/ratios?enterprise=g-l3", headers=PLATFORM).json()
        assert (good["overall"]["connected"], good["overall"]["quality_connected"]) == (2, 2)
        assert good["overall"]["quality_ratio"] == 1.0
        sparse = client.get("/api/v1/devices/g-l2/g-l2-0/telemetry", headers=PLATFORM).json()
        assert sparse["quality"] == {
            "samples": 6,
            "expected": 60,
            "complete": False,
            "frozen": False,
            "passes": False,
        }
        frozen = client.get("/api/v1/devices/g-l2/g-l2-1/telemetry", headers=PLATFORM).json()
        assert frozen["quality"]["frozen"] is True and frozen["quality"]["complete"] is True
        assert len(frozen["points"]) == 60 and frozen["points"][-1]["values"] == {"v": 1.0}
        doc = client.get("/openapi.json").json()["info"]["description"]
        assert "**quality_connected**" in doc and "frozen" in doc


def test_every_grade_of_the_default_rubric(graded: Registry) -> None:
    with _client(graded) as client:
        body = client.get("/api/v1/grades", headers=PLATFORM).json()
        grades = {it["enterprise"]: it["grade"] for it in body["items"]}
        assert grades == {
            "g-none": None,
            "g-l1": "L1",
            "g-l1b": "L1",
            "g-l2": "L2",
            "g-l3": "L3",
            "g-l4": "L4",
        }
        assert body["counts"] == {"L1": 2, "L2": 1, "L3": 1, "L4": 1, "none": 1}
        by_ent = {it["enterprise"]: it for it in body["items"]}
        l2 = by_ent["g-l1b"]["levels"][1]["evidence"]
        assert [e["criterion"] for e in l2] == ["min_ratio", "all_categories"]
        assert l2[0]["met"] is True and l2[1] == {
            "criterion": "all_categories",
            "required": ["general_power", "high_energy_process"],
            "actual": ["high_energy_process"],
            "missing": ["general_power"],
            "met": False,
        }
        # Its quality share meets L3's number, but a grade needs every level below too.
        assert by_ent["g-l1b"]["levels"][2]["met"] is True
        l4 = by_ent["g-l4"]["levels"][3]["evidence"][0]
        assert l4["actual"] == {"configs_applied": 1, "writes_ok": 0} and l4["met"] is True
        scoped = client.get("/api/v1/grades?region=1302", headers=PLATFORM).json()
        assert [it["enterprise"] for it in scoped["items"]] == ["g-l2", "g-l3"]
        text = client.get("/api/v1/reports/grades.csv", headers=PLATFORM).text
        rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
        assert rows[1][4] == "等级 grade"
        assert {r[0]: r[4] for r in rows[2:]}["g-none"] == "—"


def test_a_rubric_file_with_a_typo_is_refused_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "rubric.yaml"
    bad.write_text("levels:\n  - level: L1\n    min_conected: 1\n", encoding="utf-8")
    with pytest.raises(RubricError, match=r"rubric\.yaml: levels\.0\.min_conected: unknown key"):
        load_rubric(bad)
    assert [lv.level for lv in default_rubric().levels] == ["L1", "L2", "L3", "L4"]


# -- verification -----------------------------------------------------------------------


def test_a_stored_report_is_verified_and_a_changed_registry_is_named(hebei: Registry) -> None:
    Snapshotter(hebei, 3600, lambda _lines: None).snapshot_once(T0 - HOUR)
    with _client(hebei) as client:
        same = client.get(f"/api/v1/reports/verify?as_of={T0}", headers=PLATFORM).json()
        assert same["snapshot_ts"] == T0 - HOUR
        assert same["reproducible"] is True and same["registry_unchanged"] is True
        assert same["differences"] == []
        assert re.fullmatch(r"[0-9a-f]{16}", same["definitions_version"])
        # The ledger grows by one device after the snapshot: the report still stands, on
        # its evidence, and the change is named.
        _import(hebei, "device_id,enterprise,family\nlate-1,hb-steel,kiln\n")
        changed = client.get(f"/api/v1/reports/verify?as_of={T0}", headers=PLATFORM).json()
        assert changed["reproducible"] is True and changed["registry_unchanged"] is False
        assert changed["registry_version"] == same["registry_version"]
        assert changed["differences"] == []
        assert changed["registry_changes"]["counts"]["added"] == 1
        assert changed["registry_changes"]["examples"]["added"] == [
            {"enterprise": "hb-steel", "device_id": "late-1"}
        ]
        early = client.get(f"/api/v1/reports/verify?as_of={T0 - 2 * HOUR}", headers=PLATFORM)
        assert early.status_code == 404


# -- exports ----------------------------------------------------------------------------


def _xlsx_strings(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        xml = z.read("xl/sharedStrings.xml").decode("utf-8")
    return re.findall(r"<t[^>]*>([^<]*)</t>", xml)


@pytest.fixture
def client(hebei: Registry) -> Iterator[TestClient]:
    with _client(hebei) as c:
        yield c


def test_each_view_exports_as_csv_and_excel_with_its_filters(client: TestClient) -> None:
    r = client.get("/api/v1/reports/ratios.csv?group_by=county&region=1301", headers=PLATFORM)
    rows = list(csv.reader(io.StringIO(r.text.lstrip("\ufeff"))))
    assert "region=1301" in rows[0][0] and "group_by=county" in rows[0][0]
    assert rows[1][:3] == ["分组 key", "名称 label", "联网设备 connected"]
    assert all(row[0].startswith("1301") for row in rows[2:-1]) and rows[-1][0] == "all"
    x = client.get("/api/v1/reports/ratios.xlsx?group_by=city", headers=PLATFORM)
    assert x.headers["content-type"].startswith("application/vnd.openxmlformats")
    strings = _xlsx_strings(x.content)
    assert "石家庄市 Shijiazhuang" in strings and "联网率 ratio" in strings
    conn = client.get("/api/v1/reports/connection.xlsx?industry=C31", headers=PLATFORM)
    strings = _xlsx_strings(conn.content)
    assert "联网设备总量 connected_devices" in strings
    assert "hb-steel" in strings and "hb-cement" not in strings
    for name in ("reconciliation", "grades"):
        assert client.get(f"/api/v1/reports/{name}.xlsx", headers=PLATFORM).status_code == 200
    assert client.get("/api/v1/reports/nothing.xlsx", headers=PLATFORM).status_code == 422
    assert client.get("/api/v1/reports/ratios.xlsx?region=1x", headers=PLATFORM).status_code == 422
    assert client.get("/api/v1/reports/ratios.xlsx").status_code == 401


def test_the_window_keeps_a_bounded_number_of_messages_and_states() -> None:
    window = QualityWindow(points=50, poll_interval_s=10, clock=lambda: (T0 - 2 * HOUR) / 1000)
    for k in range(500):
        ts = T0 - 2 * HOUR + k * 10_000
        summary = SampleSummary(
            "e", "a", "d", count=1, first_ts=ts, last_ts=ts, last_good_ts=ts, latest={"v": k}
        )
        window.record(summary)
        window.record_state(("e", "d"), ts, k % 2 == 0, "" if k % 2 == 0 else "timeout")
    points = window.telemetry(("e", "d"), 0)
    assert len(points) == 50 and points[-1]["values"] == {"v": 499}
    states = window.states(("e", "d"))
    assert len(states) == 50 and states[0] == {
        "ts": T0 - 2 * HOUR + 499 * 10_000,
        "online": False,
        "reason": "timeout",
    }
    # 500 samples at 10 s over the 2 h watched: 720 expected, 0.8 needs 576.
    assert window.judge(("e", "d"), T0, 86400_000)["expected"] == 720
    assert window.judge(("e", "d"), T0, 86400_000)["complete"] is False
