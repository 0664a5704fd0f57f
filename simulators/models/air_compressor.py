"""Screw air compressor with load/unload control between two pressures.

Loaded, the compressor delivers its free air and the net pressure rises while the
plant's demand is below it; at the unload pressure it unloads, power drops to about a
third, and the pressure falls with the demand until the load pressure loads it again.
Current follows power, temperatures lag the load state, running and loaded hours and
load cycles count up, service counters count down.
"""

from __future__ import annotations

import math
import random

from device_profiles.schema import Profile
from simulators.models import Value
from simulators.models._base import FamilyModel, first_order, ou_step

__all__ = ["AirCompressorModel"]

_STOPPED, _STARTING, _UNLOADED, _LOADED = 0, 1, 2, 3
_SUBSTEP = 1.0  # s: the pressure band is crossed in tens of seconds
_MAX_SUBSTEPS = 20000
_START_TIME = 10.0  # s: star-delta start
_NET_VOLUME = 900.0  # (m3/min of free air) * s per bar of net pressure
_FAD = 22.5  # m3/min at rated pressure
_P_LOADED, _P_UNLOADED = 128.0, 38.0  # kW


class AirCompressorModel(FamilyModel):
    """Fixed-speed oil-injected screw compressor."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        super().__init__(profile, rng)
        self._state = _STARTING
        self._state_t = 0.0
        self._p = rng.uniform(5.5, 6.5)
        self._demand = 0.0
        self._t_dis = 25.0
        self._t_oil = 25.0
        self._power = 0.0
        self._sp_power = rng.uniform(5.6, 6.0)
        self._run_hours = rng.uniform(2000.0, 40000.0)
        self._load_hours = self._run_hours * rng.uniform(0.55, 0.8)
        self._starts = rng.randint(100, 5000)
        self._cycles = rng.randint(10000, 500000)
        self._service = rng.uniform(800.0, 3900.0)
        self._oil_filter = rng.uniform(400.0, 1900.0)
        self._noise = 0.0

    def _substep(self, h: float, t: float, lo: float, hi: float, run: bool) -> None:
        self._demand = ou_step(self.rng, self._demand, 0.0, 0.18, 600.0, h)
        day = 0.55 + 0.15 * math.sin(2.0 * math.pi * t / 86400.0)
        demand = min(0.95, max(0.15, day + self._demand)) * _FAD
        if not run:
            self._state, self._state_t = _STOPPED, 0.0
        elif self._state == _STOPPED:
            self._state, self._state_t = _STARTING, 0.0
            self._starts += 1
        self._state_t += h
        if self._state == _STARTING and self._state_t >= _START_TIME:
            self._state = _UNLOADED
        if self._state == _UNLOADED and self._p <= lo:
            self._state = _LOADED
            self._cycles += 1
        elif self._state == _LOADED and self._p >= hi:
            self._state = _UNLOADED
        delivered = _FAD * (1.0 - 0.02 * (self._p - 7.0)) if self._state == _LOADED else 0.0
        self._p = max(0.0, self._p + (delivered - demand) / _NET_VOLUME * h)
        if self._state == _LOADED:
            target = _P_LOADED + 3.0 * (self._p - 7.5)
        elif self._state in (_UNLOADED, _STARTING):
            target = _P_UNLOADED
        else:
            target = 0.0
        self._power = first_order(self._power, target, h, 2.0)
        if self._state != _STOPPED:
            self._run_hours += h / 3600.0
            self._service = max(0.0, self._service - h / 3600.0)
            self._oil_filter = max(0.0, self._oil_filter - h / 3600.0)
        if self._state == _LOADED:
            self._load_hours += h / 3600.0

    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        lo = self._setpoint("load_pressure_setpoint", 7.0)
        hi = max(lo + 0.2, self._setpoint("unload_pressure_setpoint", 7.8))
        run = self._flag("remote_start", True)
        n = min(_MAX_SUBSTEPS, math.ceil(dt / _SUBSTEP))
        h = dt / n if n else 0.0
        for i in range(n):
            self._substep(h, t - dt + (i + 1) * h, lo, hi, run)
        ambient = 20.0 + 6.0 * math.sin(2.0 * math.pi * (t / 86400.0 - 0.3))
        loaded = self._state == _LOADED
        running = self._state != _STOPPED
        dis_target = ambient + (55.0 + 5.0 * (self._p - 7.0) if loaded else 45.0)
        self._t_dis = first_order(self._t_dis, dis_target if running else ambient, dt, 120.0)
        self._t_oil = first_order(self._t_oil, self._t_dis - 12.0, dt, 300.0)
        self._noise = ou_step(self.rng, self._noise, 0.0, 0.8, 20.0, max(dt, 1e-3))
        power = max(0.0, self._power + (self._noise if running else 0.0))
        fad = _FAD * (1.0 - 0.02 * (self._p - 7.0)) if loaded else 0.0
        if loaded and fad > 0:
            self._sp_power = power / fad
        service_due = self._service < 100.0 or self._oil_filter < 50.0
        status = (
            (1 if running else 0)
            | (2 if loaded else 0)
            | 4
            | (8 if service_due or self._t_dis > 105.0 else 0)
            | (32 if service_due else 0)
        )
        return {
            "discharge_pressure": self._p,
            "discharge_temp": self._t_dis,
            "oil_temp": self._t_oil,
            "ambient_temp": ambient,
            "motor_current": power * 1000.0 / (math.sqrt(3.0) * 400.0 * 0.88),
            "power": power,
            "free_air_delivery": fad,
            "specific_power": self._sp_power,
            "load_state": self._state,
            "status_word": status,
            "run_hours": self._run_hours,
            "load_hours": self._load_hours,
            "motor_starts": self._starts,
            "load_cycles": self._cycles,
            "service_hours_remaining": self._service,
            "oil_filter_hours_remaining": self._oil_filter,
            "high_temp_shutdown": False,
            "motor_overload": False,
            "emergency_stop": False,
            "remote_start": run,
            "load_pressure_setpoint": lo,
            "unload_pressure_setpoint": hi,
        }
