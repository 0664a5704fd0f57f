"""Provisioning: keys for an enterprise's agents, and agents redeeming them for credentials."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException

from gateway.api.deps import (
    NOT_FOUND,
    WRITE,
    WRITE_RESPONSES,
    Ident,
    NowMs,
    ProvisionerDep,
    RegistryDep,
    invalid,
)
from gateway.api.models import CredentialsOut, ErrorOut, KeyIn, KeyOut, ProvisionIn
from gateway.provisioning import ProvisioningError
from gateway.registry import Conflict, NotFound, RegistryError

__all__ = ["router"]

log = logging.getLogger("iiot.gateway.api")

router = APIRouter(tags=["onboarding"])


@router.post(
    "/api/v1/enterprises/{enterprise}/provisioning-keys",
    response_model=KeyOut,
    status_code=201,
    responses={**WRITE_RESPONSES, **NOT_FOUND},
    dependencies=[WRITE],
)
def create_key(
    enterprise: Ident, registry: RegistryDep, now_ms: NowMs, body: KeyIn | None = None
) -> dict[str, Any]:
    """A provisioning key for the enterprise's agents; returned once, stored hashed."""
    body = body or KeyIn()
    expires_ms = now_ms + body.expires_in_s * 1000 if body.expires_in_s else None
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


@router.post(
    "/api/v1/provision",
    response_model=CredentialsOut,
    responses={
        401: {"model": ErrorOut, "description": "Key unknown, expired or used up."},
        409: {
            "model": ErrorOut,
            "description": "Agent id taken by another enterprise or by the gateway.",
        },
        503: {"model": ErrorOut, "description": "Broker auth files could not be updated."},
    },
)
def provision(body: ProvisionIn, provisioner: ProvisionerDep) -> dict[str, Any]:
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
        raise invalid("body", "agent_id", str(exc)) from None
