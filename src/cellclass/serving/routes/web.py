"""The web page: ``/`` and its files under ``/static`` (not part of the OpenAPI document)."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).parents[1] / "web"
"""The page's files: ``index.html``, ``app.js`` (Image mode), ``field.js`` (Field mode), ``style.css``."""

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The page: try images, see Grad-CAM, contribute labels."""
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


def static_files() -> StaticFiles:
    """The page's script and style sheet, to mount at ``/static``."""
    return StaticFiles(directory=WEB_DIR)
