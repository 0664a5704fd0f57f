"""OPC UA test profiles shared by the simulator and driver tests."""

from __future__ import annotations

from typing import Any

from device_profiles import load_profiles
from device_profiles.schema import Profile

SHIPPED = sorted(p.id for p in load_profiles() if p.protocol == "opcua")


def press_profile(points: list[dict[str, Any]], uri: str = "urn:test:press") -> Profile:
    """A small OPC UA press with the given points, in namespace ``uri``."""
    return Profile.model_validate(
        {
            "id": "test-press",
            "name": "Test press",
            "name_zh": "测试压机",
            "family": "other",
            "category": "intelligent",
            "protocol": "opcua",
            "opcua": {"namespace_uri": uri, "root_name": "Press"},
            "points": points,
        }
    )
