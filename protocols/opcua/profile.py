"""What a device profile says about OPC UA: point addresses, the namespace, checks."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from device_profiles.schema import Point, Profile

__all__ = ["OpcUaAddress", "OpcUaSettings", "check_profile", "opcua_address", "opcua_settings"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OpcUaAddress(_Strict):
    """Where a point lives on an OPC UA server: a NodeId or a browse path, not both."""

    node_id: str | None = Field(
        default=None,
        description="NodeId string, e.g. 'ns=2;s=Boiler.SteamPressure'. 'ns=2' is the "
        "profile's namespace_uri on the simulator; drivers resolve the URI at connect time.",
    )
    browse_path: str | None = Field(
        default=None,
        description="Slash-separated browse path from the Objects folder, each element "
        "'nsidx:Name', e.g. '2:Machine/2:Monitoring/2:Spindle/2:Speed'.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("give exactly one of node_id or browse_path")
        return self


class OpcUaSettings(_Strict):
    """Profile-wide OPC UA settings."""

    namespace_uri: str = Field(description="URI of the namespace the profile's NodeIds live in.")
    root_name: str | None = Field(
        default=None, description="Name of the device's root object under Objects."
    )


def opcua_address(point: Point) -> OpcUaAddress | None:
    """The point's ``opcua:`` address, if it has one."""
    a = point.address("opcua")
    return a if isinstance(a, OpcUaAddress) else None


def opcua_settings(profile: Profile) -> OpcUaSettings | None:
    """The profile's ``opcua:`` settings, if it gives them."""
    s = profile.settings("opcua")
    return s if isinstance(s, OpcUaSettings) else None


def check_profile(profile: Profile) -> list[str]:
    """A namespace is given and no two points share an address."""
    errors: list[str] = []
    if opcua_settings(profile) is None:
        errors.append("an opcua profile needs 'opcua: {namespace_uri: ...}'")
    seen: dict[str, str] = {}
    for p in profile.points:
        a = opcua_address(p)
        if a is None:
            continue
        key = a.node_id or a.browse_path or ""
        if key in seen:
            errors.append(f"point '{p.name}': same OPC UA address as point '{seen[key]}'")
        seen[key] = p.name
    return errors
