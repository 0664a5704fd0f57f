"""Bearer-token authorisation for the HTTP API.

Platform tokens may read; operator tokens may also write to equipment; admin tokens may
read and change everything. Missing or unknown token → 401; a token whose role does not
allow the request → 403. Tokens are compared in constant time against
every configured token, so the time taken does not reveal which one nearly matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from fastapi import HTTPException, Request, status

from gateway.config import ApiConfig

__all__ = ["Caller", "Role", "TokenAuth"]


class Role(StrEnum):
    PLATFORM = "platform"
    OPERATOR = "operator"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: the role and a fingerprint of the token (never the token)."""

    role: Role
    token_label: str


class TokenAuth:
    """Maps a request's bearer token to a role; FastAPI dependencies ``read``/``write``."""

    def __init__(self, config: ApiConfig) -> None:
        self._admin = [t.get_secret_value().encode() for t in config.admin_tokens]
        self._platform = [t.get_secret_value().encode() for t in config.platform_tokens]
        self._operator = [t.get_secret_value().encode() for t in config.operator_tokens]
        self.counters: Counter[str] = Counter()

    def role_of(self, token: str) -> Role | None:
        presented = token.encode("utf-8", errors="replace")
        admin = operator = platform = False
        # No early exit: every configured token is compared every time.
        for known in self._admin:
            admin |= hmac.compare_digest(presented, known)
        for known in self._operator:
            operator |= hmac.compare_digest(presented, known)
        for known in self._platform:
            platform |= hmac.compare_digest(presented, known)
        if admin:
            return Role.ADMIN
        if operator:
            return Role.OPERATOR
        if platform:
            return Role.PLATFORM
        return None

    def _role(self, request: Request) -> Role:
        return self._caller(request).role

    def _caller(self, request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.counters["missing"] += 1
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        role = self.role_of(token.strip())
        if role is None:
            self.counters["unknown"] += 1
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "unknown bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # A short hash names the token in audit records without revealing it.
        label = "sha256:" + hashlib.sha256(token.strip().encode(errors="replace")).hexdigest()[:12]
        return Caller(role, label)

    def read(self, request: Request) -> Role:
        """Dependency: any valid token."""
        return self._role(request)

    def write(self, request: Request) -> Role:
        """Dependency: an admin token."""
        role = self._role(request)
        if role is not Role.ADMIN:
            self.counters["forbidden"] += 1
            raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin token")
        return role

    def operate(self, request: Request) -> Caller:
        """Dependency: an admin or operator token (writes to equipment)."""
        caller = self._caller(request)
        if caller.role not in (Role.ADMIN, Role.OPERATOR):
            self.counters["forbidden"] += 1
            raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin or operator token")
        return caller

    def configure(self, request: Request) -> Caller:
        """Dependency: an admin token, with who presented it."""
        caller = self._caller(request)
        if caller.role is not Role.ADMIN:
            self.counters["forbidden"] += 1
            raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin token")
        return caller
