"""The gateway's HTTP API (``/api/v1``), ``/health``, ``/metrics`` and the dashboard."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.api.control import control_router
from gateway.api.models import (
    AgentOut,
    CredentialsOut,
    DeviceDetailOut,
    DeviceIn,
    DeviceListOut,
    DeviceOut,
    EnterpriseIn,
    EnterpriseOut,
    ErrorOut,
    HealthOut,
    HistoryOut,
    KeyIn,
    KeyOut,
    LedgerOut,
    OfflineOut,
    ProvisionIn,
    RatiosOut,
)
from gateway.auth import TokenAuth
from gateway.config import GatewayConfig
from gateway.control import ControlService
from gateway.provisioning import Provisioner, ProvisioningError
from gateway.ratios import (
    DEFINITIONS,
    compute_ratios,
    enterprise_category_table,
    parse_as_of,
    parse_window,
)
from gateway.registry import Conflict, NotFound, Registry, RegistryError
from gateway.registry.codes import CATEGORY_LABELS, region_label
from gateway.registry.ledger import LedgerError, check_row, parse_ledger

__all__ = ["create_app"]

log = logging.getLogger("iiot.gateway.api")

_MAX_LEDGER_BYTES = 64 * 1024 * 1024
_MAX_HISTORY_POINTS = 10_000

GroupBy = Literal["enterprise", "province", "city", "county", "industry", "category", "family"]
HistoryGroupBy = Literal[
    "overall", "enterprise", "province", "city", "county", "industry", "category", "family"
]
Ident = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$", max_length=64)]
_QIdent = Query(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", max_length=64)

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or unknown bearer token."},
}
_WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_AUTH_RESPONSES,
    403: {"model": ErrorOut, "description": "A platform (read-only) token on a write."},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "Unknown."}}


def _invalid(where: str, name: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the field."""
    return HTTPException(
        422, detail=[{"loc": [where, name], "msg": message, "type": "value_error"}]
    )


class _Collector(Collector):
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


