"""What every family model shares: typed, range-bounded output and a generic fallback.

A family model computes its physics in ``_advance`` and returns plain floats, bools and
strings by point name. The base turns them into what each point declares (quantised to
the register's resolution, clamped to the declared range, ints for integer types) and
serves any point the family does not know with :class:`GenericModel` behaviour.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod

from device_profiles.schema import Point, Profile, ValueType
from simulators.models import GenericModel, Value

__all__ = ["FamilyModel", "first_order", "ou_step"]

_INT_TYPES = {ValueType.INT16, ValueType.UINT16, ValueType.INT32, ValueType.UINT32, ValueType.INT64}
_INT_LIMITS: dict[ValueType, tuple[int, int]] = {
    ValueType.INT16: (-(2**15), 2**15 - 1),
    ValueType.UINT16: (0, 2**16 - 1),
    ValueType.INT32: (-(2**31), 2**31 - 1),
    ValueType.UINT32: (0, 2**32 - 1),
    ValueType.INT64: (-(2**63), 2**63 - 1),
}


def first_order(current: float, target: float, dt: float, tau: float) -> float:
    """Exact first-order lag step: stable for any ``dt``."""
    if tau <= 0:
        return target
    return target + (current - target) * math.exp(-dt / tau)


def ou_step(
    rng: random.Random, x: float, mean: float, sigma: float, tau: float, dt: float
) -> float:
    """Exact Ornstein-Uhlenbeck step: noise around ``mean`` with stationary spread ``sigma``."""
    a = math.exp(-dt / tau)
    return mean + (x - mean) * a + sigma * math.sqrt(max(0.0, 1.0 - a * a)) * rng.gauss(0.0, 1.0)


class FamilyModel(ABC):
    """Base of the family models; subclasses implement ``_advance(dt, t)``."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        # Written rw points (SimDevice forwards writes here) so the physics can react.
        self.setpoints: dict[str, Value] = {}
        self._points = {p.name: p for p in profile.points}
        self._fallback_rng = random.Random(rng.getrandbits(64))
        self._fallback: GenericModel | None = None
        self._fallback_ready = False
        self._t: float | None = None

    # -- for subclasses -------------------------------------------------------------

    @abstractmethod
    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        """Move the physics on by ``dt`` seconds to time ``t``; values of the family's points."""

    def _setpoint(self, name: str, default: float) -> float:
        """A written setpoint (clamped to its range) or the model's default."""
        v = self.setpoints.get(name)
        if v is None or isinstance(v, str):
            return default
        x = float(v)
        if not math.isfinite(x):
            return default
        p = self._points.get(name)
        if p is not None and p.range is not None:
            x = min(p.range[1], max(p.range[0], x))
        return x

    def _flag(self, name: str, default: bool) -> bool:
        """A written bool command (coil) or the model's default."""
        v = self.setpoints.get(name)
        return default if v is None else bool(v)

    # -- the Model protocol ---------------------------------------------------------

    def step(self, t: float) -> dict[str, Value]:
        dt = 0.0 if self._t is None else max(0.0, t - self._t)
        self._t = t if self._t is None else max(t, self._t)
        raw = self._advance(dt, self._t)
        if not self._fallback_ready:
            self._fallback_ready = True
            unknown = [p for p in self.profile.points if p.name not in raw]
            if unknown:
                sub = self.profile.model_copy(update={"points": unknown})
                self._fallback = GenericModel(sub, self._fallback_rng)
        out: dict[str, Value] = {}
        for p in self.profile.points:
            if p.name in raw:
                out[p.name] = self._fit(p, raw[p.name], raw)
        if self._fallback is not None:
            extra = self._fallback.step(self._t)
            out.update({k: v for k, v in extra.items() if k not in out})
        return out

    def _fit(self, p: Point, v: Value, raw: dict[str, Value]) -> Value:
        if p.type is ValueType.BOOL:
            return bool(v)
        if p.type is ValueType.STRING:
            return str(v)
        x = float(v)
        if not math.isfinite(x):
            x = p.range[0] if p.range else 0.0
        lo, hi = p.range if p.range is not None else (-math.inf, math.inf)
        x = min(hi, max(lo, x))
        if p.type not in _INT_TYPES:
            return x
        # Integer registers: land exactly on a representable raw value inside the range.
        step = p.scale
        if p.scale_factor_point is not None:
            sf = raw.get(p.scale_factor_point, 0)
            step *= 10.0 ** int(sf) if not isinstance(sf, str) else 1.0
        rlo, rhi = _INT_LIMITS[p.type]
        if p.range is not None:
            a, b = (lo - p.offset) / step, (hi - p.offset) / step
            a, b = min(a, b), max(a, b)
            rlo, rhi = max(rlo, math.ceil(a - 1e-9)), min(rhi, math.floor(b + 1e-9))
        n = min(rhi, max(rlo, round((x - p.offset) / step)))
        if step == 1.0 and p.offset == 0.0:
            return int(n)
        return round(n * step + p.offset, 10)
