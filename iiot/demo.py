"""``iiot demo``: the whole system in one process, on embedded defaults.

It starts an embedded MQTT broker (unless ``--broker`` names one), the gateway with its
registry and outbox in SQLite under ``--data-dir``, a simulated site of several Hebei
enterprises, imports their ledger (more devices than are switched on; an equipment
maker's products too), sets the province's target of enterprises on the cloud,
provisions one agent per enterprise through the API, runs the agents against the
simulators, and serves the API and dashboard. One enterprise's devices are not in any file:
its agent starts with none, the demo asks it to scan and approves what it proposes, so
they are onboarded through discovery as a platform operator would. A few devices fail
and recover while it runs, so the ratios move. The terminal shows a live table;
``--duration`` or Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["demo"]

log = logging.getLogger("iiot.demo")
_T = TypeVar("_T")

_DEMO_PLANT = Path(__file__).with_name("demo_plant.yaml")
_GATEWAY_USER = "iiot-gateway"
# The demo province's target of enterprises on the cloud (上云企业数), for every year.
_DEMO_TARGETS = [{"region": "130000", "target": 10}]


def _free_port(host: str, preferred: int) -> int:
    """``preferred`` if it can be bound on ``host``, else any free port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port on {host}")


@dataclass
class _Secrets:
    """Credentials of one demo data folder, kept (0600) so a rerun reuses its registry."""

    admin_token: str
    platform_token: str
    gateway_password: str

    @classmethod
    def load_or_create(cls, path: Path) -> _Secrets:
        if path.exists():
            data = json.loads(path.read_text())
            return cls(**data)
        made = cls(
            admin_token="adm-" + secrets.token_urlsafe(24),
            platform_token="ro-" + secrets.token_urlsafe(24),
            gateway_password=secrets.token_urlsafe(24),
        )
        path.write_text(json.dumps(made.__dict__))
        path.chmod(0o600)
        return made


@dataclass
class _Rates:
    """Messages and points per second, from the gateway's counters."""

    last_t: float = 0.0
    last_msgs: float = 0.0
    last_points: float = 0.0
    msgs_per_s: float = 0.0
    points_per_s: float = 0.0

    def update(self, msgs: float, points: float) -> None:
        now = time.monotonic()
        if self.last_t:
            dt = max(now - self.last_t, 1e-6)
            self.msgs_per_s = (msgs - self.last_msgs) / dt
            self.points_per_s = (points - self.last_points) / dt
        self.last_t, self.last_msgs, self.last_points = now, msgs, points


@dataclass
class _View:
    """What the live table shows."""

    by_enterprise: dict[str, Any] = field(default_factory=dict)
    by_category: dict[str, Any] = field(default_factory=dict)
    on_cloud: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    rates: _Rates = field(default_factory=_Rates)
    dashboard: str = ""


def _ratio_table(title: str, doc: dict[str, Any], key_title: str) -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column(key_title)
    table.add_column("name")
    table.add_column("connected", justify="right")
    table.add_column("online", justify="right")
    table.add_column("total", justify="right")
    table.add_column("ratio", justify="right")
    for g in doc.get("groups", []):
        table.add_row(
            str(g["key"]),
            str(g.get("label") or ""),
            str(g["connected"]),
            str(g["online"]),
            str(g["total"]),
            f"{100.0 * float(g['ratio']):.1f}%",
        )
    o = doc.get("overall")
    if o:
        table.add_row(
            "all",
            "",
            str(o["connected"]),
            str(o["online"]),
            str(o["total"]),
            f"{100.0 * float(o['ratio']):.1f}%",
            style="bold",
        )
    return table


def _on_cloud_text(doc: dict[str, Any]) -> str:
    """'on the cloud 4/5 enterprises, target 10, progress 40.0%' for an on-cloud response."""
    o = doc.get("overall")
    if not o:
        return ""
    text = f"on the cloud {o['on_cloud']}/{o['registered']} enterprises"
    if o.get("target") is not None:
        text += f", target {o['target']}, progress {100.0 * float(o['progress']):.1f}%"
    return text


