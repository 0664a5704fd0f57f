"""Gateway configuration (``gateway.yaml``), checked in full before anything connects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from iiot_common.backoff import MQTT_RECONNECT_MAX, MQTT_RECONNECT_MIN
from iiot_common.envsubst import UnsetVariable, expand_env
from iiot_common.identifier import Identifier
from iiot_common.yamlfile import YamlFileError, read_yaml

__all__ = [
    "ApiConfig",
    "BrokerAuthConfig",
    "ControlConfig",
    "GatewayConfig",
    "GatewayConfigError",
    "HealthConfig",
    "InfluxConfig",
    "IngestConfig",
    "MqttConfig",
    "OnCloudConfig",
    "OutboxConfig",
    "ProvincialConfig",
    "RegistryConfig",
    "TelemetryConfig",
    "load_gateway_config",
]


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttConfig(_Cfg):
    """How the gateway reaches the broker.

    With a ``username`` the client id is the username: the shipped Mosquitto set-up
    (``use_username_as_clientid``) and the embedded broker tie client ids to users, so no
    credential can take over another's session. Several gateway instances on one broker
    therefore need one username each.
    """

    url: str = Field(default="mqtt://127.0.0.1:1883", pattern=r"^mqtts?://")
    client_id: Identifier = Field(
        default="iiot-gateway-1",
        description="Default: the username, else iiot-gateway-1; must equal the username.",
    )
    username: Identifier | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None
    shared_group: Identifier | None = Field(
        default=None,
        description="Subscribe as $share/<group>/iiot/v1/# so N gateways split the load.",
    )
    keepalive: int = Field(default=30, ge=5, le=600)
    protocol: Literal["5", "3.1.1"] = Field(
        default="5",
        description="MQTT version; 3.1.1 keeps the session with clean_session=false "
        "(for brokers without MQTT 5, such as the demo's embedded broker).",
    )
    reconnect_min: float = Field(
        default=MQTT_RECONNECT_MIN, gt=0, le=60, description="First backoff, seconds."
    )
    reconnect_max: float = Field(
        default=MQTT_RECONNECT_MAX, gt=0, le=3600, description="Longest backoff, seconds."
    )

    @model_validator(mode="after")
    def _backoff_bounds(self) -> MqttConfig:
        if self.reconnect_min > self.reconnect_max:
            raise ValueError(
                f"reconnect_min ({self.reconnect_min}) is above reconnect_max "
                f"({self.reconnect_max})"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _client_id_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("username") and not data.get("client_id"):
            return {**data, "client_id": data["username"]}
        return data

    @model_validator(mode="after")
    def _client_id_is_username(self) -> Self:
        if self.username is not None and self.client_id != self.username:
            raise ValueError(
                f"client_id {self.client_id!r} differs from username {self.username!r}: the "
                "broker uses the username as the client id (use_username_as_clientid); leave "
                "client_id out, and give each gateway instance its own username"
            )
        return self


class InfluxConfig(_Cfg):
    url: str | None = Field(
        default=None, description="InfluxDB v2 write API base URL; none = outbox is the store."
    )
    token: SecretStr | None = None
    org: str = "iiot"
    bucket: str = "iiot"
    batch_lines: int = Field(default=5000, ge=1, le=100_000)
    flush_interval: float = Field(default=1.0, gt=0, le=60)
    gzip: bool = True
    timeout: float = Field(default=10.0, gt=0, le=300)


class IngestConfig(_Cfg):
    """How MQTT ingest batches messages into outbox transactions."""

    batch_max_messages: int = Field(default=5000, ge=1, le=100_000)
    batch_wait: float = Field(
        default=0.005, gt=0, le=1.0, description="Longest wait, s, to fill a batch."
    )
    receive_maximum: int = Field(
        default=10000, ge=1, le=65535, description="Unacknowledged QoS 1 messages in flight."
    )
    session_expiry: int = Field(
        default=7 * 86400, ge=0, description="Broker keeps the session this long, s."
    )
    dedup_window: int = Field(
        default=1_000_000, ge=1000, description="Recent sample keys kept to drop replays."
    )
    max_points_per_device: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Distinct point names written per device; further new names are "
        "dropped (reason point_limit).",
    )


class OutboxConfig(_Cfg):
    """Retention cap of the outbox (also the embedded store when influx.url is unset)."""

    max_lines: int = Field(default=10_000_000, ge=1000)
    max_age: float = Field(default=7 * 86400.0, gt=0, description="Seconds.")
    drain_timeout: float = Field(
        default=10.0, ge=0, description="At shutdown, keep writing this long, s."
    )
    synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="full: an acknowledged message survives power loss; normal: only a "
        "process crash (faster on slow disks).",
    )


class ApiConfig(_Cfg):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    provisioning_key_expiry: int = Field(
        default=7 * 86400,
        ge=60,
        le=366 * 86400,
        description="Seconds a provisioning key is valid when its request gives no expires_in_s.",
    )
    admin_tokens: list[SecretStr] = Field(default_factory=list)
    platform_tokens: list[SecretStr] = Field(default_factory=list)
    operator_tokens: list[SecretStr] = Field(
        default_factory=list, description="May read and write to equipment; not configure."
    )


class ControlConfig(_Cfg):
    """The control plane: writes to equipment and discovery scans."""

    write_timeout: float = Field(
        default=10.0, gt=0, le=300, description="A write command expires after this long, s."
    )
    scan_timeout: float = Field(
        default=300.0, gt=0, le=86400, description="A scan request expires after this long, s."
    )


class BrokerAuthConfig(_Cfg):
    """Where the gateway keeps Mosquitto's password and ACL files for provisioned agents."""

    password_file: Path | None = None
    acl_file: Path | None = None
    reload_command: list[str] | None = Field(
        default=None,
        description="Run after the files change, e.g. ['pkill', '-HUP', '-x', 'mosquitto'].",
    )
    broker_url_for_agents: str | None = Field(
        default=None, description="The broker URL handed to agents at provisioning."
    )
    file_group: Identifier | None = Field(
        default=None,
        description="Group of the password and ACL files (the broker's, e.g. mosquitto); "
        "the gateway's user must belong to it. Default: the gateway user's own group.",
    )
    peer_gateway_users: list[Identifier] = Field(
        default_factory=list,
        description="Broker usernames of the other gateway instances: they get the "
        "gateway's read ACL, and their password-file entries are kept as they are.",
    )


