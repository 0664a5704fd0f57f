"""``iiot gateway``: run the cloud-side gateway."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import typer

__all__ = ["app"]

app = typer.Typer(help="The gateway: ingest, registry, ratios API.", no_args_is_help=True)

log = logging.getLogger("gateway")


@app.callback()
def _group() -> None:
    """The gateway: ingest, registry, ratios API."""


@app.command("run")
def run(
    config: Path = typer.Option(..., "--config", "-c", help="gateway.yaml"),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Overrides data_dir from the config."
    ),
) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    from gateway.config import GatewayConfigError, load_gateway_config
    from gateway.outbox import OutboxError
    from gateway.service import Gateway, GatewayStartError

    try:
        cfg = load_gateway_config(config)
    except GatewayConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if data_dir is not None:
        cfg = cfg.model_copy(update={"data_dir": data_dir})
    # The file's level applies from here on; `iiot --log-level` covers reading the file.
    logging.getLogger().setLevel(cfg.log_level.upper())

    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    gateway = Gateway(cfg)
    try:
        gateway.start()
    except (GatewayStartError, OutboxError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        # Wake up now and then so signals are handled promptly on every platform.
        while not stop.wait(1.0):
            pass
    finally:
        gateway.stop()


@app.command("init-broker")
def init_broker(
    config: Path = typer.Option(..., "--config", "-c", help="gateway.yaml (its broker_auth)"),
    owner: str | None = typer.Option(
        None, "--owner", help="The user the gateway runs as (owns the auth files)."
    ),
    certs_dir: Path | None = typer.Option(
        None, "--certs-dir", help="Make a CA and a server certificate here (for TLS)."
    ),
    hostname: list[str] = typer.Option(
        [], "--hostname", help="A name or IP agents reach the broker by (repeatable)."
    ),
) -> None:
    """Make the broker's first files: empty password and ACL files, and TLS certificates.

    Run as root before Mosquitto's first start; existing files are kept.
    """
    from gateway.broker_setup import BrokerSetupError, init_auth_files, make_certificates
    from gateway.config import GatewayConfigError, load_gateway_config

    try:
        cfg = load_gateway_config(config)
    except GatewayConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        lines = init_auth_files(cfg.broker_auth, owner=owner)
        if certs_dir is not None:
            lines += make_certificates(certs_dir, hostname, key_group=cfg.broker_auth.file_group)
    except BrokerSetupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("\n".join(lines))
