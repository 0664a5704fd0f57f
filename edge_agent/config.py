"""The agent's YAML config, checked in full before anything connects.

Every problem is collected and reported at once, each naming the device it concerns
(``device 'boiler-3': profile 'x' not found``). ``load_config`` also loads the profiles
(shipped plus the config's extra folders) and checks each device against its profile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from device_profiles.loader import ProfileSet, ProfileSetError, load_profiles
from device_profiles.schema import Profile
from edge_agent.discovery import DiscoveryScope
from iiot_common.backoff import MQTT_RECONNECT_MAX, MQTT_RECONNECT_MIN
from iiot_common.envsubst import UnsetVariable, expand_env
from iiot_common.identifier import Identifier, identifier_error
from iiot_common.yamlfile import YamlFileError, read_yaml
from protocols import registry
from protocols.parts import ProtocolParts, validate_parts

__all__ = [
    "PASSWORD_ENV",
    "AgentConfig",
    "AgentConfigError",
    "DeviceConfig",
    "LoadedConfig",
    "MetricsConfig",
    "MqttConfig",
    "RemoteConfigOptions",
    "SparkplugConfig",
    "SpoolConfig",
    "load_config",
    "parse_config",
]

PASSWORD_ENV = "IIOT_MQTT_PASSWORD"
_P = TypeVar("_P", Path, Path | None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SparkplugConfig(_Strict):
    """Sparkplug B options (``mqtt.codec: sparkplug``)."""

    dcmd_max_age: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds after its timestamp that a DCMD is refused unwritten, so "
        "nothing is written late after an outage.",
    )
    primary_host: Identifier | None = Field(
        default=None,
        description="Host id of the primary host application: births and data go out only "
        "while spBv1.0/STATE/{primary_host} says it is online.",
    )


class MqttConfig(_Strict):
    """How the agent reaches the broker."""

    url: str = Field(description="mqtt://host:port or mqtts://host:port")
    username: str | None = None
    password: SecretStr | None = Field(
        default=None, description=f"Also read from the environment variable {PASSWORD_ENV}."
    )
    password_file: Path | None = Field(
        default=None,
        description="A file (mode 0600) holding only the password, as `iiot agent provision` "
        "writes it; keeps the secret out of the config.",
    )
    client_id: str | None = Field(
        default=None,
        description="Default: the username, else the agent id. The shipped broker uses the "
        "username as client id, so a different one is refused here.",
    )
    ca_file: Path | None = Field(default=None, description="CA bundle for mqtts://.")
    keepalive: int = Field(default=30, ge=5, le=3600)
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    reconnect_min: float = Field(
        default=MQTT_RECONNECT_MIN, gt=0, le=60, description="First backoff, seconds."
    )
    reconnect_max: float = Field(
        default=MQTT_RECONNECT_MAX, gt=0, le=3600, description="Longest backoff, seconds."
    )
    max_inflight: int = Field(default=20, ge=1, le=1000, description="Unacknowledged messages.")
    codec: Literal["json", "sparkplug"] = Field(
        default="json",
        description="Wire format: the iiot/v1 JSON contract, or Sparkplug B 3.0 (spBv1.0/...).",
    )
    sparkplug: SparkplugConfig = Field(default_factory=SparkplugConfig)
    batch: bool = Field(
        default=False,
        description="Publish several devices' samples in one message on .../batch (json "
        "codec; the gateway must know the batch topic). For hundreds of devices and more.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if "@" in parts.netloc:
            # Never echo it: the part before '@' is a secret.
            raise ValueError("url must not carry credentials; use username and password_file")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"url {v!r} must look like mqtt://host:1883 or mqtts://host:8883")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"url {v!r}: bad port") from exc
        return v

    @model_validator(mode="after")
    def _client_id_is_username(self) -> Self:
        if self.client_id and self.username and self.client_id != self.username:
            raise ValueError(
                f"client_id {self.client_id!r} differs from username {self.username!r}: the "
                "broker uses the username as the client id; leave client_id out"
            )
        return self

    @model_validator(mode="after")
    def _batch_is_json(self) -> Self:
        if self.batch and self.codec != "json":
            raise ValueError(
                "batch works with the json codec only; Sparkplug B sends DDATA per device"
            )
        return self

    @model_validator(mode="after")
    def _backoff_bounds(self) -> Self:
        if self.reconnect_min > self.reconnect_max:
            raise ValueError(
                f"reconnect_min ({self.reconnect_min}) is above reconnect_max "
                f"({self.reconnect_max})"
            )
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class SpoolConfig(_Strict):
    """Store-and-forward: where samples wait for the broker, and how much may wait."""

    path: Path | None = Field(default=None, description="Default: <data_dir>/spool.db.")
    max_bytes: int | None = Field(default=256 * 1024 * 1024, ge=1024)
    max_samples: int | None = Field(default=None, ge=1)
    durable: bool = Field(
        default=False,
        description="fsync every commit (synchronous=FULL); default NORMAL survives kill -9.",
    )
    batch_samples: int = Field(default=500, ge=1, le=10000, description="Samples per message.")
    batch_bytes: int = Field(default=256 * 1024, ge=1024, description="Bytes per message.")


class MetricsConfig(_Strict):
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535, description="null: no endpoint.")


class RemoteConfigOptions(_Strict):
    """Whether the gateway's desired configuration replaces this file's devices."""

    enabled: bool = Field(
        default=False,
        description="true: devices, discovery scope and extra profiles come from the gateway "
        "(the applied version is kept in data_dir); this file's devices run only until one "
        "arrives. false: this file alone is used and pushed configurations are refused.",
    )


class DeviceConfig(ProtocolParts):
    """One device instance: which profile, where it is, how often to read it.

    How to reach it sits under its protocol's key (``modbus:``, ``opcua:``), checked by
    that protocol's connection model (``protocols.registry``).
    """

    model_config = ConfigDict(extra="forbid")

    id: Identifier
    profile: str
    poll_interval: float = Field(default=5.0, gt=0, le=86400, description="Seconds.")
    poll_timeout: float | None = Field(
        default=None, gt=0, description="Bound on one whole poll; default: the interval."
    )
    points: list[str] | None = Field(default=None, description="Subset of the profile's points.")
    report_on_change: bool = False
    heartbeat_polls: int = Field(
        default=10, ge=1, description="With report_on_change: a full sample at least this often."
    )
    enabled: bool = True
    dead_after: int = Field(
        default=3, ge=1, description="Timeouts in a row after which the device is probed."
    )
    probe_max: float = Field(
        default=30.0, gt=0, le=86400, description="Longest wait between probes of a dead device."
    )
    probe_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Bound on one probe of a dead device; default: a tenth of the interval "
        "(at least 0.1 s), at most poll_timeout.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _connection(cls, data: Any, handler: ModelWrapValidatorHandler[DeviceConfig]) -> Any:
        return validate_parts(cls, data, handler, "connection", _one_connection)

    @property
    def protocol(self) -> str:
        """The protocol whose key gives the connection."""
        (name,) = self.parts
        return name

    @property
    def connection(self) -> BaseModel:
        """The connection model of the device's protocol (e.g. ``ModbusConnection``)."""
        (conn,) = self.parts.values()
        return conn

    @property
    def timeout(self) -> float:
        return self.poll_timeout if self.poll_timeout is not None else self.poll_interval

    @property
    def probe_limit(self) -> float:
        """How long a probe of a dead device may hold its line."""
        if self.probe_timeout is not None:
            return min(self.probe_timeout, self.timeout)
        return min(max(0.1, self.poll_interval / 10), self.timeout)


