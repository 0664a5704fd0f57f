"""``iiot profiles``: list, validate, schema (probe comes with the agent)."""

from __future__ import annotations

import typer

__all__ = ["app"]

app = typer.Typer(
    help="Device profiles: list, validate, print the JSON Schema.", no_args_is_help=True
)
