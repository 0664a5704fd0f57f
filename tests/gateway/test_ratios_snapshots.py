"""Scheduled ratio snapshots: registry table, line protocol, history endpoint."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from gateway.api import create_app
from gateway.ratios import Snapshotter
from gateway.registry import Registry
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import PLATFORM, make_config
from tests.gateway.test_registry_fixtures import T0, reference

HOUR = 3600_000

# Fixtures shared with the other registry/API tests; these run on SQLite and PostgreSQL.
registry_url = _fx.both_registry_urls
registry = _fx.registry
hebei = _fx.hebei


def test_snapshots_feed_history_and_line_protocol(hebei: Registry) -> None:
    written: list[str] = []
    snap = Snapshotter(hebei, 3600, written.extend, clock=lambda: T0 / 1000)
    t1 = T0 // HOUR * HOUR
    assert snap.snapshot_once() > 0 and snap.last_ts_ms == t1  # aligned to the hour
    # An hour later a steel device is decommissioned.
    hebei.decommission("hb-steel", "dev-01")
    snap.snapshot_once(t1 + HOUR)
    overall = [line for line in written if line.startswith("connection_ratio,group_by=overall")]
    # At t1 (400 s before T0) the samples stamped up to T0 count as fresh.
    total, connected, online = reference(None, window_s=86400, as_of=t1)["all"]
    assert (total, connected, online) == (50, 25, 15)
    assert overall == [
        f"connection_ratio,group_by=overall,key=all total=50i,connected=25i,online=15i,"
        f"ratio=0.5,online_ratio=0.3 {t1}",
        f"connection_ratio,group_by=overall,key=all total=49i,connected=24i,online=0i,"
        f"ratio=0.489796,online_ratio=0.0 {t1 + HOUR}",
    ]
    assert any(line.startswith("connection_ratio,group_by=city,key=130100 ") for line in written)

    app = create_app(hebei, make_config(), clock=lambda: (t1 + 2 * HOUR) / 1000)
    with TestClient(app) as client:
        h = client.get(
            "/api/v1/ratios/history", params={"group_by": "enterprise"}, headers=PLATFORM
        ).json()
        steel = next(s for s in h["series"] if s["key"] == "hb-steel")
        assert steel["label"] == "唐山钢铁 Tangshan Steel"
        assert [(p["ts"], p["total"]) for p in steel["points"]] == [(t1, 10), (t1 + HOUR, 9)]
        daily = client.get(
            "/api/v1/ratios/history",
            params={"group_by": "overall", "step": "1d", "from": t1 - HOUR, "to": t1 + HOUR},
            headers=PLATFORM,
        ).json()
        points = daily["series"][0]["points"]
        assert len(points) == 1 and points[0]["total"] == 49  # last snapshot of that day
        bad = client.get(
            "/api/v1/ratios/history", params={"from": t1, "to": t1 - 1}, headers=PLATFORM
        )
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "from"]


def test_old_snapshots_are_pruned(hebei: Registry) -> None:
    snap = Snapshotter(hebei, 3600, lambda _lines: None, retention_days=1, groupings=["city"])
    t1 = T0 // HOUR * HOUR
    snap.snapshot_once(t1 - 25 * HOUR)
    snap.snapshot_once(t1 - 2 * HOUR)
    assert {r.ts_ms for r in hebei.snapshot_rows("overall", 0, t1)} == {
        t1 - 25 * HOUR,
        t1 - 2 * HOUR,
    }
    snap.snapshot_once(t1)
    assert {r.ts_ms for r in hebei.snapshot_rows("city", 0, t1)} == {t1 - 2 * HOUR, t1}


def test_snapshotter_thread_runs_and_stops(hebei: Registry) -> None:
    got = threading.Event()
    lines: list[str] = []

    def write(batch: list[str]) -> None:
        lines.extend(batch)
        got.set()

    snap = Snapshotter(hebei, 0.05, write)
    snap.start()
    try:
        assert got.wait(5)
    finally:
        snap.stop()
    assert snap.runs >= 1 and snap.errors == 0
    assert not any(t.name == "ratio-snapshots" for t in threading.enumerate())
