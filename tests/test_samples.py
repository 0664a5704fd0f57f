"""Every sample config and README YAML example loads as what it claims to be."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from device_profiles import load_profiles, parse_profile
from edge_agent.config import DeviceConfig, load_config, parse_config
from protocols import registry
from simulators.plant import Plant, PlantConfig, load_plant_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(ROOT.glob("protocols/*/sample.yaml"))
READMES = [
    *sorted(ROOT.glob("protocols/*/README.md")),
    ROOT / "simulators" / "README.md",
    ROOT / "edge_agent" / "README.md",
]
_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)


def _blocks() -> list[tuple[str, Any]]:
    found = []
    for path in READMES:
        text = path.read_text(encoding="utf-8")
        for i, block in enumerate(_BLOCK.findall(text), 1):
            found.append((f"{path.relative_to(ROOT)}#{i}", yaml.safe_load(block)))
    return found


def _agent(devices: list[Any], profile_dir: Path | None = None) -> dict[str, Any]:
    return {
        "agent_id": "sample-edge",
        "enterprise": "sample-co",
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "profiles": [str(profile_dir)] if profile_dir else [],
        "devices": devices,
    }


def test_every_registered_protocol_has_a_sample() -> None:
    assert {p.parent.name for p in SAMPLES} == set(registry.names())


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.parent.name)
def test_a_protocol_sample_is_a_profile_and_a_device_entry_the_agent_accepts(
    path: Path, tmp_path: Path
) -> None:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(doc) == {"device", "profile"}
    profile = parse_profile(doc["profile"], path)
    assert profile.protocol == path.parent.name
    (tmp_path / f"{profile.id}.yaml").write_text(yaml.safe_dump(doc["profile"]), "utf-8")
    loaded = parse_config(_agent([doc["device"]], tmp_path), str(path))
    (dev,) = loaded.config.devices
    assert (dev.protocol, loaded.device_profiles[dev.id].id) == (profile.protocol, profile.id)


def test_the_example_agent_config_loads() -> None:
    loaded = load_config(ROOT / "edge_agent" / "agent.example.yaml")
    assert loaded.config.devices


def test_the_example_plant_builds() -> None:
    cfg = load_plant_config(ROOT / "simulators" / "plant.example.yaml")
    plant = Plant(cfg, source="plant.example.yaml")
    assert plant.endpoints


@pytest.mark.parametrize(("where", "doc"), _blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_readme_yaml_example_loads(where: str, doc: Any) -> None:
    assert isinstance(doc, dict), where
    if "enterprises" in doc:
        PlantConfig.model_validate(doc)
    elif "mqtt" in doc and "agent_id" in doc:
        parse_config(doc, where)
    elif "points" in doc:
        parse_profile(doc, where, families=load_profiles().families)
    elif "profile" in doc and "id" in doc:
        parse_config(_agent([doc]), where)
    elif len(doc) == 1 and next(iter(doc)) in registry.names():
        # A device entry's connection key shown alone.
        DeviceConfig.model_validate({"id": "sample", "profile": "sample", **doc})
    else:
        pytest.fail(f"{where}: not a plant, agent config, profile or device entry: {list(doc)}")
