"""iiot: industrial IoT device onboarding — edge agent, gateway, profiles, simulators."""

__version__ = "0.1.0"
__all__ = ["__version__"]
