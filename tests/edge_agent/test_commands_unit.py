"""A write is checked against the profile before anything is sent, with a reason."""

from __future__ import annotations

from device_profiles.loader import load_profiles
from device_profiles.schema import Point
from edge_agent.commands import check_write, settled


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


def test_a_read_back_settles_within_the_points_real_resolution() -> None:
    def point(type_: str, **extra: object) -> Point:
        return Point.model_validate({"name": "p", "type": type_, "access": "rw", **extra})

    sunspec = point("uint16", scale_factor_point="p_SF")
    # sf = 1: the register holds tens, so 1234 is stored as 123 and reads back as 1230.
    assert settled(sunspec, 1234, 1230.0, sf=1)
    assert settled(sunspec, 1235, 1240.0, sf=1)
    assert not settled(sunspec, 1234, 1250.0, sf=1)
    # sf = -2: hundredths; a device that kept only whole units did not take the write.
    assert settled(sunspec, 12.34, 12.34, sf=-2)
    assert not settled(sunspec, 12.34, 12.0, sf=-2)
    assert not settled(sunspec, 12.34, 12.33, sf=-2)
    # scale 0.1 with an offset: half a tenth either way.
    tenth = point("int16", scale=0.1, offset=-40)
    assert settled(tenth, 21.24, 21.2) and not settled(tenth, 21.3, 21.2)
    # Floats: one unit in the last place of the register's type, not a fixed fraction.
    f32 = point("float32")
    assert settled(f32, 21.7, 21.700000762939453)
    assert not settled(f32, 21.7, 21.7002)
    f64 = point("float64")
    assert settled(f64, 0.1 + 0.2, 0.3) and not settled(f64, 1000.0, 1000.0001)
    assert settled(point("bool"), True, True) and not settled(point("bool"), True, False)
    assert not settled(point("string"), "a", "b") and not settled(f32, 1.0, None)
