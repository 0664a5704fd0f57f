"""``iiot profiles`` as a user runs it: a real process, its output and exit code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from device_profiles import BUILTIN_DIR, load_profiles

GOLDEN = Path(__file__).parent / "golden"
IIOT = Path(sys.executable).parent / "iiot"
SHIPPED_FAMILIES = {p.family for p in load_profiles()}


def _iiot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(IIOT), "profiles", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_validate_bad_file_names_file_point_and_problem() -> None:
    bad = GOLDEN / "overlapping_registers" / "profile.yaml"
    r = _iiot("validate", str(bad))
    assert r.returncode == 1
    assert f"{bad}: point 'current': input register 11 overlaps point 'power'" in r.stderr
    assert "0 ok, 1 bad" in r.stderr


def test_validate_reports_good_and_bad_files_together() -> None:
    good = GOLDEN / "valid" / "profile.yaml"
    bad = GOLDEN / "scale_zero" / "profile.yaml"
    r = _iiot("validate", str(good), str(bad))
    assert r.returncode == 1
    assert f"ok {good} (golden-valid, 5 points)" in r.stdout
    assert f"{bad}: point 'temperature'" in r.stderr
    assert "scale must not be zero" in r.stderr


def test_validate_golden_folder_lists_every_bad_case() -> None:
    r = _iiot("validate", str(GOLDEN))
    assert r.returncode == 1
    for case in GOLDEN.iterdir():
        if case.is_dir() and case.name != "valid":
            assert str(case / "profile.yaml") in r.stderr, case.name


def test_validate_missing_path_fails() -> None:
    r = _iiot("validate", "/nonexistent/profiles")
    assert r.returncode == 1
    assert "/nonexistent/profiles: no such file or folder" in r.stderr


def test_validate_shipped_folder_is_clean() -> None:
    r = _iiot("validate", str(BUILTIN_DIR))
    assert r.returncode == 0, r.stderr
    oks = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert len(oks) == 9
    assert any("(pv-inverter-sunspec, 40 points)" in line for line in oks)


def test_list_shows_the_eight_families() -> None:
    r = _iiot("list")
    assert r.returncode == 0, r.stderr
    for family in SHIPPED_FAMILIES:
        assert family in r.stdout
    for profile_id in ("kiln-rotary-cement", "pv-inverter-sunspec", "cnc-machine-tool"):
        assert profile_id in r.stdout
    assert "水泥回转窑" in r.stdout
    assert "high_energy_process" in r.stdout
    assert SHIPPED_FAMILIES <= set(load_profiles().families)


def test_list_adds_extra_folder(tmp_path: Path) -> None:
    data = yaml.safe_load((GOLDEN / "valid" / "profile.yaml").read_text(encoding="utf-8"))
    data["id"] = "integrator-pump-7"
    (tmp_path / "pump.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), "utf-8")
    r = _iiot("list", "--profiles", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "integrator-pump-7" in r.stdout
    assert "kiln-rotary-cement" in r.stdout
    assert "10 device profiles" in r.stdout


def test_list_with_a_bad_extra_folder_fails_naming_the_file(tmp_path: Path) -> None:
    shutil.copy(GOLDEN / "duplicate_point_name" / "profile.yaml", tmp_path / "dup.yaml")
    r = _iiot("list", "--profiles", str(tmp_path))
    assert r.returncode == 1
    assert f"{tmp_path / 'dup.yaml'}: point 'speed': duplicate point name" in r.stderr


def test_schema_is_json_with_points() -> None:
    r = _iiot("schema")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["type"] == "object"
    assert "points" in doc["properties"]
    assert {"id", "family", "category", "protocol", "points"} <= set(doc["required"])
    assert doc["additionalProperties"] is False
    point = doc["$defs"]["Point"]
    assert {"name", "type", "modbus", "opcua", "range"} <= set(point["properties"])