class AgentConfig(_Strict):
    agent_id: Identifier
    enterprise: Identifier
    data_dir: Path = Field(default=Path("iiot-data"), description="Spool and state live here.")
    mqtt: MqttConfig
    profiles: list[Path] = Field(default_factory=list, description="Extra profile folders.")
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    devices: list[DeviceConfig] = Field(default_factory=list)
    remote_config: RemoteConfigOptions = Field(default_factory=RemoteConfigOptions)
    discovery: DiscoveryScope | None = Field(
        default=None, description="Where `iiot agent discover` and remote scans may look."
    )

    @property
    def spool_path(self) -> Path:
        return self.spool.path or self.data_dir / "spool.db"

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.mqtt.username or self.agent_id

    def mqtt_password(self) -> str | None:
        """The broker password: the config's, else its password file's, else the environment's."""
        if self.mqtt.password is not None:
            return self.mqtt.password.get_secret_value()
        if self.mqtt.password_file is not None:
            return self.mqtt.password_file.read_text(encoding="utf-8").strip() or None
        return os.environ.get(PASSWORD_ENV) or None


class AgentConfigError(ValueError):
    """A config that cannot run; ``problems`` lists every finding."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A checked config with the profile of every enabled device resolved."""

    config: AgentConfig
    profiles: ProfileSet
    device_profiles: dict[str, Profile]


