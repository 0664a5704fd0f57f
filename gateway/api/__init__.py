"""The gateway's HTTP API and dashboard: ``create_app(registry, config, ...)``."""

from gateway.api.app import create_app

__all__ = ["create_app"]
