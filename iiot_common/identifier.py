"""The one identifier rule: enterprise, agent, device, profile, point and request ids.

An identifier matches ``[A-Za-z0-9_.-]{1,64}``: safe as an MQTT topic level, an InfluxDB
tag value, a file name and a URL path segment, so it needs no escaping anywhere.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

__all__ = [
    "IDENTIFIER_PATTERN",
    "IDENTIFIER_RE",
    "IDENTIFIER_RULE",
    "Identifier",
    "check_identifier",
    "identifier_error",
    "is_identifier",
]

IDENTIFIER_RULE = "[A-Za-z0-9_.-]{1,64}"
IDENTIFIER_PATTERN = f"^{IDENTIFIER_RULE}$"
IDENTIFIER_RE = re.compile(IDENTIFIER_PATTERN)

Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]


def is_identifier(value: object) -> bool:
    """True when ``value`` is a string that matches the identifier rule."""
    return isinstance(value, str) and IDENTIFIER_RE.fullmatch(value) is not None


def identifier_error(value: object, what: str = "identifier") -> str:
    """The message naming a bad identifier: ``device 'a b' must match [A-Za-z0-9_.-]{1,64}``."""
    return f"{what} {value!r} must match {IDENTIFIER_RULE}"


def check_identifier(value: object, what: str = "identifier") -> str:
    """Return ``value`` if it is an identifier, else raise ValueError naming ``what``."""
    if not isinstance(value, str) or IDENTIFIER_RE.fullmatch(value) is None:
        raise ValueError(identifier_error(value, what))
    return value
