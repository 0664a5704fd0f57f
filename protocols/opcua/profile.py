"""What a device profile says about OPC UA: point addresses, the namespace, checks."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from device_profiles.schema import Point, Profile

__all__ = ["OpcUaAddress", "OpcUaSettings", "check_profile", "opcua_address", "opcua_settings"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OpcUaAddress(_Strict):
    """Where a point lives on an OPC UA server: exactly one of four forms.

    ``node_id`` and ``browse_path`` are absolute; ``path`` and ``node_suffix`` are relative
    to the device's root (its agent config's ``opcua.root``, else the profile's
    ``root_name`` object under Objects), so one profile serves many instances.
    """

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

    path: str | None = Field(
        default=None,
        description="Slash-separated browse path from the device's root object, "
        "e.g. '2:Monitoring/2:Spindle/2:Speed'.",
    )
    node_suffix: str | None = Field(
        default=None,
        min_length=1,
        description="Appended to the string identifier of the device's root NodeId: "
        "root 'ns=2;s=Dev0001' and suffix '.Temperature' give 'ns=2;s=Dev0001.Temperature'.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [self.node_id, self.browse_path, self.path, self.node_suffix]
        if sum(v is not None for v in given) != 1:
            raise ValueError("give exactly one of node_id, browse_path, path or node_suffix")
        return self

    @property
    def relative(self) -> bool:
        """The address is relative to the device's root."""
        return self.path is not None or self.node_suffix is not None


class OpcUaSettings(_Strict):
    """Profile-wide OPC UA settings."""

    namespace_uri: str = Field(description="URI of the namespace the profile's NodeIds live in.")
    root_name: str | None = Field(
        default=None,
        description="Name of the device's root object under Objects (browse name in the "
        "profile namespace); the default root of relative addresses.",
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
        key = a.node_id or a.browse_path or f"path:{a.path or ''}:{a.node_suffix or ''}"
        if key in seen:
            errors.append(f"point '{p.name}': same OPC UA address as point '{seen[key]}'")
        seen[key] = p.name
    return errors
