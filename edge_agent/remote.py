"""Remote configuration: a gateway's DesiredConfig checked in full, and the applied one kept.

With ``remote_config: {enabled: true}`` the desired configuration's devices, discovery
scope and profiles replace the local file's devices and discovery scope; everything else
(broker, data_dir, spool, metrics) stays the local file's. A version is built into a
whole ``LoadedConfig`` with the same checks as a local file before anything changes, so
a refused version leaves the running configuration untouched. The applied version is
kept in ``<data_dir>/remote-config.json`` and comes back after a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from device_profiles.families import FamilyInfo
from device_profiles.loader import ProfileError, parse_profile
from device_profiles.schema import Profile
from edge_agent.config import AgentConfigError, LoadedConfig, parse_config
from protocols.mqtt.control import DesiredConfig

__all__ = [
    "STATE_FILE",
    "RemoteConfigRefused",
    "RemoteConfigStore",
    "build_config",
]

log = logging.getLogger("iiot.agent.remote")

STATE_FILE = "remote-config.json"
_DEVICE = re.compile(r"^device ('(?P<id>[^']+)'|(?P<n>#\d+))(: )?")


class RemoteConfigRefused(ValueError):
    """A desired configuration that cannot run; ``errors`` maps a device id (or 'config')."""

    def __init__(self, version: int, errors: dict[str, str]) -> None:
        self.version = version
        self.errors = errors
        super().__init__(
            f"remote configuration version {version} refused: "
            + "; ".join(f"{k}: {v}" for k, v in errors.items())
        )


def _group(problems: list[str], errors: dict[str, str]) -> None:
    """Problem lines → ``errors`` by device id (``device #n`` without one), else 'config'."""
    for line in problems:
        m = _DEVICE.match(line)
        if m is None:
            key, text = "config", line
        else:
            key, text = m.group("id") or f"device {m.group('n')}", line[m.end() :]
        errors[key] = f"{errors[key]}; {text}" if key in errors else text


def _profiles(
    desired: DesiredConfig, families: Mapping[str, FamilyInfo], errors: dict[str, str]
) -> list[Profile]:
    out: list[Profile] = []
    for i, raw in enumerate(desired.profiles):
        name = raw.get("id") if isinstance(raw.get("id"), str) else f"#{i + 1}"
        try:
            out.append(parse_profile(raw, f"profile '{name}'", families=families))
        except ProfileError as exc:
            _group([str(exc)], errors)
    return out


def _families(
    local: LoadedConfig, desired: DesiredConfig, errors: dict[str, str]
) -> dict[str, FamilyInfo]:
    """The agent's families plus those the message ships; a clash is refused by name."""
    families = dict(local.profiles.families)
    for i, raw in enumerate(desired.families):
        key = raw.get("key")
        name = f"family '{key}'" if isinstance(key, str) else f"family #{i + 1}"
        try:
            fam = FamilyInfo.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            _group([f"{name}: {loc}: {first['msg']}"], errors)
            continue
        if fam.key in families and families[fam.key] != fam:
            _group([f"family '{fam.key}': differs from this agent's own"], errors)
            continue
        families[fam.key] = fam
    return families


def build_config(local: LoadedConfig, desired: DesiredConfig) -> LoadedConfig:
    """The configuration ``desired`` makes of the local file's; raises RemoteConfigRefused."""
    errors: dict[str, str] = {}
    if not local.config.remote_config.enabled:
        raise RemoteConfigRefused(
            desired.version,
            {"config": "remote configuration is disabled by this agent's file (remote_config)"},
        )
    families = _families(local, desired, errors)
    extra = _profiles(desired, families, errors)
    data: dict[str, Any] = local.config.model_dump(mode="python")
    data["devices"] = desired.devices
    data["discovery"] = desired.discovery
    try:
        built = parse_config(
            data, f"remote configuration version {desired.version}", extra_profiles=extra
        )
    except AgentConfigError as exc:
        _group(exc.problems, errors)
        raise RemoteConfigRefused(desired.version, errors) from None
    if errors:
        raise RemoteConfigRefused(desired.version, errors)
    return built


class RemoteConfigStore:
    """The applied desired configuration, kept as JSON in the agent's data_dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / STATE_FILE

    def load(self) -> DesiredConfig | None:
        """The stored version, or None (nothing stored, or unreadable: logged)."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("stored remote configuration unreadable", extra={"error": str(exc)})
            return None
        try:
            return DesiredConfig.model_validate_json(text)
        except ValidationError as exc:
            log.error(
                "stored remote configuration is invalid; the local file is used",
                extra={"path": str(self.path), "error": str(exc).splitlines()[0]},
            )
            return None

    def save(self, desired: DesiredConfig) -> None:
        """Write atomically (device entries may hold credentials: mode 0600)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(desired.model_dump_json().encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
