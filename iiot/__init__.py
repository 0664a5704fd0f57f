"""iiot: industrial IoT device onboarding — edge agent, gateway, profiles, simulators.

This package is the application shell (the ``iiot`` command, the demo, the embedded broker);
nothing below it imports it. Shared leaf pieces live in ``iiot_common``.
"""

from iiot_common import __version__

__all__ = ["__version__"]
