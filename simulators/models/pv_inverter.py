"""PV string inverter: power follows a daylight curve, with clouds, clipping and sleep.

Simulation time is mapped to time of day with one simulated minute per hour
(``DAY_SECONDS`` = 1440 s per day), starting at 06:00, so a demo sees sunrise, noon
clipping and night within minutes. At night the inverter sleeps with zero power; at
dawn it starts, tracks the maximum power point through the day, throttles when the
array could give more than the AC rating, and shuts down at dusk. The SunSpec scale
factors and model headers are constants; lifetime energy only rises.
"""

from __future__ import annotations

import math
import random

from device_profiles.schema import Profile
from simulators.models import Value
from simulators.models._base import FamilyModel, first_order, ou_step

__all__ = ["DAY_SECONDS", "START_HOUR", "PvInverterModel", "hour_of_day"]

DAY_SECONDS = 1440.0  # simulation seconds per solar day
START_HOUR = 6.0  # time of day at simulation time 0
_AC_RATED = 25000.0  # W
_DC_PEAK = 30000.0  # W of array (DC/AC ratio 1.2) at 1000 W/m2 and 25 degC
_OFF, _SLEEPING, _STARTING, _MPPT, _THROTTLED, _SHUTTING_DOWN = 1, 2, 3, 4, 5, 6
_TRANSITION_H = 0.1  # hours of day spent starting up or shutting down

_SCALE_FACTORS: dict[str, int] = {
    "A_SF": -2,
    "V_SF": -1,
    "W_SF": 0,
    "Hz_SF": -2,
    "VA_SF": 0,
    "VAr_SF": 0,
    "PF_SF": -1,
    "WH_SF": 0,
    "DCA_SF": -2,
    "DCV_SF": -1,
    "DCW_SF": 0,
    "Tmp_SF": -1,
}


def hour_of_day(t: float) -> float:
    """Time of day in hours (0..24) at simulation time ``t``."""
    return (START_HOUR + 24.0 * t / DAY_SECONDS) % 24.0


class PvInverterModel(FamilyModel):
    """Three-phase grid-tied string inverter with a SunSpec register map."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        super().__init__(profile, rng)
        self._serial = f"PV25K{rng.randint(0, 9_999_999):07d}"
        self._state = _STARTING
        self._state_h = 0.0
        self._clouds = 0.0
        self._day = -1
        self._rise, self._set = 6.0, 18.5
        self._temp = 20.0
        self._wh = rng.uniform(1e6, 2e8)
        self._v = [0.0, 0.0, 0.0]
        self._hz = 0.0
        self._q = 0.0

    def _sun(self, t: float) -> float:
        """Clear-sky irradiance (W/m2) at simulation time ``t``."""
        day = int((t / DAY_SECONDS) + START_HOUR / 24.0)
        if day != self._day:
            # Each day has its own sunrise and sunset, like a drifting season.
            self._day = day
            self._rise = 5.5 + self.rng.uniform(0.0, 1.0)
            self._set = 18.0 + self.rng.uniform(0.0, 1.5)
        h = hour_of_day(t)
        if not self._rise < h < self._set:
            return 0.0
        x = (h - self._rise) / (self._set - self._rise)
        return 1000.0 * float(math.sin(math.pi * x) ** 1.3)

    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        tick = max(dt, 1e-3)
        day_dt = 86400.0 * tick / DAY_SECONDS  # seconds of the solar day in this step
        self._clouds = ou_step(self.rng, self._clouds, 0.0, 0.25, 1800.0, day_dt)
        clear = self._sun(t)
        irradiance = clear * min(1.0, max(0.15, 0.9 + self._clouds))
        hours = 24.0 * dt / DAY_SECONDS
        self._state_h += hours
        light = irradiance > 5.0
        s = self._state
        if s in (_SLEEPING, _OFF) and light:
            s, self._state_h = _STARTING, 0.0
        elif s == _STARTING and not light:
            s, self._state_h = _SLEEPING, 0.0
        elif s == _STARTING and self._state_h >= _TRANSITION_H:
            s, self._state_h = _MPPT, 0.0
        elif s in (_MPPT, _THROTTLED) and not light:
            s, self._state_h = _SHUTTING_DOWN, 0.0
        elif s == _SHUTTING_DOWN and self._state_h >= _TRANSITION_H:
            s, self._state_h = _SLEEPING, 0.0
        ambient = 12.0 + 8.0 * math.sin(2.0 * math.pi * (hour_of_day(t) - 9.0) / 24.0)
        cell_temp = ambient + 0.03 * irradiance
        dc_avail = _DC_PEAK * irradiance / 1000.0 * (1.0 - 0.004 * (cell_temp - 25.0))
        producing = s in (_MPPT, _THROTTLED)
        if producing:
            ac = min(_AC_RATED, 0.975 * dc_avail)
            s = _THROTTLED if 0.975 * dc_avail > _AC_RATED else _MPPT
            dcw = ac / 0.975
        else:
            ac = dcw = 0.0
        self._state = s
        if light or producing:
            dcv = 620.0 - 1.5 * (cell_temp - 25.0) if producing else 780.0
        else:
            dcv = 0.0
        dca = dcw / dcv if dcv > 0 else 0.0
        for i in range(3):
            self._v[i] = ou_step(self.rng, self._v[i], 0.0, 1.2, 60.0, tick)
        volts = [230.0 + x for x in self._v]
        self._hz = ou_step(self.rng, self._hz, 0.0, 0.02, 30.0, tick)
        self._q = ou_step(self.rng, self._q, 0.0, 150.0, 60.0, tick) if producing else 0.0
        va = math.hypot(ac, self._q)
        pf = 100.0 * ac / va if va > 0 else 100.0
        phase_a = [ac / 3.0 / v for v in volts]
        self._temp = first_order(self._temp, ambient + 8.0 + 25.0 * ac / _AC_RATED, dt, 60.0)
        self._wh += ac * dt / 3600.0
        values: dict[str, Value] = {
            "SunS": "SunS",
            "C_ID": 1,
            "C_L": 66,
            "Mn": "Generic",
            "SN": self._serial,
            "I_ID": 103,
            "I_L": 50,
            "A": sum(phase_a),
            "AphA": phase_a[0],
            "AphB": phase_a[1],
            "AphC": phase_a[2],
            "PhVphA": volts[0],
            "PhVphB": volts[1],
            "PhVphC": volts[2],
            "W": ac,
            "Hz": 50.0 + self._hz,
            "VA": va,
            "VAr": self._q,
            "PF": pf,
            "WH": self._wh,
            "DCA": dca,
            "DCV": dcv,
            "DCW": dcw,
            "TmpCab": self._temp,
            "St": s,
            "Evt1": 0,
            "End_ID": 0xFFFF,
            "End_L": 0,
        }
        values.update(_SCALE_FACTORS)
        return values
