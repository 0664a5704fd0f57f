"""Family physics models: plausible, correlated, reproducible values for every shipped profile."""

from __future__ import annotations

import math
import random
from functools import cache
from itertools import pairwise
from statistics import mean

import pytest

from device_profiles import Profile, ValueType, load_profiles
from protocols.modbus.codec import decode, encode
from simulators.device import SimDevice
from simulators.models import MODELS, GenericModel, Value, model_for
from simulators.models.pv_inverter import DAY_SECONDS, hour_of_day
from simulators.models.wind_turbine import power_curve

PROFILES = {p.id: p for p in load_profiles()}
DAY = 86400
STEP = 60

COUNTERS = {
    "kiln-rotary-cement": ["run_hours", "coal_total"],
    "boiler-steam-coal": ["run_hours", "steam_total"],
    "boiler-steam-gas-opcua": ["run_hours", "burner_starts", "gas_total"],
    "aircomp-screw": ["run_hours", "load_hours", "motor_starts", "load_cycles"],
    "motor-hv-drive": ["energy_total", "run_hours", "starts_count"],
    "genset-diesel": ["run_hours", "starts_count", "energy_total"],
    "wind-turbine-2mw": ["energy_total", "operating_hours"],
    "pv-inverter-sunspec": ["WH"],
    "cnc-machine-tool": ["power_on_duration", "parts_produced", "parts_scrapped"],
}
_FLOATS = (ValueType.FLOAT32, ValueType.FLOAT64)


def _run(profile: Profile, seed: int, end: int, step: int) -> list[dict[str, Value]]:
    model = model_for(profile, random.Random(seed))
    return [model.step(float(t)) for t in range(0, end + 1, step)]


@cache
def _day(pid: str, seed: int = 7) -> tuple[dict[str, Value], ...]:
    return tuple(_run(PROFILES[pid], seed, DAY, STEP))


def _series(pid: str, name: str) -> list[float]:
    return [float(v[name]) for v in _day(pid)]


def test_every_shipped_family_has_a_model() -> None:
    for p in PROFILES.values():
        assert p.family in MODELS
        assert not isinstance(model_for(p, random.Random(0)), GenericModel)


@pytest.mark.parametrize("pid", sorted(PROFILES))
def test_a_day_stays_in_range_and_typed(pid: str) -> None:
    p = PROFILES[pid]
    for values in _day(pid):
        assert set(values) == {pt.name for pt in p.points}
        for pt in p.points:
            v = values[pt.name]
            where = f"{pid}.{pt.name}={v!r}"
            if pt.type is ValueType.BOOL:
                assert isinstance(v, bool), where
                continue
            if pt.type is ValueType.STRING:
                assert isinstance(v, str), where
                continue
            assert isinstance(v, int | float) and not isinstance(v, bool), where
            assert math.isfinite(v), where
            plain = pt.scale == 1.0 and pt.offset == 0.0 and pt.scale_factor_point is None
            if pt.type not in _FLOATS and plain:
                assert isinstance(v, int), where
            if pt.range is not None:
                assert pt.range[0] <= v <= pt.range[1], where
            if pt.enum is not None:
                assert v in pt.enum, where
            if pt.bits is not None:
                assert 0 <= int(v) < 2 ** (max(pt.bits) + 1), where


@pytest.mark.parametrize("pid", sorted(PROFILES))
def test_values_change_over_the_day(pid: str) -> None:
    p = PROFILES[pid]
    measured = [
        pt.name
        for pt in p.points
        if pt.type not in (ValueType.BOOL, ValueType.STRING)
        and not pt.enum
        and not pt.bits
        and pt.access == "r"
        and (pt.range is None or pt.range[0] != pt.range[1])
    ]
    changing = [n for n in measured if len(set(_series(pid, n))) > 1]
    assert len(changing) >= 0.7 * len(measured), set(measured) - set(changing)


@pytest.mark.parametrize("pid", sorted(PROFILES))
def test_counters_never_decrease(pid: str) -> None:
    for name in COUNTERS[pid]:
        s = _series(pid, name)
        assert all(b >= a for a, b in pairwise(s)), name
    assert any(_series(pid, n)[-1] > _series(pid, n)[0] for n in COUNTERS[pid])