def _one_connection(dev: DeviceConfig) -> list[str]:
    if len(dev.parts) == 1:
        return []
    *head, last = (f"'{n}'" for n in registry.names())
    return [f"give exactly one of {', '.join(head)} or {last}"]


def _where(data: Any, loc: tuple[int | str, ...]) -> str:
    """A pydantic location → ``device 'x': field`` where possible."""
    if len(loc) >= 2 and loc[0] == "devices" and isinstance(loc[1], int):
        devs = data.get("devices") if isinstance(data, dict) else None
        name = None
        if isinstance(devs, list) and loc[1] < len(devs) and isinstance(devs[loc[1]], dict):
            name = devs[loc[1]].get("id")
        head = f"device '{name}'" if name else f"device #{loc[1] + 1}"
        rest = [str(x) for x in loc[2:]]
        return head + (": " + ".".join(rest) if rest else "")
    return ".".join(str(x) for x in loc) or "config"


def _format(errors: list[Any], data: Any, prefix: tuple[int | str, ...] = ()) -> list[str]:
    out: list[str] = []
    for err in errors:
        loc = tuple(
            x
            for x in (*prefix, *err["loc"])
            if not (isinstance(x, str) and x.startswith("function"))
        )
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if msg.startswith("String should match pattern"):
            msg = identifier_error(err.get("input"), "").lstrip()
        out.append(f"{_where(data, loc)}: {msg}")
    return out


def _check_devices(
    devices: list[DeviceConfig], profiles: ProfileSet
) -> tuple[list[str], dict[str, Profile]]:
    problems: list[str] = []
    resolved: dict[str, Profile] = {}
    seen: set[str] = set()
    for dev in devices:
        where = f"device '{dev.id}'"
        if dev.id in seen:
            problems.append(f"{where}: duplicate device id")
            continue
        seen.add(dev.id)
        if dev.profile not in profiles:
            problems.append(f"{where}: profile '{dev.profile}' not found")
            continue
        prof = profiles[dev.profile]
        if prof.protocol != dev.protocol:
            problems.append(
                f"{where}: profile '{prof.id}' speaks {prof.protocol} but the device "
                f"has a '{dev.protocol}' connection"
            )
            continue
        if dev.points is not None:
            known = {p.name for p in prof.points}
            unknown = [p for p in dev.points if p not in known]
            for name in unknown:
                problems.append(f"{where}: point '{name}' is not in profile '{prof.id}'")
            if not dev.points:
                problems.append(f"{where}: 'points' is empty")
            if unknown or not dev.points:
                continue
        if dev.enabled:
            resolved[dev.id] = prof
    return problems, resolved


