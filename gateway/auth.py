"""Bearer-token authorisation for the HTTP API.

Platform tokens may read; admin tokens may read and write. Missing or unknown token →
401; a platform token on a write → 403. Tokens are compared in constant time against
every configured token, so the time taken does not reveal which one nearly matched.
"""

from __future__ import annotations

import hmac
from collections import Counter
from enum import StrEnum

from fastapi import HTTPException, Request, status

from gateway.config import ApiConfig

__all__ = ["Role", "TokenAuth"]


class Role(StrEnum):
    PLATFORM = "platform"
    ADMIN = "admin"


class TokenAuth:
    """Maps a request's bearer token to a role; FastAPI dependencies ``read``/``write``."""

    def __init__(self, config: ApiConfig) -> None:
        self._admin = [t.get_secret_value().encode() for t in config.admin_tokens]
        self._platform = [t.get_secret_value().encode() for t in config.platform_tokens]
        self.counters: Counter[str] = Counter()

    def role_of(self, token: str) -> Role | None:
        presented = token.encode("utf-8", errors="replace")
        admin = platform = False
        # No early exit: every configured token is compared every time.
        for known in self._admin:
            admin |= hmac.compare_digest(presented, known)
        for known in self._platform:
            platform |= hmac.compare_digest(presented, known)
        if admin:
            return Role.ADMIN
        if platform:
            return Role.PLATFORM
        return None

    def _role(self, request: Request) -> Role:
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
        return role

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