def _render(view: _View) -> Group:
    r = view.rates
    head = Text.assemble(
        ("iiot demo  ", "bold"),
        f"messages/s {r.msgs_per_s:7.1f}   points/s {r.points_per_s:8.1f}   ",
        _on_cloud_text(view.on_cloud) + "\n",
        ("dashboard  ", "bold"),
        view.dashboard,
    )
    parts: list[Any] = [head]
    if view.by_enterprise:
        parts.append(
            _ratio_table("Connected devices by enterprise", view.by_enterprise, "enterprise")
        )
    if view.by_category:
        parts.append(_ratio_table("Connected devices by category", view.by_category, "category"))
    if view.events:
        parts.append(Text("\n".join(view.events[-5:]), style="dim"))
    return Group(*parts)


class _Demo:
    def __init__(
        self,
        *,
        data_dir: Path,
        broker_url: str | None,
        influx_url: str | None,
        api_port: int,
        broker_port: int,
        plant_file: Path,
        poll_interval: float,
        fault_every: float,
        console: Console,
        sparkplug: frozenset[str] = frozenset(),
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.broker_url = broker_url
        self.influx_url = influx_url
        self.api_port = api_port
        self.broker_port = broker_port
        self.plant_file = plant_file
        self.poll_interval = poll_interval
        self.fault_every = fault_every
        self.sparkplug = sparkplug
        self.console = console
        self.view = _View()
        self.broker: Any = None
        self.gateway: Any = None
        self.plant: Any = None
        self.agents: list[Any] = []
        self.secrets: _Secrets | None = None
        self.api: str = ""
        self._rng = random.Random(11)

    # -- start ---------------------------------------------------------------------------

    def _step(self, text: str) -> None:
        self.console.print(f"[bold cyan]›[/] {text}")

    async def start(self) -> None:
        from gateway.config import GatewayConfig
        from gateway.service import Gateway
        from iiot.broker import EmbeddedBroker
        from simulators.plant import Plant

        self.data_dir.mkdir(parents=True, exist_ok=True)
        broker_dir = self.data_dir / "broker"
        broker_dir.mkdir(exist_ok=True)
        self.secrets = sec = _Secrets.load_or_create(self.data_dir / "demo-secrets.json")
        password_file = broker_dir / "passwords"
        acl_file = broker_dir / "acl"

        if self.broker_url is None:
            port = _free_port("127.0.0.1", self.broker_port)
            # The gateway rewrites both files with its own user before it connects; the
            # embedded broker re-reads them whenever they change.
            for f in (password_file, acl_file):
                if not f.exists():
                    f.write_text("")
            self._step(f"embedded MQTT broker on 127.0.0.1:{port} (passwords and ACL enforced)")
            self.broker = EmbeddedBroker(
                host="127.0.0.1", port=port, password_file=password_file, acl_file=acl_file
            )
            await self.broker.start()
            mqtt_url = self.broker.url
            broker_auth: dict[str, Any] = {
                "password_file": password_file,
                "acl_file": acl_file,
                "broker_url_for_agents": mqtt_url,
            }
        else:
            mqtt_url = self.broker_url
            self._step(f"external MQTT broker {mqtt_url}")
            broker_auth = {"broker_url_for_agents": mqtt_url}

        api_port = _free_port("127.0.0.1", self.api_port)
        cfg = GatewayConfig.model_validate(
            {
                "data_dir": self.data_dir,
                "mqtt": {
                    "url": mqtt_url,
                    # The embedded broker speaks MQTT 3.1.1.
                    "protocol": "3.1.1" if self.broker is not None else "5",
                    # With a username the client id is the username.
                    **(
                        {"username": _GATEWAY_USER, "password": sec.gateway_password}
                        if self.broker is not None
                        else {"client_id": "iiot-demo-gateway"}
                    ),
                },
                "influx": {"url": self.influx_url},
                "api": {
                    "host": "127.0.0.1",
                    "port": api_port,
                    "admin_tokens": [sec.admin_token],
                    "platform_tokens": [sec.platform_token],
                },
                "broker_auth": broker_auth,
                "snapshot_interval": 10.0,
                "default_poll_interval": self.poll_interval,
            }
        )
        store = f"InfluxDB at {self.influx_url}" if self.influx_url else "embedded outbox"
        self._step(f"gateway: registry and outbox in {self.data_dir}, time series to {store}")
        self.gateway = Gateway(cfg)
        await asyncio.to_thread(self.gateway.start)
        self.api = f"http://127.0.0.1:{self.gateway.api_port}"
        self.view.dashboard = f"{self.api}/#token={sec.platform_token}"

        self._step(f"simulated site from {self.plant_file.name}")
        self.plant = Plant.from_file(self.plant_file)
        await self.plant.start()
        served = len(self.plant.devices)
        owned = len(self.plant.ledger)
        self._step(f"{served} devices switched on, {owned} in the enterprises' ledgers")

        creds = await self._onboard()
        for enterprise, cred in creds.items():
            await self._start_agent(enterprise, cred)
        for enterprise, cred in creds.items():
            if self._by_discovery(enterprise):
                await self._discover(enterprise, cred["agent_id"])
        self._step(f"{len(self.agents)} agents polling every {self.poll_interval:g} s")
        on_sp = sorted(e for e in creds if e in self.sparkplug)
        if on_sp:
            self._step(f"on Sparkplug B (spBv1.0/{{enterprise}}/...): {', '.join(on_sp)}")

    async def _onboard(self) -> dict[str, dict[str, Any]]:
        """Create enterprises, import the ledger, provision one agent each, via the API."""
        import httpx

        assert self.secrets is not None
        admin = {"Authorization": f"Bearer {self.secrets.admin_token}"}
        ents = {e.id: e for e in self.plant.config.enterprises}
        creds: dict[str, dict[str, Any]] = {}
        async with httpx.AsyncClient(base_url=self.api, headers=admin, timeout=30) as client:
            for e in ents.values():
                r = await client.post(
                    "/api/v1/enterprises",
                    json={"id": e.id, "name": e.name, "region": e.region, "industry": e.industry},
                )
                if r.status_code not in (200, 201, 409):
                    raise RuntimeError(f"creating enterprise {e.id}: {r.status_code} {r.text}")
            ledger = [
                {
                    "device_id": d.device,
                    "enterprise": d.enterprise,
                    "region": d.region,
                    "industry": d.industry,
                    "family": d.family,
                    "category": d.category,
                    "name": d.device,
                    "kind": d.kind,
                    **({"site_region": d.site_region} if d.site_region else {}),
                }
                for d in self.plant.ledger
            ]
            r = await client.post("/api/v1/ledger", json=ledger)
            r.raise_for_status()
            products = sum(1 for d in self.plant.ledger if d.kind == "product")
            self._step(
                f"ledger imported: {r.json().get('accepted', len(ledger))} devices "
                f"({products} of them products at customers' sites)"
            )
            r = await client.put("/api/v1/targets", json={"targets": _DEMO_TARGETS})
            r.raise_for_status()
            for e in ents.values():
                # A demo started again on its data folder provisions the same agent ids
                # and runs them with the new credentials: its keys may rotate them.
                r = await client.post(
                    f"/api/v1/enterprises/{e.id}/provisioning-keys",
                    json={"allow_rotation": True},
                )
                r.raise_for_status()
                key = r.json()["key"]
                r = await client.post(
                    "/api/v1/provision", json={"key": key, "agent_id": f"{e.id}-edge"}
                )
                if r.status_code >= 400:
                    raise RuntimeError(f"provisioning {e.id}-edge: {r.status_code} {r.text}")
                creds[e.id] = r.json()
        self._step(f"{len(creds)} agents provisioned with their own MQTT credentials")
        return creds

    def _by_discovery(self, enterprise: str) -> bool:
        """True when the enterprise's devices are switched on but in no agent file."""
        eps = [ep for ep in self.plant.endpoints.values() if ep.enterprise == enterprise]
        return bool(eps) and not any(ep.configured for ep in eps)

    def _scope(self, enterprise: str) -> dict[str, Any]:
        """Where the enterprise's agent may scan: its addresses, as a site survey lists them."""
        eps = [ep for ep in self.plant.endpoints.values() if ep.enterprise == enterprise]
        ports = sorted({ep.port for ep in eps if ep.protocol == "modbus" and ep.port})
        units = sorted({ep.unit or 1 for ep in eps if ep.protocol == "modbus"})
        scope: dict[str, Any] = {"rate": 200, "timeout": 0.5}
        if ports:
            scope["modbus_tcp"] = [
                {"hosts": [self.plant.config.host], "ports": ports, "units": units}
            ]
        opcua = sorted(ep.url for ep in eps if ep.protocol == "opcua")
        if opcua:
            scope["opcua"] = opcua
        return scope

    async def _discover(self, enterprise: str, agent_id: str) -> None:
        """Push a scan scope, scan, and approve each proposal under its ledger id."""
        import httpx

        assert self.secrets is not None
        admin = {"Authorization": f"Bearer {self.secrets.admin_token}"}
        async with httpx.AsyncClient(base_url=self.api, headers=admin, timeout=30) as client:
            config = f"/api/v1/agents/{enterprise}/{agent_id}/config"
            r = await client.put(config, json={"devices": [], "discovery": self._scope(enterprise)})
            _raise_for(r, f"pushing the scan scope of {agent_id}")
            await _wait_for(lambda: self._online(client, agent_id), 30, f"{agent_id} online")
            r = await client.post(f"/api/v1/agents/{enterprise}/{agent_id}/scan")
            _raise_for(r, f"asking {agent_id} to scan")
            expected = {
                _address_key(ep): ep.device
                for ep in self.plant.endpoints.values()
                if ep.enterprise == enterprise
            }
            self._step(f"{agent_id} scans for {enterprise}'s equipment (no devices in its file)")
            found = await _wait_for(
                lambda: self._proposals(client, agent_id, len(expected)), 90, "the scan"
            )
            approved = 0
            for p in found:
                where = _address_key_of(p["address"])
                device = expected.get(where)
                if device is None:
                    continue  # it answered, but is no equipment of this site's ledger
                profile = p["candidates"][0]["profile"] if p["candidates"] else "?"
                r = await client.post(
                    f"/api/v1/discovered/{p['id']}/approve",
                    json={"device_id": device, "poll_interval": self.poll_interval},
                )
                _raise_for(r, f"approving {device}")
                approved += 1
                self._step(f"  found {where}: {profile}, approved as {device}")
        self._step(f"{enterprise}: {approved} devices onboarded by discovery and approval")

    @staticmethod
    async def _online(client: Any, agent_id: str) -> bool:
        r = await client.get("/api/v1/agents")
        return r.status_code == 200 and any(a["id"] == agent_id and a["online"] for a in r.json())

    @staticmethod
    async def _proposals(client: Any, agent_id: str, want: int) -> list[dict[str, Any]]:
        """The scan's proposals once there are ``want`` of them, else none."""
        r = await client.get("/api/v1/discovered", params={"agent": agent_id, "status": "new"})
        rows: list[dict[str, Any]] = r.json() if r.status_code == 200 else []
        return rows if len(rows) >= want else []

    async def _start_agent(self, enterprise: str, cred: dict[str, Any]) -> None:
        from edge_agent.agent import Agent
        from edge_agent.config import parse_config
        from simulators.plant import sim_hook

        devices: list[dict[str, Any]] = []
        for ep in self.plant.endpoints.values():
            if ep.enterprise != enterprise or not ep.configured:
                continue  # unconfigured devices are left for discovery
            dev: dict[str, Any] = {
                "id": ep.device,
                "profile": ep.profile,
                "poll_interval": self.poll_interval,
            }
            hook = sim_hook(ep.protocol)
            dev[ep.protocol] = hook.agent_connection(
                ep.host, ep.port, ep.unit or 0, ep.framer or "", ep.url
            )
            devices.append(dev)
        agent_dir = self.data_dir / "agents" / cred["agent_id"]
        loaded = parse_config(
            {
                "agent_id": cred["agent_id"],
                "enterprise": enterprise,
                "data_dir": str(agent_dir),
                "mqtt": {
                    "url": cred["broker_url"],
                    "username": cred["username"],
                    "password": cred["password"],
                    "reconnect_max": 5.0,
                    "codec": "sparkplug" if enterprise in self.sparkplug else "json",
                },
                # Devices pushed by the platform replace the (then empty) list here.
                "remote_config": {"enabled": self._by_discovery(enterprise)},
                "devices": devices,
            },
            source=f"demo agent {cred['agent_id']}",
        )
        agent = Agent(loaded)
        await agent.start()
        self.agents.append(agent)

    # -- run -----------------------------------------------------------------------------

    async def _refresh(self) -> None:
        import httpx

        assert self.secrets is not None
        ro = {"Authorization": f"Bearer {self.secrets.platform_token}"}
        async with httpx.AsyncClient(base_url=self.api, headers=ro, timeout=10) as client:
            by_ent = await client.get("/api/v1/ratios", params={"group_by": "enterprise"})
            by_cat = await client.get("/api/v1/ratios", params={"group_by": "category"})
            on_cloud = await client.get("/api/v1/enterprises/on-cloud", params={"region": "13"})
        if on_cloud.status_code == 200:
            self.view.on_cloud = on_cloud.json()
        if by_ent.status_code == 200:
            self.view.by_enterprise = by_ent.json()
        if by_cat.status_code == 200:
            self.view.by_category = by_cat.json()
        collector = self.gateway.collector
        msgs = collector.get_sample_value("iiot_gateway_messages_received_total") or 0.0
        points = collector.get_sample_value("iiot_gateway_points_total") or 0.0
        self.view.rates.update(msgs, points)

    async def _faults(self, stop: asyncio.Event) -> None:
        """Every so often a device stops answering for a while, then recovers."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.fault_every)
                return
            healthy = [
                d for d, dev in sorted(self.plant.devices.items()) if dev.faults.mode == "none"
            ]
            if not healthy:
                continue
            victim = self._rng.choice(healthy)
            outage = self.fault_every * 1.5
            self.plant.devices[victim].faults.set("silent")
            stamp = time.strftime("%H:%M:%S")
            self.view.events.append(f"{stamp} {victim} stops answering for {outage:.0f} s")
            asyncio.get_running_loop().call_later(outage, self._recover, victim)

    def _recover(self, device: str) -> None:
        if self.plant is not None and device in self.plant.devices:
            self.plant.devices[device].faults.clear()
            self.view.events.append(f"{time.strftime('%H:%M:%S')} {device} answers again")

    async def run(self, duration: float | None, live: bool) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        faults = asyncio.create_task(self._faults(stop), name="demo-faults")
        deadline = None if duration is None else loop.time() + duration
        token = self.secrets.platform_token if self.secrets else ""
        self.console.print(
            f"\n[bold]Dashboard:[/] {self.view.dashboard}\n"
            f"[bold]API:[/] {self.api}/docs   read-only token: {token}\n"
        )
        ctx: Any = (
            Live(_render(self.view), console=self.console, refresh_per_second=1)
            if live
            else contextlib.nullcontext()
        )
        try:
            with ctx as screen:
                while not stop.is_set():
                    timeout = 2.0 if deadline is None else min(2.0, deadline - loop.time())
                    if timeout <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout)
                    try:
                        await self._refresh()
                    except Exception as exc:  # a slow API is shown, never fatal
                        self.view.events.append(f"refresh failed: {exc}")
                    if screen is not None:
                        screen.update(_render(self.view))
        finally:
            stop.set()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await faults

    async def final(self) -> dict[str, Any]:
        """Settle faults, take one consistent reading, print it, and write it down."""
        assert self.secrets is not None
        as_of = int(time.time() * 1000)
        import httpx

        ro = {"Authorization": f"Bearer {self.secrets.platform_token}"}
        async with httpx.AsyncClient(base_url=self.api, headers=ro, timeout=10) as client:
            docs = {}
            for g in ("enterprise", "category"):
                r = await client.get("/api/v1/ratios", params={"group_by": g, "as_of": as_of})
                r.raise_for_status()
                docs[g] = r.json()
            r = await client.get(
                "/api/v1/ratios",
                params={"group_by": "enterprise", "kind": "product", "as_of": as_of},
            )
            r.raise_for_status()
            products = r.json()
            r = await client.get(
                "/api/v1/enterprises/on-cloud", params={"region": "13", "as_of": as_of}
            )
            r.raise_for_status()
            on_cloud = r.json()
        self.view.by_enterprise, self.view.by_category = docs["enterprise"], docs["category"]
        summary = {
            "as_of": as_of,
            "api": self.api,
            "ratios": docs,
            "products": products,
            "on_cloud": on_cloud,
        }
        (self.data_dir / "demo-summary.json").write_text(json.dumps(summary, ensure_ascii=False))
        self.console.print()
        self.console.print(
            _ratio_table("Final: connected devices by enterprise", docs["enterprise"], "enterprise")
        )
        self.console.print(
            _ratio_table("Final: connected devices by category", docs["category"], "category")
        )
        self.console.print(
            _ratio_table("Final: connected products by maker", products, "enterprise")
        )
        self.console.print(f"Final: {_on_cloud_text(on_cloud)} (Hebei)")
        self.console.print(
            f"as of {as_of} ms (GET /api/v1/ratios?as_of={as_of} gives the same numbers); "
            f"summary in {self.data_dir / 'demo-summary.json'}"
        )
        return summary

    async def stop(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                await agent.stop()
        self.agents = []
        if self.plant is not None:
            with contextlib.suppress(Exception):
                await self.plant.stop()
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.gateway.stop)
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.stop()


def _raise_for(r: Any, what: str) -> None:
    if r.status_code >= 400:
        raise RuntimeError(f"{what}: {r.status_code} {r.text}")


async def _wait_for(check: Callable[[], Awaitable[_T]], within: float, what: str) -> _T:
    """Poll ``check`` every half second until it returns something true, or fail naming ``what``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.5)
    raise RuntimeError(f"timed out after {within:g} s waiting for {what}")