class HealthConfig(_Cfg):
    """When ``/health/ready`` reports the gateway not ready (503)."""

    writer_failing_for: float = Field(
        default=60.0,
        gt=0,
        description="Seconds the database writer may keep failing before not ready.",
    )
    outbox_backlog_age: float = Field(
        default=300.0,
        gt=0,
        description="Seconds the oldest line waiting for the database may wait before not "
        "ready (only with influx.url; without it the outbox is the store).",
    )


class OnCloudConfig(_Cfg):
    """When an enterprise counts as on the cloud (上云企业), and its targets."""

    min_connected_devices: int = Field(
        default=1,
        ge=1,
        le=100_000,
        description="An enterprise is on the cloud when at least this many of its "
        "production equipment devices are connected in the window.",
    )
    targets_file: Path | None = Field(
        default=None,
        description="YAML or CSV of region, year (optional), target. Read at every start; "
        "its targets replace the stored ones (PUT /api/v1/targets changes them until then).",
    )


class ProvincialConfig(_Cfg):
    """The provincial platform's checks: the data-quality gate, telemetry kept, grades."""

    quality_min_share: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Share of its expected samples (window / poll interval) a connected "
        "device must send in the window to pass the data-quality gate.",
    )
    telemetry_points: int = Field(
        default=360,
        ge=1,
        le=10_000,
        description="Messages kept in memory per device for its telemetry chart.",
    )
    rubric_file: Path | None = Field(
        default=None,
        description="YAML rubric of the graded evaluation; default: the shipped one "
        "(gateway/rubrics/default.yaml).",
    )
    evidence_retention_days: float = Field(
        default=7.0,
        gt=0,
        description="Days every ratio snapshot's evidence (the devices it counted) is kept; "
        "4-13 bytes a device a snapshot, by the device ids.",
    )
    evidence_daily_retention_days: float = Field(
        default=400.0,
        gt=0,
        description="Days the evidence of each day's first snapshot (China Standard Time) is kept.",
    )


