"""Diesel genset: automatic start sequence, then 1500 rpm on a varying load.

On a start request the controller preheats, cranks, warms up at rated speed, closes the
breaker and takes load; on a stop request it unloads, cools down and stops. Fuel rate
and coolant temperature follow the load, the day tank drains and is refilled, run hours
and energy count up.
"""

from __future__ import annotations

import math
import random

from device_profiles.schema import Profile
from simulators.models import Value
from simulators.models._base import FamilyModel, first_order, ou_step

__all__ = ["DieselGensetModel"]

_STOPPED, _PREHEAT, _CRANKING, _WARMING, _RUNNING, _ON_LOAD, _COOLING, _STOPPING = range(8)
# Seconds spent in each timed state before the next one.
_DURATION = {_PREHEAT: 10.0, _CRANKING: 4.0, _WARMING: 30.0, _RUNNING: 5.0, _COOLING: 120.0}
_DURATION[_STOPPING] = 10.0
_AFTER = {
    _PREHEAT: _CRANKING,
    _CRANKING: _WARMING,
    _WARMING: _RUNNING,
    _RUNNING: _ON_LOAD,
    _COOLING: _STOPPING,
    _STOPPING: _STOPPED,
}
_SUBSTEP = 1.0
_MAX_SUBSTEPS = 20000
_RATED_KW = 500.0
_TANK_L = 1000.0
_AMBIENT = 25.0


class DieselGensetModel(FamilyModel):
    """500 kW diesel generating set with an auto-start controller."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        super().__init__(profile, rng)
        self._state = _STOPPED
        self._state_t = 0.0
        self._speed = 0.0
        self._kw = 0.0
        self._coolant = 40.0  # block heater keeps a standby engine warm
        self._oil_p = 0.0
        self._fuel_l = _TANK_L * rng.uniform(0.5, 0.95)
        self._load_noise = 0.0
        self._v_noise = [0.0, 0.0, 0.0]
        self._run_hours = rng.uniform(200.0, 8000.0)
        self._starts = rng.randint(50, 3000)
        self._energy = rng.uniform(1e4, 2e6)
        self._serial = f"GC{rng.randint(0, 99_999_999):08d}"[:16]
        self._fuel_rate = 0.0
        self._governor = 0.0

    def _next(self, start: bool) -> None:
        s = self._state
        timed_out = s in _DURATION and self._state_t >= _DURATION[s]
        if s == _STOPPED and start:
            s = _PREHEAT
        elif s in (_PREHEAT, _CRANKING, _WARMING, _RUNNING) and not start:
            s = _STOPPING
        elif s == _ON_LOAD and not start:
            s = _COOLING
        elif s == _COOLING and start:
            s = _ON_LOAD
        elif timed_out:
            s = _AFTER.get(s, s)
            if s == _WARMING:
                self._starts += 1
        if s != self._state:
            self._state, self._state_t = s, 0.0

    def _substep(self, h: float, t: float, start: bool, setpoint: float) -> None:
        self._state_t += h
        self._next(start)
        s = self._state
        if s in (_WARMING, _RUNNING, _ON_LOAD, _COOLING):
            speed_target = 1500.0
        elif s == _CRANKING:
            speed_target = 180.0
        else:
            speed_target = 0.0
        self._speed = first_order(self._speed, speed_target, h, 1.5)
        self._load_noise = ou_step(self.rng, self._load_noise, 0.0, 0.06, 600.0, h)
        if s == _ON_LOAD:
            shape = 0.85 + 0.15 * math.sin(2.0 * math.pi * t / 86400.0) + self._load_noise
            kw_target = setpoint * max(0.2, shape)
        else:
            kw_target = 0.0
        self._kw = min(1.1 * _RATED_KW, first_order(self._kw, kw_target, h, 5.0))
        turning = self._speed > 300.0
        if turning:
            self._fuel_rate = 6.0 + 0.22 * self._kw
        else:
            self._fuel_rate = 10.0 if s == _CRANKING else 0.0
        self._fuel_l -= self._fuel_rate * h / 3600.0
        if self._fuel_l < 0.25 * _TANK_L:
            self._fuel_l = 0.95 * _TANK_L  # transfer pump refills the day tank
        if turning:
            coolant_target, tau = 78.0 + 10.0 * self._kw / _RATED_KW, 600.0
        else:
            coolant_target, tau = 40.0, 3600.0
        self._coolant = first_order(self._coolant, coolant_target, h, tau)
        oil_target = 120.0 if s == _CRANKING else (380.0 + 0.03 * self._speed if turning else 0.0)
        self._oil_p = first_order(self._oil_p, oil_target, h, 2.0)
        if turning:
            self._run_hours += h / 3600.0
        self._energy += max(0.0, self._kw) * h / 3600.0

    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        start = self._flag("remote_start", True)
        setpoint = self._setpoint("load_setpoint", 320.0)
        n = min(_MAX_SUBSTEPS, math.ceil(dt / _SUBSTEP))
        h = dt / n if n else 0.0
        for i in range(n):
            self._substep(h, t - dt + (i + 1) * h, start, setpoint)
        s = self._state
        excited = s in (_WARMING, _RUNNING, _ON_LOAD, _COOLING) and self._speed > 1200
        tick = max(dt, 1e-3)
        volts = []
        for i in range(3):
            self._v_noise[i] = ou_step(self.rng, self._v_noise[i], 0.0, 1.0, 60.0, tick)
            volts.append(230.0 + self._v_noise[i] if excited else 0.0)
        # Isochronous governor: a few rpm of hunting around rated speed.
        self._governor = ou_step(self.rng, self._governor, 0.0, 2.0, 5.0, tick)
        speed = self._speed + (self._governor if self._speed > 1200 else 0.0)
        pf = 0.86 + 0.04 * self._kw / _RATED_KW if self._kw > 1.0 else 1.0
        kva = self._kw / pf if self._kw > 1.0 else 0.0
        amps = kva * 1000.0 / (3.0 * 230.0)
        fuel_pct = 100.0 * self._fuel_l / _TANK_L
        battery = 27.6 if self._speed > 300 else (21.5 if s == _CRANKING else 24.6)
        alarms_1 = (32 if fuel_pct < 30 else 0) | (2 if self._coolant > 98 else 0)
        return {
            "controller_serial": self._serial,
            "engine_state": s,
            "alarm_word_1": alarms_1,
            "alarm_word_2": 0,
            "oil_pressure": self._oil_p,
            "coolant_temp": self._coolant,
            "oil_temp": self._coolant + (8.0 if self._speed > 300 else 0.0),
            "fuel_level": fuel_pct,
            "battery_voltage": battery,
            "engine_speed": speed,
            "frequency": speed / 30.0,
            "voltage_l1_n": volts[0],
            "voltage_l2_n": volts[1],
            "voltage_l3_n": volts[2],
            "current_l1": amps * 1.01,
            "current_l2": amps * 0.99,
            "current_l3": amps,
            "power_kw": self._kw,
            "apparent_power_kva": kva,
            "power_factor": pf,
            "fuel_rate": self._fuel_rate,
            "run_hours": self._run_hours,
            "starts_count": self._starts,
            "energy_total": self._energy,
            "load_setpoint": setpoint,
            "remote_start": start,
            "breaker_closed": s == _ON_LOAD,
        }