def _address_key_of(address: dict[str, Any]) -> str:
    """'modbus 127.0.0.1:25031 unit 1' or 'opcua opc.tcp://…' for a proposal's address."""
    if "opcua" in address:
        return f"opcua {address['opcua']['endpoint']}"
    m = address.get("modbus", {})
    return f"modbus {m.get('host')}:{m.get('port', 502)} unit {m.get('unit', 1)}"


def _address_key(ep: Any) -> str:
    """The same key for a plant endpoint."""
    if ep.protocol == "opcua":
        return f"opcua {ep.url}"
    return f"modbus {ep.host}:{ep.port} unit {ep.unit or 1}"


async def _main(d: _Demo, duration: float | None, live: bool) -> int:
    try:
        with d.console.status("starting…"):
            await d.start()
        await d.run(duration, live)
        await d.final()
        return 0
    finally:
        with d.console.status("stopping…"):
            await d.stop()
        d.console.print("stopped cleanly")


def _log_to_file(path: Path) -> None:
    """Keep the terminal for the live table: structured logs go to a file instead."""
    from iiot_common.log import LogfmtFormatter

    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(LogfmtFormatter())
    root.handlers[:] = [handler]


# One enterprise of the demo site runs its agent on Sparkplug B, the others on JSON.
_SPARKPLUG_DEFAULT = "zjk-wind"


