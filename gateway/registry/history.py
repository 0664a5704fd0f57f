"""The last state changes of each device (online/offline with the reason), in memory.

Kept per gateway instance and lost on restart: it answers "why did this device drop
just now", not an archive (the time series and the registry's columns are that).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["HISTORY_PER_DEVICE", "StateChange", "StateHistory"]

HISTORY_PER_DEVICE = 50


@dataclass(frozen=True, slots=True)
class StateChange:
    """One change: when, online or not, why, and whose message said so (agent or device)."""

    ts: int
    online: bool
    reason: str
    source: str


class StateHistory:
    """A bounded list of changes per (enterprise, device); callers hold their own lock."""

    def __init__(self, per_device: int = HISTORY_PER_DEVICE) -> None:
        self._per_device = per_device
        self._changes: dict[tuple[str, str], deque[StateChange]] = {}

    def record(self, key: tuple[str, str], change: StateChange) -> None:
        """Append ``change`` unless it repeats the device's last state and reason."""
        changes = self._changes.get(key)
        if changes is None:
            changes = self._changes[key] = deque(maxlen=self._per_device)
        elif changes:
            last = changes[-1]
            if (last.online, last.reason, last.source) == (
                change.online,
                change.reason,
                change.source,
            ):
                return
        changes.append(change)

    def newest_first(self, key: tuple[str, str], limit: int) -> list[StateChange]:
        changes = self._changes.get(key)
        return list(reversed(changes))[:limit] if changes else []
