"""The quality gate's counts in stored ratio snapshots: stored with the report, in its
history, exports and evidence, and recounted by verification; on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from gateway.evidence import compress, decode, decompress, digest, encode
from gateway.provincial import recount
from gateway.quality import QualityWindow
from gateway.ratios import Snapshotter, compute_ratios
from gateway.registry import Registry
from gateway.registry.provincial import snapshot_audit, snapshot_evidence
from gateway.registry.tables import ratio_snapshots
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import PLATFORM
from tests.gateway.test_provincial import _client, _feed
from tests.gateway.test_registry_fixtures import T0
from tests.gateway.test_report_evidence import _devices_csv, _verify

HOUR = 3600_000

registry_url = _fx.both_registry_urls
registry = _fx.registry
hebei = _fx.hebei
hebei_makers = _fx.hebei_makers

# Fed an hour of samples a minute, varying (the gate expects 60, needs 48): they pass.
PASSING = {("hb-cement", "dev-00"), ("hb-cement", "dev-05"), ("hb-steel", "dev-01")}
PASSING_PRODUCTS = {("hb-compressor", "cp-00")}


@pytest.fixture
def gated(hebei_makers: Registry) -> Registry:
    """The Hebei ledger and products with a gate that watched the hour before T0: three
    pieces of equipment and one product pass; one sparse and one frozen device do not."""
    hebei_makers.set_quality(QualityWindow(poll_interval_s=60, clock=lambda: (T0 - HOUR) / 1000))
    assert hebei_makers.quality_loaded(30)
    for ent, dev in sorted(PASSING | PASSING_PRODUCTS):
        _feed(hebei_makers, ent, dev, every_min=1)
    _feed(hebei_makers, "hb-chem", "dev-03", every_min=10)  # 6 of 60: sparse
    _feed(hebei_makers, "hb-cement", "dev-10", every_min=1, frozen=True)
    return hebei_makers


def _stored(reg: Registry, group_by: str, ts: int = T0) -> dict[str, Any]:
    return {r.key: r for r in reg.snapshot_rows(group_by, ts, ts)}


def _history(client: TestClient, query: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/ratios/history?{query}", headers=PLATFORM)
    assert response.status_code == 200, response.text
    points: list[dict[str, Any]] = response.json()["series"][0]["points"]
    return points


def _quality_column(rows: list[list[str]]) -> dict[tuple[str, str], str]:
    col = rows[1].index("数据达标 quality_connected")
    return {(r[0], r[2]): r[col] for r in rows[2:]}


def test_a_snapshot_stores_its_quality_counts(gated: Registry) -> None:
    Snapshotter(gated, 3600, lambda _lines: None).snapshot_once(T0)
    overall = _stored(gated, "overall")["all"]
    assert (overall.connected, overall.quality_connected) == (25, 3)
    assert (overall.products_connected, overall.products_quality_connected) == (5, 1)
    by_ent = {k: r.quality_connected for k, r in _stored(gated, "enterprise").items()}
    assert by_ent["hb-cement"] == 2 and by_ent["hb-steel"] == 1 and by_ent["hb-chem"] == 0
    assert _stored(gated, "enterprise")["hb-compressor"].products_quality_connected == 1
    with _client(gated) as client:
        [point] = _history(client, f"group_by=overall&from={T0}&to={T0}")
        assert (point["quality_connected"], point["quality_ratio"]) == (3, 0.06)  # 3 of 50
        [made] = _history(client, f"group_by=enterprise&key=hb-compressor&to={T0}&kind=product")
        assert (made["quality_connected"], made["total"]) == (1, 8)
        # The detail list says which devices the report counted as quality_connected.
        listed = _quality_column(_devices_csv(client, f"/api/v1/reports/{T0}/devices"))
        assert {key for key, q in listed.items() if q == "1"} == PASSING | PASSING_PRODUCTS
        assert set(listed.values()) == {"0", "1"}


def test_verify_recounts_quality_after_the_registry_and_the_gate_changed(
    gated: Registry,
) -> None:
    Snapshotter(gated, 3600, lambda _lines: None).snapshot_once(T0)
    # A restart empties the gate's window (on SQLite), and dev-01 is decommissioned.
    gated.set_quality(QualityWindow(poll_interval_s=60, clock=lambda: T0 / 1000))
    assert gated.quality_loaded(30)
    gated.decommission("hb-steel", "dev-01")
    live = compute_ratios(gated, None, window_s=86400, as_of_ms=T0)["overall"]
    assert live["quality_connected"] != 3
    with _client(gated) as client:
        body = _verify(client, T0)
    assert body["quality"]["status"] == "recorded"
    assert body["reproducible"] is True and body["differences"] == []
    assert body["registry_changes"]["counts"]["decommissioned_changed"] == 1
    stored = gated.snapshot_evidence(T0)
    assert stored is not None
    ev = decode(decompress(bytes(stored["data"]), stored["encoding"]))
    again = next(r for r in recount(ev) if r["group_by"] == "overall")
    assert (again["quality_connected"], again["products_quality_connected"]) == (3, 1)


def test_a_tampered_quality_count_is_named_by_verify(gated: Registry) -> None:
    Snapshotter(gated, 3600, lambda _lines: None).snapshot_once(T0)
    c = ratio_snapshots.c
    with gated.engine.begin() as conn:
        conn.execute(
            ratio_snapshots.update()
            .where(c.ts_ms == T0, c.group_by == "overall")
            .values(quality_connected=4)
        )
        conn.execute(
            ratio_snapshots.update()
            .where(c.ts_ms == T0, c.group_by == "enterprise", c.key == "hb-compressor")
            .values(products_quality_connected=None)
        )
    with _client(gated) as client:
        body = _verify(client, T0)
        assert body["reproducible"] is False and body["evidence"]["intact"] is True
        assert body["differences"] == [
            {
                "group_by": "overall",
                "key": "all",
                "field": "quality_connected",
                "stored": 4,
                "recomputed": 3,
            },
            {
                "group_by": "enterprise",
                "key": "hb-compressor",
                "field": "products_quality_connected",
                "stored": None,
                "recomputed": 1,
            },
        ]
        # The evidence's quality flags are under its hash: one more passing device in
        # it is no longer the evidence the report recorded.
        e = snapshot_evidence.c
        stored = gated.snapshot_evidence(T0)
        assert stored is not None
        ev = decode(decompress(bytes(stored["data"]), stored["encoding"]))
        assert ev.quality is not None
        ev.quality[ev.devices.index("dev-03")] = True
        forged = compress(encode(ev), stored["encoding"])
        with gated.engine.begin() as conn:
            conn.execute(snapshot_evidence.update().where(e.ts_ms == T0).values(data=forged))
        forged_body = _verify(client, T0)
    assert forged_body["evidence"]["intact"] is False and forged_body["reproducible"] is False
    chem = [d for d in forged_body["differences"] if d["key"] == "hb-chem"]
    assert chem == [
        {
            "group_by": "enterprise",
            "key": "hb-chem",
            "field": "quality_connected",
            "stored": 0,
            "recomputed": 1,
        }
    ]


def _as_the_previous_release_stored_it(url: str, ts: int) -> None:
    """Back to schema version 12: snapshot rows without quality counts, and evidence
    without quality flags, hashed as the previous release hashed it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        e, a = snapshot_evidence.c, snapshot_audit.c
        row = conn.execute(sa.select(snapshot_evidence).where(e.ts_ms == ts)).one()
        ev = decode(decompress(bytes(row.data), row.encoding))
        old = encode(dataclasses.replace(ev, quality=None))
        conn.execute(
            snapshot_evidence.update()
            .where(e.ts_ms == ts)
            .values(data=compress(old, row.encoding), raw_bytes=len(old))
        )
        conn.execute(
            snapshot_audit.update().where(a.ts_ms == ts).values(registry_version=digest(old))
        )
        for column in ("quality_connected", "products_quality_connected"):
            conn.exec_driver_sql(f"ALTER TABLE ratio_snapshots DROP COLUMN {column}")
        conn.exec_driver_sql("DELETE FROM schema_version WHERE version > 12")
    engine.dispose()


