"""``iiot agent``: run the edge agent, or check its config."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import typer

from edge_agent.discovery import discover
from edge_agent.runtime import LoopKind, raise_open_files, run_on, settle_heap

__all__ = ["app"]

app = typer.Typer(help="The edge agent: poll devices, publish over MQTT.", no_args_is_help=True)
app.command("discover")(discover)

log = logging.getLogger("iiot.agent")


def _add_config_commands() -> None:
    from edge_agent.config_cli import app as config_app

    app.add_typer(config_app, name="config")


_add_config_commands()


def _load(config: Path):  # type: ignore[no-untyped-def]
    from edge_agent.config import AgentConfigError, load_config

    try:
        return load_config(config)
    except AgentConfigError as exc:
        typer.echo(f"agent config {exc.source} is not usable:", err=True)
        for p in exc.problems:
            typer.echo(f"  - {p}", err=True)
        raise typer.Exit(2) from None


@app.command("check")
def check(
    config: Path = typer.Option(..., "--config", "-c", help="Agent config (YAML)."),
) -> None:
    """Validate the config and the profiles it uses, without connecting to anything."""
    loaded = _load(config)
    typer.echo(
        f"ok: agent '{loaded.config.agent_id}', {len(loaded.device_profiles)} enabled device(s)"
    )


@app.command("run")
def run(
    config: Path = typer.Option(..., "--config", "-c", help="Agent config (YAML)."),
    loop_kind: LoopKind = typer.Option(
        LoopKind.UVLOOP,
        "--loop",
        envvar="IIOT_AGENT_LOOP",
        help="Event loop: uvloop (less CPU per poll) or plain asyncio.",
    ),
) -> None:
    """Poll the configured devices and publish to the broker until SIGTERM or Ctrl-C."""
    loaded = _load(config)
    from edge_agent.agent import Agent, AgentLockedError, AgentStartError

    async def _main() -> None:
        agent = Agent(loaded)
        limits = raise_open_files(len(agent.pollers))
        loop = asyncio.get_running_loop()
        settle_heap(loop)
        log.info(
            "agent runtime",
            extra={
                "loop": type(loop).__module__.split(".")[0],
                "open_file_limit": limits[0] if limits is not None else None,
            },
        )
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await agent.run(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        run_on(loop_kind, _main())
    except AgentLockedError as exc:
        # Exit 2 like a config error: starting again will not help until the other stops.
        typer.echo(f"agent cannot start: {exc}", err=True)
        raise typer.Exit(2) from None
    except AgentStartError as exc:
        typer.echo(f"agent cannot start: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("provision")
def provision(
    api: str = typer.Option(
        ..., "--api", help="The gateway's base URL, e.g. https://iiot.example:8080"
    ),
    key: str = typer.Option(
        ..., "--key", envvar="IIOT_PROVISIONING_KEY", help="Provisioning key from the platform."
    ),
    agent_id: str = typer.Option(..., "--agent-id", help="This gateway box's agent id."),
    config: Path = typer.Option(
        Path("agent.yaml"), "--config", "-c", help="Agent config to fill in (created if missing)."
    ),
    password_file: Path = typer.Option(
        Path("agent.secret"), "--password-file", help="Where the MQTT password is kept (0600)."
    ),
    ca_file: Path | None = typer.Option(
        None, "--ca-file", help="The broker's CA certificate, for mqtts:// (sets mqtt.ca_file)."
    ),
) -> None:
    """Redeem a provisioning key: register this agent and store its MQTT credentials."""
    import os

    import httpx
    import yaml

    try:
        r = httpx.post(
            api.rstrip("/") + "/api/v1/provision",
            json={"key": key, "agent_id": agent_id},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        typer.echo(f"cannot reach the gateway at {api}: {exc}", err=True)
        raise typer.Exit(1) from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        typer.echo(f"provisioning refused ({r.status_code}): {detail}", err=True)
        if r.status_code == 409 and "already provisioned" in str(detail):
            typer.echo(
                "  this agent id has credentials already; to replace them (a replaced box),\n"
                "  ask the platform for a key created with allow_rotation, or an admin to\n"
                "  rotate them (POST /api/v1/agents/{enterprise}/{agent}/rotate)",
                err=True,
            )
        raise typer.Exit(1)
    cred = r.json()
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(cred["password"] + "\n")
    data = {}
    if config.exists():
        loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
        data = loaded if isinstance(loaded, dict) else {}
    mqtt = dict(data.get("mqtt") or {})
    mqtt.pop("password", None)
    # The broker uses the username as client id; a different one would be refused.
    mqtt.pop("client_id", None)
    if ca_file is not None:
        mqtt["ca_file"] = str(ca_file.resolve())
    mqtt.update(
        {
            "url": cred["broker_url"],
            "username": cred["username"],
            "password_file": str(password_file.resolve()),
        }
    )
    data.update({"agent_id": cred["agent_id"], "enterprise": cred["enterprise"], "mqtt": mqtt})
    # A provisioned agent takes its devices from the gateway unless the file says otherwise.
    data.setdefault("remote_config", {"enabled": True})
    config.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    if cred.get("rotated"):
        typer.echo(
            f"replaced the credentials of existing agent '{cred['agent_id']}': "
            "its previous password no longer works"
        )
    typer.echo(
        f"provisioned agent '{cred['agent_id']}' of enterprise '{cred['enterprise']}'\n"
        f"  broker   {cred['broker_url']} as user '{cred['username']}'\n"
        f"  topics   {cred['topic_prefix']}/#\n"
        f"  password {password_file} (mode 0600)\n"
        f"  config   {config} updated"
    )
