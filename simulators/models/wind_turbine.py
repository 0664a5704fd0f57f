"""Wind turbine: a gusty wind through a power curve with cut-in, rated and cut-out.

The ten-minute mean wind wanders slowly and gusts ride on it. Below 3 m/s the turbine
waits; between cut-in and 12 m/s power rises with the cube of the wind at fine pitch;
above rated the blades pitch to hold 2 MW; above 25 m/s it feathers and waits for the
storm to drop below 20 m/s. The nacelle yaws after the wind direction, drive-train
temperatures follow power, energy and operating hours count up.
"""

from __future__ import annotations

import math
import random

from device_profiles.schema import Profile
from simulators.models import Value
from simulators.models._base import FamilyModel, first_order, ou_step

__all__ = ["WindTurbineModel"]

_RATED_KW = 2000.0
_CUT_IN, _RATED_WIND, _CUT_OUT, _RESTART = 3.0, 12.0, 25.0, 20.0  # m/s
_ROTOR_MIN, _ROTOR_RATED, _GEAR = 6.0, 16.7, 106.0
_STOPPED, _WAITING, _STARTING, _PARTIAL, _FULL, _STORM = 0, 1, 2, 3, 4, 5


def power_curve(v: float) -> float:
    """Available electrical power (kW) at hub wind speed ``v`` (m/s)."""
    if v < _CUT_IN or v >= _CUT_OUT:
        return 0.0
    if v >= _RATED_WIND:
        return _RATED_KW
    return _RATED_KW * (v**3 - _CUT_IN**3) / (_RATED_WIND**3 - _CUT_IN**3)


class WindTurbineModel(FamilyModel):
    """2 MW pitch-regulated variable-speed turbine."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        super().__init__(profile, rng)
        self._site_mean = rng.uniform(6.5, 8.5)
        self._mean = self._site_mean
        self._gust = 0.0
        self._avg = self._mean
        self._direction = rng.uniform(0.0, 360.0)
        self._yaw = self._direction
        self._state = _WAITING
        self._power = 0.0
        self._rotor = 0.0
        self._pitch = 90.0
        self._oil = 20.0
        self._bearing = 22.0
        self._winding = 25.0
        self._q_noise = 0.0
        self._f_noise = 0.0
        self._energy = rng.uniform(1e6, 4e7)
        self._hours = rng.uniform(5000.0, 60000.0)
        self._blade_offset = [rng.uniform(-0.3, 0.3) for _ in range(3)]

    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        tick = max(dt, 1e-3)
        limit = self._setpoint("power_limit_setpoint", _RATED_KW)
        stop = self._flag("stop_request", False)
        # Slow weather (hours) and gusts (seconds); exact OU steps for any dt.
        self._mean = ou_step(self.rng, self._mean, self._site_mean, 3.5, 4 * 3600.0, tick)
        self._gust = ou_step(self.rng, self._gust, 0.0, 0.15 * max(self._mean, 1.0), 8.0, tick)
        wind = max(0.0, self._mean + self._gust)
        self._avg = first_order(self._avg, wind, dt, 60.0)
        self._direction = (self._direction + self.rng.gauss(0.0, 0.5) * math.sqrt(tick)) % 360.0
        err = (self._direction - self._yaw + 540.0) % 360.0 - 180.0
        if abs(err) > 8.0:
            # The yaw drive turns at about 0.5 deg/s until aligned.
            self._yaw = (self._yaw + math.copysign(min(abs(err), 0.5 * dt), err)) % 360.0

        if stop:
            self._state = _STOPPED
        elif self._state == _STORM:
            if self._avg < _RESTART:
                self._state = _WAITING
        elif self._avg >= _CUT_OUT:
            self._state = _STORM
        elif self._state in (_STOPPED, _WAITING):
            self._state = _STARTING if self._avg >= _CUT_IN else _WAITING
        elif self._state == _STARTING:
            self._state = _PARTIAL if self._rotor > _ROTOR_MIN * 0.9 else _STARTING
        elif self._avg < _CUT_IN * 0.9:
            self._state = _WAITING
        producing = self._state in (_PARTIAL, _FULL)
        available = power_curve(wind) if producing else 0.0
        target = min(available, limit)
        if producing:
            self._state = _FULL if target >= min(limit, _RATED_KW) * 0.98 else _PARTIAL
        self._power = first_order(self._power, target, dt, 4.0)
        if self._state in (_STARTING, _PARTIAL, _FULL):
            frac = min(1.0, max(0.0, (wind - _CUT_IN) / (9.0 - _CUT_IN)))
            rotor_target = _ROTOR_MIN + (_ROTOR_RATED - _ROTOR_MIN) * frac
        else:
            rotor_target = 0.3 * min(wind, 10.0) / 10.0  # feathered rotor idles
        self._rotor = first_order(self._rotor, rotor_target, dt, 10.0)
        if not producing:
            pitch_target = 90.0 if self._state != _STARTING else 20.0
        elif available > limit or wind >= _RATED_WIND:
            # Pitch to shed what the power curve (or the limit) cannot take.
            excess = max(wind - _RATED_WIND, 0.0) + 4.0 * (1.0 - limit / max(available, 1.0))
            pitch_target = 2.0 + 2.2 * excess
        else:
            pitch_target = 0.5
        self._pitch = first_order(self._pitch, min(90.0, pitch_target), dt, 3.0)

        ambient = 10.0 + 6.0 * math.sin(2.0 * math.pi * (t / 86400.0 - 0.3))
        load = self._power / _RATED_KW
        self._oil = first_order(self._oil, ambient + 25.0 + 20.0 * load, dt, 1800.0)
        self._bearing = first_order(self._bearing, self._oil + 5.0 + 10.0 * load, dt, 600.0)
        self._winding = first_order(self._winding, ambient + 30.0 + 60.0 * load, dt, 900.0)
        self._q_noise = ou_step(self.rng, self._q_noise, 0.0, 20.0, 60.0, tick)
        self._f_noise = ou_step(self.rng, self._f_noise, 0.0, 0.02, 30.0, tick)
        self._energy += max(0.0, self._power) * dt / 3600.0
        if producing:
            self._hours += dt / 3600.0
        alarms = (1 if self._state == _STORM else 0) | (16 if abs(err) > 25.0 else 0)
        # Auxiliaries draw a few kW when the turbine is not producing.
        power = self._power if producing or self._power > 1.0 else -8.0
        return {
            "wind_speed": wind,
            "wind_direction": self._direction,
            "rotor_speed": self._rotor,
            "generator_speed": self._rotor * _GEAR,
            "pitch_angle_1": self._pitch + self._blade_offset[0],
            "pitch_angle_2": self._pitch + self._blade_offset[1],
            "pitch_angle_3": self._pitch + self._blade_offset[2],
            "yaw_position": self._yaw,
            "active_power": power,
            "reactive_power": 0.05 * self._power + self._q_noise if producing else 0.0,
            "gearbox_bearing_temp": self._bearing,
            "gearbox_oil_temp": self._oil,
            "generator_winding_temp": self._winding,
            "nacelle_temp": ambient + 8.0 + 6.0 * load,
            "ambient_temp": ambient,
            "turbine_state": self._state,
            "energy_total": self._energy,
            "operating_hours": self._hours,
            "grid_frequency": 50.0 + self._f_noise,
            "alarm_word": alarms,
            "power_limit_setpoint": limit,
            "stop_request": stop,
        }
