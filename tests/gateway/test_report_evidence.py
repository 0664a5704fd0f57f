"""A stored ratio report is verified from the evidence kept with it, after the registry
has changed: through the API over a real registry, on SQLite and on PostgreSQL."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from gateway.evidence import EvidenceError, compress, decode, decompress, encode
from gateway.ratios import GROUPINGS, Snapshotter, compute_ratios
from gateway.registry import Registry
from gateway.registry.provincial import snapshot_audit, snapshot_evidence
from gateway.registry.tables import ratio_snapshots
from gateway.sink import SampleSummary
from protocols.mqtt.contract import Will
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import PLATFORM
from tests.gateway.test_provincial import _client, _import
from tests.gateway.test_registry_fixtures import T0

HOUR = 3600_000
DAY = 24 * HOUR
MINUTE = 60_000

# Fixtures shared with the other registry/API tests; these run on SQLite and PostgreSQL.
registry_url = _fx.both_registry_urls
registry = _fx.registry
hebei = _fx.hebei


def _good_sample(reg: Registry, ent: str, dev: str, ts: int) -> None:
    reg.on_samples(
        SampleSummary(
            ent, f"agent-{ent}", dev, count=1, first_ts=ts, last_ts=ts, last_good_ts=ts, latest={}
        )
    )


def _verify(client: TestClient, as_of: int) -> dict[str, Any]:
    response = client.get(f"/api/v1/reports/verify?as_of={as_of}", headers=PLATFORM)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _devices_csv(client: TestClient, path: str) -> list[list[str]]:
    response = client.get(path, headers=PLATFORM)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.reader(io.StringIO(response.text.lstrip("\ufeff"))))


def _change_the_registry(reg: Registry) -> None:
    """After the snapshot at T0: two ledger devices added, one regrouped, a silent one
    reporting again, a connected one falling silent (its agent's will) and one
    decommissioned."""
    _import(
        reg,
        "device_id,enterprise,family\nlate-1,hb-steel,kiln\nlate-2,hb-cement,boiler\n",
    )
    # dev-05 (hb-cement, Shijiazhuang, a wind turbine) moves to Tangshan and becomes a motor.
    _import(reg, "device_id,enterprise,region,family\ndev-05,hb-cement,130203,motor\n")
    # dev-25 last sent a good value 30 h before T0: not connected at T0. It reports again.
    _good_sample(reg, "hb-cement", "dev-25", T0 + 10 * MINUTE)
    # hb-steel's agent (dev-01, dev-06, ... connected and online at T0) dies.
    reg.on_will("hb-steel", "agent-hb-steel", Will(bdseq=1))
    reg.decommission("hb-chem", "dev-03")


@pytest.fixture
def snapped(hebei: Registry) -> Registry:
    Snapshotter(hebei, 3600, lambda _lines: None).snapshot_once(T0)
    return hebei


def test_a_report_recomputed_after_the_registry_changed_gives_its_numbers(
    snapped: Registry,
) -> None:
    stored = {r.key: r for r in snapped.snapshot_rows("city", T0, T0)}
    with _client(snapped) as client:
        before = _verify(client, T0 + 30 * MINUTE)
        assert before["snapshot_ts"] == T0
        assert before["evidence"]["status"] == "kept" and before["evidence"]["intact"] is True
        assert before["evidence"]["devices"] == 50
        every_row = sum(len(snapped.snapshot_rows(g, T0, T0)) for g in ("overall", *GROUPINGS))
        assert before["rows_compared"] == every_row > 20
        assert before["reproducible"] is True and before["registry_unchanged"] is True
        assert set(before["registry_changes"]["counts"].values()) == {0}

        _change_the_registry(snapped)
        # Counting the registry as it is now for the same as_of gives other numbers ...
        live = compute_ratios(snapped, "city", window_s=86400, as_of_ms=T0)
        live_by_key = {g["key"]: g for g in live["groups"]}
        assert live["overall"]["total"] == 51  # 50 + 2 added - 1 decommissioned
        assert live_by_key["130200"]["total"] != stored["130200"].total  # dev-05 moved
        cement = compute_ratios(snapped, None, window_s=86400, as_of_ms=T0, enterprise="hb-cement")
        stored_cement = snapped.snapshot_rows("enterprise", T0, T0, key="hb-cement")[0]
        assert cement["overall"]["connected"] == stored_cement.connected + 1  # dev-25
        steel = compute_ratios(snapped, None, window_s=86400, as_of_ms=T0, enterprise="hb-steel")
        stored_steel = snapped.snapshot_rows("enterprise", T0, T0, key="hb-steel")[0]
        assert stored_steel.online > 0 and steel["overall"]["online"] == 0  # its agent died
        # ... but the stored report, counted from its evidence, gives its own.
        after = _verify(client, T0 + 30 * MINUTE)
        assert after["differences"] == []
        assert after["reproducible"] is True and after["evidence"]["intact"] is True
        assert after["registry_version"] == before["registry_version"]
        assert after["registry_unchanged"] is False
        changes = after["registry_changes"]
        assert changes["counts"] == {
            "added": 2,
            "removed": 0,
            "regrouped": 1,
            "decommissioned_changed": 1,
            "connection_changed": 0,  # dev-25 counts as connected now by reporting since
            "reported_since": 1,
        }
        examples = changes["examples"]
        assert examples["added"] == [
            {"enterprise": "hb-cement", "device_id": "late-2"},
            {"enterprise": "hb-steel", "device_id": "late-1"},
        ]
        assert examples["regrouped"] == [{"enterprise": "hb-cement", "device_id": "dev-05"}]
        assert examples["reported_since"] == [{"enterprise": "hb-cement", "device_id": "dev-25"}]
        assert examples["decommissioned_changed"] == [
            {"enterprise": "hb-chem", "device_id": "dev-03"}
        ]


def test_a_device_that_only_reported_since_leaves_the_registry_unchanged(
    snapped: Registry,
) -> None:
    _good_sample(snapped, "hb-cement", "dev-25", T0 + 10 * MINUTE)
    with _client(snapped) as client:
        after = _verify(client, T0 + 30 * MINUTE)
    assert after["reproducible"] is True and after["registry_unchanged"] is True
    counts = after["registry_changes"]["counts"]
    assert counts["reported_since"] == 1 and counts["connection_changed"] == 0


def test_a_tampered_row_makes_the_report_irreproducible_naming_it(snapped: Registry) -> None:
    c = ratio_snapshots.c
    row = next(r for r in snapped.snapshot_rows("city", T0, T0) if r.key == "130100")
    with snapped.engine.begin() as conn:
        conn.execute(
            ratio_snapshots.update()
            .where(c.ts_ms == T0, c.group_by == "city", c.key == "130100")
            .values(connected=row.connected + 1)
        )
    with _client(snapped) as client:
        body = _verify(client, T0)
    assert body["reproducible"] is False and body["evidence"]["intact"] is True
    assert body["differences"] == [
        {
            "group_by": "city",
            "key": "130100",
            "field": "connected",
            "stored": row.connected + 1,
            "recomputed": row.connected,
        }
    ]


def test_tampered_evidence_fails_its_integrity_check(snapped: Registry) -> None:
    e = snapshot_evidence.c
    stored = snapped.snapshot_evidence(T0)
    assert stored is not None
    ev = decode(decompress(bytes(stored["data"]), stored["encoding"]))
    # Mark every device decommissioned and repeat one, well-formed but not what was counted.
    ev.decommissioned[:] = True
    ev = dataclasses.replace(ev, devices=(ev.devices[0], *ev.devices[:1], *ev.devices[2:]))
    forged = compress(encode(ev), stored["encoding"])
    with snapped.engine.begin() as conn:
        conn.execute(snapshot_evidence.update().where(e.ts_ms == T0).values(data=forged))
    with _client(snapped) as client:
        body = _verify(client, T0)
        assert body["evidence"]["intact"] is False and body["reproducible"] is False
        assert body["evidence"]["registry_version_recomputed"] != body["registry_version"]
        assert body["registry_changes"]["counts"]["removed"] == 1  # the repeated one
        overall = [d for d in body["differences"] if d["group_by"] == "overall"]
        assert {"field": "total", "stored": 50, "recomputed": 0}.items() <= overall[0].items()
        # A region that is not a code cannot be counted at all.
        ev.values["region"] = ("13010x", *ev.values["region"][1:])
        uncountable = compress(encode(ev), stored["encoding"])
        with snapped.engine.begin() as conn:
            conn.execute(snapshot_evidence.update().where(e.ts_ms == T0).values(data=uncountable))
        odd = _verify(client, T0)
        assert odd["reproducible"] is False and odd["evidence"]["intact"] is False
        assert "cannot be counted" in odd["evidence"]["detail"]
        with snapped.engine.begin() as conn:
            conn.execute(snapshot_evidence.update().where(e.ts_ms == T0).values(data=b"junk"))
        broken = _verify(client, T0)
        assert broken["evidence"]["status"] == "unreadable"
        assert "does not decompress" in broken["evidence"]["detail"]
        assert broken["reproducible"] is None
        export = client.get(f"/api/v1/reports/{T0}/devices", headers=PLATFORM)
        assert export.status_code == 500 and "does not decompress" in export.json()["detail"]


def test_pruned_evidence_is_reported_as_pruned(hebei: Registry) -> None:
    # Every snapshot's evidence for a day, each day's first for three days.
    snap = Snapshotter(hebei, 3600, lambda _l: None, evidence_days=1, evidence_daily_days=3)
    day0 = (T0 + 8 * HOUR) // DAY * DAY - 8 * HOUR  # 00:00 China Standard Time
    old, first, second = day0 - 4 * DAY, day0 - 2 * DAY, day0 - 2 * DAY + HOUR
    for ts in (old, first, second, day0):
        snap.snapshot_once(ts)
    assert hebei.snapshot_evidence(day0) is not None
    assert hebei.snapshot_evidence(first) is not None  # the first of its day
    with _client(hebei) as client:
        for ts in (old, second):
            body = _verify(client, ts)
            assert body["snapshot_ts"] == ts
            assert body["evidence"]["status"] == "pruned"
            assert body["evidence"]["pruned_ms"] == T0  # the registry's clock
            assert "deleted" in body["evidence"]["detail"]
            assert body["reproducible"] is None and body["registry_changes"] is None
            gone = client.get(f"/api/v1/reports/{ts}/devices", headers=PLATFORM)
            assert gone.status_code == 410 and "deleted" in gone.json()["detail"]
        assert _verify(client, first)["reproducible"] is True
    # A snapshot whose evidence was never kept (taken before this version) says so.
    with hebei.engine.begin() as conn:
        conn.execute(snapshot_evidence.delete().where(snapshot_evidence.c.ts_ms == day0))
    with _client(hebei) as client:
        body = _verify(client, day0)
        assert body["evidence"]["status"] == "not_recorded" and body["reproducible"] is None
    with hebei.engine.connect() as conn:
        audits = conn.execute(sa.select(snapshot_audit.c.ts_ms)).scalars().all()
    assert sorted(audits) == [old, first, second, day0]  # the audit records stay


def test_the_devices_behind_a_report_export_as_csv(snapped: Registry) -> None:
    _change_the_registry(snapped)
    with _client(snapped) as client:
        rows = _devices_csv(client, "/api/v1/reports/2025-06-15T15:20:00Z/devices")
        assert rows[0][0].startswith(f"devices snapshot_ts={T0} window_s=86400 registry_version=")
        assert "evidence_intact=true" in rows[0][0]
        assert rows[1][:3] == [
            "企业标识 enterprise_id",
            "企业名称 enterprise_name",
            "设备 device_id",
        ]
        devices = {(r[0], r[2]): r for r in rows[2:]}
        assert len(devices) == 50 and ("hb-steel", "late-1") not in devices
        header = rows[1]
        col = {name.split(" ")[-1]: k for k, name in enumerate(header)}
        dev25 = devices[("hb-cement", "dev-25")]
        assert dev25[col["connected"]] == "0"  # as counted, though it has reported since
        assert dev25[col["last_good_ms"]] == str(T0 - 30 * HOUR)
        dev05 = devices[("hb-cement", "dev-05")]
        assert (dev05[col["region"]], dev05[col["family"]]) == ("130102", "wind_turbine")
        assert dev05[col["enterprise_name"]] == "冀东水泥 Jidong Cement"
        dev01 = devices[("hb-steel", "dev-01")]
        assert (dev01[col["connected"]], dev01[col["online"]]) == ("1", "1")
        connected = sum(int(r[col["connected"]]) for r in rows[2:])
        overall = next(iter(snapped.snapshot_rows("overall", T0, T0)))
        assert connected == overall.connected + overall.products_connected
        # Filters: one enterprise; a city by code prefix (Dingzhou 130682 is in Baoding).
        steel = _devices_csv(client, f"/api/v1/reports/{T0}/devices?enterprise=hb-steel")
        assert {r[0] for r in steel[2:]} == {"hb-steel"} and len(steel) == 2 + 10
        baoding = _devices_csv(client, f"/api/v1/reports/{T0}/devices?region=1306")
        assert {r[col["region"]] for r in baoding[2:]} == {"130682"}
        early = client.get(f"/api/v1/reports/{T0 - 1}/devices", headers=PLATFORM)
        assert early.status_code == 404
        bad = client.get("/api/v1/reports/yesterday/devices", headers=PLATFORM)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["path", "as_of"]
        region = client.get(f"/api/v1/reports/{T0}/devices?region=99x", headers=PLATFORM)
        assert region.status_code == 422


def test_evidence_is_refused_when_malformed() -> None:
    with pytest.raises(EvidenceError, match="does not decompress"):
        decompress(b"not zlib", "zlib")
    with pytest.raises(EvidenceError, match="evidence header"):
        decode(b"something else")
    with pytest.raises(EvidenceError, match="unknown encoding"):
        decompress(b"", "brotli")


def test_a_version_9_database_gets_evidence_and_names_older_snapshots(
    registry_url: str,
) -> None:
    with Registry(registry_url, default_poll_interval=_fx.POLL_S, clock=lambda: T0 / 1000) as reg:
        _fx.populate(reg)
        Snapshotter(reg, 3600, lambda _l: None).snapshot_once(T0 - HOUR)
    # Back to schema version 9, as the previous release left it.
    engine = sa.create_engine(registry_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE snapshot_evidence")
        conn.exec_driver_sql("ALTER TABLE snapshot_audit DROP COLUMN evidence_pruned_ms")
        conn.exec_driver_sql("DELETE FROM schema_version WHERE version > 9")
    engine.dispose()
    with Registry(registry_url, default_poll_interval=_fx.POLL_S, clock=lambda: T0 / 1000) as reg:
        Snapshotter(reg, 3600, lambda _l: None).snapshot_once(T0)
        with _client(reg) as client:
            older = _verify(client, T0 - HOUR)
            assert older["evidence"]["status"] == "not_recorded"
            assert older["reproducible"] is None
            assert _verify(client, T0)["reproducible"] is True


def test_a_second_verification_while_one_runs_is_told_to_come_back(
    snapped: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.api.routers import provincial as router

    monkeypatch.setattr(router, "_HEAVY_WAIT_S", 0.2)
    with _client(snapped) as client:
        assert router._HEAVY.acquire(timeout=5)  # a verification under way
        try:
            busy = client.get(f"/api/v1/reports/verify?as_of={T0}", headers=PLATFORM)
            listing = client.get(f"/api/v1/reports/{T0}/devices", headers=PLATFORM)
        finally:
            router._HEAVY.release()
        assert busy.status_code == listing.status_code == 503
        assert busy.headers["retry-after"] == "30"
        assert "try again" in busy.json()["detail"]
        assert _verify(client, T0)["reproducible"] is True
