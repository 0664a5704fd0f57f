"""The dashboard page and its static files (no token: the page asks for one)."""

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
