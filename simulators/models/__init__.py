"""Physics of each equipment family: values that behave like the real thing.

A model is built for one device from its profile and a seeded ``random.Random`` and is
stepped with the simulation time; it returns engineering values keyed by point name.
Points a model does not know get a generic behaviour from their declared range, so a
profile an integrator adds without Python is still served.
"""

from __future__ import annotations

import importlib
import random
from typing import Protocol

from device_profiles.schema import Point, Profile, ValueType

__all__ = ["MODELS", "GenericModel", "Model", "model_for"]

Value = bool | int | float | str


class Model(Protocol):
    def step(self, t: float) -> dict[str, Value]:
        """Values at simulation time ``t`` (seconds since start; never decreases)."""


# family -> "module:Class"; each class takes (profile, rng) and knows its family's points.
MODELS: dict[str, str] = {
    "kiln": "simulators.models.kiln:KilnModel",
    "boiler": "simulators.models.boiler:BoilerModel",
    "air_compressor": "simulators.models.air_compressor:AirCompressorModel",
    "motor": "simulators.models.motor:MotorModel",
    "diesel_genset": "simulators.models.diesel_genset:DieselGensetModel",
    "wind_turbine": "simulators.models.wind_turbine:WindTurbineModel",
    "pv_inverter": "simulators.models.pv_inverter:PvInverterModel",
    "cnc_machine": "simulators.models.cnc_machine:CncMachineModel",
}


class GenericModel:
    """Range-bounded random walks, rising counters, steady states, for unknown points."""

    _COUNTER_HINTS = ("hours", "count", "total", "energy", "starts", "parts")

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        self._state: dict[str, Value] = {}
        self._t = 0.0
        # Scale-factor registers (SunSpec *_SF) are constants of the device.
        self._constant = {p.scale_factor_point for p in profile.points if p.scale_factor_point}
        for p in profile.points:
            self._state[p.name] = self._initial(p)
        self._plan = self._moving()

    def _initial(self, p: Point) -> Value:
        if p.type is ValueType.BOOL:
            return False
        if p.type is ValueType.STRING:
            return self.profile.name[:32]
        if p.name in self._constant:
            if p.range is not None and p.range[0] == p.range[1]:
                return round(p.range[0])  # the profile pins the device's scale factor
            return -1 if p.type is ValueType.INT16 else 0
        if p.enum:
            return min(p.enum)
        if p.bits:
            return 0
        lo, hi = p.range or (0.0, 100.0)
        v = lo + (hi - lo) * (0.4 + 0.2 * self.rng.random())
        return self._typed(p, v)

    @staticmethod
    def _typed(p: Point, v: float) -> Value:
        if p.type in (ValueType.FLOAT32, ValueType.FLOAT64):
            return v
        return round(v)

    def _moving(self) -> list[tuple[str, bool, float, float, float, float, bool]]:
        """(name, is a counter, low, high, span, walk sigma, keeps floats) of changing points."""
        out: list[tuple[str, bool, float, float, float, float, bool]] = []
        for p in self.profile.points:
            cur = self._state[p.name]
            if isinstance(cur, bool | str) or p.enum or p.bits or p.name in self._constant:
                continue
            lo, hi = p.range or (0.0, 100.0)
            span = hi - lo
            counter = any(h in p.name for h in self._COUNTER_HINTS)
            floats = p.type in (ValueType.FLOAT32, ValueType.FLOAT64)
            out.append((p.name, counter, lo, hi, span, span * 0.01, floats))
        return out

    def step(self, t: float) -> dict[str, Value]:
        dt = max(0.0, t - self._t)
        self._t = t
        state = self._state
        gauss = self.rng.gauss
        root = dt**0.5
        for name, counter, lo, hi, span, sigma, floats in self._plan:
            if counter:
                nxt = float(state[name]) + dt * span / 86400.0
            else:
                nxt = float(state[name]) + gauss(0.0, sigma) * root
                # min(hi, max(lo, nxt)), spelled out: this loop runs per point per request.
                nxt = nxt if nxt > lo else lo
                nxt = nxt if nxt < hi else hi
            state[name] = nxt if floats else round(nxt)
        return dict(state)


def model_for(profile: Profile, rng: random.Random) -> Model:
    """The family model of ``profile``, or the generic model when there is none."""
    target = MODELS.get(profile.family)
    if target is None:
        return GenericModel(profile, rng)
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    model: Model = cls(profile, rng)
    return model
