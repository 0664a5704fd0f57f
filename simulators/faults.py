"""Fault injection: what a simulated device does wrong, settable at start and at run time.

none          behaves
silent        stops answering (requests time out; TCP stays open)
slow          answers after ``delay`` seconds
exception     answers every request with Modbus exception ``exception_code``
              (OPC UA: every read returns status ``BadDeviceFailure``)
drop          closes connections as soon as they are made or used
out_of_range  values beyond the profile's declared range (sensor fault, garbage)
restart       the server goes away for ``delay`` seconds, then comes back (OPC UA
              server restart; for Modbus the listener closes and reopens)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["FaultMode", "FaultState"]


class FaultMode(StrEnum):
    NONE = "none"
    SILENT = "silent"
    SLOW = "slow"
    EXCEPTION = "exception"
    DROP = "drop"
    OUT_OF_RANGE = "out_of_range"
    RESTART = "restart"


@dataclass(slots=True)
class FaultState:
    mode: FaultMode = FaultMode.NONE
    delay: float = 2.0
    exception_code: int = 4  # SLAVE_DEVICE_FAILURE

    def set(
        self, mode: FaultMode | str, *, delay: float | None = None, code: int | None = None
    ) -> None:
        self.mode = FaultMode(mode)
        if delay is not None:
            self.delay = delay
        if code is not None:
            self.exception_code = code

    def clear(self) -> None:
        self.mode = FaultMode.NONE
