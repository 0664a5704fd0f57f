"""``iiot gateway``: run the cloud-side gateway."""

from __future__ import annotations

import typer

__all__ = ["app"]

app = typer.Typer(help="The gateway: ingest, registry, ratios API.", no_args_is_help=True)
