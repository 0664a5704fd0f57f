"""Rotary cement kiln: a cold kiln heating to its burning-zone setpoint.

The burning zone follows a first-order curve toward the setpoint while the burner is
on (and cools toward ambient when it is off). Coal flow is what the temperature
controller asks for: feed demand plus extra while the kiln is below setpoint. The other
zones, the ID fan, draft, primary air and gas analysis follow from temperature, coal
and feed. Feed and full kiln speed come in only once the kiln is near its setpoint.
"""

from __future__ import annotations

import math
import random

from device_profiles.schema import Profile
from simulators.models import Value
from simulators.models._base import FamilyModel, first_order, ou_step

__all__ = ["KilnModel"]

_AMBIENT = 25.0
_HEAT_TAU = 7200.0  # s: burning zone heat-up time constant
_COOL_TAU = 21600.0  # s: refractory holds heat for hours


class KilnModel(FamilyModel):
    """Rotary kiln with precalciner and coal burner."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        super().__init__(profile, rng)
        self._bz = _AMBIENT + rng.uniform(0.0, 10.0)
        self._shell = self._bz
        self._feed = 0.0
        self._speed = 0.3
        self._o2 = 21.0
        self._noise = {"bz": 0.0, "coal": 0.0, "fan": 0.0, "o2": 0.0, "draft": 0.0}
        self._run_hours = rng.uniform(20000.0, 60000.0)
        self._coal_total = rng.uniform(100000.0, 1000000.0)

    def _n(self, key: str, sigma: float, tau: float, dt: float) -> float:
        self._noise[key] = ou_step(self.rng, self._noise[key], 0.0, sigma, tau, max(dt, 1e-3))
        return self._noise[key]

    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        sp = self._setpoint("burning_zone_temp_setpoint", 1450.0)
        speed_sp = self._setpoint("kiln_speed_setpoint", 3.5)
        feed_sp = self._setpoint("feed_setpoint", 300.0)
        burner = self._flag("burner_on_cmd", True)
        feed_cmd = self._flag("feed_on_cmd", True)

        target = sp if burner else _AMBIENT
        self._bz = first_order(self._bz, target, dt, _HEAT_TAU if burner else _COOL_TAU)
        bz = self._bz + self._n("bz", 3.0, 120.0, dt) * (1.0 if burner else 0.2)
        self._shell = first_order(self._shell, _AMBIENT + 0.23 * (self._bz - _AMBIENT), dt, 3600)

        # Meal goes in only when the burning zone can take it.
        feeding = burner and feed_cmd and self._bz > sp - 150.0
        self._feed = first_order(self._feed, feed_sp if feeding else 0.0, dt, 1800.0)
        feed_frac = self._feed / feed_sp if feed_sp > 0 else 0.0
        speed_target = 0.3 if self._feed < 10.0 else speed_sp * min(1.0, 0.3 + 0.7 * feed_frac)
        self._speed = first_order(self._speed, speed_target, dt, 300.0)

        coal = 0.0
        if burner:
            coal = 2.5 + 0.035 * self._feed + 0.004 * max(0.0, sp - self._bz)
            coal = min(22.0, max(1.5, coal * (1.0 + self._n("coal", 0.01, 60.0, dt))))
        self._coal_total += coal * dt / 3600.0

        fan = 250.0 + 14.0 * coal + 0.6 * self._feed + self._n("fan", 4.0, 60.0, dt)
        draft = -0.0009 * fan * fan + self._n("draft", 8.0, 30.0, dt)
        o2_target = 2.6 - 0.05 * (coal - 12.0) if burner else 20.9
        self._o2 = first_order(self._o2, o2_target, dt, 600.0)
        o2 = max(0.2, self._o2 + (self._n("o2", 0.25, 90.0, dt) if burner else 0.0))
        co = 120.0 + 1500.0 * math.exp(-2.0 * (o2 - 0.5)) if burner else 0.0
        running = self._speed > 0.1
        if running:
            self._run_hours += dt / 3600.0

        def zone(k: float) -> float:
            return _AMBIENT + k * (bz - _AMBIENT)

        status = (
            (1 if running else 0)
            | (2 if burner else 0)
            | (4 if fan > 50 else 0)
            | (8 if self._feed > 10 else 0)
            | (16 if feeding else 0)
            | 32
        )
        alarms = (
            (1 if bz > sp + 50 else 0)
            | (2 if self._shell > 380 else 0)
            | (4 if co > 1000 else 0)
            | (64 if burner and o2 < 1.0 else 0)
        )
        return {
            "burning_zone_temp": bz,
            "transition_zone_temp": zone(0.88),
            "calcining_zone_temp": zone(0.62),
            "inlet_temp": zone(0.72),
            "shell_temp_max": self._shell,
            "coal_flow": coal,
            "primary_air_flow": 1500.0 + 800.0 * coal if burner else 0.0,
            "raw_meal_feed": self._feed,
            "id_fan_speed": fan,
            "id_fan_current": 40.0 + 380.0 * (fan / 1000.0) ** 3,
            "inlet_draft": draft,
            "kiln_speed": self._speed,
            "main_drive_current": 60.0 + 95.0 * self._speed * (0.4 + 0.6 * feed_frac),
            "inlet_o2": o2,
            "inlet_co": co,
            "status_word": status,
            "alarm_word": alarms,
            "run_hours": self._run_hours,
            "coal_total": self._coal_total,
            "flame_detected": burner,
            "cooler_running": self._feed > 10.0,
            "burner_on_cmd": burner,
            "feed_on_cmd": feed_cmd,
            "burning_zone_temp_setpoint": sp,
            "kiln_speed_setpoint": speed_sp,
            "feed_setpoint": feed_sp,
        }
