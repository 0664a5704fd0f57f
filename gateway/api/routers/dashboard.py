"""The dashboard and control plane pages and their static files (no token: the pages ask)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["router"]

_STATIC = resources.files("gateway") / "static"

router = APIRouter()
router.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    return FileResponse(str(_STATIC / "index.html"), media_type="text/html")


@router.get("/admin", include_in_schema=False)
def admin() -> FileResponse:
    """The control plane page: agents, scans, discovered devices, device pages and writes."""
    return FileResponse(str(_STATIC / "admin.html"), media_type="text/html")
