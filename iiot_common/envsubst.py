"""``${NAME}`` in a config file's string values is replaced by that environment variable.

Keeps secrets (tokens, passwords) out of config files: systemd's EnvironmentFile or the
shell provides them. Expansion happens after YAML parsing, inside string values only, so
a value can never change the file's structure (a comma, ``#`` or ``: `` in a secret is
just part of it). An unset variable is an error naming it and where it is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["UnsetVariable", "expand_env"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class UnsetVariable(ValueError):
    """A ``${NAME}`` whose variable is not set."""


def expand_env(data: Any, env: Mapping[str, str] | None = None) -> Any:
    """A copy of parsed YAML with every ``${NAME}`` in its strings replaced."""
    env = os.environ if env is None else env
    missing: list[str] = []

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):

            def sub(m: re.Match[str]) -> str:
                name = m.group(1)
                if name not in env:
                    missing.append(f"{where}: environment variable {name} is not set")
                    return m.group(0)
                return env[name]

            return _VAR.sub(sub, node)
        return node

    out = walk(data, "")
    if missing:
        raise UnsetVariable("; ".join(missing))
    return out
