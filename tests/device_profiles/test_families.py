"""Families are data: the shipped families.yaml, and families an integrator adds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from device_profiles import BUILTIN_DIR, ProfileSetError, builtin_families, load_profiles
from gateway.registry.codes import FAMILY_CATEGORY, check_family, family_label

GOLDEN_VALID = Path(__file__).parent / "golden" / "valid" / "profile.yaml"


def _profile(folder: Path, family: str) -> None:
    data = yaml.safe_load(GOLDEN_VALID.read_text(encoding="utf-8"))
    data.update(id=f"model-of-{family}", family=family)
    (folder / f"{family}.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), "utf-8")


def test_the_registry_labels_and_categorises_families_from_the_data_file() -> None:
    shipped = yaml.safe_load((BUILTIN_DIR / "families.yaml").read_text(encoding="utf-8"))
    for entry in shipped["families"]:
        assert family_label(entry["key"]) == f"{entry['name_zh']} {entry['name']}"
        assert FAMILY_CATEGORY.get(entry["key"]) == entry.get("category")
        assert check_family(entry["key"]) == entry["key"]
    with pytest.raises(ValueError, match="unknown family 'toaster'"):
        check_family("toaster")


def test_an_integrators_families_file_adds_a_family_its_profiles_may_use(tmp_path: Path) -> None:
    (tmp_path / "families.yaml").write_text(
        "families:\n  - {key: roots_blower, name_zh: 罗茨鼓风机, name: Roots blower,"
        " category: general_power}\n",
        "utf-8",
    )
    _profile(tmp_path, "roots_blower")
    loaded = load_profiles([tmp_path])
    assert loaded["model-of-roots_blower"].family == "roots_blower"
    assert loaded.families["roots_blower"].label == "罗茨鼓风机 Roots blower"
    assert "roots_blower" not in builtin_families()


def test_a_family_nobody_defines_is_refused_naming_the_file(tmp_path: Path) -> None:
    _profile(tmp_path, "roots_blower")
    with pytest.raises(ProfileSetError) as info:
        load_profiles([tmp_path])
    text = str(info.value)
    assert f"{tmp_path / 'roots_blower.yaml'}: family:" in text and "roots_blower" in text


def test_redefining_a_shipped_family_is_refused_naming_both_files(tmp_path: Path) -> None:
    (tmp_path / "families.yaml").write_text(
        "families:\n  - {key: kiln, name_zh: 窑, name: Kiln, category: new_energy}\n", "utf-8"
    )
    with pytest.raises(ProfileSetError) as info:
        load_profiles([tmp_path])
    text = str(info.value)
    assert f"{tmp_path / 'families.yaml'}: family 'kiln' is already defined in" in text
    assert str(BUILTIN_DIR / "families.yaml") in text


def test_a_bad_families_file_names_the_entry_and_key(tmp_path: Path) -> None:
    (tmp_path / "families.yaml").write_text(
        "families:\n  - {key: blower, name_zh: 鼓风机, name: Blower, colour: red}\n", "utf-8"
    )
    with pytest.raises(ProfileSetError, match=r"families\.yaml: families\.0\.colour: unknown key"):
        load_profiles([tmp_path])
