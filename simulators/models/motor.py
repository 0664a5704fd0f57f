"""HV motor on a drive: a wandering process load, current proportional to power.

Speed ramps to the speed setpoint; the driven machine's load wanders (a fan or pump
law times a slow random process). Power follows load and speed, current follows power,
power factor rises with load, winding and bearing temperatures lag the load, and
vibration grows with speed and load with noise on top.
"""

from __future__ import annotations

import math
import random

from device_profiles.schema import Profile
from simulators.models import Value
from simulators.models._base import FamilyModel, first_order, ou_step

__all__ = ["MotorModel"]

_RATED_KW = 1000.0
_RATED_V = 6000.0
_SYNC_RPM = 1500.0


class MotorModel(FamilyModel):
    """Induction motor, variable-frequency drive, protection relay."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        super().__init__(profile, rng)
        self._speed = 0.0
        self._load = 0.0
        self._winding = [25.0 + rng.uniform(-1, 1) for _ in range(3)]
        self._bearing = [25.0, 25.0]
        self._vib = [0.0, 0.0]
        self._v = [0.0, 0.0, 0.0]
        self._running = False
        self._energy = rng.uniform(1e6, 3e7)
        self._run_hours = rng.uniform(5000.0, 60000.0)
        self._starts = rng.randint(50, 2000)
        self._imbalance = [rng.uniform(-0.02, 0.02) for _ in range(3)]

    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        run = self._flag("run_command", True)
        speed_sp = self._setpoint("speed_setpoint", 1480.0)
        torque_limit = self._setpoint("torque_limit", 120.0)
        tick = max(dt, 1e-3)
        if run and not self._running:
            self._starts += 1
        self._running = run
        # The drive ramps at about 100 rpm/s; model it as a short first-order lag.
        self._speed = first_order(self._speed, speed_sp if run else 0.0, dt, 8.0)
        self._load = ou_step(self.rng, self._load, 0.0, 0.1, 1800.0, tick)
        process = 0.75 + 0.1 * math.sin(2.0 * math.pi * t / 86400.0) + self._load
        process = min(1.05, max(0.3, process))
        n = self._speed / _SYNC_RPM
        # Pump/fan law: power goes with the cube of speed; the torque limit caps it.
        power = _RATED_KW * process * n**3
        power = min(power, _RATED_KW * torque_limit / 100.0 * n)
        load_frac = power / _RATED_KW
        pf = 0.78 + 0.1 * load_frac if self._speed > 5 else 0.0
        volts = []
        for i in range(3):
            self._v[i] = ou_step(self.rng, self._v[i], 0.0, 20.0, 120.0, tick)
            volts.append(_RATED_V + self._v[i])
        v_avg = sum(volts) / 3.0
        current = power * 1000.0 / (math.sqrt(3.0) * v_avg * pf) if pf > 0 else 0.0
        for i in range(3):
            target = 30.0 + 75.0 * load_frac**2 + 2.0 * i
            self._winding[i] = first_order(self._winding[i], target, dt, 1800.0)
        for i in range(2):
            target = 30.0 + 25.0 * load_frac + 12.0 * n - 3.0 * i
            self._bearing[i] = first_order(self._bearing[i], target, dt, 3600.0)
        vib = []
        for i in range(2):
            self._vib[i] = ou_step(self.rng, self._vib[i], 0.0, 0.25, 30.0, tick)
            base = (1.1 + 0.9 * load_frac) * n - 0.2 * i
            vib.append(max(0.02, base + self._vib[i] * n))
        self._energy += power * dt / 3600.0
        running = self._speed > 5.0
        if running:
            self._run_hours += dt / 3600.0
        warning = max(self._winding) > 130 or max(vib) > 7.1
        status = (
            1
            | (2 if running else 0)
            | (4 if running else 0)
            | (8 if abs(self._speed - speed_sp) < 15 and run else 0)
            | 16
            | (32 if warning else 0)
        )
        faults = (8 if max(self._winding) > 155 else 0) | (32 if max(vib) > 11 else 0)
        return {
            "voltage_uv": volts[0],
            "voltage_vw": volts[1],
            "voltage_wu": volts[2],
            "current_u": current * (1.0 + self._imbalance[0]),
            "current_v": current * (1.0 + self._imbalance[1]),
            "current_w": current * (1.0 + self._imbalance[2]),
            "active_power": power,
            "power_factor": pf,
            "frequency": self._speed / 30.0 * 1.01 if running else 0.0,
            "speed": self._speed,
            "winding_temp_u": self._winding[0],
            "winding_temp_v": self._winding[1],
            "winding_temp_w": self._winding[2],
            "bearing_temp_de": self._bearing[0],
            "bearing_temp_nde": self._bearing[1],
            "vibration_de": vib[0],
            "vibration_nde": vib[1],
            "energy_total": self._energy,
            "run_hours": self._run_hours,
            "starts_count": self._starts,
            "status_word": status,
            "fault_word": faults,
            "speed_setpoint": speed_sp,
            "torque_limit": torque_limit,
            "run_command": run,
            "fault_reset": False,
        }