@pytest.mark.parametrize("pid", sorted(PROFILES))
def test_same_seed_same_series_other_seed_differs(pid: str) -> None:
    p = PROFILES[pid]
    a = _run(p, 11, 3600, 30)
    assert a == _run(p, 11, 3600, 30)
    assert a != _run(p, 12, 3600, 30)


@pytest.mark.parametrize("pid", sorted(p.id for p in PROFILES.values() if p.protocol == "modbus"))
def test_modbus_values_survive_the_register_codec(pid: str) -> None:
    p = PROFILES[pid]
    for values in _day(pid)[::30]:
        for pt in p.points:
            sf = values[pt.scale_factor_point] if pt.scale_factor_point else None
            assert not isinstance(sf, bool | str | float)
            regs = encode(pt, values[pt.name], p.modbus, sf_exponent=sf)
            back = decode(pt, regs, p.modbus, sf_exponent=sf)
            if pt.type is ValueType.FLOAT32:
                assert back == pytest.approx(values[pt.name], rel=1e-6, abs=1e-6), pt.name
            else:
                assert back == values[pt.name], pt.name


def test_unknown_points_of_an_integrators_profile_get_generic_values() -> None:
    base = PROFILES["motor-hv-drive"].model_dump()
    base["id"] = "motor-with-extras"
    base["points"] = [
        *base["points"],
        {"name": "coolant_flow", "type": "uint16", "range": [0, 500],
         "modbus": {"table": "input", "address": 500}},
        {"name": "grease_hours", "type": "uint32", "range": [0, 100000],
         "modbus": {"table": "input", "address": 501}},
    ]  # fmt: skip
    p = Profile.model_validate(base)
    series = _run(p, 3, 7200, 60)
    for v in series:
        assert 0 <= float(v["coolant_flow"]) <= 500
        assert 1300 < float(v["speed"]) or v is series[0]
    grease = [float(v["grease_hours"]) for v in series]
    assert grease == sorted(grease)
    assert series == _run(p, 3, 7200, 60)


# -- behaviour of each family -------------------------------------------------------


