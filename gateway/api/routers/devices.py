"""Devices: listing, one device, registration by hand, moves between agents,
decommissioning, ledger import."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request, Response

from gateway.api.deps import (
    AUTH_RESPONSES,
    NOT_FOUND,
    READ,
    WRITE,
    WRITE_RESPONSES,
    Ident,
    QIdent,
    RegistryDep,
    field_of,
    invalid,
)
from gateway.api.models import (
    DeviceDetailOut,
    DeviceIn,
    DeviceListOut,
    DeviceMoveIn,
    DeviceMovesOut,
    DeviceOut,
    DeviceStatesOut,
    ErrorOut,
    LedgerOut,
    OfflineOut,
)
from gateway.auth import TokenAuth
from gateway.ratios import Kind
from gateway.registry import NotFound, RegistryError
from gateway.registry.ledger import LedgerError, check_row, parse_ledger
from gateway.registry.model import Status

__all__ = ["router"]

router = APIRouter(tags=["devices"])

_MAX_LEDGER_BYTES = 64 * 1024 * 1024

_LEDGER_FIELDS = ("device_id", "enterprise", "region", "industry", "family", "category", "name")
_LEDGER_BODY: dict[str, Any] = {
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
                        "properties": {f: {"type": "string"} for f in _LEDGER_FIELDS},
                    },
                }
            },
        },
    }
}


@router.get(
    "/api/v1/devices",
    response_model=DeviceListOut,
    responses=AUTH_RESPONSES,
    dependencies=[READ],
)
def list_devices(
    registry: RegistryDep,
    enterprise: str | None = QIdent,
    region: Annotated[str | None, Query(max_length=6)] = None,
    industry: Annotated[str | None, Query(max_length=8)] = None,
    category: Annotated[str | None, Query(max_length=32)] = None,
    family: Annotated[str | None, Query(max_length=32)] = None,
    status: Status | None = None,
    online: bool | None = None,
    not_in_ledger: bool | None = None,
    kind: Annotated[Kind | None, Query(description="equipment or product; default both")] = None,
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
            kind=kind,
            limit=limit,
            offset=offset,
        )
    except ValueError as exc:
        raise invalid("query", "region", str(exc)) from None
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get(
    "/api/v1/devices/offline",
    response_model=OfflineOut,
    responses=AUTH_RESPONSES,
    dependencies=[READ],
)
def recent_offline(
    registry: RegistryDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    enterprise: str | None = QIdent,
) -> dict[str, Any]:
    """Devices offline now that had been online, most recent drop first."""
    return {"items": registry.recent_offline(limit=limit, enterprise=enterprise)}


@router.get(
    "/api/v1/devices/{enterprise}/{device_id}",
    response_model=DeviceDetailOut,
    responses={**AUTH_RESPONSES, **NOT_FOUND},
    dependencies=[READ],
)
def get_device(enterprise: Ident, device_id: Ident, registry: RegistryDep) -> dict[str, Any]:
    """One device with its latest values (kept in memory, no time-series query)."""
    view = registry.get_device(enterprise, device_id)
    if view is None:
        raise HTTPException(404, f"device {enterprise}/{device_id} is not registered")
    return view


@router.get(
    "/api/v1/devices/{enterprise}/{device_id}/history",
    response_model=DeviceStatesOut,
    responses={**AUTH_RESPONSES, **NOT_FOUND},
    dependencies=[READ],
)
def device_history(
    enterprise: Ident,
    device_id: Ident,
    registry: RegistryDep,
    limit: Annotated[int, Query(ge=1, le=50)] = 50,
) -> dict[str, Any]:
    """The device's last online/offline changes with their reasons, newest first.

    Kept in this gateway instance's memory (the last 50 per device), so a restart empties it.
    """
    if registry.get_device(enterprise, device_id) is None:
        raise HTTPException(404, f"device {enterprise}/{device_id} is not registered")
    items = registry.state_history(enterprise, device_id, limit)
    return {
        "enterprise": enterprise,
        "device": device_id,
        "items": [
            {"ts": c.ts, "online": c.online, "reason": c.reason, "source": c.source} for c in items
        ],
    }


@router.post(
    "/api/v1/devices",
    response_model=DeviceOut,
    status_code=201,
    responses={
        **WRITE_RESPONSES,
        **NOT_FOUND,
        200: {"model": DeviceOut, "description": "Updated."},
    },
    dependencies=[WRITE],
)
def register_device(body: DeviceIn, response: Response, registry: RegistryDep) -> dict[str, Any]:
    """Register one device by hand (or update it: idempotent)."""
    try:
        row = check_row(body.model_dump(exclude_none=True))
    except ValueError as exc:
        raise invalid("body", field_of(str(exc)), str(exc)) from None
    try:
        view, created = registry.register_device(row)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except RegistryError as exc:
        raise invalid("body", field_of(str(exc)), str(exc)) from None
    response.status_code = 201 if created else 200
    return view


@router.delete(
    "/api/v1/devices/{enterprise}/{device_id}",
    response_model=DeviceOut,
    responses={**WRITE_RESPONSES, **NOT_FOUND},
    dependencies=[WRITE],
)
def decommission(
    enterprise: Ident, device_id: Ident, request: Request, registry: RegistryDep
) -> dict[str, Any]:
    """Decommission: the device stays in history, leaves the totals and its agent."""
    try:
        return registry.decommission(enterprise, device_id, by=_admin(request))
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None


def _admin(request: Request) -> str:
    auth: TokenAuth = request.app.state.auth
    return f"admin {auth.configure(request).token_label}"


@router.post(
    "/api/v1/devices/{enterprise}/{device_id}/move",
    response_model=DeviceOut,
    responses={**WRITE_RESPONSES, **NOT_FOUND},
    dependencies=[WRITE],
)
def move_device(
    enterprise: Ident, device_id: Ident, body: DeviceMoveIn, request: Request, registry: RegistryDep
) -> dict[str, Any]:
    """Give a device to another agent of its enterprise (it moved to another gateway box).

    Until then ingest refuses every other agent's data, birth and state for it. Audited.
    """
    try:
        return registry.move_device(enterprise, device_id, body.agent, by=_admin(request))
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None


@router.get(
    "/api/v1/devices/{enterprise}/{device_id}/moves",
    response_model=DeviceMovesOut,
    responses={**AUTH_RESPONSES, **NOT_FOUND},
    dependencies=[READ],
)
def device_moves(enterprise: Ident, device_id: Ident, registry: RegistryDep) -> dict[str, Any]:
    """Every change of the agent the device belongs to, newest first."""
    if registry.get_device(enterprise, device_id) is None:
        raise HTTPException(404, f"device {enterprise}/{device_id} is not registered")
    return {"items": registry.list_moves(enterprise, device_id)}


@router.post(
    "/api/v1/ledger",
    response_model=LedgerOut,
    responses={
        **WRITE_RESPONSES,
        413: {"model": ErrorOut, "description": "Ledger too large."},
        415: {"model": ErrorOut, "description": "Not CSV or JSON."},
    },
    openapi_extra=_LEDGER_BODY,
    dependencies=[WRITE],
)
async def import_ledger(request: Request, registry: RegistryDep) -> dict[str, Any]:
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
        raise invalid("body", "ledger", str(exc)) from None
    result = await anyio.to_thread.run_sync(registry.import_devices, rows)
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