def _with_profiles(base: ProfileSet, extra: Sequence[Profile]) -> ProfileSet:
    """``base`` plus ``extra``; an extra profile replaces a loaded one with its id."""
    profiles = {p.id: p for p in base}
    sources = dict(base.sources)
    for prof in extra:
        profiles[prof.id] = prof
        sources[prof.id] = Path(f"<remote profile {prof.id}>")
    return ProfileSet(profiles, sources)


def _rel(path: _P, base: Path) -> _P:
    if path is None or path.is_absolute():
        return path
    return base / path


def parse_config(
    data: Any,
    source: str = "<config>",
    *,
    base_dir: Path | None = None,
    extra_profiles: Sequence[Profile] = (),
) -> LoadedConfig:
    """Validate parsed YAML as an agent config, load profiles, and check every device.

    ``extra_profiles`` (a remote configuration's) join the loaded ones and win over a
    loaded profile with the same id.
    """
    if not isinstance(data, dict):
        raise AgentConfigError(source, ["the config must be a mapping at the top level"])
    problems: list[str] = []
    raw_devices = data.get("devices", [])
    if not isinstance(raw_devices, list):
        problems.append("devices: must be a list")
        raw_devices = []
    cfg: AgentConfig | None = None
    try:
        cfg = AgentConfig.model_validate({**data, "devices": []})
    except ValidationError as exc:
        problems.extend(_format(exc.errors(), data))
    # Each device is validated on its own so that one bad entry hides no other finding.
    devices: list[DeviceConfig] = []
    for i, raw in enumerate(raw_devices):
        try:
            devices.append(DeviceConfig.model_validate(raw))
        except ValidationError as exc:
            problems.extend(_format(exc.errors(), data, ("devices", i)))
    profile_dirs: list[Path] = []
    if cfg is not None:
        if base_dir is not None:
            # Relative paths in a config file are relative to that file.
            cfg = cfg.model_copy(
                update={
                    "profiles": [_rel(p, base_dir) for p in cfg.profiles],
                    "data_dir": _rel(cfg.data_dir, base_dir),
                    "spool": cfg.spool.model_copy(update={"path": _rel(cfg.spool.path, base_dir)}),
                    "mqtt": cfg.mqtt.model_copy(
                        update={
                            "password_file": _rel(cfg.mqtt.password_file, base_dir),
                            "ca_file": _rel(cfg.mqtt.ca_file, base_dir),
                        }
                    ),
                }
            )
        profile_dirs = list(cfg.profiles)
        pw_file = cfg.mqtt.password_file
        if pw_file is not None and not (pw_file.is_file() and os.access(pw_file, os.R_OK)):
            problems.append(f"mqtt.password_file: cannot read {pw_file}")
        ca_file = cfg.mqtt.ca_file
        if ca_file is not None and not (ca_file.is_file() and os.access(ca_file, os.R_OK)):
            problems.append(f"mqtt.ca_file: cannot read {ca_file}")
    profiles: ProfileSet | None = None
    try:
        profiles = load_profiles(profile_dirs)
    except ProfileSetError as exc:
        problems.extend(str(e) for e in exc.errors)
    if profiles is not None and extra_profiles:
        profiles = _with_profiles(profiles, extra_profiles)
    resolved: dict[str, Profile] = {}
    if profiles is not None:
        found, resolved = _check_devices(devices, profiles)
        problems.extend(found)
    if problems or cfg is None or profiles is None:
        raise AgentConfigError(source, problems)
    cfg = cfg.model_copy(update={"devices": devices})
    return LoadedConfig(cfg, profiles, resolved)


def load_config(path: Path | str) -> LoadedConfig:
    """Read, validate and check an agent config file."""
    path = Path(path)
    try:
        data = expand_env(read_yaml(path))
    except YamlFileError as exc:
        raise AgentConfigError(str(path), [str(exc)]) from exc
    except UnsetVariable as exc:
        raise AgentConfigError(str(path), str(exc).split("; ")) from exc
    return parse_config(data, str(path), base_dir=path.resolve().parent)
