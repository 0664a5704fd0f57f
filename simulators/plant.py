"""A simulated site: enterprises, their devices, and the servers that serve them.

A plant file (YAML) lists enterprises and the devices each owns. Devices marked
``on: false`` belong to the ledger but are never served — they are owned, not
connected. Devices marked ``configured: false`` are served, but the agent
configurations derived from the plant (the demo's, the tests') leave them out, so that
discovery has something to find. How a profile is served is its protocol's simulator hook
(``protocols/<name>/simulator.py``, found through ``protocols.registry``): Modbus devices
sharing a port — or naming the same ``gateway`` — answer as unit ids behind one listener
(a Modbus gateway in front of an RS-485 line); every OPC UA device gets a port of its
own. Ports left ``auto``
are assigned from ``base_port`` upwards, skipping the ports given explicitly.

An equipment maker may also list ``products`` it made (with the ``site_region`` they
are installed in): they are served like its devices and go into its ledger as kind
``product``.

Example (see ``simulators/plant.example.yaml``)::

    base_port: 15020
    enterprises:
      - id: sjz-cement
        name: Shijiazhuang Cement Co.
        region: "130102"
        industry: C30
        devices:
          - {id: sjz-kiln-1, profile: kiln-rotary-cement}
          - {id: sjz-comp-2, profile: aircomp-screw, fault: {mode: slow, delay: 1}}
          - {id: sjz-motor-9, profile: motor-hv-drive, on: false}
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from device_profiles.loader import ProfileSet, load_profiles
from device_profiles.schema import Profile
from iiot_common.identifier import IDENTIFIER_PATTERN
from iiot_common.yamlfile import YamlFileError, read_yaml
from protocols import registry
from protocols.registry import SimulatorHook
from simulators.device import SimDevice
from simulators.faults import FaultMode

__all__ = [
    "DeviceConfig",
    "Endpoint",
    "EnterpriseConfig",
    "FaultConfig",
    "LedgerEntry",
    "Plant",
    "PlantConfig",
    "PlantError",
    "ProductConfig",
    "load_plant_config",
    "sim_hook",
]

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaultConfig(_Strict):
    """A fault set when the device starts."""

    mode: FaultMode
    delay: float | None = Field(default=None, ge=0, le=3600)
    code: int | None = Field(default=None, ge=1, le=255, description="Modbus exception code.")


class DeviceConfig(_Strict):
    """One device an enterprise owns."""

    id: str = Field(pattern=IDENTIFIER_PATTERN)
    profile: str = Field(pattern=IDENTIFIER_PATTERN)
    on: bool = Field(default=True, description="false: in the ledger but never switched on.")
    configured: bool = Field(
        default=True,
        description="false: served, but left out of the agent configurations derived from "
        "the plant (the demo's, the tests'): equipment waiting to be discovered.",
    )
    fault: FaultConfig | FaultMode | None = None
    port: int | Literal["auto"] = "auto"
    unit: int = Field(default=1, ge=0, le=247, description="Modbus unit id.")
    framer: Literal["tcp", "rtu-over-tcp"] = "tcp"
    serial: str | None = Field(default=None, description="Serve as RTU on this serial line.")
    gateway: str | None = Field(
        default=None,
        pattern=IDENTIFIER_PATTERN,
        description="Devices naming the same gateway share one port as unit ids.",
    )

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `on:` key as the boolean true.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _port(self) -> Self:
        if isinstance(self.port, int) and not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 1..65535")
        return self

    @property
    def fault_config(self) -> FaultConfig | None:
        if self.fault is None or isinstance(self.fault, FaultConfig):
            return self.fault
        return FaultConfig(mode=self.fault)


class ProductConfig(DeviceConfig):
    """A product the enterprise made and sold; it reports through the maker's agent."""

    site_region: str | None = Field(
        default=None, pattern=r"^\d{6}$", description="GB/T 2260 code of where it is installed."
    )


