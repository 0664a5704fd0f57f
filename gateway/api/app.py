"""The gateway's HTTP API (``/api/v1``), ``/health``, ``/metrics``, the dashboard and /docs.

``create_app`` puts the parts in ``app.state`` and includes the routers of ``ROUTERS``;
each router reaches the parts through ``gateway.api.deps``. Adding a resource is one
module under ``gateway/api/routers`` and one line in ``ROUTERS``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from gateway.api.control import control_router
from gateway.api.routers import (
    dashboard,
    devices,
    on_cloud,
    onboarding,
    ops,
    provincial,
    provisioning,
    ratios,
    reports,
)
from gateway.auth import TokenAuth
from gateway.config import GatewayConfig
from gateway.control import ControlService
from gateway.health import Readiness
from gateway.provincial import default_rubric, load_rubric
from gateway.provisioning import Provisioner, ProvisioningError
from gateway.quality import QUALITY_DEFINITION
from gateway.ratios import DEFINITIONS, on_cloud_definition
from gateway.registry import Registry
from gateway.telemetry import TelemetryReader

__all__ = ["ROUTERS", "create_app"]

log = logging.getLogger("iiot.gateway.api")

# In this order (it is the order of the OpenAPI document).
ROUTERS: tuple[APIRouter, ...] = (
    ops.router,
    dashboard.router,
    ratios.router,
    reports.router,
    on_cloud.router,
    provincial.router,
    devices.router,
    onboarding.router,
    provisioning.router,
)

_DESCRIPTION = (
    "Device registry, onboarding and connection ratios (联网设备总量 / 企业设备总量; "
    "联网产品总量 / 生产产品总量), and enterprises on the cloud (上云企业数). "
    "Every endpoint but /health and the dashboard takes `Authorization: Bearer "
    "<token>`: platform tokens read, admin tokens also write.\n\n"
    + DEFINITIONS
    + "\n\n"
    + QUALITY_DEFINITION
)


def create_app(
    registry: Registry,
    config: GatewayConfig,
    *,
    outbox: Any = None,
    metrics: CollectorRegistry | None = None,
    readiness: Readiness | None = None,
    clock: Callable[[], float] = time.time,
    sync_broker: bool = True,
    control: ControlService | None = None,
) -> FastAPI:
    """The FastAPI app over a registry; ``metrics`` is the data path's collector registry.

    ``readiness`` judges ``/health/ready`` (default: the outbox alone, no ingest or
    writer). ``sync_broker``: write the broker's password and ACL files at start (off when
    the caller has just written them).
    ``control``: the control plane, publishing on the gateway's broker connection (without
    one, its routes that publish answer 503).
    """
    registry.start()
    auth = TokenAuth(config.api)
    provisioner = Provisioner(registry, config)
    if sync_broker and provisioner.manages_broker:
        try:
            provisioner.sync()
        except ProvisioningError:
            log.exception("could not write the broker auth files at start")
    requests: Counter[tuple[str, str]] = Counter()
    api_metrics = CollectorRegistry(auto_describe=True)
    api_metrics.register(ops.ApiCollector(registry, auth, provisioner, requests))

    # Swagger UI and ReDoc from the package's own copies: /docs works without internet.
    app = FastAPIOffline(
        title="iiot gateway",
        version="1",
        description=_DESCRIPTION
        + "\n\n"
        + on_cloud_definition(config.on_cloud.min_connected_devices),
        static_url="/docs-static",
    )
    state = app.state
    state.registry = registry
    state.provisioner = provisioner
    state.outbox = outbox
    state.auth = auth
    state.on_cloud = config.on_cloud
    state.clock = clock
    state.api_metrics = api_metrics
    state.data_metrics = metrics
    state.readiness = readiness or Readiness(config.health)
    prov = config.provincial
    registry.quality.configure(min_share=prov.quality_min_share, points=prov.telemetry_points)
    state.telemetry = TelemetryReader(config, api_metrics)
    state.rubric = load_rubric(prov.rubric_file) if prov.rubric_file else default_rubric()
    _add_handlers(app, requests)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(control_router(auth, control or ControlService(registry, config)))
    return app


def _add_handlers(app: FastAPI, requests: Counter[tuple[str, str]]) -> None:
    """Count every response by method and status; keep 422 bodies sendable."""

    @app.middleware("http")
    async def _count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        try:
            response = await call_next(request)
        except Exception:
            requests[(request.method, "500")] += 1
            log.exception("API request failed", extra={"path": request.url.path})
            return JSONResponse({"detail": "internal error"}, status_code=500)
        requests[(request.method, str(response.status_code))] += 1
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        content = {"detail": jsonable_encoder(exc.errors())}
        try:
            return JSONResponse(content, status_code=422)
        except UnicodeEncodeError:
            # The error echoes the input, and a lone surrogate in it has no UTF-8 form:
            # send it \u-escaped rather than fail the response.
            return Response(json.dumps(content), status_code=422, media_type="application/json")
