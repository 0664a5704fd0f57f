"""Steam boiler: pressure held by a fuel controller against a wandering steam load.

Steam demand wanders around a daily curve. The combustion controller sets the fuel from
demand plus a PI correction on the pressure error; steam generation lags the fuel, and
the drum pressure integrates generation minus draw, so a load step first pulls the
pressure down and the fuel then brings it back. The drum level oscillates around its
setpoint with swell on load changes. Coal and gas variants share the physics; the
ratings come from the profile's ranges. Starting runs purge, ignition and low fire.
"""

from __future__ import annotations

import math
import random

from device_profiles.schema import Profile
from simulators.models import Value
from simulators.models._base import FamilyModel, first_order, ou_step

__all__ = ["BoilerModel"]

_SUBSTEP = 5.0  # s: the pressure loop is integrated at this resolution
_MAX_SUBSTEPS = 20000
_PURGE, _IGNITION, _LOW_FIRE = 120.0, 30.0, 300.0  # s


class BoilerModel(FamilyModel):
    """Drum-type steam boiler, coal-fired or gas-fired."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        super().__init__(profile, rng)
        self._gas = "gas_flow" in self._points
        flow = self._points.get("steam_flow")
        self._rated = 0.8 * flow.range[1] if flow is not None and flow.range else 100.0
        press = self._points.get("steam_pressure")
        self._p_default = 0.65 * press.range[1] if press is not None and press.range else 3.8
        self._p = 0.8 * self._p_default
        self._gen = 0.0
        self._integral = 0.0
        self._demand_noise = 0.0
        self._level_noise = 0.0
        self._o2_noise = 0.0
        self._load_phase = rng.uniform(0.0, 2.0 * math.pi)
        self._level_phase = rng.uniform(0.0, 2.0 * math.pi)
        self._state = 1  # purge: the model starts with a cold start sequence
        self._state_t = 0.0
        self._draw = 0.0
        self._fuel = 0.0
        self._run_hours = rng.uniform(5000.0, 50000.0)
        self._starts = rng.randint(200, 3000)
        self._steam_total = rng.uniform(1e5, 5e6)
        self._gas_total = rng.uniform(1e6, 1e8)
        self._firmware = f"BMS {rng.randint(2, 4)}.{rng.randint(0, 9)}.{rng.randint(0, 20)}"

    def _sequence(self, h: float, enable: bool) -> None:
        if not enable:
            self._state, self._state_t = 0, 0.0
            return
        self._state_t += h
        if self._state == 0:
            self._state, self._state_t = 1, 0.0
        elif self._state == 1 and self._state_t >= _PURGE:
            self._state, self._state_t = 2, 0.0
        elif self._state == 2 and self._state_t >= _IGNITION:
            self._state, self._state_t = 3, 0.0
            self._starts += 1
        elif self._state == 3 and self._state_t >= _LOW_FIRE:
            self._state, self._state_t = 4, 0.0

    def _substep(self, h: float, t: float, sp: float, enable: bool) -> None:
        self._sequence(h, enable)
        day = 0.72 + 0.15 * math.sin(2.0 * math.pi * t / 86400.0 + self._load_phase)
        self._demand_noise = ou_step(self.rng, self._demand_noise, 0.0, 0.08, 900.0, h)
        demand = min(1.0, max(0.3, day + self._demand_noise)) * self._rated
        # The steam main opens at low fire and is fully in service once modulating.
        share = {3: 0.25 * self._rated, 4: demand}.get(self._state, 0.0)
        draw = min(demand, share) * min(1.05, max(0.0, self._p / sp))
        err = (sp - self._p) / sp
        if self._state == 4:
            self._integral = min(0.3, max(-0.3, self._integral + 0.001 * err * h))
            cmd = demand + (3.0 * err + self._integral) * self._rated
            cmd = min(1.1 * self._rated, max(0.2 * self._rated, cmd))
        elif self._state == 3:
            cmd = 0.3 * self._rated
        else:
            cmd = 0.0
            self._integral = 0.0
        self._fuel = cmd
        self._gen = first_order(self._gen, cmd, h, 90.0)
        capacity = 300.0 * self._rated / sp  # (t/h) per (MPa/s)
        self._p = max(0.0, self._p + (self._gen - draw) / capacity * h)
        if self._state in (3, 4):
            self._run_hours += h / 3600.0
        self._steam_total += draw * h / 3600.0
        self._gas_total += self._fuel * 75.0 * h / 3600.0
        self._draw = draw

    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        sp = self._setpoint("steam_pressure_setpoint", self._p_default)
        level_sp = self._setpoint("drum_level_setpoint", 0.0)
        enable = self._flag("boiler_enable", True)
        prev_draw = self._draw
        n = min(_MAX_SUBSTEPS, math.ceil(dt / _SUBSTEP))
        h = dt / n if n else 0.0
        for i in range(n):
            self._substep(h, t - dt + (i + 1) * h, sp, enable)
        load = self._draw / self._rated
        firing = self._state in (3, 4)
        self._level_noise = ou_step(self.rng, self._level_noise, 0.0, 4.0, 60.0, max(dt, 1e-3))
        self._o2_noise = ou_step(self.rng, self._o2_noise, 0.0, 0.2, 300.0, max(dt, 1e-3))
        # Swell: a sudden rise in steam draw lifts the level before feedwater catches up.
        swell = 60.0 * (self._draw - prev_draw) / self._rated
        level = (
            level_sp
            + 20.0 * math.sin(2.0 * math.pi * t / 240.0 + self._level_phase)
            + swell
            + self._level_noise
        )
        feedwater = max(0.0, self._draw * 1.02 + (level_sp - level) * 0.002 * self._rated)
        if self._gas:
            o2 = 3.0 - 1.2 * (load - 0.5) + self._o2_noise if firing else 20.9
            exit_temp = 110.0 + 50.0 * load if firing else 60.0
            furnace = 200.0 + 800.0 * load if firing else 0.0
            steam_temp = 100.0 * (self._p * 10.0 + 1.0) ** 0.25
            feed_temp = 104.0
        else:
            o2 = 3.5 - 1.5 * (load - 0.5) + self._o2_noise if firing else 20.9
            exit_temp = 130.0 + 40.0 * load if firing else 80.0
            furnace = -60.0 + 15.0 * self._o2_noise * 5.0
            steam_temp = 400.0 + 50.0 * load if firing else 100.0 * (self._p * 10 + 1) ** 0.25
            feed_temp = 150.0
        alarms = (
            (1 if level < level_sp - 150 else 0)
            | (2 if level > level_sp + 150 else 0)
            | (4 if self._p > 1.08 * sp else 0)
            | (8 if exit_temp > 200 else 0)
            | (16 if firing and o2 < 1.5 else 0)
        )
        return {
            "steam_pressure": self._p,
            "steam_flow": self._draw,
            "steam_temp": steam_temp,
            "drum_level": level,
            "flue_gas_o2": o2,
            "flue_gas_exit_temp": exit_temp,
            "coal_feed_rate": self._fuel * 0.145,
            "gas_flow": self._fuel * 75.0,
            "feedwater_flow": feedwater,
            "feedwater_temp": feed_temp,
            "furnace_pressure": furnace,
            "load_percent": 100.0 * self._fuel / self._rated,
            "combustion_state": self._state,
            "alarm_word": alarms,
            "run_hours": self._run_hours,
            "steam_total": self._steam_total,
            "gas_total": self._gas_total,
            "burner_starts": self._starts,
            "burner_on": firing,
            "feed_pump_1_running": enable,
            "feed_pump_2_running": False,
            "id_fan_running": self._state != 0,
            "fd_fan_running": self._state != 0,
            "low_water_trip": level < level_sp - 250,
            "high_pressure_trip": self._p > 1.15 * sp,
            "controller_firmware": self._firmware,
            "boiler_enable": enable,
            "steam_pressure_setpoint": sp,
            "drum_level_setpoint": level_sp,
        }
