"""Provisioning: keys for an enterprise's agents, and agents redeeming them for credentials."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from gateway.api.deps import (
    AUTH_RESPONSES,
    NOT_FOUND,
    READ,
    WRITE,
    WRITE_RESPONSES,
    Ident,
    NowMs,
    ProvisionerDep,
    QIdent,
    RegistryDep,
    invalid,
)
from gateway.api.models import (
    CredentialsOut,
    ErrorOut,
    KeyIn,
    KeyOut,
    ProvisionIn,
    RotationOut,
)
from gateway.auth import TokenAuth
from gateway.provisioning import ProvisioningError
from gateway.registry import Conflict, NotFound, RegistryError

__all__ = ["router"]


router = APIRouter(tags=["onboarding"])


@router.post(
    "/api/v1/enterprises/{enterprise}/provisioning-keys",
    response_model=KeyOut,
    status_code=201,
    responses={**WRITE_RESPONSES, **NOT_FOUND},
    dependencies=[WRITE],
)
def create_key(
    enterprise: Ident,
    registry: RegistryDep,
    provisioner: ProvisionerDep,
    now_ms: NowMs,
    body: KeyIn | None = None,
) -> dict[str, Any]:
    """A provisioning key for the enterprise's agents; returned once, stored hashed.

    It expires after ``expires_in_s`` (default ``api.provisioning_key_expiry``, 7 days).
    """
    body = body or KeyIn()
    ttl_s = body.expires_in_s or provisioner.config.api.provisioning_key_expiry
    expires_ms = now_ms + ttl_s * 1000
    try:
        key_id, key = registry.create_provisioning_key(
            enterprise,
            expires_ms=expires_ms,
            max_uses=body.max_uses,
            allow_rotation=body.allow_rotation,
        )
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    return {
        "key_id": key_id,
        "key": key,
        "enterprise": enterprise,
        "expires_ms": expires_ms,
        "max_uses": body.max_uses,
        "allow_rotation": body.allow_rotation,
    }


@router.post(
    "/api/v1/provision",
    response_model=CredentialsOut,
    responses={
        401: {"model": ErrorOut, "description": "Key unknown, expired or used up."},
        409: {
            "model": ErrorOut,
            "description": "Agent id taken by another enterprise or by the gateway, or "
            "provisioned already (rotation needs an admin or an allow_rotation key).",
        },
        503: {
            "model": ErrorOut,
            "description": "Broker auth files could not be written (the detail names the "
            "file); the key was not used and nothing was registered.",
        },
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
        # Logged and counted by the provisioner; only a valid key's holder gets this far.
        raise HTTPException(
            503,
            f"{exc}. The key was not used and no agent was registered: retry with the "
            "same key once the broker's auth files can be written",
        ) from None
    except RegistryError as exc:
        raise invalid("body", "agent_id", str(exc)) from None


@router.post(
    "/api/v1/agents/{enterprise}/{agent}/rotate",
    response_model=CredentialsOut,
    responses={
        **WRITE_RESPONSES,
        **NOT_FOUND,
        503: {"model": ErrorOut, "description": "Broker auth files could not be updated."},
    },
)
def rotate(
    enterprise: Ident, agent: Ident, request: Request, provisioner: ProvisionerDep
) -> dict[str, Any]:
    """A new MQTT password for an existing agent (admin); the old one stops working."""
    auth: TokenAuth = request.app.state.auth
    caller = auth.configure(request)
    try:
        return provisioner.rotate(enterprise, agent, by=f"admin {caller.token_label}")
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    except ProvisioningError as exc:
        raise HTTPException(
            503, f"{exc}. The agent keeps its current password; retry once the files can be written"
        ) from None


@router.get(
    "/api/v1/enterprises/{enterprise}/agent-rotations",
    response_model=list[RotationOut],
    responses=AUTH_RESPONSES,
    dependencies=[READ],
)
def list_rotations(
    enterprise: Ident, registry: RegistryDep, agent: str | None = QIdent
) -> list[dict[str, Any]]:
    """Who gave which agent new credentials, and when (newest first, at most 1000)."""
    return registry.list_rotations(enterprise, agent)
