"""The ``iiot`` command: demo, agent, gateway, sim, profiles.

Each group lives beside the code it drives; heavy libraries are imported inside the
commands so that ``iiot --help`` stays fast.
"""

from __future__ import annotations

import typer

from iiot_common import __version__
from iiot_common.log import setup_logging

__all__ = ["app", "main"]

app = typer.Typer(
    name="iiot",
    help="Industrial IoT device onboarding: edge agent, gateway, device profiles, simulators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"iiot {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
    log_format: str = typer.Option("text", "--log-format", help="text (logfmt) or json."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    setup_logging(log_level, log_format)


def _register() -> None:
    from device_profiles.cli import app as profiles_app
    from edge_agent.cli import app as agent_app
    from edge_agent.probe import probe
    from gateway.cli import app as gateway_app
    from iiot.demo import demo
    from simulators.cli import app as sim_app

    # probe reads a live device with the agent's driver, so it lives with the agent.
    profiles_app.command("probe")(probe)
    app.add_typer(profiles_app, name="profiles")
    app.add_typer(sim_app, name="sim")
    app.add_typer(agent_app, name="agent")
    app.add_typer(gateway_app, name="gateway")
    app.command("demo")(demo)


_register()


def main() -> None:
    app()
