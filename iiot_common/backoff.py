"""Reconnection policy, in one place: a state enum and capped exponential backoff with jitter.

Device pollers, the agent's MQTT publisher and the gateway's MQTT ingest use it; drivers
never retry beyond their own per-request retries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["MQTT_RECONNECT_MAX", "MQTT_RECONNECT_MIN", "Backoff", "ConnState"]

# Bounds of the agents' and the gateway's MQTT reconnection. The longest wait is kept
# short so both resume within 5 s once a restarted broker is back; jitter (d/2 .. d)
# spreads a fleet's reconnections over that window instead of one burst.
MQTT_RECONNECT_MIN = 0.5
MQTT_RECONNECT_MAX = 3.0


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