class TelemetryConfig(_Cfg):
    """Where a device's telemetry chart and report read its recent messages."""

    source: Literal["memory", "victoria-metrics"] = Field(
        default="memory",
        description="memory: this instance's bounded in-memory window (with several "
        "instances, only the messages this one received); victoria-metrics: the series "
        "the writer stored there, with the window as the fallback.",
    )
    url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="victoria-metrics' HTTP API base URL; default influx.url.",
    )
    timeout: float = Field(
        default=5.0, gt=0, le=60, description="Longest wait for an answer, s; then memory."
    )
    max_points: int = Field(
        default=2000,
        ge=10,
        le=100_000,
        description="Messages in an answer; with more in the hours asked, the latest these many.",
    )


class RegistryConfig(_Cfg):
    """How the registry keeps the database and, with several instances, other instances' rows."""

    refresh_interval: float | None = Field(
        default=None,
        gt=0,
        le=60,
        description="Seconds between reads of the rows other gateway instances sharing the "
        "database changed; default 2 with mqtt.shared_group, else off (one instance).",
    )
    persist_granularity: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="How far a device's last sample time moves before it is written; "
        "default 5 s when refreshing (other instances read it), else 60 s.",
    )
    quality_share_interval: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Seconds between writes of the data-quality gate's sample counts to "
        "PostgreSQL, where every instance sharing it reads them (only with "
        "mqtt.shared_group, where each instance receives part of the messages; unused on "
        "SQLite).",
    )

    def refresh_for(self, shared_group: str | None) -> float | None:
        """The refresh interval in effect (seconds), None for none."""
        if self.refresh_interval is not None:
            return self.refresh_interval
        return 2.0 if shared_group else None

    def granularity_for(self, shared_group: str | None) -> float:
        """The persist granularity in effect (seconds)."""
        if self.persist_granularity is not None:
            return self.persist_granularity
        return 5.0 if self.refresh_for(shared_group) is not None else 60.0


class GatewayConfig(_Cfg):
    data_dir: Path = Path("./iiot-data")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the registry; default SQLite in data_dir."
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    influx: InfluxConfig = Field(default_factory=InfluxConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    broker_auth: BrokerAuthConfig = Field(default_factory=BrokerAuthConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    on_cloud: OnCloudConfig = Field(default_factory=OnCloudConfig)
    provincial: ProvincialConfig = Field(default_factory=ProvincialConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    snapshot_interval: float = Field(default=3600.0, gt=0, description="Ratio snapshots, s.")
    default_poll_interval: float = Field(
        default=10.0, gt=0, description="Assumed poll interval for the 'online' freshness rule."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _telemetry_url(self) -> Self:
        if self.telemetry_query_url is None and self.telemetry.source != "memory":
            raise ValueError(
                f"telemetry.source is {self.telemetry.source}: set telemetry.url "
                "(or influx.url, the default)"
            )
        return self

    @property
    def telemetry_query_url(self) -> str | None:
        """The time-series database the telemetry chart reads, None for memory only."""
        if self.telemetry.source == "memory":
            return None
        return self.telemetry.url or self.influx.url

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "outbox.db"


class GatewayConfigError(ValueError):
    """A gateway config that cannot be used; the message names the file and the field."""


def load_gateway_config(path: Path | str) -> GatewayConfig:
    path = Path(path)
    try:
        data = expand_env(read_yaml(path) or {})
    except (YamlFileError, UnsetVariable) as exc:
        raise GatewayConfigError(f"{path}: {exc}") from exc
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = [
            # A check of the whole file (no loc) names its fields in its message.
            f"{path}: "
            + "".join(f"{x}." for x in e["loc"])[:-1]
            + (": " if e["loc"] else "")
            + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        ]
        raise GatewayConfigError("\n".join(lines)) from exc
    if cfg.provincial.rubric_file is not None:
        # A bad rubric stops the start here, naming the file and the entry.
        from gateway.provincial import RubricError, load_rubric

        try:
            load_rubric(cfg.provincial.rubric_file)
        except RubricError as exc:
            raise GatewayConfigError(f"{path}: provincial.rubric_file: {exc}") from exc
    return cfg
