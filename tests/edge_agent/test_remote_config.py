"""A desired configuration is checked in full, errors by device, before anything runs."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from device_profiles.loader import BUILTIN_DIR
from edge_agent.config import LoadedConfig, parse_config
from edge_agent.discovery import DiscoveryScope
from edge_agent.remote import RemoteConfigRefused, RemoteConfigStore, build_config
from protocols.mqtt.control import DesiredConfig
from tests.edge_agent.helpers import agent_dict, modbus_device


def _local(tmp: Path, *, remote: bool = True) -> LoadedConfig:
    devices = [modbus_device("kiln-1", "kiln-rotary-cement", 1502)]
    return parse_config(agent_dict(tmp, 1883, devices, remote_config={"enabled": remote}))


def _desired(devices: list[dict[str, Any]], **extra: Any) -> DesiredConfig:
    return DesiredConfig.model_validate({"version": 4, "ts": 1, "devices": devices, **extra})


def _motor_profile(**changes: Any) -> dict[str, Any]:
    data = yaml.safe_load((BUILTIN_DIR / "motor" / "motor-hv-drive.yaml").read_text())
    assert isinstance(data, dict)
    return {**data, **changes}


def test_devices_and_scope_are_replaced_and_the_rest_is_the_files(tmp_path: Path) -> None:
    local = _local(tmp_path)
    built = build_config(
        local, _desired([modbus_device("motor-1", "motor-hv-drive", 1502, unit=3)])
    )
    assert [d.id for d in built.config.devices] == ["motor-1"]
    assert built.device_profiles["motor-1"].id == "motor-hv-drive"
    assert built.config.mqtt == local.config.mqtt and built.config.data_dir == local.config.data_dir


def test_a_profile_shipped_with_the_config_is_used(tmp_path: Path) -> None:
    desired = _desired(
        [modbus_device("pump-1", "acme-pump", 1502)],
        profiles=[_motor_profile(id="acme-pump", name="ACME pump")],
    )
    built = build_config(_local(tmp_path), desired)
    assert built.device_profiles["pump-1"].name == "ACME pump"


def test_every_problem_is_reported_by_device(tmp_path: Path) -> None:
    desired = _desired(
        [
            modbus_device("ghost-1", "no-such-profile", 1502),
            {"profile": "motor-hv-drive", "modbus": {"host": "h"}},
            {**modbus_device("motor-1", "motor-hv-drive", 1502), "points": ["nope"]},
            modbus_device("pump-1", "bad-pump", 1502),
        ],
        profiles=[_motor_profile(id="bad-pump", points=[])],
        families=[{"key": "sawmill"}],
    )
    with pytest.raises(RemoteConfigRefused) as info:
        build_config(_local(tmp_path), desired)
    errors = info.value.errors
    assert set(errors) == {"ghost-1", "device #2", "motor-1", "pump-1", "config"}
    assert "profile 'no-such-profile' not found" in errors["ghost-1"]
    assert "id" in errors["device #2"]
    assert "point 'nope' is not in profile 'motor-hv-drive'" in errors["motor-1"]
    assert "profile 'bad-pump'" in errors["config"] and "family 'sawmill'" in errors["config"]


def test_a_file_without_remote_config_refuses_every_version(tmp_path: Path) -> None:
    with pytest.raises(RemoteConfigRefused) as info:
        build_config(_local(tmp_path, remote=False), _desired([]))
    assert "remote_config" in info.value.errors["config"]


def test_the_discovery_scope_is_checked_by_the_discovery_model(tmp_path: Path) -> None:
    with pytest.raises(RemoteConfigRefused) as info:
        build_config(_local(tmp_path), _desired([], discovery={"netwrks": ["10.0.0.0/24"]}))
    assert "discovery" in info.value.errors["config"]
    assert "netwrks" in info.value.errors["config"]
    scope = {"modbus_tcp": [{"hosts": ["10.0.0.0/30"], "units": ["1-3"]}]}
    ok = build_config(_local(tmp_path), _desired([], discovery=scope))
    assert ok.config.discovery == DiscoveryScope.model_validate(scope)


def test_a_version_may_ship_a_family_and_a_profile_of_it(tmp_path: Path) -> None:
    family = {"key": "sawmill", "name_zh": "锯木机", "name": "Sawmill", "category": "intelligent"}
    desired = _desired(
        [modbus_device("saw-1", "acme-saw", 1502)],
        profiles=[_motor_profile(id="acme-saw", family="sawmill", category="intelligent")],
        families=[family],
    )
    built = build_config(_local(tmp_path), desired)
    assert built.device_profiles["saw-1"].family == "sawmill"


def test_the_store_keeps_the_applied_version_privately(tmp_path: Path) -> None:
    store = RemoteConfigStore(tmp_path / "data")
    assert store.load() is None
    desired = _desired([modbus_device("motor-1", "motor-hv-drive", 1502)])
    store.save(desired)
    assert store.load() == desired
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    store.path.write_text("{garbage")
    assert store.load() is None
