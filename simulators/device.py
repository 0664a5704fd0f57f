"""One simulated device: a profile, its family model, its faults, and written setpoints."""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable

from device_profiles.schema import Point, Profile, ValueType
from simulators.faults import FaultMode, FaultState
from simulators.models import Model, Value, model_for

__all__ = ["SimDevice"]


class SimDevice:
    """Values of one device at the current (or given) simulation time.

    The seed and device id fix the behaviour: the same seed gives the same values at the
    same simulation time. ``clock`` is injectable so tests can step time.
    """

    def __init__(
        self,
        profile: Profile,
        *,
        device_id: str,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        time_scale: float = 1.0,
    ) -> None:
        self.profile = profile
        self.device_id = device_id
        self.faults = FaultState()
        self.rng = random.Random(seed * 1_000_003 + zlib.crc32(device_id.encode()))
        self.model: Model = model_for(profile, self.rng)
        self._clock = clock
        self._t0 = clock()
        self.time_scale = time_scale
        self._overrides: dict[str, Value] = {}
        self._last_t = -1.0
        self._last: dict[str, Value] = {}
        self.requests = 0  # counted by the servers: one per protocol request answered
        self.writes = 0  # rw points written (by clients, through the servers)

    @property
    def sim_time(self) -> float:
        return (self._clock() - self._t0) * self.time_scale

    def values(self, t: float | None = None) -> dict[str, Value]:
        """Engineering values of every point (after written setpoints and faults)."""
        t = self.sim_time if t is None else t
        if t != self._last_t:
            # Several requests in one poll see one consistent snapshot per time step.
            self._last = dict(self.model.step(max(t, self._last_t)))
            self._last_t = max(t, self._last_t)
        out = {**self._last, **self._overrides}
        if self.faults.mode is FaultMode.OUT_OF_RANGE:
            out = {p.name: self._out_of_range(p, out.get(p.name)) for p in self.profile.points}
        return out

    @staticmethod
    def _out_of_range(p: Point, v: Value | None) -> Value:
        if p.range is None or p.type in (ValueType.BOOL, ValueType.STRING) or v is None:
            return v if v is not None else 0
        lo, hi = p.range
        bad = hi + (hi - lo) * 10 + 1
        return bad if p.type in (ValueType.FLOAT32, ValueType.FLOAT64) else round(bad)

    def write(self, name: str, value: Value) -> None:
        """A client wrote an rw point: it holds that value until written again."""
        point = self.profile.point(name)
        if point.access != "rw":
            raise PermissionError(f"point '{name}' is read-only")
        self._overrides[name] = value
        self.writes += 1
        # Family models that keep a ``setpoints`` dict react to writes (e.g. kiln speed).
        setpoints = getattr(self.model, "setpoints", None)
        if isinstance(setpoints, dict):
            setpoints[name] = value
