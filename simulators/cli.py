"""``iiot sim``: serve simulated devices."""

from __future__ import annotations

import typer

__all__ = ["app"]

app = typer.Typer(
    help="Simulated equipment: Modbus TCP/RTU and OPC UA servers.", no_args_is_help=True
)
