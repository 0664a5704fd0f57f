"""Leaf pieces every iiot package shares: YAML files, ``${NAME}`` expansion, logging, backoff.

Nothing here imports another iiot package, so the agent, the gateway, the profiles and the
simulators can all depend on it without depending on the application shell (``iiot/``).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