def test_a_snapshot_from_before_quality_counts_verifies_saying_they_were_not_recorded(
    registry_url: str,
) -> None:
    def open_registry() -> Registry:
        return Registry(registry_url, default_poll_interval=_fx.POLL_S, clock=lambda: T0 / 1000)

    with open_registry() as reg:
        _fx.populate(reg)
        Snapshotter(reg, 3600, lambda _l: None).snapshot_once(T0 - HOUR)
    _as_the_previous_release_stored_it(registry_url, T0 - HOUR)
    with open_registry() as reg:
        old = _stored(reg, "overall", T0 - HOUR)["all"]
        assert old.total == 50 and old.quality_connected is None
        assert old.products_quality_connected is None
        Snapshotter(reg, 3600, lambda _l: None).snapshot_once(T0)
        with _client(reg) as client:
            body = _verify(client, T0 - HOUR)
            assert body["evidence"]["intact"] is True
            assert body["reproducible"] is True and body["differences"] == []
            assert body["quality"]["status"] == "not_recorded"
            assert "not recorded" in body["quality"]["detail"]
            assert _verify(client, T0)["quality"]["status"] == "recorded"
            then, now = _history(client, f"group_by=overall&from={T0 - HOUR}&to={T0}")
            assert then["quality_connected"] is None and then["quality_ratio"] is None
            assert then["connected"] == old.connected
            assert isinstance(now["quality_connected"], int)
            listed = _quality_column(_devices_csv(client, f"/api/v1/reports/{T0 - HOUR}/devices"))
            assert len(listed) == 50 and set(listed.values()) == {""}  # not recorded, not 0


def test_evidence_without_quality_flags_decodes_as_not_recorded() -> None:
    ev = decode(encode(_tiny_evidence(quality=None)))
    assert ev.quality is None
    flagged = decode(encode(_tiny_evidence(quality=np.array([True, False, True]))))
    assert flagged.quality is not None and flagged.quality.tolist() == [True, False, True]
    assert digest(encode(_tiny_evidence(quality=None))) != digest(
        encode(_tiny_evidence(quality=np.zeros(3, np.bool_)))
    )


def _tiny_evidence(quality: Any) -> Any:
    from gateway.evidence import from_columns

    return from_columns(
        as_of_ms=T0,
        window_s=86400,
        groupings=("city",),
        devices=["a", "b", "c"],
        columns={
            name: ((value,), np.zeros(3, np.uint32))
            for name, value in (
                ("enterprise", "e"),
                ("region", "130102"),
                ("industry", "C30"),
                ("category", "high_energy_process"),
                ("family", "kiln"),
            )
        },
        product=np.zeros(3, np.bool_),
        decommissioned=np.zeros(3, np.bool_),
        online=np.ones(3, np.bool_),
        last_good=np.full(3, T0 - 1000, np.int64),
        quality=quality,
    )
