"""``iiot agent``: run the edge agent."""

from __future__ import annotations

import typer

__all__ = ["app"]

app = typer.Typer(help="The edge agent: poll devices, publish over MQTT.", no_args_is_help=True)
