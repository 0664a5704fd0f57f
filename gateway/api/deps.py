"""What the API's routers share: auth and state as FastAPI dependencies, parameter types,
error responses and the 422 helpers.

The app keeps its parts in ``app.state`` (see ``create_app``); a router reaches them only
through the dependencies here, so a new router needs nothing but ``app.include_router``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Query, Request

from gateway.api.models import ErrorOut
from gateway.auth import Role, TokenAuth
from gateway.provisioning import Provisioner
from gateway.ratios import parse_as_of, parse_window
from gateway.registry import Registry
from iiot_common.identifier import IDENTIFIER_PATTERN

__all__ = [
    "AUTH_RESPONSES",
    "NOT_FOUND",
    "READ",
    "WRITE",
    "WRITE_RESPONSES",
    "Ident",
    "NowMs",
    "ProvisionerDep",
    "QIdent",
    "RegistryDep",
    "field_of",
    "invalid",
    "parse_time",
    "parse_window_param",
]

Ident = Annotated[str, Path(pattern=IDENTIFIER_PATTERN, max_length=64)]
QIdent = Query(default=None, pattern=IDENTIFIER_PATTERN, max_length=64)

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or unknown bearer token."},
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    403: {"model": ErrorOut, "description": "A platform (read-only) token on a write."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "Unknown."}}


def _auth(request: Request) -> TokenAuth:
    auth: TokenAuth = request.app.state.auth
    return auth


# The dependencies are coroutines though they never wait: FastAPI runs a plain function
# in its thread pool, and each hop to a thread and back costs a request more than the
# work itself when the machine is busy.


async def _require_read(request: Request) -> Role:
    return _auth(request).read(request)


async def _require_write(request: Request) -> Role:
    return _auth(request).write(request)


# Route dependencies: ``dependencies=[READ]`` (any valid token) or ``[WRITE]`` (admin).
READ = Depends(_require_read)
WRITE = Depends(_require_write)


async def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def _provisioner(request: Request) -> Provisioner:
    provisioner: Provisioner = request.app.state.provisioner
    return provisioner


async def _now_ms(request: Request) -> int:
    clock: Callable[[], float] = getattr(request.app.state, "clock", time.time)
    return int(clock() * 1000)


RegistryDep = Annotated[Registry, Depends(_registry)]
ProvisionerDep = Annotated[Provisioner, Depends(_provisioner)]
NowMs = Annotated[int, Depends(_now_ms)]


def invalid(where: str, name: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the field."""
    return HTTPException(
        422, detail=[{"loc": [where, name], "msg": message, "type": "value_error"}]
    )


def parse_window_param(text: str, name: str) -> int:
    """A window query parameter in seconds; 422 naming ``name`` if malformed."""
    try:
        return parse_window(text)
    except ValueError as exc:
        raise invalid("query", name, str(exc)) from None


def parse_time(text: str, name: str) -> int:
    """A time query parameter in Unix ms; 422 naming ``name`` if malformed."""
    try:
        return parse_as_of(text)
    except ValueError as exc:
        raise invalid("query", name, str(exc)) from None


def field_of(message: str) -> str:
    """The request field a registry error message is about."""
    names = ("device_id", "site_region", "region", "kind", "industry", "family", "category")
    # A message that starts with a field's name is about that field, whatever it goes on
    # to mention ("region ...: ... put where it is installed in site_region").
    first = message.split(" ", 1)[0]
    if first in (*names, "agent", "profile", "enterprise", "name"):
        return first
    for name in (*names, "agent", "profile"):
        if name in message:
            return name
    for name in ("enterprise", "name"):
        if name in message:
            return name
    return "body"
