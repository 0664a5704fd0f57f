"""Reconnection policy, in one place: a state enum and capped exponential backoff with jitter.

Device pollers and the MQTT publisher both use it; drivers never retry beyond their own
per-request retries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Backoff", "ConnState"]


class ConnState(StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with full jitter on the upper half.

    The n-th consecutive failure waits a random time in ``[d/2, d]`` with
    ``d = min(maximum, initial * factor**(n-1))``; an authentication failure waits
    ``maximum`` straight away (retrying bad credentials quickly only fills broker logs).
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    state: ConnState = ConnState.DISCONNECTED

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")

    def next_delay(self, *, auth_failed: bool = False) -> float:
        """Record one failure and return how long to wait before the next attempt."""
        self.failures += 1
        self.state = ConnState.BACKING_OFF
        if auth_failed:
            return self.maximum
        # The exponent is capped so a long outage cannot overflow the float.
        d = min(self.maximum, self.initial * self.factor ** min(self.failures - 1, 60))
        return d / 2 + self.rng.random() * d / 2

    def succeeded(self) -> None:
        self.failures = 0
        self.state = ConnState.CONNECTED

    def connecting(self) -> None:
        self.state = ConnState.CONNECTING

    def lost(self) -> None:
        self.state = ConnState.DISCONNECTED
