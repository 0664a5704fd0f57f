"""Golden profile cases: each folder holds a profile and the text its check must produce."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_profiles import ProfileError, load_profile

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p for p in GOLDEN.iterdir() if p.is_dir())

REQUIRED = {
    "unknown_key",
    "overlapping_registers",
    "register_past_65535",
    "rw_on_input_register",
    "rw_on_discrete_input",
    "scale_zero",
    "duplicate_point_name",
    "non_bool_on_coil",
    "string_without_length",
    "bool_in_register_without_bit",
    "opcua_point_without_address",
    "bad_identifier",
    "unknown_scale_factor_point",
    "not_yaml",
    "valid",
}


def _expected(case: Path) -> list[str]:
    lines = (case / "expected.txt").read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def _outcome(path: Path) -> tuple[bool, str]:
    try:
        prof = load_profile(path)
    except ProfileError as exc:
        return False, str(exc)
    return True, f"ok {path} ({prof.id}, {len(prof.points)} points)"


def test_every_required_case_is_present() -> None:
    assert REQUIRED <= {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_golden_case(case: Path) -> None:
    expected = _expected(case)
    assert expected, f"{case}/expected.txt is empty"
    ok, message = _outcome(case / "profile.yaml")
    wants_ok = expected[0] == "ok"
    assert ok == wants_ok, message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    if not ok:
        # Every reported problem names the file it comes from.
        for line in message.splitlines():
            assert line.startswith(str(case / "profile.yaml")), line
