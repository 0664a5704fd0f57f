"""A protocol that lives in this folder alone: values by name over a line-based TCP socket.

The device answers ``GET <key>\\n`` with the raw value and a newline, or ``ERR\\n``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from device_profiles.schema import Profile
from protocols.registry import ProtocolSpec

__all__ = ["PROTOCOL", "FakeAddress", "FakeConnection"]


class FakeAddress(BaseModel):
    """A point's ``fakeproto:`` mapping: the key the device knows the value by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(pattern=r"^[a-z_]+$")


class FakeConnection(BaseModel):
    """A device entry's ``fakeproto:`` mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int = Field(ge=1, le=65535)
    timeout: float = Field(default=1.0, gt=0)


def check_profile(profile: Profile) -> list[str]:
    seen: dict[str, str] = {}
    errors = []
    for p in profile.points:
        a = p.address("fakeproto")
        if isinstance(a, FakeAddress):
            if a.key in seen:
                errors.append(f"point '{p.name}': key '{a.key}' is also point '{seen[a.key]}'")
            seen[a.key] = p.name
    return errors


PROTOCOL = ProtocolSpec(
    name="fakeproto",
    address=FakeAddress,
    connection=FakeConnection,
    check_profile=check_profile,
    driver="tests.protocols.fakeproto.driver:FakeProtoDriver",
)
