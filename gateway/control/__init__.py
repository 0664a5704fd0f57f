"""The gateway side of the control plane: remote configuration, writes, discovery."""

from gateway.control.service import (
    ControlConflict,
    ControlError,
    ControlInvalid,
    ControlNotFound,
    ControlService,
    ControlUnavailable,
)

__all__ = [
    "ControlConflict",
    "ControlError",
    "ControlInvalid",
    "ControlNotFound",
    "ControlService",
    "ControlUnavailable",
]
