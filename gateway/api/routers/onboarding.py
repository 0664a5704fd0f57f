"""Enterprises and their agents."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response

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
from gateway.api.models import AgentOut, EnterpriseIn, EnterpriseOut

__all__ = ["router"]

router = APIRouter(tags=["onboarding"])


@router.get(
    "/api/v1/enterprises",
    response_model=list[EnterpriseOut],
    responses=AUTH_RESPONSES,
    dependencies=[READ],
)
def list_enterprises(registry: RegistryDep) -> list[dict[str, Any]]:
    return [e.view() for e in registry.list_enterprises()]


@router.post(
    "/api/v1/enterprises",
    response_model=EnterpriseOut,
    status_code=201,
    responses={**WRITE_RESPONSES, 200: {"model": EnterpriseOut, "description": "Updated."}},
    dependencies=[WRITE],
)
def add_enterprise(body: EnterpriseIn, response: Response, registry: RegistryDep) -> dict[str, Any]:
    """Create (201) or update (200) an enterprise."""
    try:
        ent, created = registry.add_enterprise(body.id, body.name, body.region, body.industry)
    except ValueError as exc:
        raise invalid("body", field_of(str(exc)), str(exc)) from None
    response.status_code = 201 if created else 200
    return ent.view()


@router.get(
    "/api/v1/enterprises/{enterprise}",
    response_model=EnterpriseOut,
    responses={**AUTH_RESPONSES, **NOT_FOUND},
    dependencies=[READ],
)
def get_enterprise(enterprise: Ident, registry: RegistryDep) -> dict[str, Any]:
    ent = registry.get_enterprise(enterprise)
    if ent is None:
        raise HTTPException(404, f"enterprise {enterprise!r} is not registered")
    return ent.view()


@router.get(
    "/api/v1/agents",
    response_model=list[AgentOut],
    responses=AUTH_RESPONSES,
    dependencies=[READ],
)
def list_agents(registry: RegistryDep, enterprise: str | None = QIdent) -> list[dict[str, Any]]:
    return [a.view() for a in registry.list_agents(enterprise)]