def create_app(
    registry: Registry,
    config: GatewayConfig,
    *,
    outbox: Any = None,
    metrics: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
    sync_broker: bool = True,
    control: ControlService | None = None,
) -> FastAPI:
    """The FastAPI app over a registry; ``metrics`` is the data path's collector registry.

    ``sync_broker``: write the broker's password and ACL files at start (off when the
    caller has just written them). ``control``: the control plane, publishing on the
    gateway's broker connection (without one, its routes that publish answer 503).
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
    own_metrics = CollectorRegistry(auto_describe=True)
    own_metrics.register(_Collector(registry, auth, provisioner, requests))

    app = FastAPI(
        title="iiot gateway",
        version="1",
        description=(
            "Device registry, onboarding and connection ratios (联网设备总量 / 企业设备总量). "
            "Every endpoint but /health and the dashboard takes `Authorization: Bearer "
            "<token>`: platform tokens read, admin tokens also write.\n\n" + DEFINITIONS
        ),
    )
    app.state.registry = registry
    app.state.provisioner = provisioner
    app.state.outbox = outbox
    app.include_router(control_router(auth, control or ControlService(registry, config)))
    read = Depends(auth.read)
    write = Depends(auth.write)

    def now_ms() -> int:
        return int(clock() * 1000)

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

    # ------------------------------------------------------------- health, metrics, page

    @app.get("/health", response_model=HealthOut, tags=["ops"])
    def health() -> dict[str, Any]:
        """Liveness; no token needed."""
        pending = getattr(outbox, "pending_lines", None) if outbox is not None else None
        return {
            "status": "ok",
            "devices": registry.stats()["devices"],
            "outbox_pending_lines": pending if isinstance(pending, int) else None,
        }

    @app.get(
        "/metrics",
        tags=["ops"],
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **_AUTH_RESPONSES,
        },
        response_class=Response,
    )
    def prometheus(_role: Any = read) -> Response:
        """Prometheus text: the data path's metrics and the registry's."""
        body = generate_latest(own_metrics)
        if metrics is not None:
            body = generate_latest(metrics) + body
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    static_dir = resources.files("gateway") / "static"

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(str(static_dir / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static_dir)), name="static")

    # ------------------------------------------------------------- ratios

    @app.get(
        "/api/v1/ratios",
        response_model=RatiosOut,
        tags=["ratios"],
        responses=_AUTH_RESPONSES,
        description="Connection ratios overall and per group.\n\n" + DEFINITIONS,
    )
    def ratios(
        _role: Any = read,
        group_by: GroupBy | None = None,
        window: Annotated[str, Query(max_length=16, description="e.g. 15m, 24h, 7d")] = "24h",
        enterprise: str | None = _QIdent,
        region: Annotated[str | None, Query(max_length=6, description="13, 1301 or 130102")] = None,
        industry: Annotated[
            str | None, Query(max_length=8, description="GB/T 4754, e.g. C30")
        ] = None,
        category: Annotated[str | None, Query(max_length=32)] = None,
        as_of: Annotated[
            str | None, Query(max_length=40, description="Unix ms or ISO 8601")
        ] = None,
    ) -> Response:
        window_s = _window(window, "window")
        as_of_ms = _time(as_of, "as_of") if as_of is not None else now_ms()
        try:
            result = compute_ratios(
                registry,
                group_by,
                window_s=window_s,
                as_of_ms=as_of_ms,
                enterprise=enterprise,
                region=region,
                industry=industry,
                category=category,
            )
        except ValueError as exc:
            raise _invalid("query", "region", str(exc)) from None
        # Built from plain ints/floats/strings already; re-validating 10⁴ enterprise
        # groups through the response model would cost more than computing them.
        body = json.dumps(result, ensure_ascii=False, separators=(",", ":"))
        return Response(body.encode(), media_type="application/json")

    @app.get(
        "/api/v1/ratios/history",
        response_model=HistoryOut,
        tags=["ratios"],
        responses=_AUTH_RESPONSES,
    )
    def history(
        _role: Any = read,
        group_by: HistoryGroupBy = "overall",
        from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
        to: Annotated[str | None, Query(max_length=40)] = None,
        step: Annotated[str | None, Query(max_length=16, description="e.g. 1h, 1d")] = None,
        key: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        """The stored ratio snapshots of one grouping; ``step`` keeps the last per step."""
        to_ms = _time(to, "to") if to is not None else now_ms()
        from_ms = _time(from_, "from") if from_ is not None else to_ms - 7 * 86400 * 1000
        if from_ms > to_ms:
            raise _invalid("query", "from", "from must not be after to")
        step_s = _window(step, "step") if step is not None else None
        if step_s is not None and (to_ms - from_ms) // (step_s * 1000) > _MAX_HISTORY_POINTS:
            raise _invalid(
                "query", "step", f"more than {_MAX_HISTORY_POINTS} steps; use a longer step"
            )
        rows = registry.snapshot_rows(str(group_by), from_ms, to_ms)
        series: dict[str, dict[str, Any]] = {}
        for r in rows:
            if key is not None and r.key != key:
                continue
            s = series.setdefault(r.key, {"key": r.key, "label": r.label, "points": {}})
            bucket = r.ts_ms if step_s is None else r.ts_ms // (step_s * 1000)
            s["points"][bucket] = {
                "ts": r.ts_ms,
                "total": r.total,
                "connected": r.connected,
                "online": r.online,
                "ratio": round(r.connected / r.total, 6) if r.total else 0.0,
                "online_ratio": round(r.online / r.total, 6) if r.total else 0.0,
            }
        out = [
            {"key": s["key"], "label": s["label"], "points": list(s["points"].values())}
            for s in sorted(series.values(), key=lambda s: s["key"])
        ]
        return {
            "group_by": str(group_by),
            "from_ms": from_ms,
            "to_ms": to_ms,
            "step_s": step_s,
            "series": out,
        }

    @app.get(
        "/api/v1/reports/connection.csv",
        tags=["ratios"],
        response_class=Response,
        responses={
            200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
            **_AUTH_RESPONSES,
        },
    )
    def connection_report(
        _role: Any = read,
        window: Annotated[str, Query(max_length=16)] = "24h",
        as_of: Annotated[str | None, Query(max_length=40)] = None,
    ) -> Response:
        """Per enterprise and category: connected devices, total devices, ratio (UTF-8 BOM)."""
        window_s = _window(window, "window")
        as_of_ms = _time(as_of, "as_of") if as_of is not None else now_ms()
        rows = enterprise_category_table(registry, window_s=window_s, as_of_ms=as_of_ms)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(
            [
                "企业标识 enterprise_id",
                "企业名称 enterprise_name",
                "行政区划 region",
                "地区 region_name",
                "行业 industry",
                "设备类别 category",
                "类别名称 category_name",
                "联网设备总量 connected_devices",
                "企业设备总量 total_devices",
                "设备联网率 connection_ratio",
            ]
        )
        for r in rows:
            zh = CATEGORY_LABELS.get(r["category"], r["category"]).split(" ")[0]
            w.writerow(
                [
                    r["enterprise"],
                    r["name"],
                    r["region"],
                    region_label(r["region"]) if r["region"] else "",
                    r["industry"],
                    r["category"],
                    zh,
                    r["connected"],
                    r["total"],
                    f"{r['connected'] / r['total']:.4f}" if r["total"] else "0.0000",
                ]
            )
        body = "\ufeff" + buf.getvalue()
        return Response(
            body.encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="connection.csv"'},
        )

    # ------------------------------------------------------------- devices

    @app.get(
        "/api/v1/devices", response_model=DeviceListOut, tags=["devices"], responses=_AUTH_RESPONSES
    )
    def list_devices(
        _role: Any = read,
        enterprise: str | None = _QIdent,
        region: Annotated[str | None, Query(max_length=6)] = None,
        industry: Annotated[str | None, Query(max_length=8)] = None,
        category: Annotated[str | None, Query(max_length=32)] = None,
        family: Annotated[str | None, Query(max_length=32)] = None,
        status: Literal["registered", "provisioned", "connected", "decommissioned"] | None = None,
        online: bool | None = None,
        not_in_ledger: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict[str, Any]:
        """Devices matching every filter, in registration order."""
        try:
            total, items = registry.list_devices(
                enterprise=enterprise,
                region=region,
                industry=industry,
                category=category,
                family=family,
                status=status,
                online=online,
                not_in_ledger=not_in_ledger,
                limit=limit,
                offset=offset,
            )
        except ValueError as exc:
            raise _invalid("query", "region", str(exc)) from None
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    @app.get(
        "/api/v1/devices/offline",
        response_model=OfflineOut,
        tags=["devices"],
        responses=_AUTH_RESPONSES,
    )
    def recent_offline(
        _role: Any = read,
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
        enterprise: str | None = _QIdent,
    ) -> dict[str, Any]:
        """Devices offline now that had been online, most recent drop first."""
        return {"items": registry.recent_offline(limit=limit, enterprise=enterprise)}

    @app.get(
        "/api/v1/devices/{enterprise}/{device_id}",
        response_model=DeviceDetailOut,
        tags=["devices"],
        responses={**_AUTH_RESPONSES, **_NOT_FOUND},
    )
    def get_device(enterprise: Ident, device_id: Ident, _role: Any = read) -> dict[str, Any]:
        """One device with its latest values (kept in memory, no time-series query)."""
        view = registry.get_device(enterprise, device_id)
        if view is None:
            raise HTTPException(404, f"device {enterprise}/{device_id} is not registered")
        return view

    @app.post(
        "/api/v1/devices",
        response_model=DeviceOut,
        status_code=201,
        tags=["devices"],
        responses={
            **_WRITE_RESPONSES,
            **_NOT_FOUND,
            200: {"model": DeviceOut, "description": "Updated."},
        },
    )
    def register_device(body: DeviceIn, response: Response, _role: Any = write) -> dict[str, Any]:
        """Register one device by hand (or update it: idempotent)."""
        try:
            row = check_row(body.model_dump(exclude_none=True))
        except ValueError as exc:
            raise _invalid("body", _field_of(str(exc)), str(exc)) from None
        try:
            view, created = registry.register_device(row)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        response.status_code = 201 if created else 200
        return view

    @app.delete(
        "/api/v1/devices/{enterprise}/{device_id}",
        response_model=DeviceOut,
        tags=["devices"],
        responses={**_WRITE_RESPONSES, **_NOT_FOUND},
    )
    def decommission(enterprise: Ident, device_id: Ident, _role: Any = write) -> dict[str, Any]:
        """Decommission: the device stays in history and leaves the totals."""
        try:
            return registry.decommission(enterprise, device_id)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post(
        "/api/v1/ledger",
        response_model=LedgerOut,
        tags=["devices"],
        responses={
            **_WRITE_RESPONSES,
            413: {"model": ErrorOut, "description": "Ledger too large."},
            415: {"model": ErrorOut, "description": "Not CSV or JSON."},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": (
                    "CSV with a header row (device_id, enterprise, region, industry, family, "
                    "category, name) or a JSON list of objects with those fields."
                ),
                "content": {
                    "text/csv": {"schema": {"type": "string"}},
                    "application/json": {
                        "schema": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "device_id": {"type": "string"},
                                    "enterprise": {"type": "string"},
                                    "region": {"type": "string"},
                                    "industry": {"type": "string"},
                                    "family": {"type": "string"},
                                    "category": {"type": "string"},
                                    "name": {"type": "string"},
                                },
                            },
                        }
                    },
                },
            }
        },
    )
    async def import_ledger(request: Request, _role: Any = write) -> dict[str, Any]:
        """Bulk import (idempotent upserts); each bad row is reported with its line."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > _MAX_LEDGER_BYTES:
            raise HTTPException(413, f"ledger is larger than {_MAX_LEDGER_BYTES} bytes; split it")
        body = await request.body()
        if len(body) > _MAX_LEDGER_BYTES:
            raise HTTPException(413, f"ledger is larger than {_MAX_LEDGER_BYTES} bytes; split it")
        content_type = request.headers.get("content-type", "")
        try:
            rows, errors = parse_ledger(body, content_type)
        except LedgerError as exc:
            if "content type" in str(exc):
                raise HTTPException(415, str(exc)) from None
            raise _invalid("body", "ledger", str(exc)) from None
        result = await _in_thread(registry.import_devices, rows)
        all_errors = sorted(errors + result.errors, key=lambda e: e.line)
        return {
            "accepted": result.accepted,
            "created": result.created,
            "updated": result.updated,
            "rejected": len(all_errors),
            "errors": [
                {"line": e.line, "device_id": e.device_id, "reason": e.reason} for e in all_errors
            ],
        }

    # ------------------------------------------------------------- enterprises, agents

    @app.get(
        "/api/v1/enterprises",
        response_model=list[EnterpriseOut],
        tags=["onboarding"],
        responses=_AUTH_RESPONSES,
    )
    def list_enterprises(_role: Any = read) -> list[dict[str, Any]]:
        return [e.view() for e in registry.list_enterprises()]

    @app.post(
        "/api/v1/enterprises",
        response_model=EnterpriseOut,
        status_code=201,
        tags=["onboarding"],
        responses={**_WRITE_RESPONSES, 200: {"model": EnterpriseOut, "description": "Updated."}},
    )
    def add_enterprise(
        body: EnterpriseIn, response: Response, _role: Any = write
    ) -> dict[str, Any]:
        """Create (201) or update (200) an enterprise."""
        try:
            ent, created = registry.add_enterprise(body.id, body.name, body.region, body.industry)
        except ValueError as exc:
            raise _invalid("body", _field_of(str(exc)), str(exc)) from None
        response.status_code = 201 if created else 200
        return ent.view()

    @app.get(
        "/api/v1/enterprises/{enterprise}",
        response_model=EnterpriseOut,
        tags=["onboarding"],
        responses={**_AUTH_RESPONSES, **_NOT_FOUND},
    )
    def get_enterprise(enterprise: Ident, _role: Any = read) -> dict[str, Any]:
        ent = registry.get_enterprise(enterprise)
        if ent is None:
            raise HTTPException(404, f"enterprise {enterprise!r} is not registered")
        return ent.view()

    @app.post(
        "/api/v1/enterprises/{enterprise}/provisioning-keys",
        response_model=KeyOut,
        status_code=201,
        tags=["onboarding"],
        responses={**_WRITE_RESPONSES, **_NOT_FOUND},
    )
    def create_key(
        enterprise: Ident, body: KeyIn | None = None, _role: Any = write
    ) -> dict[str, Any]:
        """A provisioning key for the enterprise's agents; returned once, stored hashed."""
        body = body or KeyIn()
        expires_ms = now_ms() + body.expires_in_s * 1000 if body.expires_in_s else None
        try:
            key_id, key = registry.create_provisioning_key(
                enterprise, expires_ms=expires_ms, max_uses=body.max_uses
            )
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return {
            "key_id": key_id,
            "key": key,
            "enterprise": enterprise,
            "expires_ms": expires_ms,
            "max_uses": body.max_uses,
        }

    @app.get(
        "/api/v1/agents",
        response_model=list[AgentOut],
        tags=["onboarding"],
        responses=_AUTH_RESPONSES,
    )
    def list_agents(_role: Any = read, enterprise: str | None = _QIdent) -> list[dict[str, Any]]:
        return [a.view() for a in registry.list_agents(enterprise)]

    @app.post(
        "/api/v1/provision",
        response_model=CredentialsOut,
        tags=["onboarding"],
        responses={
            401: {"model": ErrorOut, "description": "Key unknown, expired or used up."},
            409: {
                "model": ErrorOut,
                "description": "Agent id taken by another enterprise or by the gateway.",
            },
            503: {"model": ErrorOut, "description": "Broker auth files could not be updated."},
        },
    )
    def provision(body: ProvisionIn) -> dict[str, Any]:
        """An agent presents a provisioning key (no bearer token) and gets MQTT credentials."""
        try:
            return provisioner.provision(body.key, body.agent_id)
        except NotFound as exc:
            raise HTTPException(401, str(exc)) from None
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        except ProvisioningError as exc:
            log.error("provisioning could not update the broker", extra={"error": str(exc)})
            raise HTTPException(503, "the broker's auth files could not be updated") from None
        except RegistryError as exc:
            raise _invalid("body", "agent_id", str(exc)) from None

    return app


def _window(text: str, name: str) -> int:
    try:
        return parse_window(text)
    except ValueError as exc:
        raise _invalid("query", name, str(exc)) from None


def _time(text: str, name: str) -> int:
    try:
        return parse_as_of(text)
    except ValueError as exc:
        raise _invalid("query", name, str(exc)) from None


def _field_of(message: str) -> str:
    for name in ("device_id", "region", "industry", "family", "category", "agent", "profile"):
        if name in message:
            return name
    for name in ("enterprise", "name"):
        if name in message:
            return name
    return "body"


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    import anyio

    return await anyio.to_thread.run_sync(fn, *args)
