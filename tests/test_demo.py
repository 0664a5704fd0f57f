"""`iiot demo` runs the whole system and its final table agrees with the ratios API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from gateway.api import create_app
from gateway.config import GatewayConfig
from gateway.registry import Registry
from simulators.plant import load_plant_config

DEMO_PLANT = Path(__file__).resolve().parents[1] / "iiot" / "demo_plant.yaml"


def _plant_counts() -> dict[str, tuple[int, int]]:
    """enterprise -> (devices switched on, devices in its ledger), from the demo's site file."""
    plant = load_plant_config(DEMO_PLANT)
    return {e.id: (sum(1 for d in e.devices if d.on), len(e.devices)) for e in plant.enterprises}


def test_demo_final_table_shows_every_enterprise_and_matches_the_api(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iiot",
            "demo",
            "--duration",
            "30",
            "--data-dir",
            str(data),
            "--api-port",
            "0",
            "--broker-port",
            "0",
            "--fault-every",
            "8",
            "--no-live",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped cleanly" in proc.stdout
    # One enterprise's agent speaks Sparkplug B; its devices count like the others below.
    assert "on Sparkplug B (spBv1.0/{enterprise}/...): zjk-wind" in proc.stdout

    summary = json.loads((data / "demo-summary.json").read_text(encoding="utf-8"))
    groups = {g["key"]: g for g in summary["ratios"]["enterprise"]["groups"]}
    expected = _plant_counts()
    assert set(groups) == set(expected)
    for ent, (on, owned) in expected.items():
        g = groups[ent]
        # Every device switched on reported; the ledger's other devices stay in the total.
        assert (g["connected"], g["total"]) == (on, owned), ent
        assert g["connected"] < g["total"]
        # The printed final table shows the same figures.
        assert ent in proc.stdout
        assert f"{100.0 * g['ratio']:.1f}%" in proc.stdout

    # The machinery shop's devices are in no agent's file: its agent scanned, the demo
    # approved each proposal through the API, and they count as connected above.
    plant = load_plant_config(DEMO_PLANT)
    found = {d.id for e in plant.enterprises for d in e.devices if d.on and not d.configured}
    assert found, "the demo site onboards no device by discovery"
    for dev in found:
        assert f"approved as {dev}" in proc.stdout, dev
    assert "devices onboarded by discovery and approval" in proc.stdout

    # The compressor maker's products at customers' sites: their own pair of numbers.
    made = {e.id: e.products for e in load_plant_config(DEMO_PLANT).enterprises if e.products}
    products = {g["key"]: (g["connected"], g["total"]) for g in summary["products"]["groups"]}
    assert products == {ent: (sum(1 for p in ps if p.on), len(ps)) for ent, ps in made.items()}
    assert "Final: connected products by maker" in proc.stdout
    # Every enterprise connects equipment, so every one is on the cloud.
    on_cloud = summary["on_cloud"]["overall"]
    assert (on_cloud["registered"], on_cloud["on_cloud"]) == (len(expected), len(expected))
    assert f"on the cloud {len(expected)}/{len(expected)} enterprises" in proc.stdout

    # Ask the ratios API, over the registry the demo left behind, for the same moment.
    registry = Registry(f"sqlite:///{data / 'registry.db'}")
    try:
        app = create_app(
            registry, GatewayConfig.model_validate({"api": {"platform_tokens": ["t"]}})
        )
        with TestClient(app) as client:
            r = client.get(
                "/api/v1/ratios",
                params={"group_by": "enterprise", "as_of": summary["as_of"]},
                headers={"Authorization": "Bearer t"},
            )
    finally:
        registry.close()
    assert r.status_code == 200, r.text
    api = {g["key"]: (g["connected"], g["total"], g["ratio"]) for g in r.json()["groups"]}
    assert api == {k: (g["connected"], g["total"], g["ratio"]) for k, g in groups.items()}
