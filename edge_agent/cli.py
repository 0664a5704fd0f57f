"""``iiot agent``: run the edge agent, or check its config."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(help="The edge agent: poll devices, publish over MQTT.", no_args_is_help=True)

log = logging.getLogger("iiot.agent")


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
) -> None:
    """Poll the configured devices and publish to the broker until SIGTERM or Ctrl-C."""
    loaded = _load(config)
    from edge_agent.agent import Agent, AgentStartError

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await Agent(loaded).run(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(_main())
    except AgentStartError as exc:
        typer.echo(f"agent cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