class EnterpriseConfig(_Strict):
    """An enterprise, where it is, what industry it is in, and what it owns."""

    id: str = Field(pattern=IDENTIFIER_PATTERN)
    name: str = Field(min_length=1)
    region: str = Field(pattern=r"^\d{6}$", description="GB/T 2260 county code, e.g. 130102.")
    industry: str = Field(
        pattern=r"^[A-T]\d{0,4}$", description="GB/T 4754 industry code, e.g. C30."
    )
    devices: list[DeviceConfig] = Field(default_factory=list)
    products: list[ProductConfig] = Field(
        default_factory=list,
        description="Products it made, at customers' sites: ledger rows of kind 'product'.",
    )

    @property
    def owned(self) -> list[DeviceConfig]:
        """Its production equipment, then its products."""
        return [*self.devices, *self.products]


class SerialLineConfig(_Strict):
    """Settings of every serial line the plant serves (8 data bits)."""

    baudrate: int = Field(default=19200, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1


class PlantConfig(_Strict):
    """A whole simulated site."""

    host: str = "127.0.0.1"
    base_port: int = Field(default=15020, ge=1, le=65535)
    seed: int = 0
    time_scale: float = Field(default=1.0, gt=0, le=100000)
    strict_addresses: bool = True
    serial_line: SerialLineConfig = Field(default_factory=SerialLineConfig)
    profile_dirs: list[Path] = Field(
        default_factory=list, description="Extra profile folders beside the shipped ones."
    )
    enterprises: list[EnterpriseConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        errors: list[str] = []
        ents: set[str] = set()
        devs: set[str] = set()
        for e in self.enterprises:
            if e.id in ents:
                errors.append(f"enterprise '{e.id}': duplicate enterprise id")
            ents.add(e.id)
            for d in e.owned:
                if d.id in devs:
                    errors.append(f"device '{d.id}': duplicate device id")
                devs.add(d.id)
        if errors:
            raise ValueError("; ".join(errors))
        return self


class PlantError(ValueError):
    """A plant file that cannot be used; names the file and each problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _where(data: Any, loc: tuple[int | str, ...]) -> str:
    """A pydantic location as 'enterprise 'x': device 'y': field'."""
    parts: list[str] = []
    node: Any = data
    i = 0
    while i < len(loc):
        key = loc[i]
        nxt = loc[i + 1] if i + 1 < len(loc) else None
        if key in ("enterprises", "devices") and isinstance(nxt, int):
            kind = "enterprise" if key == "enterprises" else "device"
            items = node.get(key) if isinstance(node, dict) else None
            item = items[nxt] if isinstance(items, list) and nxt < len(items) else None
            ident = item.get("id") if isinstance(item, dict) else None
            parts.append(f"{kind} '{ident}'" if ident else f"{kind} #{nxt + 1}")
            node = item
            i += 2
            continue
        parts.append(str(key))
        node = node.get(key) if isinstance(node, dict) and isinstance(key, str) else None
        i += 1
    return ": ".join(parts)


def load_plant_config(path: Path | str) -> PlantConfig:
    """Read and validate a plant file; raises PlantError naming the file and device."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except YamlFileError as exc:
        raise PlantError(str(path), [str(exc)]) from exc
    if not isinstance(data, dict):
        raise PlantError(str(path), ["a plant file must be a mapping at the top level"])
    try:
        config = PlantConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            where = _where(data, tuple(err["loc"]))
            # Whole-file checks (duplicate ids) report several findings in one message.
            for m in [msg] if where else msg.split("; "):
                problems.append(f"{where}: {m}" if where else m)
        raise PlantError(str(path), problems) from exc
    # Relative profile folders are relative to the plant file.
    dirs = [d if d.is_absolute() else path.parent / d for d in config.profile_dirs]
    return config.model_copy(update={"profile_dirs": dirs})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a served device answers."""

    device: str
    enterprise: str
    profile: str
    protocol: str
    host: str
    port: int | None
    unit: int | None = None
    framer: str | None = None  # modbus: tcp, rtu-over-tcp or rtu
    serial_port: str | None = None
    server_url: str | None = None  # what the server itself reports, once started
    configured: bool = True  # false: no agent configuration derived from the plant names it

    @property
    def url(self) -> str:
        if self.server_url is not None:
            return self.server_url
        return sim_hook(self.protocol).url(
            self.host, self.port, self.unit or 0, self.framer or "", self.serial_port
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "url": self.url}


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A device as the enterprise's ledger lists it, served or not."""

    device: str
    enterprise: str
    enterprise_name: str
    region: str
    industry: str
    profile: str
    family: str
    category: str
    protocol: str
    on: bool
    kind: str = "equipment"  # or "product": made by the enterprise, installed elsewhere
    site_region: str | None = None


class _Server(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def sim_hook(protocol: str) -> SimulatorHook:
    """How the simulators serve ``protocol`` (ValueError when it has no simulator)."""
    target = registry.get(protocol).simulator
    if target is None:
        raise ValueError(f"protocol '{protocol}' has no simulator")
    hook: SimulatorHook = registry.load_object(target)
    return hook


@dataclass(slots=True)
class _Listener:
    """One port (or serial line) and the devices answering on it."""

    key: str
    protocol: str
    port: int | None
    framer: str
    serial_port: str | None
    units: dict[int, str]  # unit id -> device id (one entry, unit 0, unless shares_port)


def _bindable(host: str, port: int) -> bool:
    """True when nothing else listens on host:port right now (``auto`` skips busy ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Plant:
    """Serve a plant: ``await start()``, look at :attr:`endpoints`, ``await stop()``.

    ``devices`` gives each served :class:`SimDevice`, so callers can set faults at run
    time (``plant.devices['kiln-1'].faults.set('silent')``).
    """

    def __init__(
        self,
        config: PlantConfig,
        *,
        profiles: ProfileSet | None = None,
        source: str = "<plant>",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.source = source
        if profiles is None:
            try:
                profiles = load_profiles(config.profile_dirs)
            except ValueError as exc:
                raise PlantError(source, [f"profiles: {exc}"]) from exc
        self.profiles = profiles
        problems: list[str] = []
        self.ledger: list[LedgerEntry] = []
        self.devices: dict[str, SimDevice] = {}
        self._profile_of: dict[str, Profile] = {}
        for ent in config.enterprises:
            for d in ent.owned:
                where = f"enterprise '{ent.id}': device '{d.id}'"
                if d.profile not in profiles:
                    problems.append(f"{where}: unknown profile '{d.profile}'")
                    continue
                prof = profiles[d.profile]
                try:
                    found = sim_hook(prof.protocol).check_device(d)
                except ValueError as exc:
                    found = [str(exc)]
                problems.extend(f"{where}: {m}" for m in found)
                fault = d.fault_config
                self.ledger.append(
                    LedgerEntry(
                        device=d.id,
                        enterprise=ent.id,
                        enterprise_name=ent.name,
                        region=ent.region,
                        industry=ent.industry,
                        profile=prof.id,
                        family=prof.family,
                        category=prof.category.value,
                        protocol=prof.protocol,
                        on=d.on,
                        kind="product" if isinstance(d, ProductConfig) else "equipment",
                        site_region=d.site_region if isinstance(d, ProductConfig) else None,
                    )
                )
                if not d.on:
                    continue
                try:
                    dev = SimDevice(
                        prof,
                        device_id=d.id,
                        seed=config.seed,
                        clock=clock,
                        time_scale=config.time_scale,
                    )
                except Exception as exc:  # a model that cannot start is one bad device
                    problems.append(f"{where}: cannot simulate profile '{prof.id}': {exc}")
                    continue
                if fault is not None:
                    dev.faults.set(fault.mode, delay=fault.delay, code=fault.code)
                self.devices[d.id] = dev
                self._profile_of[d.id] = prof
        self._listeners: list[_Listener] = []
        self.endpoints: dict[str, Endpoint] = {}
        if not problems:
            problems.extend(self._assign())
        if problems:
            raise PlantError(source, problems)
        self._servers: list[_Server] = []
        self._running = False

    @classmethod
    def from_file(cls, path: Path | str, **kwargs: Any) -> Plant:
        """Load a plant file and build the plant (nothing is served until ``start``)."""
        config = load_plant_config(path)
        return cls(config, source=str(path), **kwargs)

    def _assign(self) -> list[str]:
        """Group served devices into listeners and give ``auto`` devices free ports."""
        problems: list[str] = []
        cfg = self.config
        served = [
            (ent, d) for ent in cfg.enterprises for d in ent.owned if d.on and d.id in self.devices
        ]
        taken = {d.port for _, d in served if isinstance(d.port, int)}
        next_port = cfg.base_port
        by_key: dict[str, _Listener] = {}
        gateway_ports: dict[str, int] = {}
        for ent, d in served:
            prof = self._profile_of[d.id]
            hook = sim_hook(prof.protocol)
            where = f"enterprise '{ent.id}': device '{d.id}'"
            serial, framer = hook.listener(d)
            port: int | None = None
            if serial is not None:
                key = f"serial:{serial}"
            else:
                known = gateway_ports.get(d.gateway) if d.gateway is not None else None
                if known is not None:
                    if isinstance(d.port, int) and d.port != known:
                        problems.append(
                            f"{where}: port {d.port} differs from gateway '{d.gateway}' "
                            f"on port {known}"
                        )
                        continue
                    port = known
                elif isinstance(d.port, int):
                    port = d.port
                else:
                    while next_port <= 65535 and (
                        next_port in taken or not _bindable(cfg.host, next_port)
                    ):
                        next_port += 1
                    if next_port > 65535:
                        problems.append(f"{where}: no free port left above {cfg.base_port}")
                        continue
                    port = next_port
                    taken.add(port)
                if d.gateway is not None:
                    gateway_ports[d.gateway] = port
                key = f"tcp:{port}"
            lst = by_key.get(key)
            if lst is None:
                lst = _Listener(key, prof.protocol, port, framer, serial, {})
                by_key[key] = lst
                self._listeners.append(lst)
            elif lst.protocol != prof.protocol or not hook.shares_port:
                other = next(iter(lst.units.values()))
                problems.append(f"{where}: {key} is already used by device '{other}'")
                continue
            elif lst.framer != framer:
                other = next(iter(lst.units.values()))
                problems.append(f"{where}: framer {framer} differs from device '{other}' on {key}")
                continue
            unit = d.unit if hook.shares_port else 0
            if unit in lst.units:
                problems.append(
                    f"{where}: unit {unit} on {key} is already device '{lst.units[unit]}'"
                )
                continue
            lst.units[unit] = d.id
            self.endpoints[d.id] = Endpoint(
                device=d.id,
                enterprise=ent.id,
                profile=prof.id,
                protocol=prof.protocol,
                host=cfg.host,
                port=port,
                unit=unit if hook.shares_port else None,
                framer=framer if hook.shares_port else None,
                serial_port=serial,
                configured=d.configured,
            )
        return problems

    @property
    def running(self) -> bool:
        return self._running

    async def start(self) -> None:
        """Start every listener; on failure, stop the ones already started and raise."""
        if self._running:
            raise RuntimeError("plant is already running")
        try:
            for lst in self._listeners:
                server: _Server = sim_hook(lst.protocol).server(
                    {u: self.devices[d] for u, d in lst.units.items()},
                    host=self.config.host,
                    port=lst.port,
                    framer=lst.framer,
                    serial_port=lst.serial_port,
                    serial_line=self.config.serial_line.model_dump(),
                    strict_addresses=self.config.strict_addresses,
                )
                try:
                    await server.start()
                except OSError as exc:
                    names = ", ".join(lst.units.values())
                    raise OSError(f"{exc} (devices: {names})") from exc
                self._servers.append(server)
                reported = getattr(server, "endpoint", None)
                # A server of its own reports where it really listens (its own URL form).
                if not sim_hook(lst.protocol).shares_port and isinstance(reported, str):
                    (device_id,) = lst.units.values()
                    self.endpoints[device_id] = replace(
                        self.endpoints[device_id], server_url=reported
                    )
        except BaseException:
            await self.stop()
            raise
        self._running = True
        log.info(
            "plant serving",
            extra={"source": self.source, "devices": len(self.endpoints)},
        )

    async def stop(self) -> None:
        """Stop every listener (in reverse order); safe to call twice."""
        servers, self._servers = self._servers, []
        self._running = False
        for server in reversed(servers):
            with contextlib.suppress(Exception):
                await server.stop()

    async def __aenter__(self) -> Plant:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def endpoints_document(self) -> dict[str, Any]:
        """What ``--endpoints-out`` writes: served endpoints and the whole ledger."""
        enterprises = [
            {"id": e.id, "name": e.name, "region": e.region, "industry": e.industry}
            for e in self.config.enterprises
        ]
        return {
            "enterprises": enterprises,
            "devices": {k: v.as_dict() for k, v in self.endpoints.items()},
            "ledger": [asdict(entry) for entry in self.ledger],
        }
