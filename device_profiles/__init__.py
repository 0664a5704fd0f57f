"""Device profiles: the pydantic schema and the YAML files for each device model."""

from device_profiles.families import FamilyInfo, builtin_families
from device_profiles.loader import (
    BUILTIN_DIR,
    ProfileError,
    ProfileSet,
    ProfileSetError,
    load_profile,
    load_profiles,
    parse_profile,
)
from device_profiles.schema import (
    CATEGORY_LABELS_ZH,
    Category,
    Point,
    Profile,
    ValueType,
    is_identifier,
)

__all__ = [
    "BUILTIN_DIR",
    "CATEGORY_LABELS_ZH",
    "Category",
    "FamilyInfo",
    "Point",
    "Profile",
    "ProfileError",
    "ProfileSet",
    "ProfileSetError",
    "ValueType",
    "builtin_families",
    "is_identifier",
    "load_profile",
    "load_profiles",
    "parse_profile",
]
