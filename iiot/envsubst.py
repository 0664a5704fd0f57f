"""``${NAME}`` in a config file is replaced by that environment variable before parsing.

Keeps secrets (tokens, passwords) out of config files: systemd's EnvironmentFile or the
shell provides them. An unset variable is an error naming it and its line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = ["UnsetVariable", "expand_env"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class UnsetVariable(ValueError):
    """A ``${NAME}`` whose variable is not set."""


def expand_env(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace every ``${NAME}``; raise UnsetVariable listing each unset one with its line."""
    env = os.environ if env is None else env
    missing: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for m in _VAR.finditer(line):
            if m.group(1) not in env:
                missing.append(f"line {lineno}: environment variable {m.group(1)} is not set")
    if missing:
        raise UnsetVariable("; ".join(missing))

    def sub(m: re.Match[str]) -> str:
        return env.get(m.group(1), m.group(0))

    return "\n".join(
        line if line.lstrip().startswith("#") else _VAR.sub(sub, line) for line in text.splitlines()
    )
