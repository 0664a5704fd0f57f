"""Operations: health (liveness and readiness) and Prometheus metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.api.deps import AUTH_RESPONSES, READ, RegistryDep
from gateway.api.models import HealthOut, LiveOut, ReadyOut
from gateway.auth import TokenAuth
from gateway.health import Readiness
from gateway.provisioning import Provisioner
from gateway.registry import Registry

__all__ = ["ApiCollector", "router"]

router = APIRouter(tags=["ops"])


class ApiCollector(Collector):
    """The registry's, provisioning's, auth's and the API's own counters for /metrics."""

    def __init__(
        self,
        registry: Registry,
        auth: TokenAuth,
        provisioner: Provisioner,
        requests: Counter[tuple[str, str]],
    ) -> None:
        self.registry = registry
        self.auth = auth
        self.provisioner = provisioner
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "iiot_registry_events",
            "Registry events by kind (ingest, ledger, flush).",
            labels=["kind"],
        )
        for kind, value in sorted(self.registry.counters.items()):
            events.add_metric([kind], value)
        yield events
        gauges = GaugeMetricFamily("iiot_registry", "Registry sizes.", labels=["what"])
        for what, value in sorted(self.registry.stats().items()):
            gauges.add_metric([what], value)
        yield gauges
        auth = CounterMetricFamily(
            "iiot_api_auth_failures", "Refused API requests by reason.", labels=["reason"]
        )
        for reason, value in sorted(self.auth.counters.items()):
            auth.add_metric([reason], value)
        yield auth
        prov = CounterMetricFamily(
            "iiot_provisioning", "Provisioning and broker file events.", labels=["kind"]
        )
        for kind, value in sorted(self.provisioner.counters.items()):
            prov.add_metric([kind], value)
        yield prov
        reqs = CounterMetricFamily(
            "iiot_api_requests", "API requests by method and status.", labels=["method", "status"]
        )
        for (method, status), value in sorted(self.requests.items()):
            reqs.add_metric([method, status], value)
        yield reqs


@router.get("/health", response_model=HealthOut)
def health(request: Request, registry: RegistryDep) -> dict[str, Any]:
    """Liveness; no token needed."""
    outbox = request.app.state.outbox
    pending = getattr(outbox, "pending_lines", None) if outbox is not None else None
    return {
        "status": "ok",
        "devices": registry.stats()["devices"],
        "outbox_pending_lines": pending if isinstance(pending, int) else None,
    }


@router.get("/health/live", response_model=LiveOut)
def live() -> dict[str, Any]:
    """Liveness: 200 while the process serves requests (restart it when this fails)."""
    return {"status": "ok"}


@router.get(
    "/health/ready",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "Not ready; `reasons` says why."}},
)
def ready(request: Request) -> JSONResponse:
    """Readiness: 503 with the reasons while ingest is not subscribed or refused by the
    broker, the database writer has been failing too long, or the outbox backlog is too
    old; 200 otherwise. No token needed."""
    readiness: Readiness = request.app.state.readiness
    reasons = readiness.reasons()
    body = ReadyOut(status="not ready" if reasons else "ready", reasons=reasons)
    return JSONResponse(body.model_dump(), status_code=503 if reasons else 200)


@router.get(
    "/metrics",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **AUTH_RESPONSES,
    },
    response_class=Response,
    dependencies=[READ],
)
def prometheus(request: Request) -> Response:
    """Prometheus text: the data path's metrics and the registry's."""
    own: CollectorRegistry = request.app.state.api_metrics
    data: CollectorRegistry | None = request.app.state.data_metrics
    body = generate_latest(own)
    if data is not None:
        body = generate_latest(data) + body
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
