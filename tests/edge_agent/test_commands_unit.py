"""A write is checked against the profile before anything is sent, with a reason."""

from __future__ import annotations

from device_profiles.loader import load_profiles
from edge_agent.commands import check_write


def test_write_checks_name_what_is_wrong() -> None:
    kiln = load_profiles()["kiln-rotary-cement"]
    cases = {
        ("burning_zone_temp_setpoint", 1200.5): None,
        ("burning_zone_temp_setpoint", 799.9): "out of range [800, 1550]",
        ("burning_zone_temp_setpoint", True): "takes a number",
        ("burning_zone_temp_setpoint", float("nan")): "takes a number",
        ("burner_on_cmd", 1): "takes true or false",
        ("burner_on_cmd", False): None,
        ("inlet_co", 5): "read-only",
        ("nope", 5): "not in profile 'kiln-rotary-cement'",
    }
    for (name, value), want in cases.items():
        _, why = check_write(kiln, name, value)
        assert (why is None) if want is None else (why is not None and want in why), (name, why)
    motor = load_profiles()["motor-hv-drive"]
    assert "whole number" in (check_write(motor, "speed_setpoint", 900.5)[1] or "")
