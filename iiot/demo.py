"""``iiot demo``: the whole system on embedded defaults."""

from __future__ import annotations

__all__ = ["demo"]


def demo() -> None:
    """Run a simulated site, agents and the gateway in one process."""
    raise SystemExit("iiot demo is not available yet")
