"""Control-plane routes: agent configuration, writes to equipment, discovery."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import Caller, TokenAuth
from gateway.control import (
    ControlConflict,
    ControlError,
    ControlInvalid,
    ControlNotFound,
    ControlService,
)
from protocols.mqtt.control import WriteStatus

__all__ = ["ApproveIn", "ConfigIn", "WriteIn", "control_router"]

_ID = r"^[A-Za-z0-9_.-]{1,64}$"
Ident = Annotated[str, Path(pattern=_ID, max_length=64)]
# An Annotated alias, not one shared ``Query(...)`` default: FastAPI would read every
# parameter given that same object from the first one's name.
_QIdent = Annotated[str | None, Query(pattern=_ID, max_length=64)]
_ProposalId = Annotated[int, Path(ge=1, le=2**31 - 1)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfigIn(_In):
    """An agent's desired configuration: agent.yaml's device entries, profiles to add and
    the families they need."""

    devices: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    profiles: list[dict[str, Any]] = Field(
        default_factory=list, max_length=1000, description="Profiles to upload (YAML as JSON)."
    )
    families: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=1000,
        description="Families the uploaded profiles name that no shipped families.yaml has "
        "(entries of a families.yaml: key, name_zh, name, category).",
    )
    discovery: dict[str, Any] | None = Field(
        default=None, description="Where a scan may look, with agent.yaml's discovery keys."
    )


class WriteIn(_In):
    point: str = Field(pattern=_ID, max_length=64)
    # Smart union: JSON true stays a bool and 1 an int (left-to-right would make 1 True).
    value: bool | int | float | str


class ApproveIn(_In):
    device_id: str = Field(pattern=_ID, max_length=64)
    profile: str | None = Field(default=None, pattern=_ID, max_length=64)
    poll_interval: float | None = Field(default=None, gt=0, le=86400)
    name: str | None = Field(default=None, max_length=200)
    region: str | None = None
    industry: str | None = None
    family: str | None = None
    category: str | None = None


def _http(exc: ControlError) -> HTTPException:
    if isinstance(exc, ControlInvalid):
        return HTTPException(
            422, [{"loc": ["body"], "msg": p, "type": "value_error"} for p in exc.problems]
        )
    if isinstance(exc, ControlNotFound):
        return HTTPException(404, str(exc))
    if isinstance(exc, ControlConflict):
        return HTTPException(409, str(exc))
    return HTTPException(503, str(exc))


def _call(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except ControlError as exc:
        raise _http(exc) from None


_MAX_WRITES_IN_FLIGHT = 16


def control_router(auth: TokenAuth, service: ControlService) -> APIRouter:
    """The routes over ``service``; reads need any token, changes the roles named."""
    router = APIRouter(prefix="/api/v1", tags=["control"])
    read = Depends(auth.read)
    operate = Depends(auth.operate)
    configure = Depends(auth.configure)

    @router.put("/agents/{enterprise}/{agent}/config")
    def put_config(
        enterprise: Ident, agent: Ident, body: ConfigIn, caller: Caller = configure
    ) -> dict[str, Any]:
        """Validate, store as the next version and publish (retained) the agent's config."""
        return _call(
            service.put_config, enterprise, agent, body.model_dump(exclude_none=True), caller
        )

    @router.get("/agents/{enterprise}/{agent}/config")
    def get_config(enterprise: Ident, agent: Ident, _role: Any = read) -> dict[str, Any]:
        """The desired configuration and what the agent reported about it."""
        return _call(service.config_view, enterprise, agent)

    # A write waits for its answer in one of the server's worker threads; bounding the
    # writes in flight keeps threads for every other request (ratios, devices, ...).
    writes_in_flight = threading.BoundedSemaphore(_MAX_WRITES_IN_FLIGHT)

    @router.post("/devices/{enterprise}/{device}/write")
    def write(enterprise: Ident, device: Ident, body: WriteIn, caller: Caller = operate) -> Any:
        """Write one point; 409 at once when the agent is offline, 504 on no answer."""
        if not writes_in_flight.acquire(blocking=False):
            raise HTTPException(
                429, detail=f"{_MAX_WRITES_IN_FLIGHT} writes are waiting for answers; retry"
            )
        try:
            out = _call(service.write, enterprise, device, body.point, body.value, caller)
        finally:
            writes_in_flight.release()
        if out["status"] == WriteStatus.OFFLINE.value:
            return JSONResponse(out, status_code=409)
        if out["status"] == WriteStatus.TIMEOUT.value:
            return JSONResponse(out, status_code=504)
        return out

    @router.get("/writes")
    def list_writes(
        _caller: Caller = operate,
        enterprise: _QIdent = None,
        device: _QIdent = None,
        limit: int = Query(default=100, ge=1, le=10_000),
    ) -> list[dict[str, Any]]:
        """The write audit, newest first."""
        return service.list_writes(enterprise, device, limit)

    @router.post("/agents/{enterprise}/{agent}/scan")
    def scan(enterprise: Ident, agent: Ident, _caller: Caller = configure) -> dict[str, Any]:
        """Ask the agent to scan where its configuration allows; answers become proposals."""
        return _call(service.scan, enterprise, agent)

    @router.get("/profiles/{profile_id}")
    def get_profile(profile_id: Ident, _role: Any = read) -> dict[str, Any]:
        """A device profile (shipped or uploaded): its points with type, unit and access."""
        return _call(service.profile, profile_id)

    @router.get("/discovered")
    def list_discovered(
        _role: Any = read,
        enterprise: _QIdent = None,
        agent: _QIdent = None,
        status: Literal["new", "approved", "rejected"] | None = None,
    ) -> list[dict[str, Any]]:
        """Equipment found by scans; rejected entries only when asked for by status."""
        rows = service.list_discovered(enterprise, agent, status)
        return rows if status is not None else [r for r in rows if r["status"] != "rejected"]

    @router.post("/discovered/{proposal_id}/approve")
    def approve(
        proposal_id: _ProposalId, body: ApproveIn, caller: Caller = configure
    ) -> dict[str, Any]:
        """Add the device to the ledger and to its agent's desired configuration."""
        return _call(service.approve, proposal_id, body.model_dump(), caller)

    @router.post("/discovered/{proposal_id}/reject")
    def reject(proposal_id: _ProposalId, _caller: Caller = configure) -> dict[str, Any]:
        """Hide the proposal; it is not proposed again."""
        return _call(service.reject, proposal_id)

    return router