def test_kiln_heats_toward_its_setpoint() -> None:
    bz = _series("kiln-rotary-cement", "burning_zone_temp")
    sp = _series("kiln-rotary-cement", "burning_zone_temp_setpoint")[0]
    at = {h: bz[h * 3600 // STEP] for h in (0, 1, 3, 6, 24)}
    assert at[0] < 100 < at[1] < at[3] < at[6]
    assert abs(at[24] - sp) < 0.02 * sp
    # Feed and full kiln speed come in once hot; the fan follows coal and feed.
    feed = _series("kiln-rotary-cement", "raw_meal_feed")
    assert feed[0] == 0 and feed[-1] > 250
    fan = _series("kiln-rotary-cement", "id_fan_speed")
    assert fan[-1] > fan[0]
    assert mean(_series("kiln-rotary-cement", "coal_flow")[-60:]) > 5


def test_kiln_follows_written_speed_setpoint_and_burner_command() -> None:
    clock = [0.0]
    dev = SimDevice(
        PROFILES["kiln-rotary-cement"], device_id="kiln-1", seed=4, clock=lambda: clock[0]
    )
    for t in range(0, 12 * 3600 + 1, 300):
        dev.values(float(t))
    assert dev.values(12 * 3600.0)["kiln_speed"] == pytest.approx(3.5, abs=0.1)
    dev.write("kiln_speed_setpoint", 2.0)
    for t in range(12 * 3600, 13 * 3600 + 1, 60):
        v = dev.values(float(t))
    assert v["kiln_speed"] == pytest.approx(2.0, abs=0.05)
    assert v["kiln_speed_setpoint"] == 2.0
    hot = float(v["burning_zone_temp"])
    dev.write("burner_on_cmd", False)
    for t in range(13 * 3600, 16 * 3600 + 1, 300):
        v = dev.values(float(t))
    assert v["coal_flow"] == 0 and v["flame_detected"] is False
    assert float(v["burning_zone_temp"]) < hot - 100


def test_boiler_holds_pressure_and_level_oscillates_around_setpoint() -> None:
    for pid in ("boiler-steam-coal", "boiler-steam-gas-opcua"):
        day = _day(pid)
        sp = float(day[-1]["steam_pressure_setpoint"])
        late = day[3600 // STEP :]
        pressure = [float(v["steam_pressure"]) for v in late]
        assert abs(mean(pressure) - sp) < 0.05 * sp, pid
        assert all(v["combustion_state"] == 4 for v in late)
        level = [float(v["drum_level"]) for v in late]
        assert abs(mean(level)) < 15 and min(level) < -10 and max(level) > 10
        # Load drives fuel and steam flow together.
        flow = [float(v["steam_flow"]) for v in late]
        load = [float(v["load_percent"]) for v in late]
        avg = mean(load)
        hi = [f for f, ld in zip(flow, load, strict=True) if ld > avg]
        lo = [f for f, ld in zip(flow, load, strict=True) if ld <= avg]
        assert mean(hi) > mean(lo)
    states = [v["combustion_state"] for v in _run(PROFILES["boiler-steam-coal"], 1, 900, 10)]
    assert states[0] == 1 and 2 in states and 3 in states and states[-1] == 4


def test_compressor_alternates_load_and_unload() -> None:
    p = PROFILES["aircomp-screw"]
    run = _run(p, 5, 3600, 2)[150:]  # after start-up
    states = [v["load_state"] for v in run]
    switches = sum(1 for a, b in pairwise(states) if a != b)
    assert set(states) == {2, 3} and switches >= 6
    loaded = [float(v["power"]) for v in run if v["load_state"] == 3]
    unloaded = [float(v["power"]) for v in run if v["load_state"] == 2]
    assert mean(loaded) > 2.5 * mean(unloaded)
    pressure = [float(v["discharge_pressure"]) for v in run]
    assert 6.7 < min(pressure) and max(pressure) < 8.1
    for a, b in pairwise(run):
        dp = float(b["discharge_pressure"]) - float(a["discharge_pressure"])
        if a["load_state"] == b["load_state"] == 2:
            assert dp <= 0.0
    amps = [float(v["motor_current"]) / max(float(v["power"]), 1.0) for v in run]
    assert max(amps) - min(amps) < 0.2
    assert float(run[-1]["load_hours"]) > float(run[0]["load_hours"])


def test_compressor_follows_a_new_pressure_band() -> None:
    dev = SimDevice(PROFILES["aircomp-screw"], device_id="ac-1", seed=2, clock=lambda: 0.0)
    dev.write("load_pressure_setpoint", 8.5)
    dev.write("unload_pressure_setpoint", 9.2)
    run = [dev.values(float(t)) for t in range(0, 1800, 2)][300:]
    pressure = [float(v["discharge_pressure"]) for v in run]
    assert min(pressure) > 8.2 and max(pressure) > 9.0


def test_motor_current_follows_power_and_temperatures_lag() -> None:
    day = _day("motor-hv-drive")[2:]
    ratios = [float(v["current_u"]) / float(v["active_power"]) for v in day]
    assert max(ratios) / min(ratios) < 1.15
    power = _series("motor-hv-drive", "active_power")
    assert max(power) - min(power[2:]) > 100
    winding = _series("motor-hv-drive", "winding_temp_u")
    assert winding[0] < 30 < winding[3600 // STEP] < max(winding)
    vib = _series("motor-hv-drive", "vibration_de")
    assert len(set(vib)) > 100 and max(vib) < 7.1


def test_genset_starts_then_runs_at_1500_rpm_and_fuel_follows_load() -> None:
    dev = SimDevice(PROFILES["genset-diesel"], device_id="gen-1", seed=9, clock=lambda: 0.0)
    start = [dev.values(float(t)) for t in range(0, 120)]
    states = [v["engine_state"] for v in start]
    order = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert order == [0, 1, 2, 3, 4, 5]
    for t in range(120, 1800, 10):
        v = dev.values(float(t))
    assert 1490 <= float(v["engine_speed"]) <= 1510
    assert v["frequency"] == pytest.approx(50.0, abs=0.3)
    assert v["breaker_closed"] is True
    fuel_low = []
    dev.write("load_setpoint", 150)
    for t in range(1800, 3600, 10):
        fuel_low.append(float(dev.values(float(t))["fuel_rate"]))
    dev.write("load_setpoint", 450)
    fuel_high = []
    for t in range(3600, 5400, 10):
        fuel_high.append(float(dev.values(float(t))["fuel_rate"]))
    assert mean(fuel_high[30:]) > mean(fuel_low[30:]) + 40
    dev.write("remote_start", False)
    stop = [dev.values(float(t)) for t in range(5400, 5700)]
    assert 6 in {v["engine_state"] for v in stop}
    assert stop[-1]["engine_state"] == 0 and stop[-1]["engine_speed"] == 0


def test_wind_turbine_follows_its_power_curve() -> None:
    assert power_curve(2.5) == 0 and power_curve(25.5) == 0
    assert power_curve(12.0) == power_curve(20.0) == 2000.0
    curve = [power_curve(v / 10) for v in range(30, 121)]
    assert curve == sorted(curve)
    day = _day("wind-turbine-2mw")[10:]
    full = [v for v in day if v["turbine_state"] == 4]
    partial = [v for v in day if v["turbine_state"] == 3]
    assert full and partial
    assert mean(float(v["active_power"]) for v in full) > 1900
    assert mean(float(v["pitch_angle_1"]) for v in full) > mean(
        float(v["pitch_angle_1"]) for v in partial
    )
    windy = [float(v["active_power"]) for v in day if float(v["wind_speed"]) > 10]
    calm = [float(v["active_power"]) for v in day if float(v["wind_speed"]) < 6]
    assert mean(windy) > mean(calm)


def test_wind_turbine_stops_on_request() -> None:
    dev = SimDevice(PROFILES["wind-turbine-2mw"], device_id="wt-1", seed=1, clock=lambda: 0.0)
    for t in range(0, 600, 5):
        dev.values(float(t))
    dev.write("stop_request", True)
    for t in range(600, 900, 5):
        v = dev.values(float(t))
    assert v["turbine_state"] == 0 and float(v["active_power"]) <= 0
    assert float(v["pitch_angle_1"]) > 80


def test_pv_power_is_zero_at_night_and_positive_at_noon() -> None:
    p = PROFILES["pv-inverter-sunspec"]
    step = DAY_SECONDS / 96  # every quarter of an hour of the solar day
    run = [(t, v) for t, v in zip(_times(step), _run_f(p, step), strict=True)]
    night = [v for t, v in run if hour_of_day(t) < 4.0 or hour_of_day(t) > 21.0]
    noon = [v for t, v in run if 11.0 <= hour_of_day(t) <= 13.0]
    assert night and noon
    assert all(v["W"] == 0 and v["St"] == 2 and v["DCW"] == 0 for v in night)
    assert all(float(v["W"]) > 1000 and v["St"] in (4, 5) for v in noon)
    states = {v["St"] for _, v in run}
    assert {2, 3, 4, 6} <= states
    for _, v in run:
        assert (v["A_SF"], v["W_SF"], v["V_SF"], v["WH_SF"]) == (-2, 0, -1, 0)
        assert (v["SunS"], v["C_ID"], v["I_ID"], v["End_ID"]) == ("SunS", 1, 103, 0xFFFF)


def _times(step: float) -> list[float]:
    return [i * step for i in range(int(3 * DAY_SECONDS / step) + 1)]


def _run_f(p: Profile, step: float) -> list[dict[str, Value]]:
    model = model_for(p, random.Random(21))
    return [model.step(t) for t in _times(step)]


def test_cnc_runs_cycles_and_counts_parts() -> None:
    parts = _series("cnc-machine-tool", "parts_produced")
    assert parts[-1] - parts[0] >= 50
    day = _day("cnc-machine-tool")
    states = {v["program_state"] for v in day}
    assert {0, 1, 2} <= states
    cutting = [v for v in day if v["spindle_rotating"]]
    idle = [v for v in day if not v["spindle_rotating"]]
    assert cutting and idle
    assert all(float(v["spindle_speed"]) > 0 and float(v["spindle_load"]) > 0 for v in cutting)
    assert all(v["spindle_speed"] == 0 for v in idle)
    assert all(v["stacklight_green"] == (v["program_state"] == 1) for v in day)
    assert len({v["program_name"] for v in day}) >= 2


def test_cnc_feed_hold_stops_production() -> None:
    dev = SimDevice(PROFILES["cnc-machine-tool"], device_id="cnc-1", seed=3, clock=lambda: 0.0)
    dev.write("feed_override", 0.0)
    first = dev.values(0.0)["parts_produced"]
    for t in range(0, 7200, 30):
        v = dev.values(float(t))
    assert v["parts_produced"] == first
    dev.write("feed_override", 100.0)
    for t in range(7200, 14400, 30):
        v = dev.values(float(t))
    assert float(v["parts_produced"]) > float(first)