def demo(
    broker: str | None = typer.Option(
        None,
        "--broker",
        help="Use this MQTT broker (mqtt://HOST:PORT) instead of the embedded one.",
    ),
    data_dir: Path = typer.Option(
        Path("iiot-data"), "--data-dir", help="Registry, outbox, spools and secrets live here."
    ),
    influx: str | None = typer.Option(
        None, "--influx", help="Also write time series to this InfluxDB v2 write API URL."
    ),
    duration: float | None = typer.Option(
        None, "--duration", min=1, help="Stop after this many seconds (default: until Ctrl-C)."
    ),
    api_port: int = typer.Option(
        8080, "--api-port", help="API and dashboard port (taken → any free port)."
    ),
    broker_port: int = typer.Option(
        1883, "--broker-port", help="Embedded broker port (taken → any free port)."
    ),
    plant: Path = typer.Option(
        _DEMO_PLANT, "--plant", help="The simulated site (iiot sim plant format)."
    ),
    poll_interval: float = typer.Option(
        2.0, "--poll-interval", min=0.2, help="Seconds between polls."
    ),
    fault_every: float = typer.Option(
        15.0, "--fault-every", min=1, help="Seconds between injected outages."
    ),
    live: bool = typer.Option(
        True, "--live/--no-live", help="Redraw a live table (off: final table only)."
    ),
    sparkplug: list[str] = typer.Option(
        [_SPARKPLUG_DEFAULT],
        "--sparkplug",
        help="Enterprise whose agent speaks Sparkplug B (repeatable; 'none' for none).",
    ),
) -> None:
    """Run a simulated site, agents, broker and gateway in one process, with a live table."""
    console = Console()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "demo.log"
    _log_to_file(log_file)
    console.print(f"[dim]logs: {log_file}[/]")
    d = _Demo(
        data_dir=data_dir,
        broker_url=broker,
        influx_url=influx,
        api_port=api_port,
        broker_port=broker_port,
        plant_file=plant,
        poll_interval=poll_interval,
        fault_every=fault_every,
        console=console,
        sparkplug=frozenset(e for e in sparkplug if e != "none"),
    )
    try:
        code = asyncio.run(_main(d, duration, live and console.is_terminal))
    except Exception as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from exc
    raise typer.Exit(code)
